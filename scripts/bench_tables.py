#!/usr/bin/env python3
"""Markdown tables and bar checks from a symmcomm results file (benchmarks/results/*.json), for
BENCHMARKS.md. Every figure comes from the file; nothing is typed in by hand.

    python3 scripts/bench_tables.py benchmarks/results/h200x2.json > /tmp/tables.md

Sections: the collectives per op and mode (µs per op, `auto`'s choice, auto / best NCCL path,
auto / nccl_symm), the DCP combine rows, the decode-step rows, the fused add-RMSNorm rows
(`ar_rmsnorm`), the engine's decode step (`engine_step`, examples/tp-decode), the PyTorch
decode (`torch_decode_step`, examples/torch_tp_decode.py), and the issues' bars.
"""

import json
import sys
from collections import defaultdict

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")
# Column order; an implementation shows only if the file has rows for it.
ORDER = ("nccl", "nccl_symm", "ll", "oneshot", "twoshot", "ce")


def human(b):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)


def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def collective_tables(rows, out):
    table = defaultdict(dict)  # (op, mode) -> bytes -> impl -> row
    for r in rows:
        if r["op"] in COLLECTIVES and r.get("dtype") == "bf16":
            table[(r["op"], r["mode"])].setdefault(r["bytes"], {})[r["impl"]] = r
    for mode in ("graph", "eager"):
        for op in COLLECTIVES:
            points = table.get((op, mode))
            if not points:
                continue
            impls = [i for i in ORDER if any(i in p for p in points.values())]
            out.append(
                f"**{op}, {mode}** (µs per op; auto/min = auto / best of nccl and nccl_symm)\n"
            )
            head = ["size", *impls, "auto", "auto ran", "auto/min", "auto/symm"]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join(["---:"] * (len(impls) + 2) + ["---", "---:", "---:"]) + "|")
            for size in sorted(points):
                p = points[size]
                us = {i: p[i]["us"] for i in p}
                best = min(us[i] for i in ("nccl", "nccl_symm") if i in us)
                auto = us.get("auto")
                cells = [human(size), *[fmt(us.get(i)) for i in impls], fmt(auto)]
                cells.append(p["auto"].get("ran", "?") if "auto" in p else "–")
                cells.append(f"{auto / best:.3f}" if auto else "–")
                cells.append(f"{auto / us['nccl_symm']:.3f}" if auto and "nccl_symm" in us else "–")
                out.append("| " + " | ".join(cells) + " |")
            out.append("")


