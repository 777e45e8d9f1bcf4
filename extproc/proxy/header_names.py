"""The HTTP headers the ext_proc reads, per stream: the readers use these names, and Envoy's
configuration forwards only these (`forward_rules`, extproc/routing/envoy_config.py). Every
other header stays in Envoy: a coding agent's request carries ~25 headers (SDK telemetry,
betas, user agent) and Z.AI's response ~15, and each one sent costs Envoy a copy, the gRPC
message bytes, and this process a Python string per request."""

from __future__ import annotations

PATH = ":path"
STATUS = ":status"
CONTENT_TYPE = "content-type"
API_KEY = "x-api-key"
AUTHORIZATION = "authorization"
REQUEST_ID = "x-request-id"
RETRY_AFTER = "retry-after"
# Claude Code names its conversation in this header; the usage record carries it.
AGENT_SESSION = "x-claude-code-session-id"
# Headers the gateway uses internally to carry identity or variant: never accepted from clients
# (the request filter removes any it is sent, so it must see them all).
INTERNAL_PREFIX = "x-zai-proxy-"

# The request filter: the key swap and admission; on inline routes also the response's status
# and type (it then follows the body).
REQUEST_FILTER = (PATH, API_KEY, AUTHORIZATION, REQUEST_ID, AGENT_SESSION, STATUS, CONTENT_TYPE)
REQUEST_FILTER_PREFIXES = (INTERNAL_PREFIX,)
# The observer: the response's status and whether it streams.
OBSERVER = (STATUS, CONTENT_TYPE)
# The attempt filter: each failed attempt's status and the back-off upstream asked for.
ATTEMPT = (STATUS, RETRY_AFTER)
