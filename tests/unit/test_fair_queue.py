from hypothesis import given, strategies as st

from extproc.limiter.fair_queue import FairQueue


def drain(queue, in_flight):
    order = []
    while len(queue):
        worker, item = queue.peek(in_flight)
        assert queue.pop(worker) == item
        in_flight[worker] = in_flight.get(worker, 0) + 1
        order.append(item)
    return order


def test_light_workers_go_before_a_heavy_one():
    q = FairQueue(100)
    for i in range(20):
        q.push("heavy", f"h{i}")
    for w in "abcde":
        q.push(w, w)
    order = drain(q, {"heavy": 3})
    assert order[:5] == list("abcde")


def test_equal_load_is_round_robin_in_arrival_order():
    q = FairQueue(100)
    for i in range(3):
        q.push("x", f"x{i}")
        q.push("y", f"y{i}")
    assert drain(q, {}) == ["x0", "y0", "x1", "y1", "x2", "y2"]


def test_capacity_and_removal():
    q = FairQueue(2)
    assert q.push("a", 1) and q.push("b", 2) and not q.push("c", 3)
    assert q.remove("a", 1) and not q.remove("a", 1) and len(q) == 1
    assert q.head("b") == 2 and q.head("a") is None


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=60))
def test_every_item_comes_out_once_and_per_worker_order_holds(ops):
    q = FairQueue(1000)
    pushed = {}
    for n, (worker, remove_one) in enumerate(ops):
        q.push(worker, n)
        pushed.setdefault(worker, []).append(n)
        if remove_one and pushed[worker]:
            victim = pushed[worker].pop(0)
            assert q.remove(worker, victim)
    out = drain(q, {})
    assert sorted(out) == sorted(i for items in pushed.values() for i in items)
    for worker, items in pushed.items():
        assert [i for i in out if i in items] == items


def test_newcomers_go_before_a_busy_worker_even_when_loads_tie():
    q = FairQueue(100)
    for i in range(20):
        q.push("heavy", f"h{i}")
    in_flight = {}
    for _ in range(3):  # heavy takes the first three slots
        worker, _item = q.peek(in_flight)
        q.pop(worker)
    for w in "abcde":
        q.push(w, w)
    # Heavy's three finish: loads tie at zero, and the newcomers still go first.
    assert drain(q, {})[:5] == list("abcde")
