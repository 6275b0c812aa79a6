"""symmcomm.torch on CPU tensors and the host backend (needs torch, not a GPU): the
collectives and the collective + residual add + RMSNorm against torch's float64 reference,
symmetric tensors, the DCP combine and the DP gathered buffer as tensors, the custom ops and
torch.compile, start-up from a gloo process group, and the errors."""

from __future__ import annotations

import gc
import os

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import symmcomm as sc  # noqa: E402
import symmcomm.torch as st  # noqa: E402
from launch import launch  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "torch_worker.py")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 << 20)
    options.setdefault("timeout", 20)
    return sc.run_threads(world, body, join_timeout=120, **options)


def fresh(gen, shape, dtype):
    """Values exact in every float type: small multiples of 1/8."""
    return (torch.randint(-64, 65, shape, generator=gen).to(torch.float64) / 8).to(dtype)


def close(got, want, dtype, terms=1):
    eps = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(
        got.to(torch.float64), want.to(dtype).to(torch.float64), rtol=(terms + 1) * eps, atol=(terms + 1) * eps
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["plain", "symm"])
def test_collectives(dtype, where):
    world = 3
    gen = torch.Generator().manual_seed(7)
    xs = [fresh(gen, (6, 9), dtype) for _ in range(world)]
    stack = torch.stack([x.to(torch.float64) for x in xs])

    def body(comm):
        g = comm.world
        r = g.rank

        def make(shape):
            if where == "symm":
                t = st.empty(g, shape, dtype)
                assert g.lookup(t.data_ptr()) is not None
                return t
            return torch.empty(shape, dtype=dtype)

        x = make((6, 9))
        x.copy_(xs[r])
        out = make((6, 9)).fill_(float("nan"))
        st.all_reduce(g, x, out)
        ar = out.clone()
        ar_name = g.last_dispatch.name
        y = xs[r].clone()
        st.all_reduce_(g, y, op="max")
        ag = st.all_gather(g, x, dim=1)
        agf = st.all_gather(g, x)
        rs = st.reduce_scatter(g, x, dim=1, op="avg")
        rsf = st.reduce_scatter(g, x.view(-1)[:54])
        return r, ar, ar_name, y, ag, agf, rs, rsf

    for r, ar, name, y, ag, agf, rs, rsf in run(world, body):
        close(ar, stack.sum(0), dtype, world)
        assert name == ("host_symm" if where == "symm" else "host")
        close(y, stack.max(0).values, dtype)
        assert torch.equal(ag, torch.cat(xs, dim=1))
        assert torch.equal(agf, torch.cat([x.reshape(-1) for x in xs]))
        close(rs, stack.mean(0)[:, 3 * r : 3 * r + 3], dtype, world)
        close(rsf, stack.sum(0).reshape(-1)[18 * r : 18 * r + 18], dtype, world)


def norm_ref(parts, residual, weight, eps):
    """float64: the sum rounded as the collective gives it, the residual added and rounded,
    the RMSNorm (rounded by the comparison's tolerance)."""
    dtype = residual.dtype
    total = torch.stack([p.double() for p in parts]).sum(0).to(dtype).double()
    r = (residual.double() + total).to(dtype).double()
    rms = torch.sqrt((r * r).mean(-1, keepdim=True) + torch.tensor(eps, dtype=torch.float32).item())
    return r, r / rms * weight.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["plain", "symm"])
