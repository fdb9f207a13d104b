"""The OpenAI surface of adapt-serve, through the official ``openai`` client against a real server process."""

from __future__ import annotations

import functools
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from serve_testing import KEY_A, MODEL, TEST_DEVICE, Server

import adapt_runtime as ar

PROMPT = "Once upon a time, there was a little dog named Max. Max liked to"
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a cat and a ball."}]


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian")


def _chat_stream_text(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _completion_stream_text(chunks: list) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_models_lists_the_served_model(server: Server) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_equals_nonstream_at_temperature_zero(server: Server, endpoint: str) -> None:
    client = server.client()
    if endpoint == "chat":
        kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
        whole = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert _chat_stream_text(chunks) == whole.choices[0].message.content
    else:
        kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        whole = client.completions.create(**kwargs)
        chunks = list(client.completions.create(**kwargs, stream=True))
        assert _completion_stream_text(chunks) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None, "finish_reason must be on the last choice chunk"
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_usage_chunk_rules(server: Server, include_usage: bool) -> None:
    client = server.client()
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": include_usage}))
    if not include_usage:
        assert all(c.usage is None for c in chunks)
        assert all(c.choices for c in chunks)
        return
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices == []
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


@pytest.mark.parametrize("prompt_form", ["text", "token-ids"])
def test_echo_logprobs_cover_prompt_and_answer_with_exact_top1(server: Server, prompt_form: str) -> None:
    with server.http() as http:
        ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    prompt = PROMPT if prompt_form == "text" else ids
    n = 3
    out = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                             echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected, best = _prompt_logprobs(ids)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert [max(top.values()) for top in lp.top_logprobs[1 : len(ids)]] == pytest.approx(best, abs=1e-4)
    for value, top in zip(lp.token_logprobs[-n:], lp.top_logprobs[-n:]):
        assert value == max(top.values()), "greedy tokens must carry exactly the top-1 logprob"
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].text.startswith(PROMPT)


@functools.cache
def _runtime() -> Any:
    model, _ = ar.load_model(MODEL, device=TEST_DEVICE)
    return ar.patch(model, rule="hebbian")


def _prompt_logprobs(ids: list[int]) -> tuple[list[float], list[float]]:
    """Each prompt token's logprob and the best logprob at its position, computed here with the runtime (a
    stateless request reads its prompt into a fresh state, writing as it reads)."""
    rt = _runtime()
    with torch.no_grad():
        lp = torch.log_softmax(rt.forward(ids, rt.new_state())[0, :-1].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0]
    return chosen.tolist(), lp.max(dim=-1).values.tolist()


def test_prompt_lists_and_n_give_one_choice_each(server: Server) -> None:
    prompts = ["The sun was", "A big red"]
    out = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0.8, n=2,
                                             seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    singles = [server.client().completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
               for p in prompts]
    with server.http() as http:
        lengths = [len(http.post("/tokenize", json={"prompt": p}).json()["tokens"]) for p in prompts]
    assert out.usage.prompt_tokens == sum(lengths)
    assert all(s.choices[0].finish_reason == "length" for s in singles)


def test_stop_string_cuts_the_text_in_both_modes(server: Server) -> None:
    client = server.client()
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    words = re.findall(r"[a-z]{3,}", free)
    assert words, free
    stop = words[min(2, len(words) - 1)]
    expected = free[: free.index(stop)]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    whole = client.completions.create(**kwargs)
    streamed = _completion_stream_text(list(client.completions.create(**kwargs, stream=True)))
    assert whole.choices[0].text == expected == streamed
    assert whole.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    client = server.client()
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"top_k": 40})
    first = client.completions.create(**kwargs).choices[0].text
    again = client.completions.create(**kwargs).choices[0].text
    streamed = _completion_stream_text(list(client.completions.create(**kwargs, stream=True)))
    assert first == again == streamed


def test_max_tokens_ends_with_length(server: Server) -> None:
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5


def test_presence_penalty_reduces_repeats(server: Server) -> None:
    client = server.client()
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0].logprobs.tokens
    presence = client.completions.create(**kwargs, presence_penalty=2.0).choices[0].logprobs.tokens
    both = client.completions.create(**kwargs, presence_penalty=2.0,
                                     frequency_penalty=2.0).choices[0].logprobs.tokens

    def repeats(tokens: list[str]) -> int:
        return sum(c - 1 for c in Counter(tokens).values())

    assert repeats(plain) > 0, "the probe needs a greedy text with repeated tokens"
    assert presence != plain and repeats(presence) <= repeats(plain)
    assert repeats(both) < repeats(plain)


def test_stateless_requests_keep_nothing(server: Server) -> None:
    client = server.client()
    kwargs = dict(model=MODEL, prompt=PROMPT * 3, max_tokens=12, temperature=0, logprobs=1)
    first = client.completions.create(**kwargs).choices[0].logprobs.token_logprobs
    second = client.completions.create(**kwargs).choices[0].logprobs.token_logprobs
    assert first == second


def test_tokenize_detokenize_and_tokenizer_info(server: Server) -> None:
    with server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        info = http.get("/tokenizer_info").json()
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert text == PROMPT
    assert info["vocab_size"] > max(tokens["tokens"])
    assert info["model_max_length"] == tokens["max_model_len"]
    whole = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == whole.usage.prompt_tokens


def test_concurrent_requests_decode_together_and_match_sequential(server: Server) -> None:
    client = server.client()
    prompts = [f"{PROMPT} {word}" for word in ("run", "jump", "sing", "eat", "play", "swim", "read", "hide")]

    def run(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    sequential = [run(p) for p in prompts]
    before = _batch_histogram(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(run, prompts))
    after = _batch_histogram(server)
    assert concurrent == sequential
    rows = after["sum"] - before["sum"]
    steps = after["count"] - before["count"]
    assert rows / steps > 1.5, "concurrent decodes should share model steps"


def _batch_histogram(server: Server) -> dict[str, float]:
    with server.http() as http:
        text = http.get("/metrics").text
    found = {}
    for kind in ("sum", "count"):
        match = re.search(rf"^adapt_serve:decode_batch_size_{kind} (\S+)$", text, re.M)
        found[kind] = float(match.group(1)) if match else 0.0
    return found


def test_metrics_carry_no_session_or_key(server: Server) -> None:
    sid = server.new_session()
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_headers={"X-Session-ID": sid})
    with server.http() as http:
        text = http.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "generation_tokens_total", "prompt_tokens_total", "sessions", "num_requests_running"):
        assert f"adapt_serve:{name}" in text
    assert sid not in text and "sess_" not in text and KEY_A not in text
