"""Collectives on NumPy arrays, host backend, thread ranks: every op, element type, reduction,
placement (windows or plain memory, each side) and layout (flat, along each dimension, in
place) against a float64 reference on fresh random inputs, outputs poisoned first."""

from __future__ import annotations

import numpy as np
import pytest

import symmcomm as sc
from _ref import FLOATS, NP, array, as_f64, assert_close, from_f64, poison, reduce_ref, rounded, values

PLACEMENTS = [("plain", "plain"), ("symm", "symm"), ("plain", "symm"), ("symm", "plain")]


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 << 20)
    return sc.run_threads(world, body, join_timeout=120, timeout=20, **options)


def dtype_arg(dtype):
    return "bf16" if dtype == "bf16" else None


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
@pytest.mark.parametrize("where", PLACEMENTS)
def test_all_reduce(world, dtype, op, where, rng):
    shape = (3, 7)
    inputs = [values(rng, shape, dtype) for _ in range(world)]
    want = rounded(reduce_ref(np.stack(inputs), op), dtype)

    def body(comm):
        g = comm.world
        x = array(g, shape, dtype, where[0])
        x[...] = from_f64(inputs[g.rank], dtype)
        out = array(g, shape, dtype, where[1])
        poison(out, dtype)
        got = sc.all_reduce(g, x, out, op=op, dtype=dtype_arg(dtype))
        assert got is out
        # The input is left as it was.
        assert (as_f64(x, dtype) == rounded(inputs[g.rank], dtype)).all()
        return as_f64(out, dtype), g.last_dispatch

    for got, ran in run(world, body):
        assert_close(got, want, dtype, terms=world)
        if world == 1:
            expected = "local"  # one rank: the result is the input, copied
        else:
            expected = "host_symm" if where == ("symm", "symm") else "host"
        assert ran.name == expected, ran
        assert ran.reason
        assert not ran.staged_input and not ran.staged_output


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("where", ["plain", "symm"])
def test_all_reduce_in_place(world, dtype, where, rng):
    shape = (5, 9)
    inputs = [values(rng, shape, dtype) for _ in range(world)]
    want = rounded(reduce_ref(np.stack(inputs), "sum"), dtype)

    def body(comm):
        g = comm.world
        x = array(g, shape, dtype, where)
        x[...] = from_f64(inputs[g.rank], dtype)
        assert sc.all_reduce_(g, x, dtype=dtype_arg(dtype)) is x
        return as_f64(x, dtype)

    for got in run(world, body):
        assert_close(got, want, dtype, terms=world)


def test_all_reduce_allocates_out(rng):
    inputs = [values(rng, (4, 4), "f32") for _ in range(2)]

    def body(comm):
        x = inputs[comm.rank].astype(np.float32)
        y = sc.all_reduce(comm.world, x)
        assert y is not x and y.shape == x.shape and y.dtype == np.float32
        return y

    for got in run(2, body):
        assert_close(got.astype(np.float64), inputs[0] + inputs[1], "f32", 2)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i32", "u8"])
@pytest.mark.parametrize("dim", [None, 0, 1, 2, -1])
@pytest.mark.parametrize("where", PLACEMENTS)
def test_all_gather(world, dtype, dim, where, rng):
    shape = (2, 3, 5)
    inputs = [values(rng, shape, dtype) for _ in range(world)]
    if dim is None:
        want = np.concatenate([i.reshape(-1) for i in inputs])
    else:
        want = np.concatenate(inputs, axis=dim)
    out_shape = want.shape

    def body(comm):
        g = comm.world
        x = array(g, shape, dtype, where[0])
        x[...] = from_f64(inputs[g.rank], dtype)
        out = array(g, out_shape, dtype, where[1])
        poison(out, dtype)
        sc.all_gather(g, x, out, dim=dim, dtype=dtype_arg(dtype))
        return as_f64(out, dtype), g.last_dispatch.name

    for got, name in run(world, body):
        assert_close(got, rounded(want, dtype), dtype)
        assert name in (("local",) if world == 1 else ("host", "host_symm")), name


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("where", PLACEMENTS)
def test_reduce_scatter(world, dtype, op, dim, where, rng):
    shape = (2 * world, 3 * world)
    inputs = [values(rng, shape, dtype) for _ in range(world)]
    total = reduce_ref(np.stack(inputs), op)
    if dim is None:
        pieces = np.split(total.reshape(-1), world)
    else:
        pieces = np.split(total, world, axis=dim)

    def body(comm):
        g = comm.world
        x = array(g, shape, dtype, where[0])
        x[...] = from_f64(inputs[g.rank], dtype)
        out = array(g, pieces[0].shape, dtype, where[1])
        poison(out, dtype)
        sc.reduce_scatter(g, x, out, op=op, dim=dim, dtype=dtype_arg(dtype))
        return g.rank, as_f64(out, dtype)

    for rank, got in run(world, body):
        assert_close(got, rounded(pieces[rank], dtype), dtype, terms=world)


