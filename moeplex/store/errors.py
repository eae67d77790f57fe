"""The store's error type: a store that is missing, incomplete, corrupt, or written by another schema."""

from moeplex.errors import MoeplexError


class StoreError(MoeplexError):
    """A store (or one of its files) cannot be written or read as it is; the message names the file."""
