"""Live streams as a service: ``hermes-probe serve`` (FastAPI + uvicorn). The core runtime never imports this."""

from hermes_policy.serving.app import ServerConfig, create_app, serve_in_background
from hermes_policy.serving.live_stream import LiveStream
from hermes_policy.serving.sources import SourceSpec

__all__ = ["LiveStream", "ServerConfig", "SourceSpec", "create_app", "serve_in_background"]
