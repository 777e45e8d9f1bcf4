"""Rate limiting: pure algorithms, no I/O.

- `signals`: what an upstream answer means (Z.AI business codes, reset times).
- `adaptive`: limits that learn the account's capacity (concurrency and start rate).
- `budget`: per-worker requests/tokens per minute (token buckets) and their file format.
- `quota`: the gate that stops upstream calls after a quota error until the reset.
"""
