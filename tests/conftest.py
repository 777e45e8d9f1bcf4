"""Every test is marked by its kind, from the folder it lives in: `pytest -m unit` (no processes,
no sockets: seconds), `-m integration` (real Envoy, Redis, Prometheus, SDKs), `-m deploy`
(manifests, rules, compose)."""

from __future__ import annotations

from pathlib import Path

import pytest

KINDS = ("unit", "integration", "deploy")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.fspath).relative_to(HERE).parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/deploy")
        item.add_marker(getattr(pytest.mark, kind))
