"""``certbound-wsgi demo --once``: in-process and as the installed console script."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certbound_wsgi.cli import main

# What a passing run prints for each step, in order.
EXPECTED_STEPS = [
    ("alice's token with alice's certificate", 200),
    ("the same token replayed with mallory's certificate", 401),
    ("the same token with no client certificate", 401),
]
STEP = re.compile(r"^\[(\d)\] (.+)\n\s+-> HTTP (\d{3}) \(expected (\d{3})\) (\S+)$", re.M)


def _check_report(output: str) -> None:
    steps = [(title, int(status)) for _, title, status, _, _ in STEP.findall(output)]
    assert steps == EXPECTED_STEPS, output
    assert "verdict: PASS" in output, output
    assert output.count("error=invalid_token") == 2, output
    thumbprints = dict(re.findall(r"^\s+(alice|mallory)\s+x5t#S256 = (\S+)$", output, re.M))
    assert set(thumbprints) == {"alice", "mallory"}, output
    assert thumbprints["alice"] != thumbprints["mallory"]
    assert f"bound to cnf.x5t#S256 = {thumbprints['alice']}" in output
    # The token is shown truncated only: no JWT (three base64url segments) in full.
    assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", output), output


def test_demo_once_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--once"]) == 0
    _check_report(capsys.readouterr().out)


def test_demo_once_console_script() -> None:
    script = Path(sys.executable).parent / "certbound-wsgi"
    assert script.exists(), f"{script} is missing: pip install -e ."
    started = time.monotonic()
    # The inherited environment keeps REQUESTS_CA_BUNDLE and friends: the demo
    # must trust its own CA regardless.
    result = subprocess.run(
        [str(script), "demo", "--once"], check=False, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    _check_report(result.stdout)
    assert "DEVELOPMENT-ONLY" in result.stderr
    assert elapsed < 20, f"demo --once took {elapsed:.1f}s"
