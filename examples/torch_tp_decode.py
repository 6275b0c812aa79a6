"""A tensor-parallel decode in PyTorch, side by side: the same Llama-3.1-8B-shaped decoder
with its two all-reduces per layer from torch.distributed (NCCL) or from symmcomm (`auto`).

The model: hidden 4096, intermediate 14336, 32 layers, 32 query / 8 KV heads of 128, RoPE
(theta 500000), RMSNorm, SwiGLU, a vocabulary of 128256, random bf16 weights from a seed (no
downloads). Tensor parallel over every GPU, one process per GPU: q/k/v and gate/up split by
columns (heads), o and down by rows, each followed by an all-reduce of [batch, hidden];
embedding and LM head replicated. A KV cache of `--steps` positions; greedy decoding from one
random token per sequence. Each decode step is captured once per batch size in
`torch.cuda.graph` (position and tokens are tensors the graph reads), for each backend.

It checks that both backends produce the same tokens, and reports µs per decode step (median of
graph replays timed with CUDA events) and tokens/s; `--json FILE` writes rows
`op: "torch_decode_step"` (bytes = batch size) into a results file, keeping its other rows.
With `--fused` it also runs each all-reduce, residual add and RMSNorm as one call of
`symmcomm.torch.all_reduce_add_rmsnorm`, fused (`auto`) and unfused (symmcomm's all-reduce and
its separate add-RMSNorm kernel, the same bits), and checks those two against each other (their
RMSNorm rounds once where this file's rounds twice, so not against torch.distributed).

    python examples/torch_tp_decode.py --nproc 2 --json benchmarks/results/h200x2.json
    torchrun --nproc-per-node 2 examples/torch_tp_decode.py      # the same, under torchrun
    python examples/torch_tp_decode.py --nproc 1 --preset tiny    # a quick check on one GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    theta: float = 500000.0
    eps: float = 1e-5


PRESETS = {
    "llama-3.1-8b": Shape(4096, 14336, 32, 32, 8, 128, 128256),
    "tiny": Shape(512, 1536, 4, 8, 4, 64, 4096),
}


# ---- weights: every rank builds its shard of the same random full matrices ----------------------


def full_weight(seed: int, name: int, shape: tuple, device) -> torch.Tensor:
    """The full matrix `name` of the model, the same on every rank (scaled so activations stay
    O(1))."""
    g = torch.Generator(device=device).manual_seed(seed * 1000003 + name)
    w = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return (w / math.sqrt(shape[-1])).to(torch.bfloat16)


class Layer:
    """One decoder layer's shard on this rank: weights stored [in, out] for x @ w."""

    def __init__(self, s: Shape, seed: int, index: int, rank: int, world: int, device):
        hq, hk, d = s.heads // world, s.kv_heads // world, s.head_dim
        inter = s.intermediate // world
        base = 100 * (index + 1)

        def cols(name, rows, total_cols, start, width):
            return full_weight(seed, base + name, (rows, total_cols), device)[:, start : start + width].contiguous()

        def rows_of(name, total_rows, cols_, start, height):
            return full_weight(seed, base + name, (total_rows, cols_), device)[start : start + height].contiguous()

        self.wq = cols(1, s.hidden, s.heads * d, rank * hq * d, hq * d)
        self.wk = cols(2, s.hidden, s.kv_heads * d, rank * hk * d, hk * d)
        self.wv = cols(3, s.hidden, s.kv_heads * d, rank * hk * d, hk * d)
        self.wo = rows_of(4, s.heads * d, s.hidden, rank * hq * d, hq * d)
        self.wg = cols(5, s.hidden, s.intermediate, rank * inter, inter)
        self.wu = cols(6, s.hidden, s.intermediate, rank * inter, inter)
        self.wd = rows_of(7, s.intermediate, s.hidden, rank * inter, inter)
        self.norm1 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.norm2 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.hq, self.hk = hq, hk


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] rotated by the position's angles (cos/sin [D/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Weights:
    """This rank's shard of every layer; the embedding and LM head, replicated."""

    def __init__(self, s: Shape, seed: int, rank: int, world: int, device):
        self.layers = [Layer(s, seed, i, rank, world, device) for i in range(s.layers)]
        self.embed = full_weight(seed, 1, (s.vocab, s.hidden), device)
        self.head = full_weight(seed, 2, (s.hidden, s.vocab), device)
        self.final_norm = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)


