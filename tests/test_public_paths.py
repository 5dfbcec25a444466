"""public_paths: literal exact and prefix entries that no spelling trick can widen."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certbound_wsgi.public_paths import PublicPaths

PUBLIC = PublicPaths(["/healthz", "/static/"])


@pytest.mark.parametrize(("path", "public"), [
    pytest.param("/healthz", True, id="exact"),
    pytest.param("/static/app.css", True, id="prefix"),
    pytest.param("/static/css/app.css", True, id="prefix-deep"),
    pytest.param("/static/", True, id="prefix-itself"),
    pytest.param("/healthz/", False, id="exact-is-not-a-prefix"),
    pytest.param("/healthz/x", False, id="exact-has-no-children"),
    pytest.param("/healthzx", False, id="exact-is-not-startswith"),
    pytest.param("/static", False, id="prefix-without-slash"),
    pytest.param("/staticx/a", False, id="prefix-boundary"),
    pytest.param("//healthz", False, id="double-slash"),
    pytest.param("/static//admin", False, id="empty-segment"),
    pytest.param("/healthz/../admin", False, id="dotdot-after-exact"),
    pytest.param("/static/../admin", False, id="dotdot-after-prefix"),
    pytest.param("/static/./a.css", False, id="dot-segment"),
    pytest.param("/static/..", False, id="trailing-dotdot"),
    pytest.param("/static/%2e%2e/admin", False, id="double-encoded-dots"),
    pytest.param("/static/..%2Fadmin", False, id="double-encoded-slash"),
    pytest.param("/static/..\\admin", False, id="backslash"),
    pytest.param("/static/a;/../../admin", False, id="path-parameter"),
    pytest.param("/static/a\x00.css", False, id="nul"),
    pytest.param("/HEALTHZ", False, id="case-sensitive"),
    pytest.param("/admin", False, id="other"),
])
def test_matches(path: str, public: bool) -> None:
    assert PUBLIC.matches(path) is public
    assert PUBLIC({"SCRIPT_NAME": "", "PATH_INFO": path}) is public


def test_script_name_is_part_of_the_path() -> None:
    assert PUBLIC({"SCRIPT_NAME": "/static", "PATH_INFO": "/a.css"})
    assert not PUBLIC({"SCRIPT_NAME": "/api", "PATH_INFO": "/healthz"})


@pytest.mark.parametrize("entry", [
    pytest.param("healthz", id="relative"),
    pytest.param("/", id="root"),
    pytest.param("/static/*", id="glob"),
    pytest.param("/health?x=1", id="query"),
    pytest.param("//healthz", id="double-slash"),
    pytest.param("/a/../b", id="dotdot"),
    pytest.param("/a%2Fb", id="percent"),
])
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="public path"):
        PublicPaths([entry])


def test_empty_is_false_and_matches_nothing() -> None:
    assert not PublicPaths([])
    assert not PublicPaths([])({"PATH_INFO": "/healthz"})


def resolved(path: str) -> str:
    """What the most eager normalizer could make of ``path``: decoded until stable, backslashes
    as slashes, ``;`` parameters dropped, dot segments resolved, slashes collapsed."""
    for _ in range(4):
        path = unquote(path)
    path = path.replace("\\", "/")
    path = "/".join(segment.split(";")[0] for segment in path.split("/"))
    return posixpath.normpath("/" + path.lstrip("/"))


SEGMENTS = st.sampled_from(["healthz", "static", "admin", "", ".", "..", "%2e", "%2F", "%252F", "a;b", "\\",
                            "app.css", "HEALTHZ", "x\x00"])


@given(st.lists(SEGMENTS, min_size=1, max_size=6), st.booleans())
def test_no_spelling_widens_a_public_path(segments: list[str], trailing: bool) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing else "")
    if PUBLIC.matches(path):
        # Then every normalizer agrees it is public: the spelling is the only one.
        target = resolved(path)
        assert target == "/healthz" or (target + "/").startswith("/static/"), path
        assert target == path.rstrip("/") or target == path
