"""Per-session memory: a session that read a text scores it better with no context; other sessions do not
change by a single bit. Run for the Hebbian (error target) and the gradient rule on the bundled model.

The rules run at their defaults: one pass over this 139-token text lowers its NLL by about a third (measured
with the runtime directly: hebbian -31.7%, gradient -34.9%); the check asks for 20%.
"""

from __future__ import annotations

import json

import pytest
from serve_testing import MODEL, Server

TEXT = ("The old lighthouse keeper counted seventeen gulls on the red roof every morning, and he wrote each "
        "number in a green notebook that smelled of salt and pepper. One windy Tuesday a purple kite landed "
        "beside the lamp, carrying a note from a girl named Odile.")
RULES = {"hebbian": {}, "gradient": {}}  # the runtime defaults


@pytest.fixture(scope="module", params=sorted(RULES))
def server(launch, request) -> Server:
    return launch("--rule", request.param, "--rule-config", json.dumps(RULES[request.param]))


def score(server: Server, sid: str | None, text: str = TEXT) -> list[float]:
    """Per-token logprobs of ``text`` read with no context, under the session's fast weights, writing nothing."""
    headers = {"X-Session-ID": sid} if sid else None
    out = server.client().completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0,
                                             temperature=0, extra_headers=headers, extra_body={"adapt": False})
    return out.choices[0].logprobs.token_logprobs[1:]


def nll(logprobs: list[float]) -> float:
    return -sum(logprobs) / len(logprobs)


def read(server: Server, sid: str, text: str = TEXT) -> None:
    server.client().completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0,
                                       extra_headers={"X-Session-ID": sid})


def test_a_session_remembers_what_it_read(server: Server) -> None:
    reader, fresh = server.new_session(), server.new_session()
    read(server, reader)
    before, after = nll(score(server, fresh)), nll(score(server, reader))
    assert after <= 0.8 * before, f"NLL {before:.3f} -> {after:.3f}: less than a 20% drop"


def test_scoring_without_adapt_changes_nothing(server: Server) -> None:
    sid = server.new_session()
    read(server, sid)
    assert score(server, sid) == score(server, sid)


def test_other_sessions_are_bit_identical_after_one_adapts(server: Server) -> None:
    a, b = server.new_session(), server.new_session()
    probe = "Max the dog found a shiny stone near the pond and showed it to his mother."
    base = score(server, b, probe)
    read(server, a)
    read(server, a, probe)
    assert score(server, b, probe) == base
    assert score(server, None, probe) == base, "a fresh session must be the base model"
    assert score(server, a, probe) != base
