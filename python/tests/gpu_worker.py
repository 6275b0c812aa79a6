"""One rank on a GPU, started by launch.py (1 process: RANK=0 WORLD_SIZE=1; 2 processes: one
per GPU). Each scenario checks symmcomm.torch against torch's own reference on fresh random
inputs (every rank draws every rank's inputs from one seed, so each computes the reference
itself in float64), outputs poisoned first; eager and inside torch.cuda.graph. A failed check
raises, and the launcher shows every rank's output."""

from __future__ import annotations

import math
import os
import sys

import torch

import symmcomm as sc
import symmcomm.torch as st
from symmcomm import _core
from launch import report

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOATS = (F32, F16, BF16)
EPS = {F32: 2**-23, F16: 2**-10, BF16: 2**-7}
MiB = 1 << 20


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def fresh(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    """Values exact in every type (small multiples of 1/8), drawn on the CPU from `gen`."""
    if dtype in FLOATS:
        return (torch.randint(-64, 65, shape, generator=gen).double() / 8).to(dtype)
    high = 256 if dtype == torch.uint8 else 1 << 20
    return torch.randint(0, high, shape, generator=gen).to(dtype)


def check(got: torch.Tensor, want: torch.Tensor, what: str, terms: int = 1) -> None:
    """`got` equals the float64 reference `want` up to `terms` roundings to got's type."""
    got = got.detach().cpu()
    want = want.to(got.dtype).double()
    eps = EPS.get(got.dtype, 0.0)
    tol = (terms + 1) * eps
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def reduce_ref(stack: torch.Tensor, op: str) -> torch.Tensor:
    return {
        "sum": lambda: stack.sum(0),
        "avg": lambda: stack.mean(0),
        "max": lambda: stack.max(0).values,
        "min": lambda: stack.min(0).values,
    }[op]()


def windows_work(g) -> bool:
    """Whether the group gets symmetric windows. Two or more GPUs must; a group of one rank may
    not (NCCL may register no window for a single rank): its tests then use plain memory and
    say so in their results."""
    try:
        st.empty(g, (64,), F32)
        return True
    except sc.ImplUnavailableError as e:
        if g.size > 1:
            raise
        print(f"rank {g.rank}: no windows for a group of one rank: {e}", flush=True)
        return False


def capture(step) -> "torch.cuda.CUDAGraph":
    """`step` captured into a CUDA graph: one warm-up run on a side stream first (as torch
    recommends), then the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def start(**options) -> _core.Communicator:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = False
    sc.nccl_env(apply=True)  # before NCCL starts
    options.setdefault("timeout", 120)
    comm = st.init_from_env(**options)
    assert comm.backend == "cuda", comm.describe()
    assert comm.device == torch.cuda.current_device()
    return comm


# ---- scenarios ----------------------------------------------------------------------------------


def scenario_ops(comm) -> dict:
    """Every op, element type, reduction, placement and layout, eager, on torch's stream."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(11)
    names = set()
    windows = windows_work(g)

    def make(where, shape, dtype):
        if where == "symm" and windows:
            t = st.empty(g, shape, dtype)
            assert g.lookup(t.data_ptr()) is not None
            return t
        return torch.empty(shape, dtype=dtype, device=device())

    for dtype in FLOATS:
        for where in (("plain", "plain"), ("symm", "symm"), ("plain", "symm"), ("symm", "plain")):
            tag = f"{dtype} {where}"
            xs = [fresh(gen, (48, 33), dtype) for _ in range(n)]
            stack = torch.stack([x.double() for x in xs])
            x = make(where[0], (48, 33), dtype).copy_(xs[r])
            for op in ("sum", "avg", "max", "min"):
                out = make(where[1], (48, 33), dtype).fill_(float("nan"))
                assert st.all_reduce(g, x, out, op=op) is out
                check(out, reduce_ref(stack, op), f"all_reduce {op} {tag}", n)
                names.add(g.last_dispatch.name)
            y = make(where[0], (48, 33), dtype).copy_(xs[r])
            st.all_reduce_(g, y)
            check(y, stack.sum(0), f"all_reduce_ {tag}", n)
            for dim in (None, 0, 1):
                want = torch.cat([t.reshape(-1) for t in xs]) if dim is None else torch.cat(xs, dim)
                out = make(where[1], tuple(want.shape), dtype).fill_(float("nan"))
                st.all_gather(g, x, out, dim=dim)
                check(out, want.double(), f"all_gather dim {dim} {tag}")
            zs = [fresh(gen, (8 * n, 6 * n), dtype) for _ in range(n)]
            zstack = torch.stack([z.double() for z in zs]).sum(0)
            z = make(where[0], (8 * n, 6 * n), dtype).copy_(zs[r])
            for dim in (None, 0, 1):
                if dim is None:
                    want = zstack.reshape(-1).chunk(n)[r]
                else:
                    want = zstack.chunk(n, dim)[r]
                out = make(where[1], tuple(want.shape), dtype).fill_(float("nan"))
                st.reduce_scatter(g, z, out, dim=dim)
                check(out, want, f"reduce_scatter dim {dim} {tag}", n)
    # A stream given explicitly instead of torch's current one.
    side = torch.cuda.Stream()
    xs = [fresh(gen, (1000,), F32) for _ in range(n)]
    x = xs[r].to(device())
    out = torch.full((1000,), float("nan"), device=device())
    side.wait_stream(torch.cuda.current_stream())
    st.all_reduce(g, x, out, stream=side)
    side.synchronize()
    check(out, torch.stack([t.double() for t in xs]).sum(0), "all_reduce on a given stream", n)
    for dtype in (torch.int32, torch.uint8):
        xs = [fresh(gen, (5, 7), dtype) for _ in range(n)]
        x = make("symm", (5, 7), dtype).copy_(xs[r])
        out = st.all_gather(g, x, dim=1)
        assert torch.equal(out.cpu(), torch.cat(xs, 1)), f"all_gather {dtype}"
    # Explicit implementations: each runs (and says so) or is refused on every rank alike.
    ran, refused = {}, {}
    xs = [fresh(gen, (4096,), BF16) for _ in range(n)]
    for impl in ("nccl", "nccl_symm", "oneshot", "twoshot", "ll"):
        x = make("symm", (4096,), BF16).copy_(xs[r])
        out = make("symm", (4096,), BF16).fill_(float("nan"))
        try:
            st.all_reduce(g, x, out, impl=impl)
        except (sc.ImplUnavailableError, sc.ForeignBufferError) as e:
            refused[impl] = str(e)
            continue
        check(out, torch.stack([t.double() for t in xs]).sum(0), f"all_reduce impl {impl}", n)
        ran[impl] = g.last_dispatch.name
        if comm.backend == "cuda":  # (the host backend of a dry run names them host, host_symm)
            assert ran[impl] == impl, (impl, g.last_dispatch)
    assert "nccl" in ran, refused
    if n > 1:
        assert "nccl_symm" in ran, refused
    torch.cuda.synchronize()
    return {"names": sorted(names), "ran": ran, "refused": sorted(refused), "windows": windows}


def scenario_graph(comm) -> dict:
    """The ops captured in one torch.cuda.graph, replayed 1000 times with fresh inputs (written
    into the graph's static input between replays), every output checked every 100 replays."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(23)
    shape, dtype = (16 * n, 96), BF16
    dev = device()
    windows = windows_work(g)
    # Windows where they work (plain memory for a group of one rank without them).
    symm = (lambda s: st.empty(g, s, dtype)) if windows else (lambda s: torch.empty(s, dtype=dtype, device=dev))
    src = torch.empty(shape, dtype=dtype, device=dev)
    x = symm(shape)
    ar_out = torch.empty(shape, dtype=dtype, device=dev)  # plain: staged output
    ag_out = symm((n * shape[0], shape[1]))
    rs_out = torch.empty((shape[0], shape[1] // n), dtype=dtype, device=dev)
    inplace = symm(shape)
    st.prepare(g, 2 * n * x.numel() * x.element_size())

    def step():
        x.copy_(src)
        st.all_reduce(g, x, ar_out)
        st.all_gather(g, src, ag_out, dim=0)  # plain input: staged
        st.reduce_scatter(g, x, rs_out, dim=1)
        inplace.copy_(src)
        st.all_reduce_(g, inplace, op="max")

    def refill():
        xs = [fresh(gen, shape, dtype) for _ in range(n)]
        src.copy_(xs[r])
        for t in (ar_out, ag_out, rs_out, inplace):
            t.fill_(float("nan"))
        stack = torch.stack([t.double() for t in xs])
        return xs, stack

    def verify(xs, stack, when):
        torch.cuda.synchronize()
        check(ar_out, stack.sum(0), f"graph all_reduce {when}", n)
        check(ag_out, torch.cat(xs, 0).double(), f"graph all_gather {when}")
        check(rs_out, stack.sum(0).chunk(n, 1)[r], f"graph reduce_scatter {when}", n)
        check(inplace, stack.max(0).values, f"graph all_reduce_ {when}")

    xs, stack = refill()
    step()
    verify(xs, stack, "eager")
    graph = capture(step)
    captured = g.last_dispatch.name
    replays = 0
    for i in range(1000):
        if i % 100 == 0:
            xs, stack = refill()
        graph.replay()
        replays += 1
        if i % 100 == 99:
            verify(xs, stack, f"after replay {i + 1}")
    return {"replays": replays, "captured": captured, "windows": windows}


NORM_IMPLS = ("auto", "fused", "fused_ll", "fused_oneshot", "fused_twoshot", "unfused", "nccl")
NORM_EPS = 1e-6


def norm_ref(parts, residual, weight, first=0):
    """The collective + residual add + RMSNorm in float64, rounded where the library rounds:
    every rank's `parts` summed and rounded (the collective's result), rows ``first ..`` added
    to `residual` and rounded (the new residual), then RMSNorm and `weight`. Returns
    ``(residual_out, normed)``."""
    dtype, rows = residual.dtype, residual.shape[0]
    total = torch.stack([p.double() for p in parts]).sum(0)[first : first + rows]
    r = (residual.double() + total.to(dtype).double()).to(dtype).double()
    eps = torch.tensor(NORM_EPS, dtype=torch.float32).item()
    rms = torch.sqrt((r * r).mean(-1, keepdim=True) + eps)
    return r, r / rms * weight.double()


def norm_name(d) -> str:
    """What an add-RMSNorm ran, by the CUDA backend's names (a dry run on the host backend
    prefixes them with ``host_`` and calls NCCL's path ``host``)."""
    name = d.name[len("host_") :] if d.name.startswith("host_") else d.name
    return "nccl" if name == "host" else name


