"""Session fixtures for the identity provider; import them into a conftest.py::

    from tests.support.idp_fixtures import idp, pki  # noqa: F401

``pki`` is one development CA with a certificate for each test person;
``idp`` is oidc-provider (see :mod:`tests.support.idp`) with ``bound`` holding
alice's certificate and ``bound2`` mallory's. ``idp`` is shared by the whole
session: a test that restarts it (key rotation) gets the same issuer back, and
one that reads :meth:`OidcProvider.stats` should :meth:`reset_stats` first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certbound_wsgi.dev.pki import DevCA, Issued
from tests.support.idp import OidcProvider

__all__ = ["Pki", "idp", "pki"]


@dataclass(frozen=True)
class Pki:
    """A development CA and the certificates the tests share, all in ``directory``."""

    directory: Path
    ca: DevCA
    #: TLS server certificate for localhost, 127.0.0.1 and ::1 (for the servers under test).
    server: Issued
    #: Client certificates issued by ``ca``, subject ``CN=<name>``.
    alice: Issued
    mallory: Issued

    @property
    def ca_file(self) -> str:
        return str(self.ca.cert_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    return Pki(directory, ca, ca.server(), ca.client("alice"), ca.client("mallory"))


@pytest.fixture(scope="session")
def idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(
        tmp_path_factory.mktemp("idp"), ca=pki.ca, bound={"bound": pki.alice, "bound2": pki.mallory}
    )
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()
