"""From a ServerConfig to a running server: load and patch the model, open the session store, run uvicorn."""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.context import ServerContext
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.edge.chat_template import ChatTemplate
from adapt_runtime.serving.edge.header_deadline import with_header_timeout
from adapt_runtime.serving.engine.native import Engine
from adapt_runtime.serving.metrics import Metrics
from adapt_runtime.serving.sessions.files import SessionFiles, decode_state
from adapt_runtime.serving.sessions.local_store import SessionStore

import adapt_runtime as ar

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.interface import EngineProtocol
    from adapt_runtime.serving.sessions.store import SessionStoreProtocol
    from transformers import PreTrainedTokenizerBase

    from adapt_runtime.runtime import Runtime

log = logging.getLogger("adapt_serve")
SWITCH_INTERVAL_S = 0.0005


def create_context(config: ServerConfig,
                   make_store: Callable[[Runtime, Callable[[str], None]], SessionStoreProtocol] | None = None
                   ) -> ServerContext:
    """Load the model, patch it with the rule, and open the session store (restoring persisted sessions).
    ``make_store(runtime, on_event)``, when given, builds the session store instead (the cluster mode's)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    # the model thread runs Python between kernels; a short switch interval lets the event loop stream
    # tokens while a step runs instead of waiting up to 5 ms for the GIL
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    model, tokenizer = ar.load_model(config.model, dtype=config.dtype, device=config.device)
    runtime = ar.patch(model, rule=config.rule, **config.patch_options)
    metrics = Metrics()
    engine = make_engine(config, runtime, tokenizer, metrics)
    persistent = config.session_dir is not None

    def on_event(event: str) -> None:
        metrics.session_events.labels(event=event).inc()

    if make_store is not None:
        template = ChatTemplate(tokenizer, Path(config.chat_template) if config.chat_template else None)
        return ServerContext(config, engine, make_store(runtime, on_event), metrics, template)
    root = config.session_dir if config.session_dir is not None else Path(
        tempfile.mkdtemp(prefix="adapt-serve-sessions-"))
    store = SessionStore(
        new_state=runtime.new_state,
        load_state=lambda data: decode_state(data, runtime),
        files=SessionFiles(Path(root)),
        budget=config.session_memory_budget,
        max_sessions=config.max_sessions,
        ttl=config.session_ttl,
        persistent=persistent,
        on_event=on_event,
        max_per_owner=config.session_quota,
    )
    restored = store.restore()
    template_file = Path(config.chat_template) if config.chat_template else None
    ctx = ServerContext(config, engine, store, metrics, ChatTemplate(tokenizer, template_file))
    log.info("model %s, rule %s, max length %d, %d sessions restored from %s%s", config.model, config.rule,
             engine.max_len, restored, root, "" if persistent else " (temporary: spill only)")
    return ctx


def make_engine(config: ServerConfig, runtime: Runtime, tokenizer: PreTrainedTokenizerBase,
                metrics: Metrics) -> EngineProtocol:
    """The engine ``--engine`` names: the native scheduler, or vLLM generating with the runtime learning."""
    if config.engine == "vllm":
        from adapt_runtime.serving.engine.vllm_engine import VllmEngine

        from adapt_runtime.models import resolve_model_name

        return VllmEngine(runtime, tokenizer, resolve_model_name(config.model), config.max_model_len,
                          on_step=metrics.on_step, prefill_chunk=config.prefill_chunk,
                          max_loras=config.vllm_max_loras, max_num_seqs=config.max_concurrent_requests,
                          options=config.vllm_options, url=config.vllm_url, adapter_dir=config.vllm_adapter_dir)
    return Engine(runtime, tokenizer, config.max_model_len, on_step=metrics.on_step,
                  prefill_chunk=config.prefill_chunk)


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Build the app and serve it until interrupted."""
    import uvicorn

    app = build_app(create_context(config))
    if not config.api_keys:
        log.warning("no --api-key given: every route is open to anyone who can reach %s:%d", config.host,
                    config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=10,
                http=with_header_timeout(config.read_timeout))