def norm_weight(gen, hidden, dtype):
    """RMSNorm weights: positive, around 1, exact in every type."""
    return (torch.randint(2, 15, (hidden,), generator=gen).double() / 8).to(dtype)


def scenario_norm(comm) -> dict:
    """The all-reduce and reduce-scatter fused with the residual add and RMSNorm: every
    implementation, bf16 and f16, sizes within and past the low-latency protocol, windows and
    plain memory, the residual in place and not, eager on torch's stream (and on a given
    one), outputs poisoned first."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(37)
    windows = windows_work(g)
    ran, refused = {}, {}

    def make(where, shape, dtype):
        if where == "symm" and windows:
            return st.empty(g, shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device())

    # (dtype, tokens, hidden): decode sizes in the LL protocol, 896 KiB past it, f16.
    cases = [(BF16, 4 * n, 4096), (F16, 2 * n, 2048), (BF16, 64, 7168)]
    for dtype, tokens, hidden in cases:
        parts = [fresh(gen, (tokens, hidden), dtype) for _ in range(n)]
        residual_all = fresh(gen, (tokens, hidden), dtype)
        weight_src = norm_weight(gen, hidden, dtype)
        for form in ("all_reduce", "reduce_scatter"):
            rows = tokens if form == "all_reduce" else tokens // n
            first = 0 if form == "all_reduce" else r * rows
            call = st.all_reduce_add_rmsnorm if form == "all_reduce" else st.reduce_scatter_add_rmsnorm
            want_res, want_norm = norm_ref(parts, residual_all[first : first + rows], weight_src, first)
            for where in ("symm", "plain"):
                x = make(where, (tokens, hidden), dtype).copy_(parts[r])
                weight = make(where, (hidden,), dtype).copy_(weight_src)
                for impl in NORM_IMPLS:
                    for in_place in (False, True):
                        tag = f"{form} {impl} {dtype} T={tokens} H={hidden} {where} in_place {in_place}"
                        residual = make(where, (rows, hidden), dtype).copy_(residual_all[first : first + rows])
                        normed = make(where, (rows, hidden), dtype).fill_(float("nan"))
                        out = residual if in_place else make(where, (rows, hidden), dtype).fill_(float("nan"))
                        try:
                            got = call(g, x, residual, weight, NORM_EPS, normed_out=normed,
                                       residual_out=out, impl=impl)
                        except sc.ImplUnavailableError as e:
                            refused[tag] = str(e)
                            continue
                        assert got[0] is normed and got[1] is out, tag
                        check(out, want_res, f"norm residual {tag}", n)
                        check(normed, want_norm, f"norm normed {tag}", n + 2)
                        d = g.last_dispatch
                        assert isinstance(d, sc.NormDispatch), (tag, d)
                        if impl.startswith("fused_"):
                            assert norm_name(d) == impl and d.fused, (tag, d)
                        elif impl in ("unfused", "nccl"):
                            assert norm_name(d) == impl and d.collective is not None, (tag, d)
                        ran[f"{form} {impl} T={tokens} H={hidden}"] = norm_name(d)
    small = f"T={4 * n} H=4096"
    if n > 1:
        # Two GPUs of one host: the fused kernels run decode sizes.
        assert ran[f"all_reduce auto {small}"] == "fused_ll", ran
        assert ran[f"reduce_scatter auto {small}"] == "fused_ll", ran
        assert ran[f"all_reduce fused_oneshot {small}"] == "fused_oneshot", ran
    else:
        # One rank: no fused kernel (2 to 8 ranks); `auto` runs the collective (a copy), then
        # the add-RMSNorm kernel.
        assert ran[f"all_reduce auto {small}"] == "unfused", ran
        assert all(" fused" in tag for tag in refused), refused
    # On a stream given explicitly.
    side = torch.cuda.Stream()
    parts = [fresh(gen, (8, 1024), BF16) for _ in range(n)]
    residual_src = fresh(gen, (8, 1024), BF16)
    weight = norm_weight(gen, 1024, BF16).to(device())
    x, residual = parts[r].to(device()), residual_src.to(device())
    side.wait_stream(torch.cuda.current_stream())
    normed, new_res = st.all_reduce_add_rmsnorm(g, x, residual, weight, NORM_EPS, stream=side)
    side.synchronize()
    want_res, want_norm = norm_ref(parts, residual_src, weight.cpu())
    check(new_res, want_res, "norm on a given stream", n)
    check(normed, want_norm, "norm on a given stream", n + 2)
    torch.cuda.synchronize()
    return {"ran": ran, "refused": len(refused), "windows": windows}


def scenario_norm_graph(comm) -> dict:
    """A decode layer's tail captured in one torch.cuda.graph: the all-reduce + add + RMSNorm
    with the residual in place, and the reduce-scatter form into plain outputs; replayed 1000
    times with fresh inputs, residuals and weights (written into the graph's static tensors
    between replays), every output checked every 100 replays."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(43)
    tokens, hidden, dtype = 4 * n, 2048, BF16
    rows = tokens // n
    dev = device()
    windows = windows_work(g)
    symm = (lambda s: st.empty(g, s, dtype)) if windows else (lambda s: torch.empty(s, dtype=dtype, device=dev))
    plain = lambda s: torch.empty(s, dtype=dtype, device=dev)  # noqa: E731
    src, res_src, rs_res_src = plain((tokens, hidden)), plain((tokens, hidden)), plain((rows, hidden))
    x, residual, weight, normed = symm((tokens, hidden)), symm((tokens, hidden)), symm((hidden,)), symm((tokens, hidden))
    rs_residual, rs_normed, rs_res_out = plain((rows, hidden)), plain((rows, hidden)), plain((rows, hidden))
    st.prepare(g, 2 * x.numel() * x.element_size())
    names = {}

    def step():
        x.copy_(src)
        residual.copy_(res_src)
        st.all_reduce_add_rmsnorm(g, x, residual, weight, NORM_EPS, normed_out=normed, residual_out=residual)
        names["all_reduce"] = norm_name(g.last_dispatch)
        rs_residual.copy_(rs_res_src)
        st.reduce_scatter_add_rmsnorm(
            g, x, rs_residual, weight, NORM_EPS, normed_out=rs_normed, residual_out=rs_res_out
        )
        names["reduce_scatter"] = norm_name(g.last_dispatch)

    def refill():
        parts = [fresh(gen, (tokens, hidden), dtype) for _ in range(n)]
        res_all = fresh(gen, (tokens, hidden), dtype)
        w = norm_weight(gen, hidden, dtype)
        src.copy_(parts[r])
        res_src.copy_(res_all)
        rs_res_src.copy_(res_all[r * rows : (r + 1) * rows])
        weight.copy_(w)
        for t in (normed, rs_normed, rs_res_out):
            t.fill_(float("nan"))
        return parts, res_all, w

    def verify(parts, res_all, w, when):
        torch.cuda.synchronize()
        want_res, want_norm = norm_ref(parts, res_all, w)
        check(residual, want_res, f"graph norm residual {when}", n)
        check(normed, want_norm, f"graph norm normed {when}", n + 2)
        want_res, want_norm = norm_ref(parts, res_all[r * rows : (r + 1) * rows], w, r * rows)
        check(rs_res_out, want_res, f"graph rs norm residual {when}", n)
        check(rs_normed, want_norm, f"graph rs norm normed {when}", n + 2)

    problem = refill()
    step()
    verify(*problem, "eager")
    graph = capture(step)
    captured = dict(names)
    replays = 0
    for i in range(1000):
        if i % 100 == 0:
            problem = refill()
        graph.replay()
        replays += 1
        if i % 100 == 99:
            verify(*problem, f"after replay {i + 1}")
    if n > 1:
        assert captured == {"all_reduce": "fused_ll", "reduce_scatter": "fused_ll"}, captured
    return {"replays": replays, "captured": captured, "windows": windows}


