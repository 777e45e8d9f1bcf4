"""`zai-proxy serve` refuses to start on a bad setting, naming it, without printing the key."""

from __future__ import annotations


def test_serve_refuses_to_start_on_a_bad_value(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    zai_proxy = str(Path(sys.executable).with_name("zai-proxy"))
    bad_prices = tmp_path / "prices.json"
    bad_prices.write_text('{"models": {"glm-4.7": {"input": "free"}}}')
    for env, expected in (({"ZAI_API_KEY": "k" * 20, "EXTPROC_GRPC_PORT": "-5"}, "EXTPROC_GRPC_PORT='-5'"),
                          ({"ZAI_API_KEY": "k" * 20, "PRICES_FILE": str(bad_prices)}, "PRICES_FILE="),
                          ({}, "no upstream key")):
        result = subprocess.run([zai_proxy, "serve"], env={"PATH": "/usr/bin:/bin", **env},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert expected in result.stderr and "for example" in result.stderr
        assert "k" * 20 not in result.stderr
