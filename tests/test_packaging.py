"""The distribution ships every subpackage: an editable install would hide a missing one."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
    assert templates == {"gunicorn.conf", "uwsgi.conf", "auth_request.conf"}
    assert "*.conf" in package_data["certbound_wsgi.nginx"]
    assert "py.typed" in package_data["certbound_wsgi"]


def test_the_request_path_never_loads_the_dev_package() -> None:
    """The demo, dev issuer, dev PKI, dev server and echo app are fenced off: a deployment that names its
    app (``CERTBOUND_APP``) imports the middleware, the Flask integration and the entry point without them."""
    program = (
        "import sys, certbound_wsgi, certbound_wsgi.middleware, certbound_wsgi.flask, certbound_wsgi.wsgi\n"
        "assert certbound_wsgi.wsgi.application.app.__module__ == 'tests.support.sample_app'\n"
        "print(sorted(name for name in sys.modules if name.startswith('certbound_wsgi')))\n"
    )
    environ = {key: value for key, value in os.environ.items() if not key.startswith("CERTBOUND_")}
    environ.update(CERTBOUND_ISSUER="https://issuer.test", CERTBOUND_AUDIENCE="https://api.test",
                   CERTBOUND_APP="tests.support.sample_app:app", CERTBOUND_TRUSTED_PROXIES="unix")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=environ, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout)
    assert "certbound_wsgi.middleware" in loaded
    assert [name for name in loaded if name == "certbound_wsgi.dev" or name.startswith("certbound_wsgi.dev.")] == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, relative imports made absolute, with the line of each."""
    package = ["certbound_wsgi", *path.relative_to(ROOT / "certbound_wsgi").parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            module = base if node.level else node.module or ""
            found += [(node.lineno, module), *((node.lineno, f"{module}.{alias.name}") for alias in node.names)]
    return found


def test_only_the_command_line_and_the_entry_point_import_the_dev_package() -> None:
    """Statically too, so that an import inside a request-path function cannot slip past the test above."""
    allowed = {"cli.py", "wsgi.py"}
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "certbound_wsgi").rglob("*.py"))
        if path.relative_to(ROOT / "certbound_wsgi").parts[0] != "dev" and path.name not in allowed
        for line, module in _imports(path)
        if module == "certbound_wsgi.dev" or module.startswith("certbound_wsgi.dev.")
    ]
    assert offenders == []
    assert any(module == "certbound_wsgi.dev.demo" for _, module in _imports(ROOT / "certbound_wsgi" / "cli.py"))
