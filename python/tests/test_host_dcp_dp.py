"""The DCP combine and DP attention's gathered buffer on NumPy arrays (host backend): every
implementation against a float64 reference of the LSE merge and of the padded gather and
scatter, on fresh random inputs with empty shards and uneven token counts, outputs poisoned."""

from __future__ import annotations

import math

import numpy as np
import pytest

import symmcomm as sc
from _ref import as_f64, assert_close, from_f64, poison, rounded, values  # noqa: F401


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 << 20)
    options.setdefault("timeout", 20)
    return sc.run_threads(world, body, join_timeout=120, **options)


def merge_ref(outs, lses, base):
    """float64 reference: O = sum_r beta^(s_r - S) O_r, S = log_beta sum_r beta^s_r; empty
    shards (NaN, +inf, -inf) weigh 0, a row with no shard gives zeros and -inf."""
    exp = (lambda x: np.exp2(x)) if base == "2" else np.exp
    log = (lambda x: np.log2(x)) if base == "2" else np.log
    s = np.stack(lses)  # [N, B, H]
    s = np.where(np.isnan(s) | (s == np.inf), -np.inf, s)
    m = s.max(axis=0)  # [B, H]
    finite = np.isfinite(m)
    safe_m = np.where(finite, m, 0.0)
    w = np.where(finite[None], exp(s - safe_m[None]), 0.0)  # [N, B, H]
    total = w.sum(axis=0)
    weights = np.where(total[None] > 0, w / np.where(total > 0, total, 1)[None], 0.0)
    out = np.einsum("nbh,nbhd->bhd", weights, np.stack(outs))  # [B, H, D]
    merged = np.where(total > 0, safe_m + log(np.where(total > 0, total, 1)), -np.inf)
    return out, merged


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("base", ["2", "e"])
def test_dcp_combine(world, dtype, base, rng):
    batch_max, heads, dim = 5, 2 * world, 16
    hl = heads // world
    impls = ["host", "host_symm", "fused"]

    def inputs(batch):
        outs = [values(rng, (batch, heads, dim), dtype) for _ in range(world)]
        lses = [rng.normal(0, 3, size=(batch, heads)) for _ in range(world)]
        # Empty shards: -inf, +inf and NaN on some ranks; one row empty everywhere.
        lses[0][0, 0] = -np.inf
        lses[1 % world][0, 1] = np.nan
        lses[-1][min(1, batch - 1), 0] = np.inf
        for r in range(world):
            lses[r][batch - 1, heads - 1] = -np.inf
        return outs, [l.astype(np.float32).astype(np.float64) for l in lses]

    cases = [(b, impl, inputs(b)) for b in (batch_max, 2, 1) for impl in impls]

    def body(comm):
        g = comm.world
        c = sc.DcpCombine(g, batch_max, heads, dim, dtype=dtype, lse_base=base, merged_lse=True)
        assert c.heads_local == hl and c.spec["lse_base"] == base
        got = []
        for batch, impl, (outs, lses) in cases:
            po, pl = c.partial_out(batch), c.partial_lse(batch)
            assert po.shape == (batch, heads, dim) and pl.shape == (batch, heads)
            po[...] = from_f64(outs[g.rank], dtype)
            pl[...] = lses[g.rank].astype(np.float32)
            out, merged = c.output(batch), c.merged_lse(batch)
            poison(out, dtype)
            merged[...] = np.nan
            ran = c.run(batch, impl)
            got.append((as_f64(out, dtype), merged.astype(np.float64), ran.name,
                        [d.name for d in ran.collectives]))
        return g.rank, got

    for rank, got in run(world, body):
        for (batch, impl, (outs, lses)), (out, merged, name, colls) in zip(cases, got):
            want_out, want_lse = merge_ref(outs, lses, base)
            mine = slice(rank * hl, (rank + 1) * hl)
            want = rounded(want_out[:, mine].transpose(1, 0, 2), dtype)
            # The weights are f32 (as in every implementation): errors scale with the largest
            # partial output, not with each merged value.
            scale = max(1.0, max(float(np.abs(o).max()) for o in outs))
            tol = {"f32": 1e-5, "bf16": 2.0**-7}[dtype] * scale * (world + 2)
            err = np.abs(out - want)
            assert (err <= tol).all(), (impl, batch, float(err.max()), tol)
            w = want_lse[:, mine]
            assert (np.isneginf(merged) == np.isneginf(w)).all()
            fin = np.isfinite(w)
            assert np.allclose(merged[fin], w[fin], rtol=1e-5, atol=1e-5)
            if impl == "fused":
                assert name == "host_fused" and colls == []
            else:
                assert name == impl and colls == [impl, impl]