def test_outputs_made_for_the_caller(rng):
    world = 3
    inputs = [values(rng, (6, 4), "f32").astype(np.float32) for _ in range(world)]

    def body(comm):
        g = comm.world
        x = inputs[g.rank]
        gathered = sc.all_gather(g, x, dim=1)
        flat = sc.all_gather(g, x)
        scattered = sc.reduce_scatter(g, x, dim=0)
        return g.rank, gathered, flat, scattered

    total = np.sum(inputs, axis=0)
    for rank, gathered, flat, scattered in run(world, body):
        assert gathered.shape == (6, 12) and flat.shape == (72,) and scattered.shape == (2, 4)
        assert (gathered == np.concatenate(inputs, axis=1)).all()
        assert (flat == np.concatenate([i.reshape(-1) for i in inputs])).all()
        assert (scattered == total[2 * rank : 2 * rank + 2]).all()


@pytest.mark.parametrize("impl", ["host", "host_symm", "auto", "nccl", "nccl_symm"])
def test_explicit_implementations(impl, rng):
    """Every implementation the host backend has, named explicitly (nccl and nccl_symm are
    the same implementations, as the CUDA backend names them)."""
    inputs = [values(rng, (64,), "f32") for _ in range(2)]

    def body(comm):
        g = comm.world
        x = sc.empty(g, (64,), "f32")
        x[...] = inputs[g.rank]
        out = sc.empty(g, (64,), "f32")
        poison(out, "f32")
        sc.all_reduce(g, x, out, impl=impl)
        return out.astype(np.float64), g.last_dispatch

    for got, ran in run(2, body):
        assert_close(got, inputs[0] + inputs[1], "f32", 2)
        expected = {"host": "host", "nccl": "host", "auto": "host_symm"}.get(impl, "host_symm")
        assert ran.name == expected, ran
        if impl != "auto":
            assert ran.reason == "requested explicitly", ran.reason


def test_subgroups(rng):
    """Collectives of groups made by rank lists run among their members only."""
    world = 4
    inputs = [values(rng, (8,), "f32") for _ in range(world)]

    def body(comm):
        tp = comm.new_groups([[0, 1], [2, 3]], "tp")
        dp = comm.new_groups([[0, 2], [1, 3]], "dp")
        a = sc.all_reduce(tp, inputs[comm.rank].astype(np.float32))
        b = sc.all_gather(dp, inputs[comm.rank].astype(np.float32))
        return comm.rank, tp.members, dp.members, a, b

    for rank, tpm, dpm, a, b in run(world, body):
        assert tpm == ([0, 1] if rank < 2 else [2, 3])
        assert dpm == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert_close(a.astype(np.float64), inputs[tpm[0]] + inputs[tpm[1]], "f32", 2)
        assert (b == np.concatenate([inputs[dpm[0]], inputs[dpm[1]]])).all()


def test_many_calls_reuse_nothing_stale(rng):
    """Fresh inputs every call, the same buffers: each result is the new inputs' reduction."""
    world = 2
    rounds = [[values(rng, (33,), "f16") for _ in range(world)] for _ in range(20)]

    def body(comm):
        g = comm.world
        x = sc.empty(g, (33,), "f16")
        out = sc.empty(g, (33,), "f16")
        got = []
        for inputs in rounds:
            x[...] = inputs[g.rank]
            poison(out, "f16")
            sc.all_reduce(g, x, out)
            got.append(out.astype(np.float64))
        return got

    for got in run(world, body):
        for g, inputs in zip(got, rounds):
            assert_close(g, rounded(inputs[0] + inputs[1], "f16"), "f16", 2)


def test_empty_arrays():
    def body(comm):
        x = np.empty((0, 4), np.float32)
        out = sc.all_reduce(comm.world, x)
        return out.shape

    assert run(2, body) == [(0, 4), (0, 4)]


def test_numpy_types_by_name():
    assert NP["bf16"] == np.uint16


def test_implementation_codes_round_trip():
    """Every implementation name has its own code (none falls back to auto)."""
    from symmcomm import _core

    names = ["auto", "nccl", "nccl_symm", "local", "oneshot", "twoshot", "ce", "ll"]
    codes = [_core.impl_code(n) for n in names]
    assert len(set(codes)) == len(names)
    assert _core.impl_code("host") == _core.impl_code("nccl")
    assert _core.impl_code("host_symm") == _core.impl_code("nccl_symm")
    with pytest.raises(sc.ArgumentError):
        _core.impl_code("fastest")


def test_local_for_one_rank_and_refused_for_more():
    def body(comm):
        g = comm.world
        x = np.arange(6, dtype=np.float32)
        if g.size == 1:
            out = sc.all_reduce(g, x, impl="local")
            return (out == x).all(), g.last_dispatch.name
        with pytest.raises(sc.ImplUnavailableError, match="one rank"):
            sc.all_reduce(g, x, impl="local")
        return True, None

    assert run(1, body) == [(True, "local")]
    assert run(2, body) == [(True, None)] * 2
