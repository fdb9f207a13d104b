"""``build_app``: the FastAPI application (routes, error envelope, guard) around a ServerContext."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from adapt_runtime.serving.context import ServerContext, describe_runtime, off_loop, text_size
from adapt_runtime.serving.edge.adapter_routes import is_adapter_route
from adapt_runtime.serving.edge.adapter_routes import router as adapter_router
from adapt_runtime.serving.edge.chat import chat_prompt, create_chat_completion
from adapt_runtime.serving.edge.completions import create_completion
from adapt_runtime.serving.edge.errors import APIError, install_error_handlers
from adapt_runtime.serving.edge.guard import ApiKeys, Guard
from adapt_runtime.serving.edge.read_routes import router as read_router
from adapt_runtime.serving.edge.requests import ctx_of
from adapt_runtime.serving.edge.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from adapt_runtime.serving.edge.session_routes import is_state_route
from adapt_runtime.serving.edge.session_routes import router as session_router
from adapt_runtime.serving.sessions.local_store import SessionStore
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime

log = logging.getLogger("adapt_serve")
router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> dict:
    """200 while the model thread runs; 503 once it is gone (every generation would hang)."""
    if not ctx_of(request).engine.alive:
        raise APIError(503, "the model thread is not running; restart the server", "model_unavailable")
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(ctx_of(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request) -> dict:
    ctx = ctx_of(request)
    card = {
        "id": ctx.model_name,
        "object": "model",
        "created": int(ctx.started_at),
        "owned_by": "adapt-runtime",
        "root": ctx.config.model,
        "max_model_len": ctx.engine.max_len,
        "metadata": {"rule": ctx.config.rule, "runtime": describe_runtime(ctx.engine.rt)},
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await create_completion(ctx_of(request), request, body)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await create_chat_completion(ctx_of(request), request, body)


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeRequest) -> dict:
    ctx = ctx_of(request)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt or messages", "invalid_request", "prompt")
    if body.messages is not None:
        ids = await off_loop(text_size(body.messages), chat_prompt, ctx, body.messages, True)
    else:
        text = body.prompt or ""
        ids = await off_loop(len(text), ctx.engine.encode, text, body.add_special_tokens)
    pieces = [ctx.engine.detok.piece(i) for i in ids]
    return {"count": len(ids), "max_model_len": ctx.engine.max_len, "tokens": ids, "token_strs": pieces}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeRequest) -> dict:
    ctx = ctx_of(request)
    ctx.check_model(body.model)
    ids = ctx.engine.check_ids(body.tokens, "tokens")
    return {"prompt": ctx.engine.detok.decode(ids)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    ctx = ctx_of(request)
    tok = ctx.engine.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": ctx.engine.vocab_size,
        "model_max_length": ctx.engine.max_len,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": list(ctx.engine.eos_ids),
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "chat_template": ctx.template.jinja,
        "chat_template_kind": ctx.template.kind,
    }


def _state_bytes_bound(rt: Runtime) -> int:
    """An upper bound on an exported state: S, a full KV cache in float32, the pending chunk, and slack."""
    s_bytes = sum(d * f * 8 for d, f in rt.state_spec.shapes)
    cfg = rt.model.config
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    kv = cfg.num_hidden_layers * 2 * kv_heads * head_dim * rt.max_length * 4
    return 2 * (s_bytes + kv) + 8 * 2**20


async def _reaper(ctx: ServerContext) -> None:
    period = max(1.0, min(ctx.config.session_ttl / 4, 60.0))
    while True:
        await asyncio.sleep(period)
        try:
            await ctx.store.reap()
        except Exception:  # noqa: BLE001 - the reaper must survive a bad file
            log.exception("session reaper failed")


def build_app(ctx: ServerContext) -> Guard:
    """The ASGI application: the guard (keys, body limit) around FastAPI."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(_reaper(ctx))
        try:
            yield
        finally:
            reaper.cancel()
            if ctx.store.persistent:
                await ctx.store.flush()
            elif isinstance(ctx.store, SessionStore):  # spill files only: gone with the server
                shutil.rmtree(ctx.store.files.root, ignore_errors=True)
            ctx.engine.close()

    app = FastAPI(title="adapt-serve", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible server with per-session fast-weight memory")
    app.state.ctx = ctx
    app.state.started = time.time()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(session_router)
    app.include_router(adapter_router)
    app.include_router(read_router)
    ctx.metrics.watch_sessions(ctx.store.counts, ctx.store.resident_bytes)
    state_limit = max(ctx.config.max_request_bytes, _state_bytes_bound(ctx.engine.rt))

    def binary_body(path: str) -> bool:
        return is_state_route(path) or is_adapter_route(path)

    def body_limit(path: str) -> int:
        return state_limit if binary_body(path) else ctx.config.max_request_bytes

    return Guard(app, ApiKeys(ctx.config.api_keys), body_limit, read_timeout=ctx.config.read_timeout,
                 send_timeout=ctx.config.send_timeout, json_body=lambda path: not binary_body(path))