def grouped_table(rows, op, key, key_name, out, title):
    sel = [r for r in rows if r["op"] == op]
    if not sel:
        return
    impls = sorted({r["impl"] for r in sel}, key=lambda i: (i != "nccl", i != "nccl_symm", i))
    groups = defaultdict(dict)
    for r in sel:
        groups[(r.get("config", ""), r["mode"], key(r))][r["impl"]] = r
    out.append(title + "\n")
    head = ["config", "mode", key_name, *impls, *[f"{i}/nccl" for i in impls if i != "nccl"],
            *[f"{i}/nccl_symm" for i in impls if i not in ("nccl", "nccl_symm")], "ok"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|")
    for (config, mode, k), p in sorted(groups.items()):
        us = {i: p[i]["us"] for i in p}
        cells = [config or "–", mode, str(k), *[fmt(us.get(i)) for i in impls]]
        for i in impls:
            if i != "nccl":
                cells.append(f"{us[i] / us['nccl']:.3f}" if i in us and "nccl" in us else "–")
        for i in impls:
            if i not in ("nccl", "nccl_symm"):
                cells.append(
                    f"{us[i] / us['nccl_symm']:.3f}" if i in us and "nccl_symm" in us else "–"
                )
        cells.append("yes" if all(r["ok"] for r in p.values()) else "**NO**")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")


def decode_steps(rows, out):
    """Per (config, B): the three implementations, what auto ran, auto/nccl and the saving."""
    steps = defaultdict(dict)
    for r in rows:
        if r["op"] == "decode_step" and r["mode"] == "graph":
            steps[(r.get("config", ""), r["bytes"])][r["impl"]] = r
    if not steps:
        return
    out.append("**decode_step, graph** (µs of communication per step; saving = nccl − auto)\n")
    out.append("| config | B | nccl | nccl_symm | auto | auto ran | auto/nccl | saving µs | saving % | ok |")
    out.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    met = 0
    order = {"tp": 0, "dp_attn": 1, "dcp": 2}
    for (config, b), p in sorted(steps.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        us = {i: p[i]["us"] for i in p}
        if "auto" not in us or "nccl" not in us:
            continue
        ratio = us["auto"] / us["nccl"]
        met += ratio <= 0.6
        save = us["nccl"] - us["auto"]
        ok = "yes" if all(r["ok"] for r in p.values()) else "**NO**"
        out.append(f"| {config} | {b} | {us['nccl']:.1f} | {fmt(us.get('nccl_symm'))} | "
                   f"{us['auto']:.1f} | {p['auto'].get('ran', '')} | {ratio:.3f} | {save:.1f} | "
                   f"{100 * save / us['nccl']:.1f}% | {ok} |")
    out.append(f"\nauto ≤ 0.6 × nccl at {met} of {len(steps)} points.\n")


def ratio(us, a, b):
    return f"{us[a] / us[b]:.3f}" if a in us and b in us else "–"


def step_table(rows, op, base, impls, title, out):
    """Per batch: µs of each implementation, each against `base`, and whether all were ok.
    Returns {batch: {impl: µs}} for the bars."""
    steps = defaultdict(dict)
    for r in rows:
        if r["op"] == op:
            steps[r["bytes"]][r["impl"]] = r
    if not steps:
        return {}
    shown = [i for i in impls if any(i in p for p in steps.values())]
    out.append(title + "\n")
    head = ["batch", *shown, *[f"{i}/{base}" for i in shown if i != base], "ok"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---:"] * (len(head) - 1) + ["---"]) + "|")
    table = {}
    for b, p in sorted(steps.items()):
        us = {i: p[i]["us"] for i in p}
        table[b] = us
        cells = [str(b), *[fmt(us.get(i)) for i in shown]]
        cells += [ratio(us, i, base) for i in shown if i != base]
        cells.append("yes" if all(r["ok"] for r in p.values()) else "**NO**")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return table


def step_bar(table, what, a, b, first, rest, out):
    """`what`: a / b at batch 1 against `first`, at the other batches against `rest`."""
    for batch, us in sorted(table.items()):
        if a in us and b in us:
            r = round(us[a] / us[b], 3)  # judged as printed
            want = first if batch == 1 else rest
            met = "met" if r <= want else "**missed**"
            out.append(f"| {what}, batch {batch} | {r:.3f} | ≤ {want} | {met} |")


def engine_steps(rows, out):
    engine = step_table(
        rows, "engine_step", "nccl", ("nccl", "auto", "fused"),
        "**engine_step, graph** (examples/tp-decode: µs per decode step, slowest rank)", out)
    torch_steps = step_table(
        rows, "torch_decode_step", "torch.distributed",
        ("torch.distributed", "auto", "unfused_add_rmsnorm", "fused"),
        "**torch_decode_step, graph** (examples/torch_tp_decode.py: µs per decode step)", out)
    if not engine and not torch_steps:
        return
    out.append("| bar | ratio | want | |")
    out.append("| --- | ---: | ---: | --- |")
    step_bar(engine, "engine_step auto / nccl", "auto", "nccl", 0.95, 1.0, out)
    step_bar(engine, "engine_step fused / auto", "fused", "auto", 1.0, 1.0, out)
    step_bar(torch_steps, "torch_decode_step auto / torch.distributed", "auto",
             "torch.distributed", 0.92, 1.0, out)
    step_bar(torch_steps, "torch_decode_step fused / unfused", "fused", "unfused_add_rmsnorm",
             1.0, 1.0, out)
    out.append("")


def ar_rmsnorm(rows, out):
    """Per (hidden, bytes): fused against unfused and nccl + the same kernel (the bars: fused
    ≤ 0.75 × unfused and ≤ 0.5 × nccl)."""
    points = defaultdict(dict)
    for r in rows:
        if r["op"] == "ar_rmsnorm" and r["mode"] == "graph":
            points[(r.get("config", ""), r["bytes"])][r["impl"]] = r
    if not points:
        return
    out.append("**ar_rmsnorm, graph** (µs per all-reduce + add + RMSNorm)\n")
    out.append("| config | bytes | nccl | unfused | fused | fused ran | fused/unfused | fused/nccl | ok |")
    out.append("|---|---:|---:|---:|---:|---|---:|---:|---|")
    met = 0
    for (config, b), p in sorted(points.items()):
        us = {i: p[i]["us"] for i in p}
        fused = next((i for i in us if i.startswith("fused")), None)
        if fused is None:
            continue
        fu, fn = us[fused] / us.get("unfused", float("nan")), us[fused] / us.get("nccl", float("nan"))
        met += fu <= 0.75 and fn <= 0.5
        ok = "yes" if all(r["ok"] for r in p.values()) else "**NO**"
        out.append(f"| {config} | {human(b)} | {fmt(us.get('nccl'))} | {fmt(us.get('unfused'))} | "
                   f"{us[fused]:.2f} | {p[fused].get('ran', fused)} | {fu:.3f} | {fn:.3f} | {ok} |")
    out.append(f"\nfused ≤ 0.75 × unfused and ≤ 0.5 × nccl at {met} of {len(points)} points.\n")


def bars(rows, out, limits):
    graph = defaultdict(dict)
    for r in rows:
        if r["op"] in COLLECTIVES and r["mode"] == "graph" and r.get("dtype") == "bf16":
            graph[(r["op"], r["bytes"])][r["impl"]] = r["us"]
    def worst(lo, hi, ref):
        ratios = []
        for (op, b), us in graph.items():
            if lo <= b <= hi and "auto" in us:
                base = us["nccl_symm"] if ref == "symm" else min(us["nccl"], us["nccl_symm"])
                ratios.append((us["auto"] / base, op, human(b)))
        return max(ratios) if ratios else None
    out.append("| bar (graph, bf16) | worst ratio | where |")
    out.append("| --- | ---: | --- |")
    for label, lo, hi, ref in (
        ("2–64 KiB: auto / nccl_symm", 2 << 10, 64 << 10, "symm"),
        ("256 KiB–4 MiB: auto / min(nccl, nccl_symm)", 256 << 10, 4 << 20, "min"),
        ("16–256 MiB: auto / min(nccl, nccl_symm)", 16 << 20, 256 << 20, "min"),
        ("every size: auto / min(nccl, nccl_symm)", 0, 1 << 40, "min"),
    ):
        w = worst(lo, hi, ref)
        if w:
            out.append(f"| {label} | {w[0]:.3f} | {w[1]} {w[2]} |")
    big_ag = graph.get(("all_gather", 256 << 20), {})
    copy = (limits or {}).get("p2p_copy_gbps")
    world = next((r["world"] for r in rows if r["op"] == "all_gather"), 2)
    if "auto" in big_ag and copy:
        # Bus bandwidth (nccl-tests): algbw x (n - 1) / n.
        bus = (256 << 20) / big_ag["auto"] / 1e3 * (world - 1) / world
        out.append(f"| all_gather 256M: auto bus bandwidth / peer copy | {bus / copy:.3f} | "
                   f"{bus:.0f} of {copy:.1f} GB/s |")
    n_ok = sum(r["ok"] for r in rows)
    out.append(f"| rows ok | {n_ok} / {len(rows)} | |")
    out.append("")


def main():
    data = json.load(open(sys.argv[1]))
    rows = data["rows"]
    out = [f"Source: `{sys.argv[1]}`, commit `{data['meta'].get('commit')}`, "
           f"{data['meta'].get('date')}, NCCL {data['meta'].get('nccl')}.\n"]
    collective_tables(rows, out)
    grouped_table(rows, "dcp_combine", lambda r: r["bytes"], "bytes", out,
                  "**dcp_combine** (µs per combine; bytes = partial output per rank)")
    decode_steps(rows, out)
    ar_rmsnorm(rows, out)
    engine_steps(rows, out)
    bars(rows, out, data.get("limits"))
    print("\n".join(out))


if __name__ == "__main__":
    main()
