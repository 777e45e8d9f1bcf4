"""The dashboard: one read-only aiohttp service that collects every few seconds from each
variant's ext_procs (or from Prometheus), keeps a bounded SQLite history, and serves a JSON API,
live updates (SSE) and the web page; `zai-proxy usage` reports from the same history.

Modules: `exposition` (Prometheus text -> samples), `catalogue` (which series the dashboard
keeps, and how samples become them), `sources` (the ext_procs' /metrics, or Prometheus's API),
`history` (SQLite: increases per interval, downsampled and pruned), `quantiles`, `panels` (the
status document and the charts' series, from the history), `collector` (the loop), `events`
(live updates to many viewers), `server` (HTTP), `usage` (the usage report), `service` (wiring).
"""
