"""``adapt-serve --engine vllm`` against the native engine and the runtime, through the HTTP API.

Runs where vLLM is installed (CI's vLLM virtual environment: ``python -m pytest tests/vllm``); skipped elsewhere.
Two servers on the same random-init Llama (head_dim 64, which vLLM's CPU attention takes), the same rule and
rank-16 states: the native engine and the vLLM engine. The checks:

* learning: the state a vLLM-engine turn commits is the state the runtime reaches reading the turn's prompt and
  completion (all but its last token), and the native engine given the same tokens commits the same state;
* equivalence: for the same session history, an ``"adapt": false`` echo request scores the prompt (the runtime's
  read on both engines) and the completion (vLLM with the session's adapter against the native decode) alike, to
  1e-3 nats in float32 on CPU, and greedily picks the same tokens;
* isolation: 8 sessions taking turns at once each end where they end alone, and their concurrent adapter reads
  score as they do one at a time;
* restarts: a vLLM engine that dies is restarted (requests meanwhile answer 503 with Retry-After) and every session
  keeps its memory; the sessions also survive a kill -9 of the whole server;
* refusal: ``--engine vllm`` with dense states exits at once with a one-line reason.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import httpx  # noqa: E402
import torch  # noqa: E402
from adapt_runtime.serving.launch import ServerProcess  # noqa: E402
from vllm_testing import make_model  # noqa: E402

import adapt_runtime as ar  # noqa: E402

RULE_CONFIG = {"chunk_size": 16, "layers": "all", "norm_bound": 0}
RANK = 16
TOLERANCE = 1e-3  # nats (the bound); float32, vLLM's kernels against the runtime's
STATE_TOLERANCE = 1e-5  # relative, on S = B A: the same reads, cut into other pieces
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play with her ball in the park.",
    "Tom had a big red truck. Every day he drove it to the sand box and built a tall castle.",
    "The cat sat on the mat and looked at the bird. The bird sang a happy song in the tall tree.",
    "Sue wanted to bake a cake for her mom. She got eggs, milk and flour from the kitchen.",
    "A small boat sailed on the blue sea. The sun was warm and the fish jumped in the waves.",
    "Ben found a shiny key under a rock. He wondered which door it would open in the old house.",
    "Mia and her dog ran up the green hill. At the top they saw the whole town below them.",
    "The old man planted a seed in his garden. He gave it water every day until it grew tall.",
]
PROBE = "One day, the little girl saw a big dog in the park. The dog was sad because"


def serve_args(model: Path, engine: str, *extra: str) -> list[str]:
    return ["--model", str(model), "--rule", "hebbian", "--rule-config", json.dumps(RULE_CONFIG),
            "--state-rank", str(RANK), "--threads", "1", "--engine", engine, "--log-level", "warning", *extra]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vllm-engine") / "model"
    make_model(folder)
    return folder


@pytest.fixture(scope="module")
def runtime(model: Path) -> tuple[ar.Runtime, object]:
    loaded, tokenizer = ar.load_model(str(model))
    return ar.patch(loaded, rule="hebbian", state_rank=RANK, **RULE_CONFIG), tokenizer


@pytest.fixture(scope="module")
def native(model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("native") / "serve.log"
    server = ServerProcess(serve_args(model, "native"), log_path=log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("vllm")
    server = ServerProcess(serve_args(model, "vllm", "--session-dir", str(work / "sessions")),
                           log_path=work / "serve.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=600)
    yield server
    server.stop()


def complete(server: ServerProcess, session: str | None, prompt: str | list[int], **body: object) -> dict:
    headers = {"X-Session-ID": session} if session else {}
    request = {"prompt": prompt, "temperature": 0.0, **body}
    response = httpx.post(f"{server.url}/v1/completions", json=request, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def state_of(server: ServerProcess, session: str, rt: ar.Runtime) -> ar.FastWeights:
    response = httpx.get(f"{server.url}/v1/sessions/{session}/state", timeout=60)
    assert response.status_code == 200, response.text
    return ar.state_from_bytes(response.content, rt)


def memory(state: ar.FastWeights) -> dict[int, torch.Tensor]:
    """Each plastic layer's S = B A, float64."""
    return {layer: (B.double() @ A.double()) for layer, (B, A) in state.factors.items()}


