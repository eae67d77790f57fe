"""The OpenAI-compatible HTTP server over the engine, with Prometheus metrics.

Names are imported on first use, so `moeplex.server.options` (argparse only) stays light for the CLI.
"""

_EXPORTS = {
    "ServerSettings": "moeplex.server.app",
    "create_app": "moeplex.server.app",
    "BackgroundServer": "moeplex.server.serve",
    "serve": "moeplex.server.serve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeplex.server' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
