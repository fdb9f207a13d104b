"""The SSE framing in-process, with a stand-in engine: vLLM's chunk order, and a failure after the headers
becomes an error event followed by ``[DONE]`` (the HTTP status is already 200)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from adapt_runtime.serving.edge.chat import ChatFormat
from adapt_runtime.serving.edge.responses import Generation, respond
from adapt_runtime.serving.edge.schemas import StreamOptions
from adapt_runtime.serving.engine.events import Done, Failed, Finished, PromptScored, Token
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job
from adapt_runtime.serving.metrics import Metrics
from adapt_runtime.serving.sessions.turn import Turn


class ScriptedEngine:
    """Replays a fixed list of events as the engine would report them."""

    def __init__(self, events: list) -> None:
        self.events = events

    async def run(self, job: Job):
        for event in self.events:
            yield event


def _frames(events: list, include_usage: bool) -> list:
    ctx = SimpleNamespace(engine=ScriptedEngine(events), metrics=Metrics(), model_name="m",
                          config=SimpleNamespace(rule="hebbian"), leave=lambda: None)
    job = Job([], 1, SamplingParams(max_tokens=4), True, frozenset(), emit=lambda _: None)
    gen = Generation(ctx, Turn(ctx, None, None, True), job, ChatFormat(None, None), "chat")

    async def collect() -> list[bytes]:
        response = await respond(gen, None, True, StreamOptions(include_usage=include_usage))
        return [chunk async for chunk in response.body_iterator]

    raw = b"".join(asyncio.run(collect())).decode()
    frames = [block.removeprefix("data: ") for block in raw.split("\n\n") if block]
    return [frame if frame == "[DONE]" else json.loads(frame) for frame in frames]


def test_chunks_come_in_vllm_order() -> None:
    events = [PromptScored(0, 3, None), Token(0, 7, "Hel", 0.0, []), Token(0, 8, "lo", 0.0, []),
              Finished(0, "stop", 2), Done()]
    frames = _frames(events, include_usage=True)
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [f["choices"][0]["delta"].get("content") for f in frames[1:3]] == ["Hel", "lo"]
    assert frames[3]["choices"][0]["finish_reason"] == "stop"
    assert frames[4]["choices"] == [] and frames[4]["usage"]["total_tokens"] == 5
    assert all(f["usage"] is None for f in frames[:4])
    assert frames[5] == "[DONE]" and len(frames) == 6


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_a_failure_after_the_headers_is_an_error_event(include_usage: bool) -> None:
    events = [PromptScored(0, 3, None), Token(0, 7, "Hel", 0.0, []), Failed(RuntimeError("boom"))]
    frames = _frames(events, include_usage)
    assert frames[-1] == "[DONE]"
    error = frames[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert not any(isinstance(f, dict) and f.get("choices") == [] for f in frames), "no usage after an error"