def assert_same_memory(got: ar.FastWeights, want: ar.FastWeights) -> None:
    assert got.tokens_seen == want.tokens_seen
    assert got.writes == want.writes
    a, b = memory(got), memory(want)
    assert a.keys() == b.keys() and a
    for layer in a:
        scale = float(b[layer].norm())
        assert scale > 0
        assert float((a[layer] - b[layer]).norm()) <= STATE_TOLERANCE * scale, layer


def runtime_reading(rt: ar.Runtime, tokens: list[int]) -> ar.FastWeights:
    state = rt.new_state()
    rt.forward(tokens, state)
    return state


def same_history(servers: tuple[ServerProcess, ServerProcess], session: str, texts: list[str],
                 runtime: tuple[ar.Runtime, object]) -> list[int]:
    """The texts read by ``session`` on both servers, one token generated per turn (so the history is the prompts
    alone, the same on both); both commit the same memory. Returns the history's tokens."""
    rt, tokenizer = runtime
    history: list[int] = []
    for text in texts:
        history += tokenizer(text).input_ids
        for server in servers:
            complete(server, session, history, max_tokens=1)
    assert_same_memory(state_of(servers[0], session, rt), state_of(servers[1], session, rt))
    return history


def probe_scores(servers: tuple[ServerProcess, ServerProcess], session: str, tokenizer) -> list[dict]:
    """Each server's echo logprobs of ``PROBE`` and its 6 greedy tokens, ``"adapt": false`` in ``session``."""
    probe = tokenizer(PROBE).input_ids
    return [complete(server, session, probe, max_tokens=6, echo=True, logprobs=3, adapt=False)["choices"][0]
            ["logprobs"] for server in servers]


def test_a_turn_learns_its_prompt_and_completion_as_the_runtime_and_the_native_engine_do(
        vllm_server, native, runtime) -> None:
    rt, tokenizer = runtime
    turn = complete(vllm_server, "learn", TEXTS[0], max_tokens=8)
    assert turn["usage"]["completion_tokens"] == 8
    got = state_of(vllm_server, "learn", rt)
    prompt = tokenizer(TEXTS[0]).input_ids
    assert got.tokens[: len(prompt)] == prompt
    assert len(got.tokens) == len(prompt) + 7  # the completion but its last token, as the native engine leaves it
    assert_same_memory(got, runtime_reading(rt, got.tokens))
    complete(native, "learn", got.tokens, max_tokens=1)  # the same tokens through the native engine
    assert_same_memory(state_of(native, "learn", rt), got)


def test_the_same_history_scores_alike_on_both_engines(vllm_server, native, runtime) -> None:
    rt, tokenizer = runtime
    history = same_history((vllm_server, native), "history", TEXTS[:3], runtime)
    scored = probe_scores((vllm_server, native), "history", tokenizer)
    fresh = complete(native, None, tokenizer(PROBE).input_ids, max_tokens=6, echo=True, logprobs=3, adapt=False)
    assert scored[0]["tokens"] == scored[1]["tokens"]  # the same greedy completion
    got, want, base = (torch.tensor(s["token_logprobs"][1:], dtype=torch.float64)
                       for s in (*scored, fresh["choices"][0]["logprobs"]))
    assert float((got - want).abs().max()) <= TOLERANCE
    assert float((want - base).abs().max()) > 100 * TOLERANCE  # the memory does move the scores
    for top_got, top_want in zip(scored[0]["top_logprobs"][1:], scored[1]["top_logprobs"][1:], strict=True):
        for token, value in top_want.items():
            if token in top_got:
                assert abs(top_got[token] - value) <= TOLERANCE
    after = state_of(vllm_server, "history", rt)
    assert after.tokens_seen == len(history) and after.writes == state_of(native, "history", rt).writes


