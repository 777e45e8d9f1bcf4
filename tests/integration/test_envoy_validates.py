"""Envoy 1.40 itself accepts the rendered bootstrap and routes."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from extproc.config import Settings
from extproc.local.processes import envoy_binary
from extproc.routing.envoy_config import write
from extproc.routing.weights import validate


def settings(**env: str) -> Settings:
    return Settings.from_env({"ZAI_API_KEY": "k" * 16, **env})


@pytest.mark.parametrize("env", [
    {},
    {"ZAI_TARGET_URL": "http://127.0.0.1:9/api/anthropic", "ZAI_OPENAI_URL": "https://127.0.0.1:9/v4"},
    {"ZAI_OPENAI_URL": "https://api.z.ai/api/paas/v4", "EXTPROC_HOST": "extproc"},
])
def test_envoy_accepts_rendered_config(tmp_path, env):
    path = write(settings(ENVOY_ROUTES_DIR=str(tmp_path / "routes"), **env), tmp_path / "envoy.yaml")
    validate(yaml.safe_load((tmp_path / "routes" / "routes.yaml").read_text()))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
