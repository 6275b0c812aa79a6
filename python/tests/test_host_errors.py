"""Every misuse raises a clear exception of the symmcomm.errors hierarchy naming rank, group,
operation and size; none crashes or hangs (every wait has the communicator's deadline)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

import symmcomm as sc
from symmcomm import _core


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 << 20)
    options.setdefault("timeout", 20)
    return sc.run_threads(world, body, join_timeout=120, **options)


def raises_on_every_rank(world, call, cls, *, op=None, kind=None, match=None):
    """Run `call(comm)` on every rank; each must raise `cls` naming its own rank."""

    def body(comm):
        with pytest.raises(cls, match=match) as info:
            call(comm)
        e = info.value
        return comm.rank, e

    for rank, e in run(world, body):
        assert isinstance(e, sc.SymmcommError)
        if op is not None:
            assert e.op == op, (e.op, e)
            assert e.group is not None and e.world is not None and e.nbytes is not None
            assert str(e.rank) in str(e)
        if kind is not None:
            assert e.kind == kind, (e.kind, e)
    return e


def f32(*shape):
    return np.ones(shape, np.float32)


def test_not_contiguous():
    e = raises_on_every_rank(
        2,
        lambda c: sc.all_reduce(c.world, f32(4, 6).T),
        sc.NotContiguousError,
        op="all_reduce",
        kind="NotContiguous",
    )
    assert "strides" in str(e) and e.nbytes == 96 and e.group == "world"
    assert isinstance(e, ValueError)


def test_not_contiguous_output():
    raises_on_every_rank(
        2,
        lambda c: sc.all_gather(c.world, f32(4), f32(4, 4)[:, 1:3]),
        sc.NotContiguousError,
        op="all_gather",
    )


def test_negative_strides():
    raises_on_every_rank(
        2, lambda c: sc.all_reduce(c.world, f32(8)[::-1]), sc.ArgumentError, op="all_reduce"
    )


def test_dtype_mismatch():
    e = raises_on_every_rank(
        2,
        lambda c: sc.all_reduce(c.world, f32(4), np.ones(4, np.float16)),
        sc.DTypeError,
        op="all_reduce",
        kind="DTypeMismatch",
    )
    assert isinstance(e, TypeError)


def test_integer_reduction():
    raises_on_every_rank(
        2,
        lambda c: sc.all_reduce(c.world, np.ones(4, np.int32)),
        sc.DTypeError,
        op="all_reduce",
        kind="OpNotAllowed",
    )


def test_unsupported_numpy_type():
    with pytest.raises(sc.DTypeError, match="float64"):
        run(1, lambda c: sc.all_reduce(c.world, np.ones(4)))


def test_bf16_override_needs_two_byte_elements():
    with pytest.raises(sc.DTypeError, match="2-byte"):
        run(1, lambda c: sc.all_reduce(c.world, f32(4), dtype="bf16"))


def test_wrong_output_shape():
    raises_on_every_rank(
        2,
        lambda c: sc.all_gather(c.world, f32(4), f32(7)),
        sc.ShapeError,
        op="all_gather",
    )


def test_output_shape_along_dim():
    raises_on_every_rank(
        2,
        lambda c: sc.all_gather(c.world, f32(2, 3), f32(2, 5), dim=1),
        sc.ShapeError,
        op="all_gather",
    )


def test_not_divisible():
    raises_on_every_rank(
        2,
        lambda c: sc.reduce_scatter(c.world, f32(5)),
        sc.ShapeError,
        op="reduce_scatter",
        match="not divisible",
    )


def test_not_divisible_given_output():
    raises_on_every_rank(
        3,
        lambda c: sc.reduce_scatter(c.world, f32(4, 2), f32(1, 2), dim=0),
        sc.ShapeError,
        op="reduce_scatter",
    )


def test_bad_dim():
    raises_on_every_rank(
        2, lambda c: sc.all_gather(c.world, f32(2, 3), dim=2), sc.ShapeError, op="all_gather"
    )
    raises_on_every_rank(
        2,
        lambda c: sc.all_gather(c.world, f32(2, 3), f32(2, 6), dim=-3),
        sc.ShapeError,
        op="all_gather",
    )


def test_overlap():
    def call(c):
        buf = f32(16)
        sc.all_reduce(c.world, buf[0:8], buf[4:12])

    raises_on_every_rank(2, call, sc.OverlapError, op="all_reduce", kind="Overlap")


def test_read_only_output():
    def call(c):
        out = f32(4)
        out.setflags(write=False)
        sc.all_reduce(c.world, f32(4), out)

    with pytest.raises(sc.ArgumentError, match="read-only"):
        run(1, call)


def test_array_of_another_group():
    """A buffer of the tp group's windows handed to a world collective."""

    def call(c):
        tp = c.new_group([0, 1], "tp")
        x = sc.empty(tp, (8,), "f32")
        x[...] = 1
        sc.all_reduce(c.world, x)

    e = raises_on_every_rank(2, call, sc.ForeignBufferError, op="all_reduce", kind="ForeignBuffer")
    assert "tp#0" in str(e)


