"""The OpenAI edge: everything that speaks HTTP, and nothing else does.

It owns the FastAPI app (``app``), the ASGI guard (API keys, body limits: ``guard``), the header deadline uvicorn runs
(``header_deadline``), the request schemas (``schemas``), the routes (``completions``, ``chat``, ``read_routes``,
``session_routes``, ``adapter_routes``), the chat template, the streaming of engine events as OpenAI responses
(``responses``, framed by ``sse``) and the error envelope with the one table from domain errors to status codes
(``errors``). A route resolves what the request names (its principal, its session), then calls the engine
(``ServerContext.engine``, an ``engine.interface.EngineProtocol``) and the sessions (``ServerContext.store``, a
``sessions.store.SessionStoreProtocol``) through their interfaces only.
"""
