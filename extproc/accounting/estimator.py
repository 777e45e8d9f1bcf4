"""The session's `Estimator`: request parsing and tiktoken counts, the big ones off the event loop."""

from __future__ import annotations

from extproc.accounting.request_body import RequestInfo, parse_request_async
from extproc.accounting.tokens import TokenCounter
from extproc.api import Api


class TiktokenEstimator:
    """The session's `Estimator`: request parsing and token counts, big ones off the loop."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter

    async def parse(self, body: bytes, api: Api) -> RequestInfo:
        return await parse_request_async(body, api, self.counter.executor)

    async def count(self, info: RequestInfo) -> int:
        return await self.counter.count(info)

    async def count_text(self, text: str) -> int:
        return await self.counter.count_text_async(text)