def test_array_of_another_rank():
    """Thread ranks share an address space: rank 1's window is not rank 0's."""
    mine = {}

    def body(comm):
        g = comm.world
        x = sc.empty(g, (8,), "f32")
        mine[comm.rank] = x
        g.barrier()
        other = mine[1 - comm.rank]
        with pytest.raises(sc.ForeignBufferError, match="windows of group world"):
            sc.all_reduce(g, other, x)
        g.barrier()
        return True

    assert run(2, body) == [True, True]


def test_symmetric_impl_needs_windows():
    raises_on_every_rank(
        2,
        lambda c: sc.all_reduce(c.world, f32(8), impl="host_symm"),
        sc.ForeignBufferError,
        op="all_reduce",
        kind="NotSymmetric",
    )


def test_kernel_impl_unavailable_on_host():
    def call(c):
        x = sc.empty(c.world, (8,), "f32")
        x[...] = 1
        sc.all_reduce_(c.world, x, impl="oneshot")

    raises_on_every_rank(
        2, call, sc.ImplUnavailableError, op="all_reduce", kind="ImplUnavailable"
    )


def test_unknown_names():
    def body(comm):
        g = comm.world
        for call in (
            lambda: sc.all_reduce(g, f32(4), impl="fastest"),
            lambda: sc.all_reduce(g, f32(4), op="prod"),
            lambda: sc.empty(g, (4,), "f64"),
            lambda: g.split("ep", 0),
            lambda: sc.DcpCombine(g, 2, 4, 8, dtype="f32", lse_base="10"),
        ):
            with pytest.raises(sc.ArgumentError):
                call()
        return True

    assert run(1, body) == [True]


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown option"):
        _core.Communicator.threads(1, backend="host", colour=3)
    with pytest.raises(sc.ArgumentError, match="backend"):
        _core.Communicator.threads(1, backend="tpu")
    with pytest.raises(sc.ArgumentError, match="timeout"):
        _core.Communicator.threads(1, backend="host", timeout=-1)


def test_cuda_stream_on_host_backend():
    raises_on_every_rank(
        1,
        lambda c: sc._collectives.run(
            sc._host.ARRAYS, c.world, _core.ALL_REDUCE, f32(4), f32(4), stream=0x1234
        ),
        sc.ArgumentError,
        match="host backend",
    )


def test_device_memory_on_host_backend():
    """The hot path is told where the memory is; device memory is refused before it is read."""

    def call(c):
        a = f32(4)
        p = a.__array_interface__["data"][0]
        _core.collective(
            c.world.handle, _core.ALL_REDUCE, 0, -1, 0, p, 0, [4], [1], 0, p, 0, [4], [1]
        )

    raises_on_every_rank(1, call, sc.ArgumentError, op="all_reduce", match="cuda:0")


def test_dropped_group_handle():
    def body(comm):
        g = comm.new_group([0], "tp")
        handle = g.handle
        del g
        a = f32(4)
        p = a.__array_interface__["data"][0]
        with pytest.raises(sc.ArgumentError, match="names nothing"):
            _core.collective(handle, 0, 0, -1, -1, p, 0, [4], [1], -1, p, 0, [4], [1])
        return True

    assert run(1, body) == [True]


def test_closed_communicator():
    comm = _core.Communicator.threads(1, backend="host")[0]
    comm.close()
    assert comm.closed
    with pytest.raises(sc.ArgumentError, match="closed"):
        comm.new_group([0])
    comm.close()  # twice is fine


def test_deadline_then_aborted():
    """Rank 1 never joins: rank 0's collective ends by the deadline, and the communicator is
    aborted for every later call."""
    started = time.monotonic()

    def body(comm):
        if comm.rank == 1:
            return None
        g = comm.world
        with pytest.raises(sc.DeadlineError) as info:
            sc.all_reduce(g, f32(4))
        with pytest.raises(sc.AbortedError):
            sc.all_reduce(g, f32(4))
        return info.value

    e = run(2, body, timeout=1.0)[0]
    assert isinstance(e, TimeoutError) and e.op == "all_reduce" and e.rank == 0
    assert time.monotonic() - started < 30


