"""The collective + residual add + RMSNorm of a decode layer (``all_reduce_add_rmsnorm``,
``reduce_scatter_add_rmsnorm``) on NumPy arrays, host backend, thread ranks: every
implementation name the host backend accepts, both forms, bf16 and f16, windows and plain
memory, the residual in place and not, against a float64 reference on fresh random inputs,
outputs poisoned first; what ran (``NormDispatch``); a decode loop of layers; the
reduce-scatter form gathered equals the all-reduce form; and every misuse refused before
anything runs, as the exception class its kind maps to."""

from __future__ import annotations

import numpy as np
import pytest

import symmcomm as sc
from _ref import (
    NP,
    add_rmsnorm_ref,
    array,
    as_f64,
    assert_close,
    assert_norm_close,
    from_f64,
    poison,
    values,
)

EPS = 1e-6
FORMS = ["all_reduce", "reduce_scatter"]
CALLS = {"all_reduce": sc.all_reduce_add_rmsnorm, "reduce_scatter": sc.reduce_scatter_add_rmsnorm}
OPS = {"all_reduce": "all_reduce_add_rmsnorm", "reduce_scatter": "reduce_scatter_add_rmsnorm"}

#: Every name the host backend takes: the CUDA backend's names, the host's own (``host_``
#: prefixed, ``host`` for NCCL's path), and ``regular``.
NAMES = [
    "auto",
    "fused",
    "fused_ll",
    "fused_oneshot",
    "fused_twoshot",
    "fused_ce",
    "unfused",
    "nccl",
    "host",
    "regular",
    "host_auto",
    "host_fused",
    "host_fused_ll",
    "host_fused_oneshot",
    "host_fused_twoshot",
    "host_unfused",
    "host_nccl",
]


def run(world, body, **options):
    options.setdefault("segment_bytes", 2 << 20)
    return sc.run_threads(world, body, join_timeout=120, timeout=20, **options)


def dtype_arg(dtype):
    return "bf16" if dtype == "bf16" else None


def expected(name: str, form: str, world: int, big: bool = False):
    """What `name` runs for a call of `form` on `world` thread ranks of the host backend: the
    result's name, or the exception class when it is refused. `big`: past the low-latency
    protocol's piece (512 KiB)."""
    bare = name[len("host_") :] if name.startswith("host_") else name
    if bare in ("nccl", "host", "regular"):
        return "host"
    if bare == "unfused":
        return "host_unfused"
    fused_ok = 2 <= world <= 8
    if bare == "auto":
        if not fused_ok:
            return "host_unfused"
        return "host_fused_oneshot" if big else "host_fused_ll"
    if not fused_ok:
        return sc.ImplUnavailableError
    if bare == "fused":
        return "host_fused_oneshot" if big else "host_fused_ll"
    algo = bare[len("fused_") :]
    if algo == "ce" or (algo == "twoshot" and form == "reduce_scatter") or (algo == "ll" and big):
        return sc.ImplUnavailableError
    return f"host_fused_{algo}"


class Problem:
    """Every rank's inputs ``[T, H]``, the residual of every row and the weight, drawn once
    from the test's generator (every rank reads the same problem)."""

    def __init__(self, rng, world, tokens, hidden, dtype):
        self.world, self.tokens, self.hidden, self.dtype = world, tokens, hidden, dtype
        self.inputs = [values(rng, (tokens, hidden), dtype) for _ in range(world)]
        self.residual = values(rng, (tokens, hidden), dtype)
        # RMSNorm weights: positive, around 1, exact in every type.
        self.weight = rng.integers(2, 15, size=hidden).astype(np.float64) / 8.0

    def rows(self, form, rank):
        if form == "all_reduce":
            return 0, self.tokens
        n = self.tokens // self.world
        return rank * n, n

    def want(self, form, rank):
        first, n = self.rows(form, rank)
        residual = self.residual[first : first + n]
        return add_rmsnorm_ref(self.inputs, residual, self.weight, EPS, self.dtype, first)


