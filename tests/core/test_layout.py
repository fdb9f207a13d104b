"""The checkout's folders never shadow an installed distribution, from the repo root or anywhere else.

``kernels/``, ``serving/`` and ``eval/`` are installed as ``adapt_runtime.*``; from the repo root Python also sees
them under their bare names. ``kernels`` is the Hugging Face Hub's distribution that transformers (>= 5.25) imports.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LOAD_AND_RUN = """
import torch
import adapt_runtime as ar
model, tok = ar.load_model("llama")
rt = ar.patch(model, rule="hebbian", chunk_size=4)
state = rt.new_state()
logits = rt.forward(torch.tensor([tok.encode("Once upon a time there was")]), state)
assert torch.isfinite(logits).all() and state.writes > 0, state.writes
"""

# The Hub's kernels made invisible, as on a machine where it is not installed: the path finder skips it and its
# metadata is missing (transformers asks both).
HIDE_HUB_KERNELS = """
import importlib.machinery, importlib.metadata, os
_ours = os.path.join(os.getcwd(), "kernels", "")
_find = importlib.machinery.PathFinder.find_spec.__func__
def _find_spec(cls, name, path=None, target=None):
    spec = _find(cls, name, path, target)
    if name.split(".")[0] == "kernels" and spec is not None and not (spec.origin or "").startswith(_ours):
        return None
    return spec
importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
_version, _distribution = importlib.metadata.version, importlib.metadata.distribution
def _missing(real):
    def lookup(name):
        if name == "kernels":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    return lookup
importlib.metadata.version, importlib.metadata.distribution = _missing(_version), _missing(_distribution)
"""


def _run_from_root(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _hub_kernels_imports_elsewhere() -> bool:
    """Whether the installed distribution imports at all, from a folder outside the checkout (it may not: CI's
    low-bound run lays transformers 4.57.1 and an older hub client over a venv whose ``kernels`` needs a newer one)."""
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # the same search path, whatever the folder
    with tempfile.TemporaryDirectory() as elsewhere:
        done = subprocess.run([sys.executable, "-c", "import kernels"], cwd=elsewhere, capture_output=True,
                              timeout=120, env=env)
    return done.returncode == 0


@pytest.mark.skipif(not _hub_kernels_installed(), reason="the Hub's kernels distribution is not installed")
def test_from_the_repo_root_kernels_is_the_hub_distribution_and_a_model_loads():
    if not _hub_kernels_imports_elsewhere():
        pytest.skip("the installed kernels distribution does not import in this environment, from anywhere")
    code = (
        "import kernels, os\n"
        f"assert not os.path.abspath(kernels.__file__).startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
        "from kernels import get_kernel\n"
        "import transformers.integrations.hub_kernels\n" + LOAD_AND_RUN
    )
    result = _run_from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_from_the_repo_root_without_the_hub_distribution_kernels_is_empty_and_a_model_loads():
    """transformers >= 5.25 requires the distribution and loads models with ``use_kernels=True`` unless
    ``USE_HUB_KERNELS=0``; older releases never ask for it. The switch makes both take an install-without path."""
    code = (
        HIDE_HUB_KERNELS
        + "import kernels\n"
        + "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'apply'), vars(kernels)\n"
        + "from transformers.utils import import_utils\n"
        + "assert not import_utils.is_kernels_available()\n"
        + LOAD_AND_RUN
    )
    result = _run_from_root(code, USE_HUB_KERNELS="0")
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_project_kernels_are_adapt_runtime_kernels_from_the_repo_root():
    result = _run_from_root("import adapt_runtime.kernels as k; assert callable(k.write) and callable(k.apply)")
    assert result.returncode == 0, result.stderr[-3000:]


def _importable_names_from_the_checkout() -> dict[str, Path]:
    """Names Python finds in the checkout: root folders and modules, and scripts' siblings in benchmarks/."""
    names = {}
    for parent in (ROOT, ROOT / "benchmarks"):
        for path in parent.iterdir():
            if path.name.startswith((".", "_")):
                continue
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                names[path.stem] = path
    return names


def test_no_checkout_folder_or_script_takes_an_installed_distributions_name():
    """Guards the next collision: a folder with an ``__init__.py`` at the root, or a script beside the benchmarks
    (run as ``python benchmarks/x.py``, its folder is on ``sys.path``), named like a module some installed
    distribution provides. ``kernels/`` hands its name over (its ``__init__``), so it is the one allowed."""
    provided = importlib.metadata.packages_distributions()
    clashes = {
        name: (str(path.relative_to(ROOT)), provided[name])
        for name, path in _importable_names_from_the_checkout().items()
        if name in provided and name not in {"adapt_runtime", "kernels"}
    }
    assert not clashes, f"checkout names that shadow installed distributions: {clashes}"
