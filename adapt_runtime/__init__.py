"""adapt-runtime: plastic down_proj fast weights for pretrained decoder LLMs."""

__version__ = "0.1.0"