def test_pool_divergence():
    """Ranks asking the pool for different sizes are stopped with the first difference."""

    def body(comm):
        g = comm.world
        with pytest.raises(sc.DisagreementError, match="diverged"):
            sc.empty(g, (4 << 20 if comm.rank else 1 << 20,), "u8")
        return True

    assert run(2, body) == [True, True]


def test_new_group_disagreement():
    def body(comm):
        ranks = [0, 1] if comm.rank == 0 else [0, 2]
        with pytest.raises(sc.DisagreementError, match="ranks of new groups"):
            comm.new_group(ranks)
        return True

    assert run(3, body) == [True] * 3


def test_new_group_bad_ranks():
    def body(comm):
        for ranks in ([], [0, 0], [5]):
            with pytest.raises(sc.ArgumentError):
                comm.new_group(ranks)
        with pytest.raises(sc.ArgumentError, match="two of the lists"):
            comm.new_groups([[0, 1], [1]])
        return True

    assert run(2, body) == [True, True]


def test_split_colour_too_large():
    def body(comm):
        with pytest.raises(sc.ArgumentError, match="too large"):
            comm.split("tp", 1 << 31)
        return True

    assert run(1, body) == [True]


def test_bootstrap_from_bad_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(sc.BootstrapError, match="WORLD_SIZE"):
        sc.Communicator.from_env(backend="host", timeout=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(sc.BootstrapError, match="out of range"):
        sc.Communicator.from_env(backend="host", timeout=2)


def test_rendezvous_unreachable():
    port = sc.free_port()
    started = time.monotonic()
    with pytest.raises(sc.BootstrapError) as info:
        sc.Communicator.rendezvous("127.0.0.1", port, 1, 2, backend="host", timeout=1.0)
    assert info.value.rank == 1
    assert time.monotonic() - started < 20


def test_dcp_errors():
    def body(comm):
        g = comm.world
        with pytest.raises(sc.ShapeError):
            sc.DcpCombine(g, 2, 3, 8, dtype="f32")  # 3 heads over 2 ranks
        with pytest.raises(sc.ArgumentError, match="multiple of 8"):
            sc.DcpCombine(g, 2, 4, 12, dtype="f32")
        with pytest.raises(sc.ArgumentError, match="bf16 or f32"):
            sc.DcpCombine(g, 2, 4, 8, dtype="f16")
        c = sc.DcpCombine(g, 2, 4, 8, dtype="f32")
        with pytest.raises(sc.ArgumentError, match="batch_max"):
            c.partial_out(3)
        with pytest.raises(sc.ArgumentError, match="batch_max"):
            c.run(3)
        with pytest.raises(sc.ArgumentError):
            c.run(1, impl="fastest")
        return True

    assert run(2, body) == [True, True]


def test_dp_errors():
    def body(comm):
        g = comm.world
        with pytest.raises(sc.DisagreementError, match="hidden size"):
            sc.DpGatheredBuffer(g, 8 + comm.rank, "f32", 4)
        b = sc.DpGatheredBuffer(g, 8, "f32", 4)
        step = b.step(5 if comm.rank == 0 else 1)
        with pytest.raises(sc.CapacityError):
            b.gather(step)
        with pytest.raises(sc.CapacityError):
            b.gathered(step)
        with pytest.raises(sc.ArgumentError, match="padding mode"):
            b.step(1, mode="min_len")
        ok = b.step(1)
        for call, op in ((b.gather, "dp_gather"), (b.scatter, "dp_scatter")):
            with pytest.raises(sc.ArgumentError, match="unknown implementation") as e:
                call(ok, impl="fastest")
            assert e.value.op == op, (op, e.value.op)
        other = sc.DpGatheredBuffer(comm.new_group([0, 1], "dp"), 8, "f32", 4)
        s2 = other.step(1)
        with pytest.raises(sc.ArgumentError, match="token counts agreed"):
            b.gather(s2)
        del other
        with pytest.raises(sc.ArgumentError, match="not in the group"):
            s2.rows_of(7)
        return True

    assert run(2, body) == [True, True]


def test_errors_pickle():
    e = sc.ShapeError("msg", kind="ShapeMismatch", rank=1, world=2, group="tp#0", op="all_gather", nbytes=8)
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is sc.ShapeError and e2.rank == 1 and e2.group == "tp#0" and str(e2) == "msg"


def test_hierarchy():
    assert issubclass(sc.DeadlineError, TimeoutError)
    assert issubclass(sc.CapacityError, MemoryError)
    assert issubclass(sc.DTypeError, TypeError) and issubclass(sc.DTypeError, ValueError)
    for name in sc.errors.__all__:
        assert issubclass(getattr(sc, name), sc.SymmcommError)
