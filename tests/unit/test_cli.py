"""The command line takes its flags where a person types them."""

from __future__ import annotations

import pytest

from extproc.cli import build_parser


@pytest.mark.parametrize("argv", [
    ["weights", "set", "10", "--offline"],
    ["weights", "--offline", "set", "10"],
    ["weights", "set", "--offline", "10"],
])
def test_weights_offline_in_any_position(argv):
    args = build_parser().parse_args(argv)
    assert (args.action, args.percent, args.offline) == ("set", 10, True)


def test_weights_flags_default_off_and_routes_dir_after_the_action():
    args = build_parser().parse_args(["weights", "fallback", "--routes-dir", "/tmp/r"])
    assert (args.action, args.routes_dir, bool(args.offline)) == ("fallback", "/tmp/r", False)
    assert not build_parser().parse_args(["weights", "show"]).offline
