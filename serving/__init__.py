"""adapt-serve: an OpenAI-compatible streaming server with per-session fast-weight memory.

    from adapt_runtime.serving import ServerConfig, build_app, create_context
    app = build_app(create_context(ServerConfig(model="llama", rule="hebbian")))

The command line is ``adapt-serve`` (``adapt_runtime.serving.cli``).
"""

from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.server import create_context, serve

__all__ = ["ServerConfig", "build_app", "create_context", "serve"]
