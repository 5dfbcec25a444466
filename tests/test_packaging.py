"""The distribution ships every subpackage: an editable install would hide a missing one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def _keyword(name: str) -> ast.expr:
    return next(k.value for k in _setup_call().keywords if k.arg == name)


def test_every_subpackage_is_listed() -> None:
    listed = set(ast.literal_eval(_keyword("packages")))
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "certbound_wsgi").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert on_disk, "no package found"
    assert on_disk <= listed, f"missing from setup.py packages: {sorted(on_disk - listed)}"
    assert "certbound_wsgi.nginx" in listed


def test_the_nginx_templates_are_package_data() -> None:
    package_data = ast.literal_eval(_keyword("package_data"))
    templates = {p.name for p in (ROOT / "nginx").glob("*.conf")}
    assert templates == {"gunicorn.conf", "uwsgi.conf"}
    assert "*.conf" in package_data["certbound_wsgi.nginx"]
    assert "py.typed" in package_data["certbound_wsgi"]
