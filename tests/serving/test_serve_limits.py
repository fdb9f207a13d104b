"""Per-request limits and slow clients against a real server: caps answer 400, half-sent headers and bodies are
cut off after ``--read-timeout``, an unread stream gives its slot back after ``--send-timeout``, and a client
that leaves stops its job's decoding."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from serve_testing import KEY_A, MODEL, Server, assert_envelope

READ_TIMEOUT_S = 1
SEND_TIMEOUT_S = 1
MAX_CHOICES = 16
MAX_TOKENS = 7500
PROMPT = "Once upon a time, there was a little dog named Max. Max liked to"


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--read-timeout", f"{READ_TIMEOUT_S}s", "--send-timeout", f"{SEND_TIMEOUT_S}s",
                  "--max-concurrent-requests", "1", "--max-choices-per-request", str(MAX_CHOICES),
                  "--max-tokens-per-request", str(MAX_TOKENS))


def _connect(server: Server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(10 * READ_TIMEOUT_S + 5)
    return sock


def _request(body: dict, path: str = "/v1/completions") -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY_A}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def _decoded_rows(server: Server) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    match = re.search(r"^adapt_serve:decode_batch_size_sum (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _ok_soon(server: Server, within_s: float) -> bool:
    """Whether a small completion succeeds (not 429) within ``within_s``."""
    deadline = time.monotonic() + within_s
    with server.http() as http:
        while time.monotonic() < deadline:
            if http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200:
                return True
            time.sleep(0.2)
    return False


@pytest.mark.parametrize("body,code", [
    ({"prompt": ["a", "b"], "n": MAX_CHOICES // 2 + 1, "max_tokens": 1}, "too_many_choices"),
    ({"prompt": [[1, 2], [3, 4], [5, 6]], "n": MAX_CHOICES // 3 + 1, "max_tokens": 1}, "too_many_choices"),
    ({"prompt": [PROMPT] * (MAX_CHOICES * 50), "max_tokens": 1}, "too_many_choices"),
    ({"prompt": PROMPT, "n": MAX_CHOICES, "max_tokens": 480}, "too_many_tokens"),
], ids=["prompts-x-n", "token-prompts-x-n", "many-prompts", "tokens"])
def test_requests_past_the_caps_answer_400(server: Server, body: dict, code: str) -> None:
    with server.http() as http:
        assert_envelope(http.post("/v1/completions", json=body), 400, code)


def test_chat_past_the_token_cap_answers_400(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "n": MAX_CHOICES, "max_tokens": 480}
    with server.http() as http:
        assert_envelope(http.post("/v1/chat/completions", json=body), 400, "too_many_tokens")
        body.update(n=2, max_tokens=8)
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_half_sent_headers_are_cut_off(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b"", "the server must close the connection"
        assert time.monotonic() - started < 5 * READ_TIMEOUT_S + 3


def test_a_half_sent_body_answers_408(server: Server) -> None:
    with _connect(server) as sock:
        whole = _request({"prompt": PROMPT, "max_tokens": 1})
        sock.sendall(whole[: len(whole) - 10])
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"request_timeout"' in reply
    assert _ok_soon(server, 10)


def test_an_unread_stream_gives_its_slot_back(server: Server) -> None:
    # a stream of about 6 MB (15 choices x 480 tokens, 20 logprobs each; more than the socket buffers hold)
    # that the client never reads
    body = {"prompt": "Once", "n": 15, "max_tokens": 480, "ignore_eos": True, "logprobs": 20, "stream": True}
    with _connect(server, rcvbuf=4096) as sock:
        sock.sendall(_request(body))
        time.sleep(0.5)
        with server.http() as http:
            assert_envelope(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 429)
        assert _ok_soon(server, 30), "the unread stream still holds the only concurrency slot"


def test_a_client_that_leaves_a_stream_stops_its_decoding(server: Server) -> None:
    assert _ok_soon(server, 30)
    before = _decoded_rows(server)
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for _, line in zip(range(4), response.iter_lines())]
    assert any(line.startswith("data:") for line in lines)
    decoded, last_change = _decoded_rows(server) - before, time.monotonic()
    while time.monotonic() - last_change < 1.5 and decoded < 400:  # until decoding stops (or ends)
        time.sleep(0.25)
        now = _decoded_rows(server) - before
        if now != decoded:
            decoded, last_change = now, time.monotonic()
    assert decoded < 200, f"{decoded} rows decoded after the client left a 400-token stream"
    assert _ok_soon(server, 10)


def test_the_server_still_generates(server: Server) -> None:
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length"