class Model:
    """A batch's KV cache and static buffers over the shared weights, and one decode step."""

    def __init__(self, s: Shape, w: Weights, world: int, batch: int, steps: int, device):
        self.s, self.batch, self.steps, self.device = s, batch, steps, device
        self.layers, self.embed, self.head = w.layers, w.embed, w.head
        self.final_norm = w.final_norm
        hk = s.kv_heads // world
        self.k_cache = torch.zeros(s.layers, batch, hk, steps, s.head_dim, device=device, dtype=torch.bfloat16)
        self.v_cache = torch.zeros_like(self.k_cache)
        inv = 1.0 / (s.theta ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim))
        angles = torch.outer(torch.arange(steps, device=device, dtype=torch.float32), inv)
        self.cos, self.sin = angles.cos(), angles.sin()
        # What a captured step reads and writes.
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.arange(steps, device=device)

    def reset(self, first_tokens: torch.Tensor):
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.tokens.copy_(first_tokens)
        self.pos.zero_()

    def step(self, backend):
        """One decode step: embedding, every layer, final norm, greedy next token. The backend
        gives the tensors the row-parallel GEMMs write into (`backend.buffers`: symmetric
        memory for symmcomm) and ends each half of a layer: `backend.reduce_add_norm(part, x,
        w)` all-reduces `part`, adds it to the residual stream `x` and normalises the sum with
        `w`, returning (normalised, new x)."""
        s, b = self.s, self.batch
        x = self.embed.index_select(0, self.tokens)  # [B, hidden]
        cos = self.cos.index_select(0, self.pos)  # [1, D/2]
        sin = self.sin.index_select(0, self.pos)
        # Attend to positions 0..pos: a mask over the whole cache.
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        h = rms_norm(x, self.layers[0].norm1, s.eps)
        for i, layer in enumerate(self.layers):
            q = rope((h @ layer.wq).view(b, layer.hq, s.head_dim), cos, sin)
            k = rope((h @ layer.wk).view(b, layer.hk, s.head_dim), cos, sin)
            v = (h @ layer.wv).view(b, layer.hk, s.head_dim)
            self.k_cache[i].index_copy_(2, self.pos, k.unsqueeze(2))
            self.v_cache[i].index_copy_(2, self.pos, v.unsqueeze(2))
            attn = torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(2),  # [B, Hq, 1, D]
                self.k_cache[i],  # [B, Hk, T, D]
                self.v_cache[i],
                attn_mask=mask,
                enable_gqa=True,
            ).reshape(b, layer.hq * s.head_dim)
            o = backend.buffers[0]
            torch.matmul(attn, layer.wo, out=o)
            h, x = backend.reduce_add_norm(o, x, layer.norm2)
            mlp = torch.nn.functional.silu(h @ layer.wg) * (h @ layer.wu)
            d = backend.buffers[1]
            torch.matmul(mlp, layer.wd, out=d)
            last = i + 1 == len(self.layers)
            h, x = backend.reduce_add_norm(d, x, self.final_norm if last else self.layers[i + 1].norm1)
        logits = h @ self.head
        self.next_tokens.copy_(logits.argmax(-1))
        # Feed the next step (tokens and position live on the device, read by the graph).
        self.tokens.copy_(self.next_tokens)
        self.pos.add_(1)


# ---- the backends ----------------------------------------------------------------------------


