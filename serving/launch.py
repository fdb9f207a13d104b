"""``adapt-serve`` as a child process: the one launcher of tests, benchmarks and the lm-eval check.

    server = ServerProcess(["--model", "llama", "--rule", "hebbian"], log_path=Path("serve.log"))
    ...                      # server.url, e.g. http://127.0.0.1:41234
    server.restart()         # same port and flags (persistence checks)
    server.stop()

It takes a free loopback port, starts ``python -m adapt_runtime.serving.cli`` of this interpreter (the console
script may not be on PATH), and returns once ``/health`` answers; a process that exits or never answers raises
with the tail of its log. Standard library only, so it runs wherever the package does (the shape of vLLM's
``RemoteOpenAIServer``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

STARTUP_TIMEOUT = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url``'s ``/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class ServerProcess:
    """One ``adapt-serve`` process on a free port; ``restart`` keeps the port and every flag."""

    def __init__(self, args: list[str], log_path: Path | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self.port = free_port()
        self.args = list(args)
        self.log_path = log_path
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "adapt_runtime.serving.cli", "--port", str(self.port), *self.args]

    def start(self) -> None:
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below after the fork
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.env)
        finally:
            if not isinstance(out, int):  # not DEVNULL
                out.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adapt-serve exited with {self.proc.returncode}:\n{self.log()}")
            if healthy(self.url):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"adapt-serve did not answer /health in {self.startup_timeout:.0f} s:\n{self.log()}")

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
        """The last 4000 characters of the process's output (empty without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        """The process's resident memory in MiB (Linux), NaN when unknown."""
        if self.proc is None:
            return float("nan")
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")