def scenario_hosts(comm_unused) -> dict:
    """Each process on its own simulated host (SYMMCOMM_HOST_ID and NCCL_HOSTID, NCCL's
    sockets over loopback): the topology every rank reports; on two ranks the hierarchical
    all-reduce (eager, and prepared then captured in a graph), `auto` running NCCL across
    hosts, our kernels and the fused add-RMSNorm refused by name, `auto` running it unfused;
    on one rank the hierarchical all-reduce refused (one host)."""
    rank = int(os.environ["RANK"])
    host = f"sim-{rank}"
    os.environ.update(
        SYMMCOMM_HOST_ID=host,
        NCCL_HOSTID=host,
        NCCL_SOCKET_IFNAME="lo",
        NCCL_IB_DISABLE="1",
        NCCL_MNNVL_ENABLE="0",
    )
    comm = start()
    g, n, r = comm.world, comm.world_size, comm.rank
    assert comm.host_id == host and comm.host_id_source == "env", (comm.host_id, comm.host_id_source)
    assert comm.topology == [f"sim-{q}" for q in range(n)], comm.topology
    topo = g.topology
    assert topo["spans_domains"] == (n > 1) and len(topo["domains"]) == n, topo
    gen = torch.Generator().manual_seed(47)
    xs = [fresh(gen, (4096,), BF16) for _ in range(n)]
    want = torch.stack([t.double() for t in xs]).sum(0)
    x = xs[r].to(device())
    result = {"topology": topo["describe"]}
    if n == 1:
        try:
            st.all_reduce(g, x, impl="hierarchical")
            raise AssertionError("hierarchical ran on one host")
        except sc.ImplUnavailableError as e:
            assert "nothing to be hierarchical" in str(e), str(e)
        comm.close()
        return result
    out = st.all_reduce(g, x, impl="hierarchical")
    check(out, want, "hierarchical all_reduce", n)
    result["hierarchical"] = g.last_dispatch.name
    assert result["hierarchical"] == "hierarchical", g.last_dispatch
    out = st.all_reduce(g, x)
    check(out, want, "auto across hosts", n)
    result["auto"] = g.last_dispatch.name
    assert result["auto"] in ("nccl", "nccl_symm"), g.last_dispatch
    try:
        st.all_reduce(g, st.empty(g, (4096,), BF16).copy_(x), impl="oneshot")
        raise AssertionError("oneshot ran across hosts")
    except (sc.ImplUnavailableError, sc.ForeignBufferError) as e:
        result["oneshot"] = str(e)[:100]
    # Captured: prepared first (the hierarchy's groups are communicators).
    st.prepare_hierarchical(g, x.numel() * x.element_size())
    src = torch.empty_like(x)
    buf = torch.empty_like(x)

    def step():
        buf.copy_(src)
        st.all_reduce_(g, buf, impl="hierarchical")

    graph = capture(step)
    for i in range(200):
        if i % 50 == 0:
            xs = [fresh(gen, (4096,), BF16) for _ in range(n)]
            src.copy_(xs[r])
        graph.replay()
        if i % 50 == 49:
            torch.cuda.synchronize()
            check(buf, torch.stack([t.double() for t in xs]).sum(0), f"hierarchical replay {i}", n)
    # The add-RMSNorm across hosts.
    parts = [fresh(gen, (4, 1024), BF16) for _ in range(n)]
    residual_src = fresh(gen, (4, 1024), BF16)
    weight = norm_weight(gen, 1024, BF16).to(device())
    try:
        st.all_reduce_add_rmsnorm(g, parts[r].to(device()), residual_src.to(device()), weight,
                                  NORM_EPS, impl="fused_ll")
        raise AssertionError("fused_ll ran across hosts")
    except sc.ImplUnavailableError as e:
        assert "one NVLink domain" in str(e), str(e)
    normed, new_res = st.all_reduce_add_rmsnorm(
        g, parts[r].to(device()), residual_src.to(device()), weight, NORM_EPS
    )
    want_res, want_norm = norm_ref(parts, residual_src, weight.cpu())
    check(new_res, want_res, "norm across hosts", n)
    check(normed, want_norm, "norm across hosts", n + 2)
    result["norm"] = g.last_dispatch.name
    assert result["norm"] == "unfused", g.last_dispatch
    torch.cuda.synchronize()
    comm.close()
    return result


