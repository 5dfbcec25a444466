"""Packaging for issue 15: a PEP 517 build system, a core free of servers, extras that match what users run."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVERS_AND_OPTIONS = ("gunicorn", "uwsgi", "flask", "prometheus_client")


def _setup_keyword(name: str) -> object:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    names = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name)}

    def value(node: ast.expr) -> object:
        # setup.py's requirement lists are literals, names of literals, and their sums.
        if isinstance(node, ast.Name):
            return value(names[node.id])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)  # type: ignore[operator]
        if isinstance(node, ast.Dict):
            return {ast.literal_eval(k): value(v) for k, v in zip(node.keys, node.values, strict=True)
                    if k is not None}
        return ast.literal_eval(node)

    return value(next(k.value for k in call.keywords if k.arg == name))


def _names(requirements: list[str]) -> set[str]:
    return {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in requirements}


def test_pyproject_declares_the_setuptools_build_backend() -> None:
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(req.startswith("setuptools") for req in build["requires"])


def test_core_has_no_server_or_optional_dependency() -> None:
    core = _names(_setup_keyword("install_requires"))  # type: ignore[arg-type]
    assert core.isdisjoint(SERVERS_AND_OPTIONS), core


@pytest.mark.parametrize(("extra", "needs"), [
    pytest.param("gunicorn", {"gunicorn"}, id="gunicorn"),
    pytest.param("uwsgi", {"uwsgi"}, id="uwsgi"),
    pytest.param("redis", {"redis"}, id="redis"),
    pytest.param("flask", {"flask"}, id="flask"),
    pytest.param("prometheus", {"prometheus_client"}, id="prometheus"),
    pytest.param("bench", {"matplotlib", "gunicorn"}, id="bench-runs-gunicorn"),
    pytest.param("test", {"pytest", "hypothesis", "gunicorn", "uwsgi", "flask", "prometheus_client", "redis"},
                 id="test-runs-everything"),
])
def test_extras(extra: str, needs: set[str]) -> None:
    extras = _setup_keyword("extras_require")
    assert isinstance(extras, dict)
    assert needs <= _names(extras[extra])


def _module_level_imports(path: Path) -> set[str]:
    """Top-level modules imported when ``path`` is imported (not inside functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "certbound_wsgi").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_an_optional_dependency_at_import_time(path: Path) -> None:
    allowed = {"flask"} if path.name == "flask.py" else set()
    assert _module_level_imports(path).isdisjoint(set(SERVERS_AND_OPTIONS) - allowed)
