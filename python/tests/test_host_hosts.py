"""Groups across hosts, simulated on one machine (thread ranks given host identities with
``Communicator.threads(hosts=...)``, processes with ``SYMMCOMM_HOST_ID``): what every rank
learns of the hosts (``comm.host_id``, ``comm.topology``, ``group.topology``); the
hierarchical all-reduce (``impl="hierarchical"``) against a float64 reference, flat and in
place, prepared and not; ``auto`` across hosts running the host's regular or symmetric path,
never our kernels; the fused add-RMSNorm refused across hosts by name and ``auto`` running it
unfused; and every refusal with its reason."""

from __future__ import annotations

import os

import numpy as np
import pytest

import symmcomm as sc
from _ref import add_rmsnorm_ref, array, as_f64, assert_close, assert_norm_close, from_f64
from _ref import poison, rounded, values
from launch import launch

#: Four thread ranks on two hosts, interleaved (the domains follow the hosts, not the ranks).
HOSTS = ["host-a", "host-b", "host-a", "host-b"]


def run(world, body, hosts=None, **options):
    options.setdefault("segment_bytes", 2 << 20)
    return sc.run_threads(world, body, join_timeout=120, timeout=20, hosts=hosts, **options)


def test_without_hosts_every_rank_is_on_this_machine():
    def body(comm):
        return comm.host_id, comm.host_id_source, comm.topology, comm.world.topology

    results = run(2, body)
    host = results[0][0]
    for rank, (host_id, source, hosts, topo) in enumerate(results):
        assert host_id == host and source in ("machine", "env"), (host_id, source)
        assert hosts == [host, host]
        assert topo["domains"] == [{"host": host, "ranks": [0, 1]}]
        assert not topo["spans_domains"] and topo["kernels_unavailable"] is None
        assert (topo["my_domain"], topo["rank_in_domain"]) == (0, rank)
        assert topo["ranks_per_domain"] == 2
        assert "nothing to be hierarchical" in topo["hierarchical_unavailable"]
        assert topo["describe"] == f"one NVLink domain (host {host})"