class TorchDistributed:
    name = "torch.distributed"

    def __init__(self, model: Model):
        b, h = model.batch, model.s.hidden
        self.eps = model.s.eps
        self.buffers = [torch.empty(b, h, dtype=torch.bfloat16, device=model.device) for _ in range(2)]

    def reduce_add_norm(self, part: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        dist.all_reduce(part)
        x = x + part
        return rms_norm(x, w, self.eps), x

    def last(self) -> str:
        return "nccl"


class Symmcomm:
    name = "symmcomm"

    def __init__(self, model: Model, group):
        import symmcomm.torch as st

        self.st, self.group, self.eps = st, group, model.s.eps
        b, h = model.batch, model.s.hidden
        # The row-parallel GEMMs write straight into the group's windows.
        self.buffers = [st.empty(group, [b, h], torch.bfloat16) for _ in range(2)]

    def reduce_add_norm(self, part: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        self.st.all_reduce_(self.group, part)
        x = x + part
        return rms_norm(x, w, self.eps), x

    def last(self) -> str:
        d = self.group.last_dispatch
        return f"{d.name} ({d.reason})" if d is not None else "?"


class SymmcommAddNorm(Symmcomm):
    """symmcomm's all-reduce + residual add + RMSNorm in one call (`--fused`): `impl` "auto"
    (one fused kernel per rank where one runs) or "unfused" (symmcomm's all-reduce, then its
    separate add-RMSNorm kernel, which gives the same bits). Its RMSNorm rounds once where
    `rms_norm` above rounds twice, so its tokens are compared with the other impl's, not with
    torch.distributed's."""

    def __init__(self, model: Model, group, impl: str):
        super().__init__(model, group)
        self.impl, self.name = impl, f"symmcomm {impl} add-rmsnorm"
        # Kernels loaded and staging grown before the capture.
        self.st.prepare(group, model.batch * model.s.hidden * 2)

    def reduce_add_norm(self, part: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        return self.st.all_reduce_add_rmsnorm(self.group, part, x, w, self.eps, impl=self.impl)


# ---- capture, replay, check --------------------------------------------------------------------


def decode(model: Model, backend, first: torch.Tensor, replays: int):
    """Capture one step in a graph, replay it `replays` times from `first`; returns the tokens
    of every step [replays, B] and the median µs per step."""
    model.reset(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernels, NCCL connections) outside the capture
        model.step(backend)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    model.reset(first)
    with torch.cuda.graph(graph):
        model.step(backend)
    tokens, times = [], []
    model.reset(first)
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
        tokens.append(model.tokens.clone())
    del graph
    return torch.stack(tokens).cpu(), statistics.median(times[1:] if len(times) > 1 else times)


def agree(a: torch.Tensor, b: torch.Tensor, device) -> bool:
    """Whether two runs' tokens are equal on every rank (collective)."""
    flag = torch.tensor([1 if torch.equal(a, b) else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_rank(args) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    import symmcomm.torch as st

    comm = st.init_from_process_group()
    group = comm.world
    shape = PRESETS[args.preset]
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    if shape.kv_heads % world or shape.heads % world:
        raise SystemExit(f"{world} ranks do not divide {shape.kv_heads} KV heads")
    rows = []
    weights = Weights(shape, args.seed, rank, world, device)
    for batch in args.batch:
        model = Model(shape, weights, world, batch, args.steps, device)
        g = torch.Generator(device=device).manual_seed(args.seed + batch)
        first = torch.randint(0, shape.vocab, (batch,), generator=g, device=device)
        backends = [TorchDistributed(model), Symmcomm(model, group)]
        if args.fused:
            backends += [SymmcommAddNorm(model, group, "unfused"), SymmcommAddNorm(model, group, "auto")]
        results = {}
        for b in backends:
            tokens, us = decode(model, b, first, args.steps)
            results[b.name] = (tokens, us, b.last())
        base_tokens, base_us, _ = results["torch.distributed"]
        ours_tokens, ours_us, ran = results["symmcomm"]
        same = agree(base_tokens, ours_tokens, device)
        if rank == 0:
            print(
                f"batch {batch:3d}: torch.distributed {base_us:9.1f} us/step "
                f"({batch / base_us * 1e6:9.0f} tok/s) | symmcomm {ours_us:9.1f} us/step "
                f"({batch / ours_us * 1e6:9.0f} tok/s) | ratio {ours_us / base_us:.3f} | "
                f"same tokens: {same} | symmcomm ran {ran}",
                flush=True,
            )
        timed = [("torch.distributed", base_us, same), ("auto", ours_us, same)]
        if args.fused:
            unfused_tokens, unfused_us, _ = results["symmcomm unfused add-rmsnorm"]
            fused_tokens, fused_us, fused_ran = results["symmcomm auto add-rmsnorm"]
            same_fused = agree(unfused_tokens, fused_tokens, device)
            if rank == 0:
                print(
                    f"batch {batch:3d}: add-rmsnorm unfused {unfused_us:9.1f} us/step | fused "
                    f"{fused_us:9.1f} us/step | fused / unfused {fused_us / unfused_us:.3f} | "
                    f"fused / torch.distributed {fused_us / base_us:.3f} | same tokens: "
                    f"{same_fused} | ran {fused_ran}",
                    flush=True,
                )
            timed += [("unfused_add_rmsnorm", unfused_us, same_fused), ("fused", fused_us, same_fused)]
        for name, us, ok in timed:
            rows.append(
                {"op": "torch_decode_step", "dtype": "bf16", "bytes": batch, "world": world,
                 "impl": name, "mode": "graph", "us": us, "algbw_gbps": 0.0, "busbw_gbps": 0.0,
                 "ok": ok, "config": f"{args.preset} layers={shape.layers} steps={args.steps}"}
            )
        del model, backends
        torch.cuda.empty_cache()
    if rank == 0 and args.json:
        write_rows(args, rows, world)
    comm.close()
    dist.destroy_process_group()
    if not all(r["ok"] for r in rows):
        raise SystemExit("the backends produced different tokens")


def write_rows(args, rows, world) -> None:
    path = args.json
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        results = {"meta": {}, "limits": {}, "rows": []}
    results["rows"] = [r for r in results.get("rows", []) if r.get("op") != "torch_decode_step"] + rows
    meta = results.setdefault("meta", {})
    meta.setdefault("gpu", torch.cuda.get_device_name(0))
    meta.setdefault("gpus", world)
    meta["torch_decode"] = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("SYMMCOMM_COMMIT", "unknown"),
    }
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {len(rows)} torch_decode_step rows to {path}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> int:
    """One process per GPU, torchrun's variables, a deadline on the whole job."""
    port = free_port()
    procs = []
    for r in range(args.nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        procs.append(subprocess.Popen([sys.executable, __file__] + sys.argv[1:], env=env))
    deadline = time.monotonic() + args.timeout
    codes = [None] * len(procs)
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    if time.monotonic() > deadline:
        print(f"timed out after {args.timeout} s", file=sys.stderr)
        return 124
    return max(abs(c) for c in codes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="GPUs (default: every visible one)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    p.add_argument("--batch", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--steps", type=int, default=32, help="decode steps (KV cache length)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=float, default=540.0)
    p.add_argument(
        "--fused",
        action="store_true",
        help="also time symmcomm's all-reduce + add + RMSNorm in one call, fused against unfused",
    )
    args = p.parse_args()
    if args.steps < 2 or any(b < 1 for b in args.batch):
        p.error("--steps must be at least 2 and every --batch at least 1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" in os.environ:
        run_rank(args)
        return 0
    args.nproc = args.nproc or torch.cuda.device_count()
    if args.nproc < 1:
        p.error("no GPU visible")
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
