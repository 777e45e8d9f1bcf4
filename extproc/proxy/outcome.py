"""What a finished request came to: the record handed once to the recorder (metrics, the
"Token usage" line, the access log's metadata), and the recorder's contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from extproc.api import Endpoint


class Tokens(NamedTuple):
    """Final token counts of a request, and which of them are estimates. A named tuple: one is
    built for every request (a frozen dataclass's `__init__` costs ~8x more)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    input_estimated: bool = False
    output_estimated: bool = False

    @property
    def estimated(self) -> bool:
        return self.input_estimated or self.output_estimated

    def by_direction(self) -> dict[str, int]:
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_write": self.cache_write}


@dataclass
class Outcome:
    """What the request came to; handed to the recorder once."""

    endpoint: Endpoint
    worker: str
    request_id: str
    status: int
    duration: float
    completed: bool  # the response reached its end (vs. cut short / client gone)
    requested_model: str | None = None
    # The served model: as the response named it, else as the last attempt was sent (MODEL_MAP,
    # MODEL_FALLBACKS), else as requested.
    model: str | None = None
    tokens: Tokens | None = None  # None: no tokens to account (rejected before upstream)
    time_to_first_token: float | None = None
    error_type: str | None = None
    error_code: str | None = None
    malformed_request: str | None = None
    agent_session: str | None = None  # the client's conversation id, when it sends one
    # The gateway's id of the request (its ticket's session): how an observer process's outcome
    # finds its claim in the admission process (proxy/handoff.py).
    session: str | None = None


class Recorder(Protocol):
    async def record(self, outcome: Outcome) -> dict[str, object]: ...