def test_sessions_taking_turns_at_once_end_as_they_do_alone(vllm_server, runtime) -> None:
    rt, tokenizer = runtime
    sessions = [f"iso-{i}" for i in range(len(TEXTS))]
    with ThreadPoolExecutor(len(sessions)) as pool:
        list(pool.map(lambda pair: complete(vllm_server, pair[0], pair[1], max_tokens=6), zip(sessions, TEXTS)))
    states = [state_of(vllm_server, sid, rt) for sid in sessions]
    for state, text in zip(states, TEXTS):
        assert state.tokens[: len(tokenizer(text).input_ids)] == tokenizer(text).input_ids
        assert_same_memory(state, runtime_reading(rt, state.tokens))
    probe = tokenizer(PROBE).input_ids

    def score(sid: str) -> list[float]:
        answer = complete(vllm_server, sid, probe, max_tokens=4, echo=True, logprobs=1, adapt=False)
        return answer["choices"][0]["logprobs"]["token_logprobs"][1:]

    with ThreadPoolExecutor(len(sessions)) as pool:
        together = list(pool.map(score, sessions))
    alone = [score(sid) for sid in sessions]
    for a, b in zip(together, alone):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-4
    assert len({round(a[-1], 4) for a in alone}) > 1  # each session scored with its own memory


