"""Per-worker metric labels stay bounded across replicas; named workers keep theirs."""

from __future__ import annotations

from extproc.accounting.request_body import agent_session_of, clean_session
from extproc.limiter.stores.local import LocalStore
from extproc.proxy.keys import parse_worker_keys
from extproc.telemetry.worker_labels import OTHER, WorkerLabels


async def test_300_unnamed_credentials_give_at_most_101_labels_across_two_replicas():
    store = LocalStore()  # shared by both "replicas", as Redis is
    named = {"alice", "bob"}
    replicas = [WorkerLabels(store, "acct", 100, named.__contains__) for _ in range(2)]
    seen = set()
    for i in range(300):
        seen.add(await replicas[i % 2].label(f"key-{i:012x}"))
    for replica in replicas:
        seen.add(await replica.label("alice"))
    assert "alice" in seen and OTHER in seen
    unnamed = seen - named
    assert len(unnamed) == 101  # 100 fingerprints and "other"
    # A worker keeps its label: labelled ones stay, later ones stay "other".
    assert await replicas[1].label("key-000000000000") == "key-000000000000"
    assert await replicas[0].label(f"key-{299:012x}") == OTHER


def test_priority_workers_in_the_keys_file():
    table = parse_worker_keys("alice sk-a priority\nbob sk-b\nsk-c\n")
    assert table.priority == frozenset({"alice"}) and table.named == frozenset({"alice", "bob"})
    assert table.name_for("sk-c").startswith("key-")


def test_agent_session_from_claude_codes_user_id_or_header():
    user_id = ("user_4f2a_account_11111111-2222-3333-4444-555555555555_session_"
               "abcdef12-3456-7890-abcd-ef1234567890")
    assert agent_session_of({"metadata": {"user_id": user_id}}) == \
        "abcdef12-3456-7890-abcd-ef1234567890"
    assert agent_session_of({"metadata": {"user_id": "plain"}}) is None
    assert agent_session_of({"metadata": "x"}) is None
    assert clean_session(" s-1 ") == "s-1"
    assert clean_session("x" * 65) is None and clean_session("a\nb") is None


def test_queued_requests_by_worker_label():
    from prometheus_client import CollectorRegistry, generate_latest

    from extproc.telemetry.metrics import WorkerQueueCollector

    labels = WorkerLabels(LocalStore(), "acct", 1, {"alice"}.__contains__)
    registry = CollectorRegistry()
    registry.register(WorkerQueueCollector("production", lambda: {"alice": 2, "key-1": 1,
                                                                   "key-2": 3}, labels.known))
    text = generate_latest(registry).decode()
    assert 'zai_proxy_worker_queued{deployment_variant="production",worker="alice"} 2.0' in text
    assert 'zai_proxy_worker_queued{deployment_variant="production",worker="other"} 4.0' in text
