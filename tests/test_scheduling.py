"""Caps and the least-loaded choice (pure), and the slot pool's FIFO hand-out."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from supervisor.scheduling import SlotPool, StartGate, StartsGate, choose_machine


def test_choose_least_loaded_by_share_of_capacity() -> None:
    caps = {"local": 1, "a": 2, "b": 2}
    assert choose_machine({"local": 0, "a": 0, "b": 0}, caps, total_cap=5) == "local"
    assert choose_machine({"local": 1, "a": 0, "b": 0}, caps, total_cap=5) == "a"
    assert choose_machine({"local": 1, "a": 1, "b": 0}, caps, total_cap=5) == "b"
    assert choose_machine({"local": 1, "a": 2, "b": 2}, caps, total_cap=9) is None


def test_global_cap_and_pinning_and_closed_machines() -> None:
    caps = {"local": 3, "a": 3}
    assert choose_machine({"local": 1, "a": 1}, caps, total_cap=2) is None
    assert choose_machine({"local": 0, "a": 0}, caps, total_cap=2, preferred="a") == "a"
    assert choose_machine({"local": 0, "a": 3}, caps, total_cap=9, preferred="a") is None
    closed = frozenset({"local"})
    assert choose_machine({"local": 0, "a": 0}, caps, total_cap=9, closed=closed) == "a"
    assert choose_machine({"local": 0}, {"local": 0}, total_cap=3) is None


@pytest.mark.anyio
async def test_pool_never_exceeds_caps_and_serves_fifo() -> None:
    pool = SlotPool(3, {"local": 2, "a": 2})
    order: list[int] = []
    peak = 0

    async def job(n: int) -> None:
        nonlocal peak
        machine = await pool.acquire()
        order.append(n)
        peak = max(peak, pool.total)
        assert pool.running[machine] <= pool.capacity[machine]
        await anyio.sleep(0.01)
        pool.release(machine)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(12):
                tg.start_soon(job, n)
                await anyio.lowlevel.checkpoint()
    assert peak == 3 and pool.peak == 3
    assert order == sorted(order)
    assert pool.total == 0


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_no_slot_taken() -> None:
    pool = SlotPool(1, {"local": 1})
    held = await pool.acquire()
    with anyio.move_on_after(0.05):
        await pool.acquire()
    pool.release(held)
    with anyio.fail_after(1):
        assert await pool.acquire() == "local"


@pytest.mark.anyio
async def test_start_gate_spaces_starts() -> None:
    gate = StartGate(0.05)
    times = []
    with anyio.fail_after(5):
        for _ in range(3):
            await gate.wait_turn()
            times.append(anyio.current_time())
    assert times[1] - times[0] >= 0.045 and times[2] - times[1] >= 0.045


@pytest.mark.anyio
async def test_starts_gate_pause_resume_and_close() -> None:
    gate = StartsGate()
    gate.pause()
    result: list[bool] = []

    async def waiter() -> None:
        result.append(await gate.wait())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.02)
            assert result == []
            gate.resume()
        assert result == [True]
        gate.close("deadline")
        assert await gate.wait() is False


def test_take_holds_a_slot_at_once_past_the_cap_and_would_wait_sees_it() -> None:
    """Adoption: a run already running takes its slot without waiting (even on a machine with
    no capacity left, or none at all); nobody new gets one until the count is under the cap."""
    pool = SlotPool(2, {"local": 2, "m1": 0})
    assert not pool.would_wait()
    pool.take("local")
    pool.take("m1")
    pool.take("gone")  # a machine no longer configured
    assert (pool.total, pool.peak) == (3, 3)
    assert pool.would_wait() and pool.would_wait("local")
    pool.release("gone")
    pool.release("m1")
    assert not pool.would_wait("local")
