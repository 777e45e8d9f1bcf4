from __future__ import annotations

import pytest

from harness import StackHandle, stack_env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The default local stack: no real key, so the emulator stands in for Z.AI."""
    handle = StackHandle(tmp_path_factory.mktemp("stack"), stack_env()).start()
    yield handle
    handle.stop()


@pytest.fixture
def emulator_options(stack):
    """Set emulator options for one test; the previous options come back afterwards."""
    saved = stack.emulator("GET", "/_emulator/config").json()
    saved.pop("api_key", None)

    def apply(**options):
        stack.emulator("POST", "/_emulator/config", json=options)

    yield apply
    stack.emulator("POST", "/_emulator/config", json=saved)
