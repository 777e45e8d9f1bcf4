"""`zai-proxy up`, as a user runs it: one command, no credentials, Ctrl-C stops everything."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx2 as httpx

from harness import stack_env

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_with_emulator_and_stops_everything_on_ctrl_c():
    env = stack_env()
    ports = [int(env[k]) for k in ("LISTEN_PORT", "EXTPROC_GRPC_PORT", "EXTPROC_ADMIN_PORT",
                                   "ENVOY_ADMIN_PORT")]
    proc = subprocess.Popen([ZAI_PROXY, "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops everything" in l for l in output):
            assert proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        text = "".join(output)
        assert "BUILT-IN Z.AI EMULATOR" in text
        assert f"ANTHROPIC_BASE_URL=http://localhost:{env['LISTEN_PORT']}/api/anthropic" in text

        url = f"http://localhost:{env['LISTEN_PORT']}"
        assert httpx.get(f"{url}/health", trust_env=False).text == '{"status":"ok"}'
        client = anthropic.Anthropic(base_url=f"{url}/api/anthropic", auth_token="proxy-handles-auth",
                                     max_retries=0, http_client=httpx.Client(trust_env=False))
        with client.messages.stream(model="glm-4.7", max_tokens=32,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            assert stream.get_final_text()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(port_open(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in ports if port_open(p)], "a child process outlived `up`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_stops_when_a_child_dies():
    env = stack_env()
    proc = subprocess.Popen([ZAI_PROXY, "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Read as it comes: `up` forwards its children's logs, and a full pipe would block it.
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # Up once `up` says so (its banner): from then on it watches its children.
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops everything" in line for line in output):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(output)
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{env['LISTEN_PORT']}/health", trust_env=False).status_code == 200
        found = subprocess.run(["pgrep", "-f", "extproc serve"], capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split()]
        children = [p for p in pids if _parent(p) == proc.pid]
        assert children, "no ext_proc child found"
        os.kill(children[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1  # each child gets up to 5 s to stop
        reader.join(timeout=10)
        # Either variant's ext_proc may be the one killed ("extproc", "extproc-canary").
        assert re.search(r"zai-proxy up: extproc(-\w+)? exited with code -9", "".join(output))
        assert not port_open(int(env["LISTEN_PORT"]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
