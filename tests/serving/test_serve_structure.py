"""HTTP lives at the edge: engine and session code raise domain errors (``serving/failures.py``), only the edge
packages import fastapi or starlette, and only modules that speak HTTP build HTTP errors; one table maps the rest."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from adapt_runtime.serving import failures
from adapt_runtime.serving.edge.errors import STATUS, http_error

SERVING = Path(__file__).resolve().parents[2] / "serving"
MODULES = sorted(p for p in SERVING.rglob("*.py") if "__pycache__" not in p.parts)
WEB = ("fastapi", "starlette")
HTTP_ERRORS = {"APIError", "retry_later", "HTTPException", "JSONResponse"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _calls(tree: ast.AST) -> set[str]:
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVING)))
def test_http_errors_are_built_only_at_the_edge(path: Path) -> None:
    tree = ast.parse(path.read_text())
    speaks_http = bool(_imports(tree) & set(WEB))
    built = _calls(tree) & HTTP_ERRORS
    assert speaks_http or path.name == "errors.py" or not built, f"{path.name} builds {built} without being an edge"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVING)))
def test_a_module_that_runs_the_model_speaks_no_http(path: Path) -> None:
    imports = _imports(ast.parse(path.read_text()))
    assert not ("torch" in imports and imports & set(WEB)), f"{path.name} imports torch and {imports & set(WEB)}"


# The HTTP fronts: the OpenAI edge package, and the cluster's ingress (it forwards HTTP to the engine replicas).
EDGES = ("edge/", "cluster/ingress.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVING)))
def test_only_the_edge_packages_speak_http(path: Path) -> None:
    where = path.relative_to(SERVING).as_posix()
    web = _imports(ast.parse(path.read_text())) & set(WEB)
    assert not web or where.startswith(EDGES), f"{where} imports {web} outside the edge ({EDGES})"


def test_the_packages_say_what_they_own() -> None:
    for package in ("edge", "engine", "sessions", "cluster"):
        doc = ast.get_docstring(ast.parse((SERVING / package / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 10, f"serving/{package}/__init__.py says nothing of what it owns"


def test_the_domain_errors_module_knows_no_http() -> None:
    assert not _imports(ast.parse(Path(failures.__file__).read_text())) & set(WEB)


@pytest.mark.parametrize("kind", [failures.InvalidRequest, failures.NotFound, failures.Conflict,
                                  failures.LimitReached, failures.Unavailable], ids=lambda k: k.__name__)
def test_every_domain_error_has_one_status_and_keeps_its_words(kind: type[failures.ServingError]) -> None:
    err = http_error(kind("what happened", "some_code", "field"))
    assert err.status == STATUS[kind] and (err.message, err.code, err.param) == ("what happened", "some_code", "field")
    assert ("Retry-After" in err.headers) == (kind in (failures.LimitReached, failures.Unavailable))
