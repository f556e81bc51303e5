"""``TimerQueue``, the event worker's asyncio timers, both implementations:
order (by when, then by the order they came in), cancelled timers dropped
at the top, when due and in bulk, their count kept exact, handles released,
and asyncio's ``TimerHandle.cancel()`` reaching it through the loop."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork.server.workers.event_asyncio import EventWorkerLoop

pytestmark = pytest.mark.timeout(60)


class Owner:
    """Stands for the loop: TimerHandle.cancel() calls its _timer_handle_cancelled."""

    def __init__(self, impl: ModuleType) -> None:
        self.queue = impl.TimerQueue()
        self._timer_handle_cancelled = self.queue.cancelled

    def get_debug(self) -> bool:
        return False

    def timer(self, when: float, name: Any = None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, print, (name,), self)  # type: ignore[arg-type]
        self.queue.push(handle)
        return handle


def due(queue: Any, now: float) -> list[asyncio.TimerHandle]:
    ready: list[asyncio.TimerHandle] = []
    queue.pop_due(now, ready)
    return ready


def names(handles: list[asyncio.TimerHandle]) -> list[Any]:
    return [h._args[0] for h in handles]  # type: ignore[attr-defined]


def test_timers_come_due_by_when_then_in_the_order_pushed(impl):
    owner = Owner(impl)
    for name, when in [("c", 3.0), ("a1", 1.0), ("b", 2.0), ("a2", 1.0), ("a3", 1.0), ("d", 4.0)]:
        owner.timer(when, name)
    assert len(owner.queue) == 6 and owner.queue.next_when() == 1.0
    assert due(owner.queue, 0.5) == []
    first = due(owner.queue, 2.0)
    assert names(first) == ["a1", "a2", "a3", "b"]
    assert all(not h._scheduled for h in first)  # type: ignore[attr-defined]
    assert len(owner.queue) == 2 and owner.queue.next_when() == 3.0
    assert names(due(owner.queue, float("inf"))) == ["c", "d"]
    assert owner.queue.next_when() == float("inf") and len(owner.queue) == 0


def test_cancelled_timers_are_counted_once_and_never_come_due(impl):
    owner = Owner(impl)
    first, second, third = owner.timer(1.0, 1), owner.timer(2.0, 2), owner.timer(3.0, 3)
    first.cancel()
    first.cancel()  # asyncio calls the loop once per handle
    assert owner.queue.cancelled_count == 1
    assert owner.queue.next_when() == 2.0  # the cancelled top is dropped
    assert owner.queue.cancelled_count == 0 and len(owner.queue) == 2
    third.cancel()
    assert names(due(owner.queue, 10.0)) == [2]
    assert owner.queue.cancelled_count == 0 and len(owner.queue) == 0
    second.cancel()  # after it came due: not in the queue, not counted
    assert owner.queue.cancelled_count == 0


def test_a_push_drops_the_cancelled_once_they_are_half_of_the_queue(impl):
    owner = Owner(impl)
    limit = impl.TimerQueue.COMPACT_AFTER
    live = [owner.timer(100.0 + i, f"live{i}") for i in range(limit)]
    dead = [owner.timer(1.0 + i, f"dead{i}") for i in range(limit + 1)]
    for handle in dead:
        handle.cancel()
    assert owner.queue.cancelled_count == limit + 1 and len(owner.queue) == 2 * limit + 1
    owner.timer(50.0, "new")
    assert owner.queue.cancelled_count == 0 and len(owner.queue) == limit + 1
    assert all(not h._scheduled for h in dead)  # type: ignore[attr-defined]
    assert owner.queue.next_when() == 50.0
    assert names(due(owner.queue, 1e9)) == ["new", *names(live)]


def test_clear_empties_the_queue(impl):
    owner = Owner(impl)
    handles = [owner.timer(float(i)) for i in range(10)]
    handles[3].cancel()
    owner.queue.clear()
    assert len(owner.queue) == 0 and owner.queue.cancelled_count == 0
    assert owner.queue.next_when() == float("inf")
    assert all(not h._scheduled for h in handles)  # type: ignore[attr-defined]


def test_handles_are_released_and_cycles_through_the_loop_collected(impl):
    owner = Owner(impl)
    handle = owner.timer(1.0)
    before = sys.getrefcount(handle)
    for i in range(200):  # through the heap, compaction and pop_due
        owner.timer(2.0 + i).cancel()
    owner.timer(5.0)
    due(owner.queue, 1e9)
    assert sys.getrefcount(handle) == before - 1  # the queue's reference is gone
    # A handle refers to its loop, the loop to its queue, the queue to the handle.
    cycle = Owner(impl)
    cycle.timer(1.0)
    alive = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert alive() is None


operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from([0.0, 1.0, 1.5, 2.0, 7.0, 1e9])),
        st.tuples(st.just("cancel"), st.integers(0, 400)),
        st.tuples(st.just("due"), st.sampled_from([0.5, 1.0, 2.0, 1e10])),
        st.tuples(st.just("next"), st.just(0)),
    ),
    max_size=400,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_both_implementations_follow_a_sorted_list(ops):
    """Against a model (a list sorted by when, then push order), the
    compiled queue and its twin give the same timers in the same order."""
    from prefork import _fastio_py

    from support import compiled_unless_disabled

    impls = [_fastio_py]
    compiled = compiled_unless_disabled("_fastio")
    if compiled is not None:
        impls.append(compiled)
    for impl in impls:
        owner = Owner(impl)
        model: list[tuple[float, int, asyncio.TimerHandle]] = []
        pushed: list[asyncio.TimerHandle] = []
        for op, value in ops:
            if op == "push":
                handle = owner.timer(value, len(pushed))
                model.append((value, len(pushed), handle))
                pushed.append(handle)
            elif op == "cancel" and pushed:
                pushed[value % len(pushed)].cancel()
            elif op == "due":
                model.sort(key=lambda entry: entry[:2])
                expected = [e[2] for e in model if e[0] <= value and not e[2].cancelled()]
                model = [e for e in model if e[0] > value]
                assert due(owner.queue, value) == expected
            else:
                live = [e[0] for e in model if not e[2].cancelled()]
                assert owner.queue.next_when() == min(live, default=float("inf"))
            cancelled_in_queue = sum(1 for e in model if e[2].cancelled())
            assert owner.queue.cancelled_count <= cancelled_in_queue


def test_the_event_workers_loop_keeps_its_timers_there():
    loop = EventWorkerLoop()
    fired: list[str] = []
    kept = loop.call_at(loop.time() - 1, fired.append, "kept")
    gone = loop.call_later(-1, fired.append, "gone")
    gone.cancel()
    assert loop._timers.cancelled_count == 1 and len(loop._timers) == 2
    assert isinstance(kept, asyncio.TimerHandle)
    assert loop.timeout(5.0) == 0.0  # one is due
    loop.run_once()
    assert fired == ["kept"]
    later = loop.call_later(30, fired.append, "later")
    assert 29 < loop.timeout(60.0) <= 30
    loop.close()
    assert not later._scheduled  # type: ignore[attr-defined]
