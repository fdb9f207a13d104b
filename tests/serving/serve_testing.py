"""Test helpers: a real ``adapt-serve`` subprocess on a free loopback port and clients for it (the shape of
vLLM's RemoteOpenAIServer), and the error-envelope check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-0123456789"
MODEL = "llama"
STARTUP_TIMEOUT = 180.0
TEST_DEVICE = os.environ.get("ADAPT_TEST_DEVICE") or None  # e.g. cuda: every test server gets --device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command() -> list[str]:
    """``adapt-serve`` of this interpreter's environment (the console script may not be on PATH)."""
    return [sys.executable, "-m", "adapt_runtime.serving.cli"]


class Server:
    """One ``adapt-serve`` process. ``restart`` keeps the port and every flag (for persistence tests)."""

    def __init__(self, args: list[str], log_path: Path, keys: tuple[str, ...] = (KEY_A, KEY_B)) -> None:
        self.port = free_port()
        self.keys = keys
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*_command(), "--port", str(self.port), "--log-level", "warning", *self.args]
        for key in self.keys:
            cmd += ["--api-key", key]
        if TEST_DEVICE and "--device" not in self.args:  # ADAPT_TEST_DEVICE=cuda serves on the GPU
            cmd += ["--device", TEST_DEVICE]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adapt-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"adapt-serve did not become healthy:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

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
