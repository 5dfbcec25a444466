"""certbound_wsgi.wsgi: the gunicorn/uWSGI entry point, configured from the environment."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest

from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.support import sample_app
from tests.support.tokens import AUDIENCE, ISSUER

ENV = {"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE,
       "CERTBOUND_PROXY_SECRET": "wsgi-test-proxy-secret-0123456789abcdef"}


@pytest.fixture()
def wsgi(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The module, imported with a valid environment (its ``application`` is built at import)."""
    for key in list(os.environ):
        if key.startswith("CERTBOUND_"):
            monkeypatch.delenv(key)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    # Imported afresh: an earlier test may have imported it under another environment.
    monkeypatch.delitem(sys.modules, "certbound_wsgi.wsgi", raising=False)
    return importlib.import_module("certbound_wsgi.wsgi")


def test_module_application_is_the_protected_echo_app(wsgi: ModuleType) -> None:
    assert isinstance(wsgi.application, CertBoundMiddleware)
    assert wsgi.application.settings.issuer == ISSUER


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(None, echo_app, id="unset-echo"),
        pytest.param("", echo_app, id="empty-echo"),
        pytest.param("   ", echo_app, id="blank-echo"),
        pytest.param("tests.support.sample_app:app", sample_app.app, id="module-attribute"),
        pytest.param("  tests.support.sample_app:app  ", sample_app.app, id="surrounding-spaces"),
        pytest.param("tests.support.sample_app:holder.app", sample_app.app, id="dotted-attribute"),
    ],
)
def test_create_application_wraps_the_named_app(wsgi: ModuleType, target: str | None, expected: object) -> None:
    environ = dict(ENV) if target is None else {**ENV, "CERTBOUND_APP": target}
    application = wsgi.create_application(environ)
    assert isinstance(application, CertBoundMiddleware)
    assert application.app is expected
    assert application.settings.audience == (AUDIENCE,)


def test_settings_come_from_the_given_environ(wsgi: ModuleType) -> None:
    application = wsgi.create_application({**ENV, "CERTBOUND_REALM": "orders", "CERTBOUND_LEEWAY": "5"})
    assert (application.settings.realm, application.settings.leeway) == ("orders", 5)


def test_create_application_defaults_to_os_environ(wsgi: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBOUND_APP", "tests.support.sample_app:app")
    assert wsgi.create_application().app is sample_app.app


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("tests.support.sample_app", id="no-colon"),
        pytest.param("tests.support.sample_app:", id="no-attribute"),
        pytest.param(":app", id="no-module"),
        pytest.param("tests.support.no_such_module:app", id="missing-module"),
        pytest.param("no_such_package_xyz:app", id="missing-package"),
        pytest.param("tests.support.sample_app:missing", id="missing-attribute"),
        pytest.param("tests.support.sample_app:holder.missing", id="missing-dotted-attribute"),
        pytest.param("tests.support.sample_app:not_callable", id="not-callable"),
        pytest.param("tests.support..sample_app:app", id="double-dot"),
        pytest.param(".sample_app:app", id="relative-module"),
        pytest.param("tests.support.sample_app\x00:app", id="nul-in-module-name"),
    ],
)
def test_bad_app_names_the_app_option(wsgi: ModuleType, target: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        wsgi.create_application({**ENV, "CERTBOUND_APP": target})
    assert info.value.option == "app"
    assert repr(target) in str(info.value) or target in str(info.value)


@pytest.mark.parametrize(
    ("environ", "option"),
    [
        pytest.param({"CERTBOUND_AUDIENCE": AUDIENCE}, "issuer", id="no-issuer"),
        pytest.param({**ENV, "CERTBOUND_LEEWAY": "-1"}, "leeway", id="bad-leeway"),
        pytest.param({**ENV, "CERTBOUND_TYPO": "1"}, "typo", id="typo"),
    ],
)
def test_bad_settings_name_the_option(wsgi: ModuleType, environ: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        wsgi.create_application({**environ, "CERTBOUND_APP": "tests.support.sample_app:app"})
    assert info.value.option == option


def test_import_without_configuration_fails_naming_the_option() -> None:
    """gunicorn imports the module: a missing setting must stop the worker with the option's name."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CERTBOUND_")}
    result = subprocess.run(
        [sys.executable, "-c", "import certbound_wsgi.wsgi"], env=environ, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "ConfigurationError: issuer: required" in result.stderr