def test_dcp_combine_without_merged_lse(rng):
    def body(comm):
        c = sc.DcpCombine(comm.world, 2, 4, 8, dtype="f32", lse_base="e")
        assert c.merged_lse(2) is None and c.unavailable("fused") is None
        assert c.unavailable("oneshot") is not None
        c.partial_out(2)[...] = 1.0 + comm.rank
        c.partial_lse(2)[...] = 0.0
        c.run(2)
        return c.output(2)

    for out in run(2, body):
        assert np.allclose(out, 1.5)


def dp_case(rng, counts, hidden):
    return [values(rng, (c, hidden), "f32") for c in counts]


@pytest.mark.parametrize(
    "counts,mode",
    [([3, 3], "max_len"), ([4, 1], "max_len"), ([4, 0, 1], None), ([4, 0, 0, 0], "sum_len"),
     ([0, 0], None), ([2, 3, 1], "sum_len")],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dp_gather_scatter(counts, mode, symmetric, rng):
    world, hidden, cap = len(counts), 8, 4
    rows = dp_case(rng, counts, hidden)
    # SGLang's rule when no mode is forced: MAX_LEN when 2 * sum >= max * world.
    expected = mode or ("max_len" if 2 * sum(counts) >= max(counts) * world else "sum_len")
    global_rows = sum(counts) if expected == "sum_len" else world * max(counts)
    partial = [values(rng, (global_rows, hidden), "f32") for _ in range(world)]

    def body(comm):
        g = comm.world
        b = sc.DpGatheredBuffer(g, hidden, "f32", cap, symmetric=symmetric)
        assert b.is_symmetric == (symmetric and world > 1)
        step = b.step(counts[g.rank], mode=mode)
        assert step.counts == counts and step.local_count == counts[g.rank]
        b.local_input(step)[...] = rows[g.rank]
        gathered = b.gathered(step)
        gathered[...] = np.nan
        ran = b.gather(step)
        assert (ran is None) == (sum(counts) == 0)
        got = gathered.copy()
        places = [step.rows_of(r) for r in range(world)]
        # The MLP's partial sums, written in place; then the scatter.
        gathered[...] = partial[g.rank]
        out = b.local_output(step)
        out[...] = np.nan
        b.scatter(step)
        return g.rank, step.mode, got, places, out.copy()

    total = np.sum(partial, axis=0)
    for rank, used_mode, got, places, out in run(world, body):
        assert used_mode == expected and got.shape == (global_rows, hidden)
        for r, (start, stop) in enumerate(places):
            assert stop - start == counts[r]
            assert (got[start:stop] == rows[r]).all()
        start, stop = places[rank]
        assert_close(out.astype(np.float64), total[start:stop], "f32", world)


def test_dp_scatter_from_and_views(rng):
    world, hidden, cap = 2, 4, 3
    counts = [3, 2]
    partial = [values(rng, (world * cap, hidden), "f32").astype(np.float32) for _ in range(world)]

    def body(comm):
        g = comm.world
        b = sc.DpGatheredBuffer(g, hidden, "f32", cap)
        step = b.step(counts[g.rank], cuda_graph=True)
        assert step.mode == "max_len" and step.local_rows == 3 and step.global_rows == 6
        assert b.padded_input(step).shape == (3, hidden)
        assert b.padded_output(step).shape == (3, hidden)
        ran = b.scatter_from(step, partial[g.rank])
        return g.rank, b.local_output(step).copy(), ran.name

    total = np.sum(partial, axis=0)
    for rank, out, name in run(world, body):
        start = rank * cap
        assert_close(out.astype(np.float64), total[start : start + counts[rank]].astype(np.float64), "f32", 2)
        assert name == "host"


def test_merge_reference_sanity():
    o, s = merge_ref([np.ones((1, 1, 8)), 3 * np.ones((1, 1, 8))], [np.zeros((1, 1))] * 2, "e")
    assert np.allclose(o, 2.0) and math.isclose(s[0, 0], math.log(2))
