"""The app in-process (ASGI, no socket): large prompts are tokenised off the event loop, and ``/health`` reports
the model thread (503 once it is gone); the GPU image runs the model on the GPU."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.context import OFF_LOOP_CHARS, ServerContext
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.server import create_context
from serve_testing import TEST_DEVICE

LARGE = "Once upon a time there was a dog. " * (OFF_LOOP_CHARS // 20)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, ServerContext]]:
    ctx = create_context(ServerConfig(rule="hebbian", device=TEST_DEVICE))  # ADAPT_TEST_DEVICE=cuda: on the GPU
    try:
        yield build_app(ctx), ctx
    finally:
        ctx.engine.close()
        shutil.rmtree(ctx.store.files.root, ignore_errors=True)


def _calls(app: Any, requests: list[tuple[str, str, dict | None]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return [await http.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(go())


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"prompt": LARGE}),
    ("/tokenize", {"messages": [{"role": "user", "content": LARGE}]}),
    ("/v1/completions", {"prompt": LARGE, "max_tokens": 1}),
    ("/v1/completions", {"prompt": ["Hi", LARGE], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LARGE}], "max_tokens": 1}),
    ("/v1/sessions/doc/read", {"text": LARGE}),
], ids=["tokenize", "tokenize-chat", "completion", "completion-list", "chat", "read"])
def test_large_prompts_are_tokenised_off_the_event_loop(served: tuple[Any, ServerContext], path: str, body: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app, ctx = served
    tokenizer = ctx.engine.tokenizer
    threads: list[threading.Thread] = []
    real = tokenizer.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        if len(text) >= len(LARGE):
            threads.append(threading.current_thread())
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    loop_thread = threading.current_thread()  # asyncio.run runs the loop in this thread
    (response,) = _calls(app, [("POST", path, body)])
    assert response.status_code in (200, 400), response.text  # a prompt past the context is 400, after tokenising
    assert threads, "the large prompt was never tokenised"
    assert all(t is not loop_thread for t in threads), "a large prompt was tokenised on the event loop"


def test_small_prompts_stay_inline_and_correct(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    (response,) = _calls(app, [("POST", "/tokenize", {"prompt": "Once upon a time"})])
    assert response.json()["tokens"] == ctx.engine.tokenizer.encode("Once upon a time")


def test_health_is_503_once_the_model_thread_is_gone(served: tuple[Any, ServerContext]) -> None:
    app, ctx = served
    (alive,) = _calls(app, [("GET", "/health", None)])
    assert alive.status_code == 200
    ctx.engine.scheduler.close()
    (gone,) = _calls(app, [("GET", "/health", None)])
    assert gone.status_code == 503
    assert gone.json()["error"]["code"] == "model_unavailable"


def test_the_gpu_image_serves_on_the_gpu() -> None:
    dockerfile = Path(__file__).resolve().parents[2] / "Dockerfile"
    (cmd,) = [line for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")]
    args = json.loads(cmd.removeprefix("CMD "))
    assert args[args.index("--device") + 1] == "cuda"