def _forced(scope, world):
    """On one GPU the policy keeps a one-rank group in plain memory: open the scope anyway so
    that the allocator path runs."""
    if world == 1:
        assert not scope.active and scope.reason == "the group has one rank", scope
        scope.active = True
    else:
        assert scope.active, scope
    return scope


def scenario_scope(comm) -> dict:
    """use_symmetric_memory: torch's own allocations in the group's windows, collectives on
    them without staging, the disabled scope, the capacity error, and the scope inside a
    torch.cuda.graph capture (leaving the graph's pool and entering it again)."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(5)
    dev = device()
    if not windows_work(g):
        scope = st.use_symmetric_memory(g)
        assert not scope.active and scope.reason == "the group has one rank", scope
        return {"skipped": "no windows for a group of one rank: the scope stays plain"}
    with _forced(st.use_symmetric_memory(g, reserve_bytes=64 * MiB), n):
        a = torch.empty((1024, 512), dtype=BF16, device=dev)
        b = torch.empty(1000, dtype=F32, device=dev)
    c = torch.empty(1000, dtype=F32, device=dev)
    assert g.lookup(a.data_ptr()) is not None and g.lookup(b.data_ptr()) is not None
    assert g.lookup(c.data_ptr()) is None
    assert _core.live_allocations() >= 1
    xs = [fresh(gen, (1024, 512), BF16) for _ in range(n)]
    a.copy_(xs[r])
    st.all_reduce_(g, a)
    ran = g.last_dispatch
    assert not ran.staged_input and not ran.staged_output, ran
    check(a, torch.stack([t.double() for t in xs]).sum(0), "all_reduce in the scope's memory", n)
    with st.use_symmetric_memory(g, disabled=True) as off:
        d = torch.empty(100, device=dev)
    assert not off.active and g.lookup(d.data_ptr()) is None
    capacity = None
    try:
        with _forced(st.use_symmetric_memory(g, reserve_bytes=2 * MiB), n):
            torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    except sc.CapacityError as e:
        capacity = str(e)
        assert isinstance(e.__cause__, torch.OutOfMemoryError)
    assert capacity is not None and "reserve_bytes" in capacity, capacity

    # Inside a capture: the graph's pool is left while the scope is open.
    shape = (64 * n, 128)
    src = torch.empty(shape, dtype=BF16, device=dev)
    st.prepare(g, 4 * MiB)
    # Reserve before capturing (a scope inside a capture cannot).
    with _forced(st.use_symmetric_memory(g, reserve_bytes=16 * MiB), n):
        pass
    graph = torch.cuda.CUDAGraph()
    # The capture's pool, known before the capture begins (graph.pool() is only known after).
    pool = torch.cuda.graph_pool_handle()
    without_pool = None
    with torch.cuda.graph(graph, pool=pool):
        try:
            with _forced(st.use_symmetric_memory(g), n):
                pass
        except sc.CaptureError as e:
            without_pool = str(e)
        with _forced(st.use_symmetric_memory(g, graph_pool=pool), n):
            t = torch.empty(shape, dtype=BF16, device=dev)
        u = torch.empty(shape, dtype=BF16, device=dev)  # the graph's pool again
        t.copy_(src)
        st.all_reduce_(g, t)
        u.copy_(t)
    assert without_pool is not None and "graph_pool" in without_pool
    assert g.lookup(t.data_ptr()) is not None and g.lookup(u.data_ptr()) is None
    for i in range(200):
        xs = [fresh(gen, shape, BF16) for _ in range(n)]
        src.copy_(xs[r])
        graph.replay()
        if i % 50 == 49:
            torch.cuda.synchronize()
            check(u, torch.stack([x.double() for x in xs]).sum(0), f"scope graph replay {i}", n)
    return {"capacity": capacity[:80], "ran": ran.name}


class RowParallel(torch.nn.Module):
    """A row-parallel linear layer: a local matmul, then the TP all-reduce."""

    def __init__(self, group, weight):
        super().__init__()
        self.group = group
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        y = st.all_reduce(self.group, x @ self.weight)
        return st.all_gather(self.group, torch.relu(y), dim=0) * 2


class NormTail(torch.nn.Module):
    """A decode layer's tail: a row-parallel matmul, then the all-reduce fused with the
    residual add and RMSNorm, the residual carried in place."""

    def __init__(self, group, weight, norm_weight):
        super().__init__()
        self.group = group
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.norm_weight = torch.nn.Parameter(norm_weight, requires_grad=False)

    def forward(self, x, residual):
        y = (x @ self.weight).to(torch.bfloat16)
        normed, residual = st.all_reduce_add_rmsnorm(
            self.group, y, residual, self.norm_weight, NORM_EPS, residual_out=residual
        )
        return normed * 2


def scenario_compile(comm) -> dict:
    """torch.compile of small modules calling the ops (custom ops, traced with their fake
    implementations), against eager and the reference."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(9)
    weights = [fresh(gen, (64, 64), F32) for _ in range(n)]
    x = fresh(gen, (8, 64), F32)
    block = RowParallel(g, weights[r].to(device()))
    xd = x.to(device())
    eager = block(xd)
    want = torch.cat([torch.relu(sum(x.double() @ w.double() for w in weights))] * n) * 2
    check(eager, want, "eager module", n + 64)
    backends = ["aot_eager"] + (["inductor"] if os.environ.get("SYMMCOMM_TEST_INDUCTOR") == "1" else [])
    for backend in backends:
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        for _ in range(3):
            check(compiled(xd), want, f"compiled ({backend})", n + 64)
    # The add-RMSNorm as a custom op mutating the residual in place.
    weights = [(torch.randint(-3, 4, (64, 1024), generator=gen).float() / 8) for _ in range(n)]
    nw = norm_weight(gen, 1024, BF16)
    x = torch.randint(-3, 4, (8, 64), generator=gen).float() / 8
    residual0 = fresh(gen, (8, 1024), BF16)
    parts = [(x.double() @ w.double()).float().to(BF16) for w in weights]
    want_res, want_norm = norm_ref(parts, residual0, nw)
    tail = NormTail(g, weights[r].to(device()), nw.to(device()))
    xd = x.to(device())
    norm_names = set()
    for backend in [None] + backends:
        run = tail if backend is None else torch.compile(tail, backend=backend, fullgraph=True)
        for _ in range(3):
            residual = residual0.to(device(), copy=True)
            normed = run(xd, residual)
            check(residual, want_res, f"norm residual ({backend or 'eager'})", n)
            check(normed, want_norm * 2, f"norm normed ({backend or 'eager'})", n + 2)
            norm_names.add(norm_name(g.last_dispatch))
    return {"backends": backends, "norm": sorted(norm_names)}


