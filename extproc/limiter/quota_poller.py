"""Polls Z.AI's quota report for the account, off the request path, and acts on it.

One replica per account polls in each interval (the first to claim the interval's slot in the
state store: with Redis, one of all the replicas of both variants; without it, each process) and
shares the report; the others take it from the store. Every replica feeds the report to its pacer
(metrics, the reserve) and closes the quota gate when a window is spent, until its reset, so no
request is sent that Z.AI would refuse with 1308/1310. A failed poll keeps the last good report.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from extproc.lifecycle import cancel_and_wait
from extproc.limiter.pacing import Pacer
from extproc.limiter.quota_report import GATE_CODES, QuotaReport, QuotaReportError, parse_report
from extproc.limiter.stores.base import LimiterStore, StoreUnavailable

log = logging.getLogger(__name__)

QUOTA_PATH = "/api/monitor/usage/quota/limit"
MAX_REPORT_BYTES = 256 * 1024  # a report is a few hundred bytes; anything this big is not one
REPORT_TTL_INTERVALS = 10  # a shared report older than this many intervals is not taken

Fetch = Callable[[], Awaitable[Any]]
CloseGate = Callable[[float, str, str], object]


@dataclass
class PollStatus:
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    errors: int = 0
    polls: int = 0


class QuotaPoller:
    def __init__(self, account: str, fetch: Fetch, store: LimiterStore, pacer: Pacer,
                 close_gate: CloseGate, interval: float,
                 wall: Callable[[], float] = time.time) -> None:
        self.account = account
        self.fetch = fetch
        self.store = store
        self.pacer = pacer
        self.close_gate = close_gate
        self.interval = interval
        self.wall = wall
        self.report: QuotaReport | None = None
        self.status = PollStatus()
        self._task: asyncio.Task[None] | None = None

    # -- one round -------------------------------------------------------------------------

    async def round(self) -> None:
        """Poll if this replica holds the interval's slot, else take the shared report."""
        now = self.wall()
        slot = int(now // self.interval)
        try:
            mine = await self.store.claim(f"quota-poll:{self.account}:{slot}", now, self.interval)
        except StoreUnavailable:
            mine = True  # alone for now: better one poll too many than none
        if mine:
            await self.poll()
        else:
            await self._take_shared()

    async def poll(self) -> None:
        now = self.wall()
        self.status.polls += 1
        try:
            report = parse_report(await self.fetch(), now)
        except (QuotaReportError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._failed(exc)
            return
        self.status.last_success = now
        try:
            await self.store.save_state(self._shared_key(), report.to_dict(),
                                        self.interval * REPORT_TTL_INTERVALS)
        except StoreUnavailable:
            pass
        self.adopt(report)

    async def _take_shared(self) -> None:
        try:
            doc = await self.store.load_state(self._shared_key())
        except StoreUnavailable:
            return
        report = QuotaReport.from_dict(doc) if doc is not None else None
        if report is not None and (self.report is None or report.taken_at > self.report.taken_at):
            self.status.last_success = report.taken_at
            self.adopt(report)

    def adopt(self, report: QuotaReport) -> None:
        """A new report: pace it, and close the gate over a spent window until its reset."""
        now = self.wall()
        self.report = report
        self.pacer.observe(report, now)
        for name, window in report.windows.items():
            code = GATE_CODES.get(name)
            if code is None or not window.exhausted or window.reset_at is None:
                continue
            if window.reset_at > now:
                self.close_gate(window.reset_at + 1.0, code,
                                f"Z.AI's quota report shows the {name} window used up "
                                f"({window.used_ratio:.0%}).")

    def _failed(self, exc: BaseException) -> None:
        status = self.status
        status.errors += 1
        status.last_error_at = self.wall()
        message = str(exc) if isinstance(exc, QuotaReportError) else exc.__class__.__name__
        if message != status.last_error:
            # Once per kind of failure, not once a minute.
            log.warning("quota poll failed; keeping the last report", extra={"error": message})
        status.last_error = message

    def _shared_key(self) -> str:
        return f"{self.account}:quota-report"

    # -- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception:  # the poller must never die
                log.exception("quota poller round failed")
            # Wake at the next slot's start, so replicas agree on whose turn it is.
            now = self.wall()
            await asyncio.sleep(self.interval - (now % self.interval) + 0.05)

    def state(self) -> dict[str, Any]:
        """For /health?detail=1."""
        now = self.wall()
        report = self.report
        windows: dict[str, Any] = {}
        if report is not None:
            for name, window in report.windows.items():
                windows[name] = {
                    "used_ratio": round(window.used_ratio, 4),
                    "used_now_estimate": _round(self.pacer.used_now(name)),
                    "reset_at": window.reset_at,
                    "runs_out_at": self.pacer.runs_out_at(name, now),
                }
        return {"level": report.level if report else None,
                "taken_at": report.taken_at if report else None,
                "last_success": self.status.last_success, "last_error": self.status.last_error,
                "errors": self.status.errors, "windows": windows}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def http_fetch(url: str, key: Callable[[], str], timeout: float,
               ca_file: str | None = None) -> Fetch:
    """GET the report with the raw key as `Authorization` (no `Bearer`, as Z.AI wants), with a
    short timeout and a bounded read. One client session, made on first use."""
    session: aiohttp.ClientSession | None = None
    ssl_context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    async def fetch() -> Any:
        nonlocal session
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                connector=aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None)
        async with session.get(url, headers={"Authorization": key(),
                                             "Accept": "application/json"}) as response:
            body = await response.content.read(MAX_REPORT_BYTES + 1)
            if len(body) > MAX_REPORT_BYTES:
                raise QuotaReportError(f"the answer is over {MAX_REPORT_BYTES} bytes")
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise QuotaReportError(
                    f"HTTP {response.status}, not JSON ({len(body)} bytes)") from None
            if response.status != 200 and isinstance(doc, dict) and doc.get("code") == 200:
                raise QuotaReportError(f"HTTP {response.status}")
            return doc

    async def close() -> None:
        if session is not None:
            await session.close()

    fetch.close = close  # type: ignore[attr-defined]
    return fetch
