#!/usr/bin/env python3
"""Plot a symmcomm results file (benchmarks/results/*.json): latency against size, log-log,
one panel per collective, one line per implementation, for one mode (graph by default).

    python3 scripts/plot_bench.py benchmarks/results/h200x2.json benchmarks/h200x2-graph.svg

Needs matplotlib (`pip install matplotlib`); writes SVG or PNG by the output's extension.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "nccl": ("tab:gray", "o", "-"),
    "nccl_symm": ("black", "s", "-"),
    "ll": ("tab:purple", "P", "--"),
    "oneshot": ("tab:blue", "^", "--"),
    "twoshot": ("tab:cyan", "v", "--"),
    "ce": ("tab:green", "D", "--"),
    "auto": ("tab:red", "*", "-"),
}


def human(b):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b >= 1 << shift:
            return f"{b >> shift}{unit}"
    return str(b)


def main(path, out, mode="graph"):
    results = json.load(open(path))
    rows = [r for r in results["rows"] if r["mode"] == mode]
    ops = ["all_gather", "reduce_scatter", "all_reduce"]
    fig, axes = plt.subplots(1, len(ops), figsize=(16, 5), sharey=False)
    for ax, op in zip(axes, ops):
        impls = sorted({r["impl"] for r in rows if r["op"] == op}, key=lambda i: list(STYLE).index(i) if i in STYLE else 99)
        for impl in impls:
            pts = sorted((r["bytes"], r["us"]) for r in rows if r["op"] == op and r["impl"] == impl)
            color, marker, ls = STYLE.get(impl, (None, "x", ":"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, color=color, marker=marker, linestyle=ls)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r["bytes"] for r in rows if r["op"] == op})
        ax.set_xticks(sizes)
        ax.set_xticklabels([human(s) for s in sizes], rotation=45)
        ax.set_title(f"{op} ({mode})")
        ax.set_xlabel("bytes (larger buffer)")
        ax.set_ylabel("µs per operation (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = results["meta"]
    fig.suptitle(f"{m['gpus']}× {m['gpu']}, NCCL {m['nccl']}, bf16, commit {m['commit']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *(sys.argv[3:4]))
