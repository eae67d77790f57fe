"""Exception types that carry a message meant for the user (file, key, what to do)."""


class MoeplexError(Exception):
    """Base class for errors that the CLI prints without a traceback."""


class CheckpointError(MoeplexError):
    """A checkpoint folder is missing, incomplete, or does not match its config."""


class UnsupportedModelError(MoeplexError):
    """The checkpoint's architecture or one of its options is not supported."""


class ExpertReadError(MoeplexError):
    """An expert's weights could not be read from its file; the message names the file and the expert."""