def run_one(g, p: Problem, form: str, name: str, where: str, in_place: bool):
    """One call on this rank, outputs poisoned; `(residual_out, normed, dispatch)` as float64,
    or the exception it raised."""
    dtype = p.dtype
    first, n = p.rows(form, g.rank)
    x = array(g, (p.tokens, p.hidden), dtype, where)
    x[...] = from_f64(p.inputs[g.rank], dtype)
    residual = array(g, (n, p.hidden), dtype, where)
    residual[...] = from_f64(p.residual[first : first + n], dtype)
    weight = array(g, (p.hidden,), dtype, where)
    weight[...] = from_f64(p.weight, dtype)
    normed = array(g, (n, p.hidden), dtype, where)
    poison(normed, dtype)
    if in_place:
        residual_out = residual
    else:
        residual_out = array(g, (n, p.hidden), dtype, where)
        poison(residual_out, dtype)
    x_before = x.copy()
    try:
        got_normed, got_residual = CALLS[form](
            g,
            x,
            residual,
            weight,
            EPS,
            normed_out=normed,
            residual_out=residual_out,
            impl=name,
            dtype=dtype_arg(dtype),
        )
    except sc.SymmcommError as e:
        return e
    assert got_normed is normed and got_residual is residual_out
    assert (x == x_before).all(), "the input was written"
    return as_f64(residual_out, dtype), as_f64(normed, dtype), g.last_dispatch


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["plain", "symm"])
@pytest.mark.parametrize("in_place", [False, True])
def test_every_implementation(world, dtype, form, where, in_place, rng):
    # Tokens that do not split over the ranks in the all-reduce form; 6 rows for the
    # reduce-scatter form (a multiple of 1, 2 and 3).
    tokens = 5 if form == "all_reduce" else 6
    p = Problem(rng, world, tokens, 40, dtype)

    def body(comm):
        g = comm.world
        return g.rank, {name: run_one(g, p, form, name, where, in_place) for name in NAMES}

    for rank, results in run(world, body):
        want_res, want_norm = p.want(form, rank)
        for name, got in results.items():
            want = expected(name, form, world)
            what = f"{name} {form} {dtype} world {world} rank {rank} {where} in_place {in_place}"
            if isinstance(want, type):
                assert isinstance(got, want), (what, got)
                assert got.op == OPS[form] and got.kind == "ImplUnavailable", (what, got)
                continue
            assert not isinstance(got, Exception), (what, got)
            res, normed, ran = got
            assert_close(res, want_res, dtype, terms=world)
            assert_norm_close(normed, want_norm, dtype, terms=world + 2)
            assert isinstance(ran, sc.NormDispatch), (what, ran)
            assert ran.name == want, (what, ran)
            assert ran.reason, (what, ran)
            if ran.name.startswith("host_fused"):
                assert ran.fused and ran.collective is None, (what, ran)
                assert not ran.staged_input and not ran.staged_output
            else:
                # The collective ran first: NCCL's path asks for the host's regular one;
                # `unfused` asks for `auto`: one rank copies, else the regular path, or the
                # symmetric one when both buffers lie in the windows.
                assert not ran.fused and isinstance(ran.collective, sc.Dispatch), (what, ran)
                if ran.name == "host":
                    coll = "host"
                elif world == 1:
                    coll = "local"
                elif where == "plain":
                    coll = "host"
                else:
                    coll = "host_symm"
                assert ran.collective.name == coll, (what, ran)
            if name in ("auto", "host_auto") and world == 1:
                assert "no fused kernel" in ran.reason, ran.reason


def test_auto_follows_the_size_rule(rng):
    """Past the low-latency protocol's piece (40 x 7168 bf16: 560 KiB) `auto` runs one-shot,
    and `fused_ll` is refused saying why."""
    world = 2
    p = Problem(rng, world, 40, 7168, "bf16")

    def body(comm):
        g = comm.world
        names = ("auto", "fused", "fused_ll", "fused_oneshot", "fused_twoshot", "unfused")
        return g.rank, {n: run_one(g, p, "all_reduce", n, "symm", True) for n in names}

    for rank, results in run(world, body, segment_bytes=8 << 20):
        want_res, want_norm = p.want("all_reduce", rank)
        for name, got in results.items():
            want = expected(name, "all_reduce", world, big=True)
            if isinstance(want, type):
                assert isinstance(got, want) and "low-latency" in str(got), (name, got)
                continue
            res, normed, ran = got
            assert ran.name == want, (name, ran)
            assert_close(res, want_res, "bf16", terms=world)
            assert_norm_close(normed, want_norm, "bf16", terms=world + 2)
        assert "size rule" in results["auto"][2].reason


