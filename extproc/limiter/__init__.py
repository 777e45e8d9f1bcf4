"""Rate limiting and the account's quota.

Pure parts (no I/O): `codes` (every Z.AI code's behaviour), `signals` (an answer → what it means,
reset times), `adaptive` (limits that learn the account's capacity), `fair_queue`, `admission`
(the queue in front of the limits), `budget` (per-worker requests/tokens per minute), `quota`
(the gate after a quota error), `quota_report` (Z.AI's quota report read), `pacing` (burn rate,
run-out, the priority reserve). Edges: `account` (the limiter of one account over its state
store), `quota_poller` (polls Z.AI's report), `stores/` (in-process, Redis, failover).
"""
