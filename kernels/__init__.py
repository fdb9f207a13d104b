"""Fast-weight ops: ``apply``, ``write``, the fused ``apply_write`` and ``chunk_scan``, each with
``impl="auto"|"torch"|"triton"``.

Every implementation has a naive twin in :mod:`adapt_runtime.kernels.naive` with the same signature and
layout.

This folder is installed as ``adapt_runtime.kernels``. From a checkout's root (``python -c``, ``python -m pytest``,
``python benchmarks/x.py`` with the root on ``sys.path``) Python would also find it under the bare name
``kernels``, which is the Hugging Face Hub's ``kernels`` distribution that transformers imports. Reached under that
name, this file hands the name to the installed distribution (or reports it missing) and defines nothing of ours.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess from the repo root (tests/core/test_layout.py)
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        # No distribution of that name: be what this folder would be without an __init__.py, an empty namespace
        # package (no file, no version, nothing to import), which is how transformers tells a stray folder on
        # sys.path from an install.
        __file__ = None  # type: ignore[assignment]  # an empty namespace module has no file
        __path__ = []
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ends
        _spec.loader.exec_module(_module)
else:
    from adapt_runtime.kernels.ops import apply, apply_write, chunk_scan, write

    __all__ = ["apply", "apply_write", "chunk_scan", "write"]
