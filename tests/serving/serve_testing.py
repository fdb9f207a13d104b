"""Test helpers: a real ``adapt-serve`` subprocess on a free loopback port and clients for it (the shape of
vLLM's RemoteOpenAIServer), and the error-envelope check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import openai
from adapt_runtime.serving.launch import ServerProcess

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-0123456789"
MODEL = "llama"
TEST_DEVICE = os.environ.get("ADAPT_TEST_DEVICE") or None  # e.g. cuda: every test server gets --device


class Server(ServerProcess):
    """One ``adapt-serve`` process with the test API keys (and ``--device`` from ADAPT_TEST_DEVICE)."""

    def __init__(self, args: list[str], log_path: Path, keys: tuple[str, ...] = (KEY_A, KEY_B)) -> None:
        self.keys = keys
        flags = ["--log-level", "warning", *args]
        for key in keys:
            flags += ["--api-key", key]
        if TEST_DEVICE and "--device" not in args:  # ADAPT_TEST_DEVICE=cuda serves on the GPU
            flags += ["--device", TEST_DEVICE]
        super().__init__(flags, log_path=log_path, env={"OMP_NUM_THREADS": "1"})

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def new_session(self, key: str = KEY_A) -> str:
        with self.http(key) as http:
            response = http.post("/v1/sessions")
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def session_info(self, sid: str, key: str = KEY_A) -> dict:
        with self.http(key) as http:
            response = http.get(f"/v1/sessions/{sid}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_idle(self, sid: str, timeout: float = 30.0) -> dict:
        """The session's info once no turn holds it (a client that left must not keep it busy)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.session_info(sid)
            if not current["busy"]:
                return current
            time.sleep(0.05)
        raise AssertionError("session stayed busy after the client went away")


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is the OpenAI error envelope with ``status`` (and ``code``, if given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code, error
    return error
