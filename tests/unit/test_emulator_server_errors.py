"""The emulator's `server_error_percent`: an exact, evenly spread share of 500s (what the canary
rollout's integration test gives the canary's upstream), validated like every option."""

from __future__ import annotations

import time

import pytest

from extproc.emulator.app import EmulatorState
from extproc.emulator.options import EmulatorOptions


def test_the_share_of_failures_is_exact_and_evenly_spread():
    state = EmulatorState(EmulatorOptions(api_key="k"), time.monotonic, time.time)
    fails = [state.server_error_due(20.0) for _ in range(100)]
    assert sum(fails) == 20
    assert fails[:10] == [False, False, False, False, True] * 2
    assert all(state.server_error_due(100.0) for _ in range(5))


def test_the_option_is_validated_and_settable_per_request():
    options = EmulatorOptions(api_key="k")
    assert options.with_request_overrides(['{"server_error_percent": 20}']).server_error_percent == 20.0
    with pytest.raises(ValueError, match="server_error_percent"):
        options.update({"server_error_percent": 120})
