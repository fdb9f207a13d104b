"""The chaos oracle: a session's commit history is linear, every committed version is loadable, and each version
equals its turn replayed on one single-process server from the version before it; no acknowledged turn is missing
(0 lost commits).

A client records every turn it sent: ``acked`` (200 with the state committed), ``rejected`` (409 before the turn
started: never committed) or ``uncertain`` (cut stream, replica lost: it may or may not have committed). The
replay runs the turns in order on one in-process single-process server; an uncertain turn whose replay does not
match the next committed version is taken as not committed and undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from adapt_runtime.serving.config import ServerConfig
from adapt_runtime.serving.edge.app import build_app
from adapt_runtime.serving.server import create_context
from safetensors.torch import load


@dataclass
class TurnRecord:
    prompt: str
    outcome: str  # acked | rejected | uncertain
    replica: str | None = None


@dataclass
class History:
    sid: str
    turns: list[TurnRecord] = field(default_factory=list)

    def record(self, prompt: str, response: httpx.Response | None) -> TurnRecord:
        if response is None:
            outcome = "uncertain"
        elif response.status_code == 200:
            outcome = "acked" if response.json().get("adaptation", {}).get("committed") else "uncertain"
        elif response.status_code == 409 and response.json()["error"]["code"] == "session_busy":
            outcome = "rejected"
        else:
            outcome = "uncertain"
        replica = None if response is None else response.headers.get("x-replica-id")
        turn = TurnRecord(prompt, outcome, replica)
        self.turns.append(turn)
        return turn


# The delta form's retrieval record (``pending.retrieved.<layer>``, ``S x`` of the pending positions) is kept where
# the forward formed ``S x`` apart: rows decoded in a batch record it, a row decoded alone (``W0 + S`` merged) does
# not. Either way the next write is the same to float rounding (tests/core/test_retrieval.py), so two states that
# differ only by the record are the same state; every other tensor is compared.
RECORD = "pending.retrieved."


def same_state(a: bytes, b: bytes) -> bool:
    ta, tb = ({k: v for k, v in load(x).items() if not k.startswith(RECORD)} for x in (a, b))
    if ta.keys() != tb.keys() or not torch.equal(ta["tokens"], tb["tokens"]):
        return False
    return all(torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-4, atol=1e-5) for k in ta)


class Replay:
    """A single-process adapt-serve in this process (no lifespan, so nothing but the model thread runs)."""

    def __init__(self, max_tokens: int) -> None:
        from starlette.testclient import TestClient

        self.max_tokens = max_tokens
        self.ctx = create_context(ServerConfig(model="llama", threads=1))
        self.client = TestClient(build_app(self.ctx))

    def state(self, sid: str) -> bytes:
        return self.client.get(f"/v1/sessions/{sid}/state").content

    def turn(self, sid: str, prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        response = self.client.post("/v1/completions", json=body, headers={"X-Session-ID": sid})
        assert response.status_code == 200, response.text

    def close(self) -> None:
        self.ctx.engine.close()


def check(states: Any, replay: Replay, history: History, owner: str = "anonymous") -> dict[str, int]:
    """Assert the oracle for one session; returns its counts (commits, acked, uncertain, lost, forks)."""
    key = f"{owner}/{history.sid}"
    log = states.log(key)
    forks = sum(1 for i, c in enumerate(log) if c.base != i or c.head.version != i + 1)
    assert forks == 0, f"{history.sid}: commit history is not linear: {log}"
    acked = sum(t.outcome == "acked" for t in history.turns)
    uncertain = sum(t.outcome == "uncertain" for t in history.turns)
    assert acked <= len(log) <= acked + uncertain, (history.sid, len(log), acked, uncertain)
    rsid = f"replay-{history.sid}"
    candidates = [t for t in history.turns if t.outcome != "rejected"]
    position = 0
    for commit in log:
        blob = states.load(key, commit.head)
        while True:
            assert position < len(candidates), f"{history.sid}: version {commit.head.version} matches no turn"
            turn = candidates[position]
            position += 1
            before = replay.state(rsid) if position > 1 else None
            replay.turn(rsid, turn.prompt)
            if same_state(replay.state(rsid), blob):
                # the next turn starts from the committed version itself: each commit must be its turn applied to
                # the commit before it (a serial replay chain would carry batched-vs-alone float differences from
                # turn to turn until a greedy near-tie flips a token)
                restored = replay.client.put(f"/v1/sessions/{rsid}/state", content=blob)
                assert restored.status_code < 300, restored.text
                break
            assert turn.outcome == "uncertain", f"{history.sid}: acked turn {turn} is not version {commit.head}"
            if before is None:
                replay.client.delete(f"/v1/sessions/{rsid}")
            else:
                replay.client.put(f"/v1/sessions/{rsid}/state", content=before)
    lost = sum(t.outcome == "acked" for t in candidates[position:])
    assert lost == 0, f"{history.sid}: {lost} acknowledged turns are not in the commit history"
    return {"commits": len(log), "acked": acked, "uncertain": uncertain, "lost": lost, "forks": forks}