def merge_ref(outs, lses, base):
    """float64 LSE merge of [B, H, D] outputs and [B, H] LSEs (empty shards weigh 0)."""
    s = torch.stack(lses).double()
    s = torch.where(torch.isnan(s) | (s == math.inf), torch.full_like(s, -math.inf), s)
    m = s.max(0).values
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = (torch.exp2 if base == "2" else torch.exp)(s - safe)
    w = torch.where(torch.isfinite(m)[None], w, torch.zeros_like(w))
    total = w.sum(0)
    weights = w / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("nbh,nbhd->bhd", weights, torch.stack(outs).double())
    return out


def scenario_dcp_dp(comm) -> dict:
    """The DCP combine (every implementation available) and DP attention's gathered buffer,
    eager and replayed in a graph."""
    g, n, r = comm.world, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(31)
    heads, dim, batch_max = 8 * n, 64, 8
    hl = heads // n
    c = st.DcpCombine(g, batch_max, heads, dim, dtype=BF16, lse_base="2", merged_lse=True)
    done = {}
    for impl in ("auto", "nccl", "nccl_symm", "fused"):
        why = c.unavailable(impl)
        if why is not None:
            done[impl] = f"unavailable: {why}"
            continue
        for batch in (batch_max, 3):
            outs = [fresh(gen, (batch, heads, dim), BF16) for _ in range(n)]
            lses = [torch.randn(batch, heads, generator=gen) * 3 for _ in range(n)]
            lses[0][0, 0] = -math.inf
            c.partial_out(batch).copy_(outs[r])
            c.partial_lse(batch).copy_(lses[r])
            c.output(batch).fill_(float("nan"))
            run = c.run(batch, impl)
            want = merge_ref(outs, lses, "2")[:, r * hl : (r + 1) * hl].transpose(0, 1)
            check(c.output(batch), want, f"dcp {impl} batch {batch}", n + 2)
        done[impl] = run.name
    # The combine in a graph.
    batch = 4
    graph = capture(lambda: c.run(batch, "auto"))
    for i in range(1000):
        if i % 250 == 0:
            outs = [fresh(gen, (batch, heads, dim), BF16) for _ in range(n)]
            lses = [torch.randn(batch, heads, generator=gen) for _ in range(n)]
            c.partial_out(batch).copy_(outs[r])
            c.partial_lse(batch).copy_(lses[r])
            c.output(batch).fill_(float("nan"))
        graph.replay()
        if i % 250 == 249:
            want = merge_ref(outs, lses, "2")[:, r * hl : (r + 1) * hl].transpose(0, 1)
            check(c.output(batch), want, f"dcp graph replay {i}", n + 2)

    hidden, cap = 128, 8
    counts = [5, 3, 8, 1][:n]
    b = st.DpGatheredBuffer(g, hidden, BF16, cap)
    rows = [fresh(gen, (counts[q], hidden), BF16) for q in range(n)]
    step = b.step(counts[r], cuda_graph=True)
    b.local_input(step).copy_(rows[r])
    b.gathered(step).fill_(float("nan"))
    b.gather(step)
    gathered = b.gathered(step)
    for q in range(n):
        start, stop = step.rows_of(q)
        check(gathered[start:stop], rows[q].double(), f"dp gather rows of {q}")
    partial = [fresh(gen, tuple(gathered.shape), BF16) for _ in range(n)]
    gathered.copy_(partial[r])
    b.local_output(step).fill_(float("nan"))
    b.scatter(step)
    start, stop = step.rows_of(r)
    check(b.local_output(step), torch.stack([p.double() for p in partial]).sum(0)[start:stop], "dp scatter", n)
    # Gather and scatter in a graph (MAX_LEN: the shapes are fixed).
    def gather_scatter():
        b.gather(step)
        b.scatter(step)

    graph = capture(gather_scatter)
    for i in range(1000):
        if i % 250 == 0:
            rows = [fresh(gen, (counts[q], hidden), BF16) for q in range(n)]
            b.local_input(step).copy_(rows[r])
            b.local_output(step).fill_(float("nan"))
        graph.replay()
        if i % 250 == 249:
            torch.cuda.synchronize()
            # The scatter reduces the gathered rows themselves: every rank's rows summed n-fold.
            mine = step.rows_of(r)
            want = torch.zeros(tuple(gathered.shape), dtype=torch.float64)
            for q in range(n):
                s0, s1 = step.rows_of(q)
                want[s0:s1] = rows[q].double()
            check(b.local_output(step), (want * n)[mine[0] : mine[1]], f"dp graph replay {i}", n)
    return {"dcp": done}