def test_add_rmsnorm(dtype, where):
    """Both forms, in place and not, outputs made or given; the pair returned; what ran."""
    world, tokens, hidden, eps = 2, 4, 32, 1e-6
    gen = torch.Generator().manual_seed(17)
    parts = [fresh(gen, (tokens, hidden), dtype) for _ in range(world)]
    residual0 = fresh(gen, (tokens, hidden), dtype)
    weight0 = (torch.randint(2, 15, (hidden,), generator=gen).double() / 8).to(dtype)

    def body(comm):
        g = comm.world
        r = g.rank

        def make(src):
            if where == "symm":
                t = st.empty(g, tuple(src.shape), dtype)
                assert g.lookup(t.data_ptr()) is not None
                return t.copy_(src)
            return src.clone()

        x, weight = make(parts[r]), make(weight0)
        residual = make(residual0)
        normed = make(residual0).fill_(float("nan"))
        got_normed, got_res = st.all_reduce_add_rmsnorm(
            g, x, residual, weight, eps, normed_out=normed, residual_out=residual
        )
        assert got_normed is normed and got_res is residual
        in_place = (normed.clone(), residual.clone(), g.last_dispatch)
        made = st.all_reduce_add_rmsnorm(g, x, residual0.clone(), weight, eps, impl="unfused")
        made_ran = g.last_dispatch
        rows = slice(r * tokens // world, (r + 1) * tokens // world)
        rs = st.reduce_scatter_add_rmsnorm(g, x, residual0[rows].clone(), weight, eps)
        return r, in_place, made, made_ran, rs, g.last_dispatch

    want_res, want_norm = norm_ref(parts, residual0, weight0, eps)
    for r, (normed, res, ran), made, made_ran, rs, rs_ran in run(world, body):
        for what, (n, rr) in (("in place", (normed, res)), ("made", made)):
            close(rr, want_res, dtype, world)
            close(n, want_norm, dtype, world + 2)
        assert isinstance(ran, sc.NormDispatch) and ran.name == "host_fused_ll", ran
        assert made_ran.name == "host_unfused" and made_ran.collective is not None
        rows = slice(r * tokens // world, (r + 1) * tokens // world)
        close(rs[1], want_res[rows], dtype, world)
        close(rs[0], want_norm[rows], dtype, world + 2)
        assert rs_ran.name == "host_fused_ll", rs_ran


def test_add_rmsnorm_errors():
    def body(comm):
        g = comm.world
        x = torch.ones(4, 16, dtype=torch.bfloat16)
        w = torch.ones(16, dtype=torch.bfloat16)
        with pytest.raises(sc.DTypeError, match="weight is f16"):
            st.all_reduce_add_rmsnorm(g, x, x.clone(), w.half(), 1e-6)
        with pytest.raises(sc.ShapeError, match="residual has shape"):
            st.all_reduce_add_rmsnorm(g, x, x[:3].clone(), w, 1e-6)
        with pytest.raises(sc.ArgumentError, match="bf16 or f16"):
            st.all_reduce_add_rmsnorm(g, x.float(), x.float(), w.float(), 1e-6)
        with pytest.raises(sc.ImplUnavailableError, match="twoshot"):
            st.reduce_scatter_add_rmsnorm(g, x, x[:2].clone(), w, 1e-6, impl="fused_twoshot")
        with pytest.raises(sc.DTypeError):
            st.all_reduce_add_rmsnorm(g, x, x.clone(), w.double(), 1e-6)
        return True

    assert run(2, body) == [True, True]


def test_symmetric_tensor_goes_back_to_the_pool():
    def body(comm):
        g = comm.world
        t = st.empty(g, (1024,), torch.float16)
        used = g.pool_stats()["in_use"]
        v = t[10:]
        del t
        gc.collect()
        assert g.pool_stats()["in_use"] == used
        del v
        gc.collect()
        return used, g.pool_stats()["in_use"]

    used, after = run(2, body)[0]
    assert used >= 2048 and after == 0


def test_errors():
    def body(comm):
        g = comm.world
        with pytest.raises(sc.NotContiguousError) as e:
            st.all_reduce(g, torch.ones(4, 6).t())
        assert e.value.op == "all_reduce" and e.value.rank == g.rank
        with pytest.raises(sc.DTypeError):
            st.all_reduce(g, torch.ones(4, dtype=torch.float64))
        with pytest.raises(sc.DTypeError):
            st.empty(g, (4,), torch.int64)
        with pytest.raises(sc.DTypeError):
            st.all_reduce(g, torch.ones(4), torch.ones(4, dtype=torch.float16))
        with pytest.raises(sc.ShapeError):
            st.all_gather(g, torch.ones(4), torch.ones(5))
        with pytest.raises(sc.ShapeError):
            st.reduce_scatter(g, torch.ones(3))
        with pytest.raises(TypeError):
            st.all_reduce(g, [1.0, 2.0])
        tp = comm.new_group([0, 1], "tp")
        t = st.empty(tp, (4,), torch.float32)
        with pytest.raises(sc.ForeignBufferError, match="tp#0"):
            st.all_reduce(g, t)
        return True

    assert run(2, body) == [True, True]


def test_scope_is_a_no_op_on_the_host_backend():
    def body(comm):
        scope = st.use_symmetric_memory(comm.world)
        with scope as s:
            t = torch.empty(4)
        assert s is scope and not scope.active and "host backend" in scope.reason
        return t.shape

    assert run(2, body) == [torch.Size([4])] * 2


def test_dcp_combine_tensors():
    world, heads, dim, batch = 2, 4, 8, 3

    def body(comm):
        g = comm.world
        c = st.DcpCombine(g, 4, heads, dim, dtype=torch.float32, lse_base="e", merged_lse=True)
        po, pl = c.partial_out(batch), c.partial_lse(batch)
        assert isinstance(po, torch.Tensor) and po.shape == (batch, heads, dim)
        po.fill_(float(g.rank + 1))
        pl.zero_()
        results = {}
        for impl in ("host", "host_symm", "fused"):
            c.output(batch).fill_(float("nan"))
            ran = c.run(batch, impl)
            results[impl] = (c.output(batch).clone(), c.merged_lse(batch).clone(), ran.name)
        return results

    import math

    for results in run(world, body):
        for impl, (out, merged, name) in results.items():
            assert out.shape == (heads // world, batch, dim)
            assert torch.allclose(out, torch.full_like(out, 1.5)), impl
            assert torch.allclose(merged, torch.full_like(merged, math.log(2)))


def test_dp_buffer_tensors():
    world, hidden = 2, 4
    counts = [2, 1]

    def body(comm):
        g = comm.world
        b = st.DpGatheredBuffer(g, hidden, torch.bfloat16, 3)
        step = b.step(counts[g.rank], cuda_graph=True)
        b.local_input(step).copy_(torch.full((counts[g.rank], hidden), float(g.rank + 1)))
        b.gather(step)
        gathered = b.gathered(step).clone()
        b.gathered(step).fill_(1.0)
        b.scatter(step)
        return gathered, b.local_output(step).clone(), step.rows_of(1)

    for gathered, out, rows1 in run(world, body):
        # MAX_LEN: every rank padded to the largest count (2).
        assert gathered.shape == (4, hidden) and rows1 == (2, 3)
        assert (gathered[0:2] == 1).all() and (gathered[2:3] == 2).all()
        assert (out == 2).all()


def test_custom_ops_are_registered():
    for name in ("all_reduce_", "all_reduce", "all_gather", "reduce_scatter", "dcp_combine",
                 "dp_gather", "dp_scatter", "all_reduce_add_rmsnorm", "all_reduce_add_rmsnorm_",
                 "reduce_scatter_add_rmsnorm", "reduce_scatter_add_rmsnorm_"):
        assert hasattr(torch.ops.symmcomm, name), name


def test_fake_implementations():
    """Under FakeTensorMode (what torch.compile traces with) the ops run their fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 8)
        out = torch.empty(8, 8)
        assert torch.ops.symmcomm.all_gather(x, out, 12345, 0, 0) is None
        assert torch.ops.symmcomm.all_reduce_(x, 12345, 0, 0) is None
        r, w, n, r2 = torch.empty(4, 8), torch.empty(8), torch.empty(4, 8), torch.empty(4, 8)
        ops = torch.ops.symmcomm
        assert ops.all_reduce_add_rmsnorm(x, r, w, n, r2, 12345, 1e-6, 0) is None
        assert ops.all_reduce_add_rmsnorm_(x, r, w, n, 12345, 1e-6, 0) is None
        assert ops.reduce_scatter_add_rmsnorm(x, r[:2], w, n[:2], r2[:2], 1, 1e-6, 0) is None
        assert ops.reduce_scatter_add_rmsnorm_(x, r[:2], w, n[:2], 1, 1e-6, 0) is None


@pytest.mark.parametrize("scenario", ["compile", "compile_norm", "process_group"])
def test_in_processes(scenario):
    results = launch(WORKER, 2, args=[scenario], timeout=240)
    assert all(r["ok"] for r in results), results
