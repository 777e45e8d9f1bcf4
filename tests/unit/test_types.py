"""The gateway's code type-checks: mypy over extproc/ with the project's settings
([tool.mypy] in pyproject.toml) finds nothing. A wrong annotation misleads the next reader, and a
None where a value was assumed is a crash waiting for the one request that brings it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_error_in_the_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # mypy reads [tool.mypy] (files, overrides) from the checkout's pyproject.toml
    out, err, status = api.run(["--cache-dir", str(tmp_path / "cache"), "--no-error-summary"])
    assert status == 0, f"mypy found errors:\n{out}{err}"
    assert not out.strip(), out
