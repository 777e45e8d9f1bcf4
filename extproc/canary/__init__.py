"""Canary analysis and rollout: compare the canary with production, move the split step by step.

Pure parts know nothing of HTTP or files: `stats` (the tests), `thresholds` (the file of limits),
`analysis` (metrics of both variants -> one verdict per check), `rollout` (the state machine).
Edges do the I/O: `sources` (Prometheus' HTTP API), `routes` (the routes file or ConfigMap the
split lives in), `k8s` (the Kubernetes API), `audit` and `state` (the files), `metrics` (the
controller's own series), `controller` (the loop that drives the state machine).
"""
