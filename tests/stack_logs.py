"""Waiting for a request's lines in a StackHandle's logs: its "Token usage" line (an ext_proc's)
and its access log line (Envoy's), each parsed, found by the request id."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, TypeVar

from harness import StackHandle

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 12.0) -> T:
    """The predicate's first truthy value, or its last value once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def usage_line(stack: StackHandle, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for name, line in list(stack.logs):  # a copy: the stack's threads append to it
            if name.startswith("extproc") and '"Token usage"' in line and request_id in line:
                return json.loads(line)
        return None
    found = wait_for(find)
    assert found, f"no Token usage line for {request_id}"
    return found


def access_line(stack: StackHandle, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for name, line in list(stack.logs):
            if name == "envoy" and line.startswith("{") and request_id in line:
                doc = json.loads(line)
                if doc.get("log") == "access":
                    return doc
        return None
    found = wait_for(find)
    assert found, f"no access log line for {request_id}"
    return found
