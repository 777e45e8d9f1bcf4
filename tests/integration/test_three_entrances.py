"""The deployment guide's three entrances, each a listener of its own: the weighted split,
production only and canary only. A pinned entrance ignores the weights; each serves its variant's
/health and /metrics."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env

pytestmark = pytest.mark.timeout(300)

ASK = {"model": "glm-4.7", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    handle = StackHandle(tmp_path_factory.mktemp("three"), stack_env(CANARY_WEIGHT="50"),
                         variants=("production", "canary")).start()
    yield handle
    handle.stop()


def entrance(stack: StackHandle, which: str) -> str:
    settings = stack.stack.settings
    port = {"split": settings.listen_port, "production": settings.production_listen_port,
            "canary": settings.canary_listen_port}[which]
    return f"http://127.0.0.1:{port}"


def requests_by_variant(stack: StackHandle) -> dict[str, int]:
    out = {"production": 0, "canary": 0}
    for variant in out:
        for url in stack.admin_urls(variant):
            text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
            out[variant] += sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                                if line.startswith("zai_proxy_requests_total{"))
    return out


def send(base: str, count: int) -> None:
    def one(i: int) -> None:
        # A different worker each time: the split is sticky per worker.
        resp = httpx.post(f"{base}/api/anthropic/v1/messages", json=ASK, trust_env=False, timeout=30,
                          headers={"x-api-key": f"worker-{base[-5:]}-{i}"})
        assert resp.status_code == 200, resp.text
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


@pytest.mark.parametrize("which", ["production", "canary"])
def test_a_pinned_entrance_serves_its_variant_only_whatever_the_weights(three, which):
    before = requests_by_variant(three)
    send(entrance(three, which), 100)
    three.settle()
    after = requests_by_variant(three)
    other = "canary" if which == "production" else "production"
    assert after[which] - before[which] == 100
    assert after[other] == before[other]


def test_the_split_entrance_serves_both(three):
    before = requests_by_variant(three)
    send(entrance(three, "split"), 100)
    three.settle()
    after = requests_by_variant(three)
    got = {v: after[v] - before[v] for v in after}
    assert sum(got.values()) == 100 and got["production"] >= 20 and got["canary"] >= 20, got


@pytest.mark.parametrize("which,variant", [("split", "production"), ("production", "production"),
                                           ("canary", "canary")])
def test_the_guides_checks_on_each_entrance(three, which, variant):
    base = entrance(three, which)
    health = httpx.get(f"{base}/health", timeout=10, trust_env=False)
    assert health.status_code == 200 and health.text == '{"status":"ok"}'
    metrics = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    variants = {line.split('deployment_variant="', 1)[1].split('"', 1)[0]
                for line in metrics.splitlines() if 'deployment_variant="' in line}
    assert variants == {variant}
    smoke = httpx.post(f"{base}/api/anthropic/v1/messages", json=ASK, timeout=30, trust_env=False,
                       headers={"x-api-key": "proxy-handles-auth", "anthropic-version": "2023-06-01"})
    assert smoke.status_code == 200 and smoke.json()["type"] == "message"


@pytest.mark.parametrize("which,variant", [("split", "production"), ("production", "production"),
                                           ("canary", "canary")])
def test_the_guides_checks_pass_as_scripted(three, which, variant):
    script = Path(__file__).resolve().parents[2] / "scripts" / "check-entrance"
    done = subprocess.run([str(script), entrance(three, which), variant], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"serves {variant}" in done.stdout
