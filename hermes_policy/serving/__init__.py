"""Live streams as a service: ``hermes-probe serve`` (FastAPI + uvicorn). The core runtime never imports this."""

from .app import ServerConfig, create_app, serve_in_background
from .live_stream import LiveStream
from .sources import SourceSpec

__all__ = ["LiveStream", "ServerConfig", "SourceSpec", "create_app", "serve_in_background"]