def test_topology_of_groups_across_hosts():
    def body(comm):
        tp = comm.new_group([2, 3], "tp")  # host-a and host-b
        pair = comm.new_groups([[0, 2], [1, 3]], "dp")  # one host each
        return (
            comm.rank,
            comm.host_id,
            comm.host_id_source,
            comm.topology,
            comm.world.topology,
            None if tp is None else tp.topology,
            pair.topology,
        )

    for rank, host_id, source, hosts, world, tp, pair in run(4, body, HOSTS):
        assert host_id == HOSTS[rank] and source == "bootstrap"
        assert hosts == HOSTS
        assert world["domains"] == [
            {"host": "host-a", "ranks": [0, 2]},
            {"host": "host-b", "ranks": [1, 3]},
        ]
        assert world["spans_domains"] and world["ranks_per_domain"] == 2
        assert (world["my_domain"], world["rank_in_domain"]) == (rank % 2, rank // 2)
        assert world["hierarchical_unavailable"] is None
        assert "one NVLink domain" in world["kernels_unavailable"]
        assert world["describe"] == (
            "2 NVLink domains (hosts): host-a ranks [0, 2], host-b ranks [1, 3]"
        )
        if rank >= 2:
            assert [d["host"] for d in tp["domains"]] == ["host-a", "host-b"]
            assert tp["spans_domains"] and tp["ranks_per_domain"] == 1
        else:
            assert tp is None
        assert pair["domains"] == [{"host": HOSTS[rank], "ranks": [0, 1]}]
        assert not pair["spans_domains"]


def test_uneven_hosts_refuse_the_hierarchy():
    def body(comm):
        g = comm.world
        topo = g.topology
        with pytest.raises(sc.ImplUnavailableError, match="same number of ranks") as e:
            sc.all_reduce(g, np.ones(6, np.float32), impl="hierarchical")
        return topo["ranks_per_domain"], topo["hierarchical_unavailable"], e.value.op

    for per_domain, why, op in run(3, body, ["a", "a", "b"]):
        assert per_domain is None and "a ranks [0, 1], b ranks [2]" in why
        assert op == "all_reduce"


def test_hosts_must_name_every_rank():
    with pytest.raises(sc.ArgumentError, match="one per rank"):
        sc.Communicator.threads(3, hosts=["a", "b"], backend="host")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("where", ["plain", "symm"])
@pytest.mark.parametrize("prepared", [False, True])
def test_hierarchical_all_reduce(dtype, op, where, prepared, rng):
    world, shape = 4, (6, 10)  # 60 elements: a piece of 30 for each domain's 2 ranks
    rounds = [[values(rng, shape, dtype) for _ in range(world)] for _ in range(3)]

    def body(comm):
        g = comm.world
        if prepared:
            g.prepare_hierarchical(60 * 4)
        got = []
        for inputs in rounds:
            x = array(g, shape, dtype, where)
            x[...] = from_f64(inputs[g.rank], dtype)
            out = array(g, shape, dtype, where)
            poison(out, dtype)
            kw = {"dtype": "bf16"} if dtype == "bf16" else {}
            sc.all_reduce(g, x, out, op=op, impl="hierarchical", **kw)
            ran = g.last_dispatch
            sc.all_reduce_(g, x, op=op, impl="hierarchical", **kw)
            got.append((as_f64(out, dtype), as_f64(x, dtype), ran))
        return got

    for got in run(world, body, HOSTS):
        for (out, in_place, ran), inputs in zip(got, rounds):
            stack = np.stack(inputs)
            want = rounded(stack.sum(0) if op == "sum" else stack.max(0), dtype)
            assert_close(out, want, dtype, terms=world)
            assert_close(in_place, want, dtype, terms=world)
            assert ran.name == "host_hierarchical", ran
            assert "hierarchical over 2 domains" in ran.reason, ran.reason
            assert not ran.staged_input and not ran.staged_output, ran


def test_hierarchical_is_refused_where_it_cannot_run():
    def body(comm):
        g = comm.world
        refusals = []
        for call in (
            lambda: sc.all_gather(g, np.ones(4, np.float32), impl="hierarchical"),
            lambda: sc.reduce_scatter(g, np.ones(8, np.float32), impl="hierarchical"),
            lambda: sc.all_reduce(g, np.ones(7, np.float32), impl="hierarchical"),
        ):
            with pytest.raises(sc.ImplUnavailableError) as e:
                call()
            refusals.append(str(e.value))
        return refusals

    for gather, scatter, odd in run(4, body, HOSTS):
        assert "all-reduces only" in gather and "all_gather" in gather
        assert "all-reduces only" in scatter
        assert "do not split into the 2 ranks" in odd

    def one_host(comm):
        g = comm.world
        with pytest.raises(sc.ImplUnavailableError, match="nothing to be hierarchical"):
            sc.all_reduce(g, np.ones(8, np.float32), impl="hierarchical")
        with pytest.raises(sc.ImplUnavailableError, match="nothing to be hierarchical"):
            g.prepare_hierarchical(1024)
        return True

    assert run(2, one_host) == [True, True]


def test_auto_across_hosts_runs_the_regular_or_symmetric_path(rng):
    """Across hosts `auto` runs the host's own paths, never our kernels, which are refused by
    name."""
    inputs = [values(rng, (64,), "f32") for _ in range(4)]

    def body(comm):
        g = comm.world
        x = sc.empty(g, (64,), "f32")
        x[...] = inputs[g.rank]
        out = sc.empty(g, (64,), "f32")
        poison(out, "f32")
        sc.all_reduce(g, x, out)
        symm = g.last_dispatch
        plain = sc.all_reduce(g, inputs[g.rank].astype(np.float32))
        regular = g.last_dispatch
        with pytest.raises(sc.ImplUnavailableError, match="one NVLink domain") as e:
            sc.all_reduce(g, x, out, impl="oneshot")
        return out.astype(np.float64), plain.astype(np.float64), symm, regular, str(e.value)

    for out, plain, symm, regular, refused in run(4, body, HOSTS):
        assert_close(out, np.sum(inputs, axis=0), "f32", 4)
        assert_close(plain, np.sum(inputs, axis=0), "f32", 4)
        assert symm.name == "host_symm" and regular.name == "host", (symm, regular)
        assert "NVLink domains" in symm.reason, symm.reason
        assert "host-a ranks [0, 2]" in refused


def test_add_rmsnorm_across_hosts(rng):
    """The fused kernels need one NVLink domain: explicit ones are refused saying so, `auto`
    runs unfused (the collective across hosts, then the add-RMSNorm kernel), right."""
    world, tokens, hidden, dtype = 4, 3, 32, "bf16"
    inputs = [values(rng, (tokens, hidden), dtype) for _ in range(world)]
    residual = values(rng, (tokens, hidden), dtype)
    weight = rng.integers(2, 15, size=hidden) / 8.0

    def body(comm):
        g = comm.world
        x = sc.empty(g, (tokens, hidden), dtype)
        x[...] = from_f64(inputs[g.rank], dtype)
        res = from_f64(residual, dtype)
        w = from_f64(weight, dtype)
        with pytest.raises(sc.ImplUnavailableError, match="one NVLink domain"):
            sc.all_reduce_add_rmsnorm(g, x, res, w, 1e-6, impl="fused_ll", dtype="bf16")
        normed, new_res = sc.all_reduce_add_rmsnorm(g, x, res, w, 1e-6, dtype="bf16")
        return as_f64(normed, dtype), as_f64(new_res, dtype), g.last_dispatch

    want_res, want_norm = add_rmsnorm_ref(inputs, residual, weight, 1e-6, dtype)
    for normed, new_res, ran in run(world, body, HOSTS):
        assert ran.name == "host_unfused" and "no fused kernel" in ran.reason, ran
        assert ran.collective.name in ("host", "host_symm"), ran
        assert_close(new_res, want_res, dtype, terms=world)
        assert_norm_close(normed, want_norm, dtype, terms=world + 2)


def test_implementation_codes_round_trip():
    """Every implementation name has its own code, `hierarchical` included."""
    from symmcomm import _core

    names = ["auto", "nccl", "nccl_symm", "local", "oneshot", "twoshot", "ce", "ll",
             "hierarchical"]
    codes = [_core.impl_code(n) for n in names]
    assert len(set(codes)) == len(names)
    assert _core.impl_code("host_hierarchical") == _core.impl_code("hierarchical")


def test_processes_on_simulated_hosts():
    """Four processes, two on each simulated host (SYMMCOMM_HOST_ID, set by each rank before
    it starts): the topology every rank reports, the hierarchical all-reduce over the job's
    store, and the add-RMSNorm (unfused: the fused kernels run on thread ranks only)."""
    worker = os.path.join(os.path.dirname(__file__), "host_worker.py")
    results = launch(worker, 4, args=["hosts"], timeout=120)
    for rank, r in enumerate(results):
        assert r["ok"], results
        assert r["host_id"] == f"sim-{rank // 2}" and r["source"] == "env", r
        assert r["topology"] == ["sim-0", "sim-0", "sim-1", "sim-1"], r
        assert r["hierarchical"] == "host_hierarchical" and r["norm"] == "host_unfused", r
