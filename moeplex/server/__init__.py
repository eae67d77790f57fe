"""The OpenAI-compatible HTTP server over the engine, with Prometheus metrics."""

from moeplex.server.app import ServerSettings, create_app
from moeplex.server.serve import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]
