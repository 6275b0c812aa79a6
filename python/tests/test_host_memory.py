"""Symmetric buffers: allocation in the group's windows, hand-over by DLPack once, the slot
back to the pool when the last array drops it; the allocator callbacks torch loads (served
from reserved segments, never growing the pool); handles that do not leak."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import symmcomm as sc
from symmcomm import _core

MiB = 1 << 20


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 * MiB)
    options.setdefault("timeout", 20)
    return sc.run_threads(world, body, join_timeout=120, **options)


def addr(a):
    return a.__array_interface__["data"][0]


def test_empty_lies_in_windows_and_goes_back():
    def body(comm):
        g = comm.world
        assert g.pool_stats()["in_use"] == 0
        a = sc.empty(g, (3, 5), "f32")
        assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.writeable
        seg, off = g.lookup(addr(a))
        used = g.pool_stats()["in_use"]
        assert used >= a.nbytes
        view = a[1:]  # a view keeps the slot
        del a
        gc.collect()
        assert g.pool_stats()["in_use"] == used
        del view
        gc.collect()
        assert g.pool_stats()["in_use"] == 0
        return seg, off

    # Every rank's buffer lies at the same segment and offset (the pool is SPMD).
    a, b = run(2, body)
    assert a == b


def test_plain_and_policy_placements():
    def body(comm):
        g = comm.world
        plain = sc.empty(g, (16,), "f32", symmetric=False)
        assert g.lookup(addr(plain)) is None
        by_policy = sc.empty(g, (16,), "f32", symmetric=None)
        placed = g.lookup(addr(by_policy)) is not None
        return placed, g.placement(), g.uses_symmetric(), g.placement(disabled=True)

    two = run(2, body)[0]
    assert two == (True, "symmetric", True, "the scope was opened disabled")
    one = run(1, body)[0]
    assert one == (False, "the group has one rank", False, "the scope was opened disabled")
    off = run(2, body, symmetric=False)[0]
    assert off[0] is False and off[1] == "symmetric memory is switched off"


def test_dcp_policy():
    """With DCP > 1 only the dcp group uses windows (the policy: with DCP, only the DCP group)."""

    def body(comm):
        tp = comm.new_group([0, 1], "tp")
        dcp = comm.new_group([0, 1], "dcp")
        return tp.placement(), dcp.placement()

    assert run(2, body, dcp_size=2)[0] == (
        "DCP > 1: only the DCP group uses symmetric memory",
        "symmetric",
    )


def test_dlpack_buffer_protocol():
    def body(comm):
        g = comm.world
        buf = g.empty([2, 3], "f16")
        assert buf.__dlpack_device__() == (1, 0)
        assert buf.shape == [2, 3] and buf.dtype == "f16" and buf.nbytes == 12
        assert buf.symmetric and g.lookup(buf.ptr) is not None
        a = np.from_dlpack(buf)
        b = np.from_dlpack(buf)  # every capsule keeps the memory: two arrays, one slot
        assert addr(a) == addr(b) == buf.ptr and a.dtype == np.float16
        a[...] = 1.5
        assert (b == 1.5).all()
        with pytest.raises(BufferError):
            buf.__dlpack__(copy=True)
        with pytest.raises(BufferError):
            buf.__dlpack__(dl_device=(2, 0))
        # An unconsumed capsule frees its export.
        cap = buf.__dlpack__()
        del cap
        bits = np.from_dlpack(g.empty([4], "bf16").bits())
        assert bits.dtype == np.uint16
        in_use = g.pool_stats()["in_use"]
        del buf, a, b, bits
        gc.collect()
        return in_use, g.pool_stats()["in_use"]

    in_use, after = run(2, body)[0]
    assert in_use > 0 and after == 0


def test_reserve_then_allocate_like_torch():
    """The callbacks torch's allocator calls: served from what the scope reserved, never
    growing the pool; a request beyond it fails with the reason and the pool unchanged."""

    def body(comm):
        g = comm.world
        g.reserve(4 * MiB)
        segments = g.pool_stats()["segments"]
        assert g.pool_stats()["capacity"] >= 4 * MiB
        with pytest.raises(sc.ArgumentError, match="no symmcomm scope"):
            _core._test_alloc(MiB, -1)
        _core.push_alloc_group(g.handle)
        try:
            p = _core._test_alloc(MiB, -1)
            assert g.lookup(p) is not None
            assert _core.live_allocations() >= 1
            with pytest.raises(sc.ArgumentError, match="reserve_bytes"):
                _core._test_alloc(64 * MiB, -1)
            with pytest.raises(sc.ArgumentError, match="cuda:0"):
                _core._test_alloc(MiB, 0)
            assert g.pool_stats()["segments"] == segments  # never grew
            in_use = g.pool_stats()["in_use"]
            _core._test_free(p, MiB, -1)
            assert g.pool_stats()["in_use"] == in_use - MiB
        finally:
            _core.pop_alloc_group(g.handle)
        _core._test_free(12345, 1, -1)  # unknown pointer: reported, not a crash
        assert "never handed out" in _core.take_alloc_error()
        assert _core.take_alloc_error() is None
        return True

    assert run(1, body) == [True]


def test_scopes_close_in_order():
    def body(comm):
        a = comm.world
        b = comm.new_group([0], "tp")
        _core.push_alloc_group(a.handle)
        _core.push_alloc_group(b.handle)
        with pytest.raises(sc.ArgumentError, match="reverse order"):
            _core.pop_alloc_group(a.handle)
        _core.pop_alloc_group(b.handle)
        _core.pop_alloc_group(a.handle)
        return True

    assert run(1, body) == [True]


def test_handles_do_not_leak():
    before = _core.live_handles()

    def body(comm):
        g = comm.new_group(list(range(comm.world_size)), "tp")
        c = sc.DcpCombine(g, 2, 4, 8, dtype="f32")
        b = sc.DpGatheredBuffer(g, 8, "f32", 2)
        s = b.step(1)
        return g.handle, c.handle, b.handle, s.handle

    handles = run(2, body)
    assert len({h[0] for h in handles}) == 2
    gc.collect()
    assert _core.live_handles() == before


def test_groups_by_rank_lists():
    def body(comm):
        r = comm.rank
        tp = comm.new_group([0, 1], "tp")
        tp2 = comm.new_group([2, 3], "tp")
        pp = comm.new_groups([[0, 2], [1, 3]], "pp")
        sp = comm.split("dp", r % 2)
        sub = (tp or tp2).split("dcp", 0)
        return (
            r,
            None if tp is None else (tp.rank, tp.size, tp.label, tp.kind, tp.members),
            None if tp2 is None else (tp2.rank, tp2.label, tp2.members),
            (pp.label, pp.members),
            (sp.label, sp.members),
            (sub.kind, sub.size),
        )

    for r, tp, tp2, pp, sp, sub in run(4, body):
        if r < 2:
            assert tp == (r, 2, "tp#0", "tp", [0, 1]) and tp2 is None
        else:
            assert tp is None and tp2 == (r - 2, "tp#1", [2, 3])
        assert pp == (f"pp#{r % 2}", [r % 2, r % 2 + 2])
        assert sp == (f"dp#{r % 2}", [r % 2, r % 2 + 2])
        assert sub == ("dcp", 2)


def test_communicator_facts():
    def body(comm):
        f = comm.facts()
        return comm.backend, comm.device, comm.world_size, f["name"], repr(comm), comm.describe()

    backend, device, n, name, text, describe = run(2, body)[0]
    assert (backend, device, n, name) == ("host", None, 2, "host")
    assert "rank 0/2" in text and "host" in describe


def test_context_manager_closes():
    comms = _core.Communicator.threads(1, backend="host")
    with comms[0] as c:
        assert c.world.size == 1
    assert comms[0].closed


def test_nccl_env_plan(monkeypatch):
    for name in ("NCCL_CUMEM_ENABLE", "NCCL_RUNTIME_CONNECT", "NCCL_GRAPH_MIXING_SUPPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    plan = {line["name"]: line for line in sc.nccl_env(dcp_size=2)}
    assert plan["NCCL_CUMEM_ENABLE"]["action"] == "set" and plan["NCCL_CUMEM_ENABLE"]["value"] == "1"
    assert plan["NCCL_GRAPH_MIXING_SUPPORT"]["value"] == "0"
    assert plan["NCCL_NVLS_ENABLE"] == {
        "name": "NCCL_NVLS_ENABLE",
        "action": "observe",
        "value": None,
        "user": "0",
        "why": plan["NCCL_NVLS_ENABLE"]["why"],
    }
    import os

    assert "NCCL_RUNTIME_CONNECT" not in os.environ
    monkeypatch.setenv("NCCL_CUMEM_ENABLE", "0")
    sc.nccl_env(apply=True)
    assert os.environ["NCCL_RUNTIME_CONNECT"] == "0"
    assert os.environ["NCCL_CUMEM_ENABLE"] == "0"  # the user's value wins
    monkeypatch.delenv("NCCL_RUNTIME_CONNECT")