def test_outputs_made_for_the_caller(rng):
    """Without outputs, new arrays of the residual's shape and type; the inputs stay as they
    were; the returned pair is (normed, new residual)."""
    world, tokens, hidden = 2, 4, 16
    p = Problem(rng, world, tokens, hidden, "f16")

    def body(comm):
        g = comm.world
        r = g.rank
        x = p.inputs[r].astype(np.float16)
        x_rs = x.copy()
        residual = p.residual.astype(np.float16)
        residual_before = residual.copy()
        weight = p.weight.astype(np.float16)
        normed, new_residual = sc.all_reduce_add_rmsnorm(g, x, residual, weight, EPS)
        assert normed.dtype == np.float16 and normed.shape == (tokens, hidden)
        assert new_residual is not residual and (residual == residual_before).all()
        rows = slice(r * tokens // world, (r + 1) * tokens // world)
        rs_normed, rs_residual = sc.reduce_scatter_add_rmsnorm(
            g, x_rs, residual[rows].copy(), weight, EPS
        )
        assert rs_normed.shape == (tokens // world, hidden)
        return r, [as_f64(a, "f16") for a in (normed, new_residual, rs_normed, rs_residual)]

    for rank, (normed, res, rs_normed, rs_res) in run(world, body):
        want_res, want_norm = p.want("all_reduce", rank)
        assert_close(res, want_res, "f16", terms=world)
        assert_norm_close(normed, want_norm, "f16", terms=world + 2)
        want_res, want_norm = p.want("reduce_scatter", rank)
        assert_close(rs_res, want_res, "f16", terms=world)
        assert_norm_close(rs_normed, want_norm, "f16", terms=world + 2)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("impl", ["auto", "unfused", "nccl"])
def test_decode_loop_in_place(world, impl, rng):
    """A decode step's layers: the same buffers every layer, fresh partial sums each, the
    residual carried in place from layer to layer, every layer's outputs checked."""
    tokens, hidden, layers, dtype = 3, 64, 6, "bf16"
    steps = [[values(rng, (tokens, hidden), dtype) for _ in range(world)] for _ in range(layers)]
    weights = [rng.integers(2, 15, size=hidden) / 8.0 for _ in range(layers)]
    residual0 = values(rng, (tokens, hidden), dtype)

    def body(comm):
        g = comm.world
        x = sc.empty(g, (tokens, hidden), dtype)
        residual = sc.empty(g, (tokens, hidden), dtype)
        weight = sc.empty(g, (hidden,), dtype)
        normed = sc.empty(g, (tokens, hidden), dtype)
        residual[...] = from_f64(residual0, dtype)
        got = []
        for inputs, w in zip(steps, weights):
            x[...] = from_f64(inputs[g.rank], dtype)
            weight[...] = from_f64(w, dtype)
            poison(normed, dtype)
            sc.all_reduce_add_rmsnorm(
                g, x, residual, weight, EPS, normed_out=normed, residual_out=residual,
                impl=impl, dtype="bf16",
            )
            got.append((as_f64(residual, dtype), as_f64(normed, dtype), g.last_dispatch.name))
        return got

    for got in run(world, body):
        residual = residual0
        for (res, normed, name), inputs, w in zip(got, steps, weights):
            # Each layer starts from the residual the library left (the reference's own
            # rounding may differ by an ulp, which must not accumulate into the check).
            want_res, want_norm = add_rmsnorm_ref(inputs, residual, w, EPS, dtype)
            assert_close(res, want_res, dtype, terms=world)
            assert_norm_close(normed, want_norm, dtype, terms=world + 2)
            assert name == {"auto": "host_fused_ll", "unfused": "host_unfused"}.get(impl, "host")
            residual = res


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_scatter_form_gathered_is_the_all_reduce_form(world, rng):
    """reduce_scatter_add_rmsnorm on each rank's rows, then all_gather of the normalised rows:
    the all-reduce form's result, bit for bit on the host backend."""
    tokens, hidden, dtype = 4 * world, 32, "bf16"
    p = Problem(rng, world, tokens, hidden, dtype)

    def body(comm):
        g = comm.world
        r = g.rank
        n = tokens // world
        x = sc.empty(g, (tokens, hidden), dtype)
        x[...] = from_f64(p.inputs[r], dtype)
        weight = from_f64(p.weight, dtype)
        residual = from_f64(p.residual, dtype)
        ar_normed, ar_res = sc.all_reduce_add_rmsnorm(g, x, residual, weight, EPS, dtype="bf16")
        rs_normed, rs_res = sc.reduce_scatter_add_rmsnorm(
            g, x, residual[r * n : (r + 1) * n].copy(), weight, EPS, dtype="bf16"
        )
        gathered = sc.all_gather(g, rs_normed, dim=0, dtype="bf16")
        gathered_res = sc.all_gather(g, rs_res, dim=0, dtype="bf16")
        return ar_normed, ar_res, gathered, gathered_res

    for ar_normed, ar_res, gathered, gathered_res in run(world, body):
        assert np.array_equal(gathered, ar_normed) and np.array_equal(gathered_res, ar_res)


def test_zero_tokens():
    """No rows: nothing to do, and no error (every rank calls it alike)."""

    def body(comm):
        g = comm.world
        x = np.empty((0, 16), np.float16)
        normed, res = sc.all_reduce_add_rmsnorm(g, x, x.copy(), np.ones(16, np.float16), EPS)
        return normed.shape, res.shape

    assert run(2, body) == [((0, 16), (0, 16))] * 2


# ---- misuse ----------------------------------------------------------------------------------


def f16(*shape):
    return np.ones(shape, np.float16)


def raises_on_every_rank(world, call, cls, *, form="all_reduce", kind=None, match=None):
    """Run `call(comm)` on every rank; each must raise `cls` naming its rank and the op."""

    def body(comm):
        with pytest.raises(cls, match=match) as info:
            call(comm)
        return comm.rank, info.value

    for rank, e in run(world, body):
        assert isinstance(e, sc.SymmcommError)
        assert e.rank == rank and e.op == OPS[form], (e.rank, e.op, e)
        assert e.group == "world" and e.world == world, e
        if kind is not None:
            assert e.kind == kind, (e.kind, e)
    return e


def norm(c, x, residual=None, weight=None, *, form="all_reduce", **kwargs):
    """The call with `x` ``[T, H]`` f16 and matching defaults for what is not given."""
    rows = x.shape[0] // (c.world.size if form == "reduce_scatter" else 1)
    hidden = x.shape[-1]
    if residual is None:
        residual = f16(rows, hidden)
    if weight is None:
        weight = f16(hidden)
    return CALLS[form](c.world, x, residual, weight, kwargs.pop("eps", EPS), **kwargs)


@pytest.mark.parametrize(
    "arg, case",
    [
        ("residual", lambda c: norm(c, f16(4, 16), np.ones((4, 16), np.float32))),
        ("weight", lambda c: norm(c, f16(4, 16), weight=np.ones(16, np.float32))),
        ("normed_out", lambda c: norm(c, f16(4, 16), normed_out=np.ones((4, 16), np.float32))),
        ("residual_out", lambda c: norm(c, f16(4, 16), residual_out=np.ones((4, 16), np.int32))),
    ],
)
def test_dtype_mismatch_names_the_argument(arg, case):
    e = raises_on_every_rank(2, case, sc.DTypeError, kind="ArgDTypeMismatch")
    assert f"{arg} is " in str(e) and "the input is f16" in str(e), str(e)
    assert isinstance(e, TypeError) and isinstance(e, ValueError)


@pytest.mark.parametrize(
    "arg, case, want",
    [
        ("residual", lambda c: norm(c, f16(4, 16), f16(3, 16)), "[4, 16]"),
        ("weight", lambda c: norm(c, f16(4, 16), weight=f16(8)), "[16]"),
        ("normed_out", lambda c: norm(c, f16(4, 16), normed_out=f16(4, 8)), "[4, 16]"),
        ("residual_out", lambda c: norm(c, f16(4, 16), residual_out=f16(16, 4)), "[4, 16]"),
        # The reduce-scatter form: this rank's rows.
        ("residual", lambda c: norm(c, f16(4, 16), f16(4, 16), form="reduce_scatter"), "[2, 16]"),
    ],
)
def test_shape_mismatch_names_the_argument(arg, case, want):
    form = "reduce_scatter" if want == "[2, 16]" else "all_reduce"
    e = raises_on_every_rank(2, case, sc.ShapeError, form=form, kind="ArgShapeMismatch")
    assert f"{arg} has shape" in str(e) and f"expected {want}" in str(e), str(e)


def test_rows_that_do_not_split():
    e = raises_on_every_rank(
        2,
        lambda c: norm(c, f16(5, 16), f16(2, 16), form="reduce_scatter"),
        sc.ShapeError,
        form="reduce_scatter",
        kind="NotDivisible",
    )
    assert "not divisible by world size 2" in str(e)


@pytest.mark.parametrize(
    "case, match",
    [
        (lambda c: norm(c, np.ones((4, 16), np.float32)), "bf16 or f16"),
        (lambda c: norm(c, f16(4, 12)), "multiple of 8"),
        (lambda c: norm(c, f16(2, 16392)), "too large"),
        (lambda c: norm(c, f16(2, 4, 16), f16(2, 16)), r"\[tokens, hidden\]"),
        (lambda c: norm(c, f16(4, 16), eps=-1.0), "eps"),
        (lambda c: norm(c, f16(4, 16), eps=float("nan")), "eps"),
        # A view one element into an array: 2-byte aligned, not 16.
        (lambda c: norm(c, f16(4 * 16 + 8)[1:65].reshape(4, 16)), "16-byte aligned"),
    ],
)
def test_invalid_arguments(case, match):
    raises_on_every_rank(2, case, sc.ArgumentError, kind="InvalidArgument", match=match)


def test_not_contiguous():
    e = raises_on_every_rank(
        2,
        lambda c: norm(c, f16(4, 16), f16(16, 4).T),
        sc.NotContiguousError,
        kind="NotContiguous",
    )
    assert "residual is not contiguous" in str(e)


def test_overlapping_outputs():
    def normed_over_input(c):
        x = f16(4, 16)
        norm(c, x, normed_out=x)

    def residual_out_over_normed(c):
        out = f16(4, 16)
        norm(c, f16(4, 16), normed_out=out, residual_out=out)

    for call in (normed_over_input, residual_out_over_normed):
        raises_on_every_rank(2, call, sc.OverlapError, kind="Overlap")


def test_read_only_outputs():
    def call(c, which):
        out = f16(4, 16)
        out.setflags(write=False)
        norm(c, f16(4, 16), **{which: out})

    for which in ("normed_out", "residual_out"):
        with pytest.raises(sc.ArgumentError, match=f"{which} is read-only"):
            run(1, lambda c: call(c, which))


def test_unknown_implementation():
    for name in ("fastest", "fused_fastest", "oneshot", "nccl_symm"):
        with pytest.raises(sc.ArgumentError, match="add-RMSNorm implementation"):
            run(1, lambda c: norm(c, f16(4, 16), impl=name))


def test_fused_needs_two_ranks():
    e = raises_on_every_rank(
        1, lambda c: norm(c, f16(4, 16), impl="fused_ll"), sc.ImplUnavailableError
    )
    assert "2..8 ranks" in str(e)


def test_array_of_another_group():
    def call(c):
        tp = c.new_group([0, 1], "tp")
        w = sc.empty(tp, (16,), "f16")
        w[...] = 1
        norm(c, f16(4, 16), weight=w)

    e = raises_on_every_rank(2, call, sc.ForeignBufferError, kind="ForeignBuffer")
    assert "weight" in str(e) and "tp#0" in str(e)


def test_norm_implementation_codes_round_trip():
    from symmcomm import _core

    names = ["auto", "fused", "unfused", "nccl", "fused_oneshot", "fused_twoshot", "fused_ce",
             "fused_ll"]
    codes = [_core.norm_impl_code(n) for n in names]
    assert len(set(codes)) == len(names)
    for host, cuda in (("host", "nccl"), ("host_fused_ll", "fused_ll"), ("regular", "nccl"),
                       ("host_unfused", "unfused")):
        assert _core.norm_impl_code(host) == _core.norm_impl_code(cuda)
    assert NP["f16"] == np.float16