def test_a_stream_an_adapt_false_turn_and_a_stop_string(vllm_server, runtime) -> None:
    rt, tokenizer = runtime
    complete(vllm_server, "stream", TEXTS[1], max_tokens=4)
    before = state_of(vllm_server, "stream", rt)
    complete(vllm_server, "stream", TEXTS[2], max_tokens=4, adapt=False)
    assert_same_memory(state_of(vllm_server, "stream", rt), before)  # an adapt: false turn keeps nothing
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", headers={"X-Session-ID": "stream"}, timeout=300,
                      json={"prompt": TEXTS[1], "max_tokens": 5, "temperature": 0.0, "stream": True}) as response:
        frames = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(frame[6:]) for frame in frames[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    full = complete(vllm_server, None, TEXTS[1], max_tokens=12, adapt=False)["choices"][0]["text"]
    stop = next(ch for ch in full[1:] if ch.isascii() and ch.isalnum())  # a whole character the text holds
    cut = complete(vllm_server, None, TEXTS[1], max_tokens=12, adapt=False, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]
    assert text


def test_a_dead_vllm_engine_is_restarted_and_loses_no_session(vllm_server, runtime) -> None:
    import psutil

    rt, tokenizer = runtime
    complete(vllm_server, "survivor", TEXTS[5], max_tokens=4)
    before = state_of(vllm_server, "survivor", rt)
    children = psutil.Process(vllm_server.proc.pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join(p.cmdline())]
    assert cores
    for process in cores:
        process.kill()
    statuses, deadline = [], time.monotonic() + 600
    while True:
        response = httpx.post(f"{vllm_server.url}/v1/completions", headers={"X-Session-ID": "survivor"}, timeout=300,
                              json={"prompt": TEXTS[6], "max_tokens": 3, "temperature": 0.0})
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_restarting" and response.headers.get("retry-after")
        assert time.monotonic() < deadline, statuses
        time.sleep(2)
    assert statuses[0] == 503  # the death was noticed, not served around
    after = state_of(vllm_server, "survivor", rt)
    turn = len(tokenizer(TEXTS[6]).input_ids) + 3 - 1  # the prompt and the completion but its last token
    assert after.tokens_seen == before.tokens_seen + turn  # the session as it was, plus the turn served after
    assert after.writes >= before.writes


def test_sessions_survive_a_kill_of_the_server(vllm_server, runtime) -> None:
    rt, _ = runtime
    complete(vllm_server, "durable", TEXTS[3], max_tokens=5)
    before = httpx.get(f"{vllm_server.url}/v1/sessions/durable/state", timeout=60).content
    vllm_server.stop(signal.SIGKILL)
    vllm_server.start()
    after = httpx.get(f"{vllm_server.url}/v1/sessions/durable/state", timeout=60).content
    got, want = ar.state_from_bytes(after, rt), ar.state_from_bytes(before, rt)
    assert (got.tokens, got.tokens_seen, got.writes, got.kv_len) == (want.tokens, want.tokens_seen, want.writes,
                                                                      want.kv_len)
    assert got.factors.keys() == want.factors.keys()
    for layer, (B, A) in want.factors.items():
        assert torch.equal(got.factors[layer][0], B) and torch.equal(got.factors[layer][1], A)
    seen = got.tokens_seen
    turn = complete(vllm_server, "durable", TEXTS[4], max_tokens=3)
    assert turn["adaptation"]["tokens_seen"] > seen


def test_the_vllm_engine_refuses_dense_states_in_one_line(model: Path) -> None:
    args = [a for a in serve_args(model, "vllm") if a not in ("--state-rank", str(RANK))]
    done = subprocess.run([sys.executable, "-m", "adapt_runtime.serving.cli", *args, "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("adapt-serve: ") and "--state-rank" in last


class VllmServe(ServerProcess):
    """A ``vllm serve`` process of this interpreter (the user's own server that ``--vllm-url`` names)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(self.port), *self.args]


@pytest.fixture(scope="module")
def remote(model: Path, tmp_path_factory: pytest.TempPathFactory):
    """``vllm serve`` with runtime LoRA loading, and an ``adapt-serve --engine vllm --vllm-url`` in front of it."""
    work = tmp_path_factory.mktemp("remote")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_HOST_IP": "127.0.0.1"}
    vllm = VllmServe(["--model", str(model), "--dtype", "float32", "--max-model-len", "512", "--enable-lora",
                      "--max-lora-rank", str(RANK), "--max-loras", "8", "--seed", "0"],
                     log_path=work / "vllm.log", env=env, startup_timeout=600)
    server = ServerProcess(serve_args(model, "vllm", "--vllm-url", vllm.url, "--vllm-adapter-dir", str(work)),
                           log_path=work / "serve.log")
    yield server, vllm
    server.stop()
    vllm.stop()


def test_a_vllm_server_by_url_scores_and_learns_as_the_native_engine(remote, native, runtime, model: Path) -> None:
    server, vllm = remote
    rt, tokenizer = runtime
    same_history((server, native), "by-url", TEXTS[3:6], runtime)
    scored = probe_scores((server, native), "by-url", tokenizer)
    assert scored[0]["tokens"] == scored[1]["tokens"]  # the same greedy completion, generated by the vLLM server
    got, want = (torch.tensor(s["token_logprobs"][1:], dtype=torch.float64) for s in scored)
    assert float((got - want).abs().max()) <= TOLERANCE
    for top_got, top_want in zip(scored[0]["top_logprobs"][1:], scored[1]["top_logprobs"][1:], strict=True):
        assert list(top_got) == list(top_want)  # the same top tokens, best first
        for token, value in top_want.items():
            assert abs(top_got[token] - value) <= TOLERANCE
    turn = complete(server, "by-url-learn", TEXTS[6], max_tokens=8)  # vLLM generates, the runtime reads both
    assert turn["usage"]["completion_tokens"] == 8
    learned = state_of(server, "by-url-learn", rt)
    assert len(learned.tokens) == len(tokenizer(TEXTS[6]).input_ids) + 7
    assert_same_memory(learned, runtime_reading(rt, learned.tokens))
    listed = httpx.get(f"{vllm.url}/v1/models", timeout=30).json()["data"]
    assert [entry["id"] for entry in listed] == [str(model)]  # the base model alone: every adapter unloaded


def test_an_unreachable_vllm_url_is_refused_in_one_line(model: Path) -> None:
    from adapt_runtime.serving.launch import free_port

    done = subprocess.run([sys.executable, "-m", "adapt_runtime.serving.cli", *serve_args(
        model, "vllm", "--vllm-url", f"http://127.0.0.1:{free_port()}"), "--port", "0"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("adapt-serve: --vllm-url") and "no vLLM server answers" in last
