"""The installed package, not the checkout: build the wheel, install it into a fresh venv, use it from elsewhere.

    python .ci/wheel_check.py [--constraints constraints/main.txt] [--keep DIR]

1. ``pip wheel`` builds the wheel; every file of the package folders (code, the bundled model, the lm-eval task pack)
   must be in it.
2. A fresh venv gets ``torch==2.13.0`` and the wheel with its ``serve`` and ``eval`` extras.
3. From a folder outside the checkout: ``adapt_runtime`` imports from the venv, ``adapt-serve --model llama`` answers
   a completion in a session, ``adapt-eval`` runs its smallest task, and ``adapt-eval lm-eval-tasks-dir`` names a
   folder inside the venv holding the task pack.
Prints each step's seconds; exits non-zero at the first failure.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the package's folders in the checkout -> their place in the wheel (pyproject's package-dir)
FOLDERS = {
    "adapt_runtime": "adapt_runtime",
    "kernels": "adapt_runtime/kernels",
    "serving": "adapt_runtime/serving",
    "eval": "adapt_runtime/eval",
}
DOCS = {"README.md"}  # a folder's notes for developers; nothing reads them at run time


def step(name: str, started: float) -> None:
    print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(
            f"wheel check: {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-4000:]}"
        )
    return done.stdout


def expected_files() -> set[str]:
    files = set()
    for folder, target in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder)
            if not path.is_file() or "__pycache__" in rel.parts or path.suffix == ".pyc" or path.name in DOCS:
                continue
            if folder == "adapt_runtime" and rel.parts[0] in FOLDERS:  # a build's link, not the package's own
                continue
            files.add(f"{target}/{rel.as_posix()}")
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, headers: dict[str, str]) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serve_once(venv: Path, cwd: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            venv / "bin" / "adapt-serve",
            "--model",
            "llama",
            "--rule",
            "hebbian",
            "--port",
            str(port),
            "--session-dir",
            cwd / "sessions",
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"wheel check: adapt-serve exited ({server.returncode}):\n{server.stdout.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("wheel check: adapt-serve did not answer /health in 180 s")
                time.sleep(0.5)
        answer = post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "llama", "prompt": "Once upon a time", "max_tokens": 8},
            {"X-Session-ID": "wheel-check"},
        )
        if answer["usage"]["completion_tokens"] != 8 or not answer["choices"][0]["text"]:
            sys.exit(f"wheel check: unexpected completion {answer}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sessions/wheel-check", timeout=30) as response:
            session = json.loads(response.read())
        if session.get("tokens_seen", 0) < 8:
            sys.exit(f"wheel check: the session did not keep the turn: {session}")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constraints", type=Path, help="pip constraints for the venv's installs")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="adapt-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    pins = ["-c", str(args.constraints.resolve())] if args.constraints else []
    print(f"wheel check in {work}", flush=True)

    started = time.perf_counter()
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", work / "dist", ROOT)
    (wheel,) = (work / "dist").glob("adapt_runtime-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
    missing = sorted(expected_files() - inside)
    if missing:
        sys.exit(f"wheel check: {wheel.name} lacks {len(missing)} package files: {missing[:20]}")
    model = [n for n in inside if n.startswith("adapt_runtime/data/stories260K/")]
    tasks = [n for n in inside if n.startswith("adapt_runtime/eval/lm_eval_tasks/")]
    step(
        f"built {wheel.name} ({wheel.stat().st_size // 1024} KiB, {len(inside)} files: bundled model "
        f"{len(model)} files, lm-eval task pack {len(tasks)} files)",
        started,
    )

    started = time.perf_counter()
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    run(*pip, "torch==2.13.0", *pins)
    run(*pip, f"{wheel}[serve,eval]", *pins)
    step("fresh venv with the wheel", started)

    outside = work / "elsewhere"
    outside.mkdir(exist_ok=True)
    started = time.perf_counter()
    where = run(
        venv / "bin" / "python",
        "-c",
        "import adapt_runtime.kernels, adapt_runtime.serving, adapt_runtime.eval"
        "; import adapt_runtime; print(adapt_runtime.__file__)",
        cwd=outside,
    ).strip()
    if not Path(where).resolve().is_relative_to(venv.resolve()):
        sys.exit(f"wheel check: adapt_runtime imported from {where}, not from the venv")
    serve_once(venv, outside)
    step("adapt-serve --model llama answered a completion in a session", started)

    started = time.perf_counter()
    run(
        venv / "bin" / "adapt-eval",
        "run",
        "--preset",
        "smoke",
        "--task",
        "copy",
        "--rules",
        "none,hebbian",
        "--episodes",
        "2",
        "--out",
        outside / "eval",
        "--no-progress",
        cwd=outside,
    )
    results = json.loads((outside / "eval" / "results.json").read_text())
    if not results:
        sys.exit("wheel check: adapt-eval wrote empty results")
    folder = Path(run(venv / "bin" / "adapt-eval", "lm-eval-tasks-dir", cwd=outside).strip())
    if not folder.resolve().is_relative_to(venv.resolve()) or not (folder / "adapt_tasks.py").is_file():
        sys.exit(f"wheel check: the lm-eval task pack is not in the venv: {folder}")
    step("adapt-eval ran its smallest task (copy, smoke); the task pack is in the venv", started)
    print("wheel check passed", flush=True)


if __name__ == "__main__":
    main()