def scenario_process_group(comm_unused) -> dict:
    """Start-up from a torch.distributed NCCL process group; results against torch's own
    all_reduce."""
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    sc.nccl_env(apply=True)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    comm = st.init_from_process_group(timeout=120)
    r, n = dist.get_rank(), dist.get_world_size()
    assert (comm.rank, comm.world_size, comm.device) == (r, n, local)
    gen = torch.Generator().manual_seed(77)
    xs = [fresh(gen, (256, 64), BF16) for _ in range(n)]
    x = xs[r].to(device())
    mine = st.all_reduce(comm.world, x)
    theirs = x.clone()
    dist.all_reduce(theirs)
    torch.cuda.synchronize()
    assert torch.equal(mine, theirs)
    comm.close()
    dist.destroy_process_group()
    return {"ran": "ok"}


def scenario_errors(comm) -> dict:
    """Misuse on the GPU raises, never crashes or hangs."""
    g = comm.world
    dev = device()
    seen = []

    def expect(cls, call, match=""):
        try:
            call()
        except cls as e:
            assert match in str(e), (match, str(e))
            assert e.rank is not None and e.group is not None, e
            seen.append(type(e).__name__)
            return
        raise AssertionError(f"{cls.__name__} not raised")

    expect(sc.ArgumentError, lambda: st.all_reduce(g, torch.ones(8)), "host memory")
    expect(sc.NotContiguousError, lambda: st.all_reduce(g, torch.ones(8, 4, device=dev).t()))
    expect(sc.DTypeError, lambda: st.all_reduce(g, torch.ones(8, device=dev, dtype=torch.int32)))
    expect(sc.ShapeError, lambda: st.all_gather(g, torch.ones(8, device=dev), torch.ones(3, device=dev)))
    if torch.cuda.device_count() > 1:
        other = (torch.cuda.current_device() + 1) % torch.cuda.device_count()
        expect(
            sc.ArgumentError,
            lambda: st.all_reduce(g, torch.ones(8, device=torch.device("cuda", other))),
            f"cuda:{other}",
        )
        with torch.cuda.device(other):
            foreign_stream = torch.cuda.Stream()
        expect(
            sc.ArgumentError,
            lambda: st.all_reduce(g, torch.ones(8, device=dev), stream=foreign_stream),
            "context",
        )
    # Capture: what would allocate or grow is refused, and the capture goes on.
    windows = windows_work(g)
    x = torch.zeros(1024, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
        expect(sc.CaptureError, lambda: st.prepare(g, 1 << 30))
        if windows:
            expect(sc.CaptureError, lambda: st.empty(g, (1 << 28,), F32))
    graph.replay()
    torch.cuda.synchronize()
    return {"seen": seen}


def scenario_deadline(comm) -> dict:
    """A rank that never joins: the other's wait ends by the deadline, and the communicator is
    aborted for every later call."""
    g = comm.world
    if comm.rank == 1:
        return {"skipped": "the absent rank"}
    x = torch.ones(1024, device=device())
    try:
        st.all_reduce_(g, x)
        g.synchronize(torch.cuda.current_stream().cuda_stream)
    except sc.DeadlineError as e:
        after = None
        try:
            st.all_reduce_(g, x)
        except sc.AbortedError as a:
            after = str(a)
        return {"deadline": str(e)[:120], "aborted": after is not None}
    raise AssertionError("no DeadlineError")


SCENARIOS = {
    "ops": scenario_ops,
    "graph": scenario_graph,
    "norm": scenario_norm,
    "norm_graph": scenario_norm_graph,
    "scope": scenario_scope,
    "compile": scenario_compile,
    "dcp_dp": scenario_dcp_dp,
    "errors": scenario_errors,
}


def main(name: str) -> None:
    if name == "process_group":
        result = scenario_process_group(None)
    elif name == "hosts":
        result = scenario_hosts(None)
    elif name == "deadline":
        comm = start(timeout=5)
        result = scenario_deadline(comm)
        del comm  # after an abort the closing barrier is skipped
    else:
        comm = start()
        result = SCENARIOS[name](comm)
        comm.close()
    result["rank"] = int(os.environ["RANK"])
    result["ok"] = True
    report(result)


if __name__ == "__main__":
    main(sys.argv[1])
