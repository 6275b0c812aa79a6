//! Benchmark rows of the all-reduce + residual add + RMSNorm of a tensor-parallel decode layer
//! (`op: "ar_rmsnorm"`): per hidden size and token count, our fused kernel (`fused`), symmcomm's
//! best all-reduce followed by the separate add-RMSNorm kernel (`unfused`) and NCCL's regular
//! all-reduce followed by the same kernel (`nccl`); eager and in graphs; both outputs of every
//! row checked against the f64 reference of the very inputs it ran on. `bytes` is the
//! all-reduce's (`tokens × hidden × element size`); `config` holds `hidden=H`, and `ran` what
//! ran (the fused algorithm, or the all-reduce of the unfused paths).

use std::fmt::Write as _;

use super::{Mode, Row, Timing, median, replay_us, slowest_rank};
use crate::reference::{self, Accumulation};
use symmcomm::norm::{AddRmsNorm, NormForm, NormImpl};
use symmcomm::{BackendKind, Collective, Communicator, DType, Group, ReduceOp, Result, Tensor};

/// What to measure.
#[derive(Clone, Debug)]
pub struct NormBenchSpec {
    /// Hidden sizes.
    pub hiddens: Vec<usize>,
    /// Tokens per call.
    pub tokens: Vec<usize>,
    /// Element type (bf16 or f16).
    pub dtype: DType,
    /// The RMSNorm epsilon.
    pub eps: f32,
    /// Implementations.
    pub impls: Vec<NormImpl>,
    /// How each row is timed (one call counts as one operation).
    pub timing: Timing,
}

impl NormBenchSpec {
    /// Llama-8B's and DeepSeek-V3's hidden sizes (4096, 7168) at 1 to 64 decode tokens, bf16,
    /// with the timing parameters of `timing`.
    pub fn decode(impls: Vec<NormImpl>, timing: &Timing) -> Self {
        NormBenchSpec {
            hiddens: vec![4096, 7168],
            tokens: vec![1, 2, 4, 8, 16, 32, 64],
            dtype: DType::BF16,
            eps: 1e-6,
            impls,
            timing: Timing {
                seed: timing.seed ^ 0x4A5,
                ..timing.clone()
            },
        }
    }

    /// The default implementations: the fused kernel, unfused, NCCL's path.
    pub fn default_impls() -> Vec<NormImpl> {
        vec![NormImpl::Fused(None), NormImpl::Unfused, NormImpl::Nccl]
    }

    /// What `tune` measures: every fused kernel by name, unfused, NCCL's path.
    pub fn tune_impls() -> Vec<NormImpl> {
        use symmcomm::Algo;
        vec![
            NormImpl::Fused(Some(Algo::LowLatency)),
            NormImpl::Fused(Some(Algo::OneShot)),
            NormImpl::Fused(Some(Algo::TwoShot)),
            NormImpl::Unfused,
            NormImpl::Nccl,
        ]
    }

    /// Rows the sweep produces at most.
    pub fn rows(&self) -> usize {
        self.hiddens.len() * self.tokens.len() * self.impls.len() * self.timing.modes.len()
    }
}

/// One implementation's buffers at one point: windows, but plain memory for NCCL's path.
struct Buffers {
    input: Tensor,
    residual: Tensor,
    weight: Tensor,
    normed: Tensor,
    residual_out: Tensor,
}

impl Buffers {
    fn args(&self, eps: f32) -> AddRmsNorm<'_> {
        AddRmsNorm {
            input: &self.input,
            residual: &self.residual,
            weight: &self.weight,
            eps,
            normed_out: &self.normed,
            residual_out: &self.residual_out,
        }
    }
}

struct Prepared {
    imp: NormImpl,
    bufs: Buffers,
    graph: Option<symmcomm::Graph>,
    ran: NormImpl,
    ran_name: String,
    samples: Vec<f64>,
}

/// One (hidden, tokens, mode) of the sweep on one group.
struct NormPoint<'a> {
    comm: &'a Communicator,
    group: &'a Group,
    spec: &'a NormBenchSpec,
    hidden: usize,
    tokens: usize,
    mode: Mode,
}

/// The values the fill generator gives `n` elements of `dtype` for `seed` and `rank` (epoch 0).
fn fill_values(dtype: DType, seed: u64, rank: u64, n: usize) -> Vec<f64> {
    let mut b = vec![0u8; n * dtype.size()];
    symmcomm::lab::fill::fill_bytes(dtype, seed, rank, 0, 0, &mut b);
    (0..n).map(|i| dtype.read_f64(&b, i)).collect()
}

/// `xs` as bytes of `dtype`.
fn to_bytes(dtype: DType, xs: &[f64]) -> Vec<u8> {
    let mut b = vec![0u8; xs.len() * dtype.size()];
    for (i, &x) in xs.iter().enumerate() {
        dtype.write_f64(&mut b, i, x);
    }
    b
}

/// `x` rounded to `dtype`.
fn round_to(dtype: DType, x: f64) -> f64 {
    dtype.read_f64(&to_bytes(dtype, &[x]), 0)
}

impl NormPoint<'_> {
    fn seeds(&self) -> (u64, u64, u64) {
        let s = self.spec.timing.seed ^ (self.hidden as u64) << 20 ^ self.tokens as u64;
        (s, !s, s.rotate_left(17))
    }

    /// The residual (the same on every rank, as tensor parallelism keeps it) and the weight.
    fn residual_and_weight(&self) -> (Vec<f64>, Vec<f64>) {
        let (_, r, w) = self.seeds();
        let d = self.spec.dtype;
        // Weights around 1, as trained norms have them.
        let weight = fill_values(d, w, 0, self.hidden)
            .into_iter()
            .map(|x| round_to(d, 1.0 + x / 2.0))
            .collect();
        (fill_values(d, r, 0, self.tokens * self.hidden), weight)
    }

    fn alloc(&self, imp: NormImpl) -> Result<Buffers> {
        let (g, d, t, h) = (self.group, self.spec.dtype, self.tokens, self.hidden);
        let scope = g.scope(imp == NormImpl::Nccl);
        Ok(Buffers {
            input: scope.alloc(d, &[t, h])?,
            residual: scope.alloc(d, &[t, h])?,
            weight: scope.alloc(d, &[h])?,
            normed: scope.alloc(d, &[t, h])?,
            residual_out: scope.alloc(d, &[t, h])?,
        })
    }

    /// `imp`'s buffers with their inputs, run `warmup` times (at least once) and, in graph mode,
    /// captured as `graph_ops` calls and replayed twice; `None` (and a log line) when `imp`
    /// cannot run the point.
    fn prepare(&self, imp: NormImpl) -> Result<Option<Prepared>> {
        let (g, spec) = (self.group, self.spec);
        let bufs = self.alloc(imp)?;
        let args = bufs.args(spec.eps);
        if let Err(e) = g.add_rmsnorm_plan(NormForm::AllReduce, &args, imp) {
            tracing::info!(
                "skipping ar_rmsnorm H={} T={}: {e}",
                self.hidden,
                self.tokens
            );
            return Ok(None);
        }
        let (residual, weight) = self.residual_and_weight();
        g.fill_random(&bufs.input, self.seeds().0, None)?;
        g.upload_bytes(&bufs.residual, &to_bytes(spec.dtype, &residual))?;
        g.upload_bytes(&bufs.weight, &to_bytes(spec.dtype, &weight))?;
        let mut ran = g.all_reduce_add_rmsnorm(&args, imp)?;
        for _ in 1..spec.timing.warmup.max(1) {
            ran = g.all_reduce_add_rmsnorm(&args, imp)?;
        }
        let graph = match self.mode {
            Mode::Eager => None,
            Mode::Graph => {
                let (graph, ()) = self.comm.capture(|| {
                    (0..spec.timing.graph_ops)
                        .try_for_each(|_| g.all_reduce_add_rmsnorm(&args, imp).map(|_| ()))
                })?;
                for _ in 0..2 {
                    graph.replay()?;
                }
                Some(graph)
            }
        };
        let ran_name = match &ran.collective {
            Some(c) => format!("{}: {}", ran.name(), c.name()),
            None => ran.name(),
        };
        Ok(Some(Prepared {
            imp,
            bufs,
            graph,
            ran: ran.imp,
            ran_name,
            samples: Vec::with_capacity(spec.timing.repeats),
        }))
    }

    /// The timed regions, interleaved over the implementations repeat by repeat; each sample
    /// is µs per call.
    fn time_interleaved(&self, prepared: &mut [Prepared]) -> Result<()> {
        let (comm, g, timing) = (self.comm, self.group, &self.spec.timing);
        for _ in 0..timing.repeats {
            for p in prepared.iter_mut() {
                let us = match &p.graph {
                    Some(graph) => {
                        replay_us(comm, graph, timing.replays)? / timing.graph_ops as f64
                    }
                    None => {
                        let args = p.bufs.args(self.spec.eps);
                        let t = comm.time(&mut || {
                            for _ in 0..timing.iters {
                                g.all_reduce_add_rmsnorm(&args, p.imp)?;
                            }
                            Ok(())
                        })?;
                        t.as_secs_f64() * 1e6 / timing.iters as f64
                    }
                };
                p.samples.push(us);
            }
        }
        Ok(())
    }

    /// Elements of both outputs of this rank outside the reference's tolerance, after one more
    /// run with the outputs poisoned.
    fn count_wrong(&self, p: &Prepared) -> Result<usize> {
        let (g, spec) = (self.group, self.spec);
        g.poison(&p.bufs.normed)?;
        g.poison(&p.bufs.residual_out)?;
        match &p.graph {
            Some(graph) => graph.replay()?,
            None => {
                g.all_reduce_add_rmsnorm(&p.bufs.args(spec.eps), p.imp)?;
            }
        }
        let n = self.tokens * self.hidden;
        let inputs: Vec<Vec<f64>> = (0..g.size() as u64)
            .map(|r| fill_values(spec.dtype, self.seeds().0, r, n))
            .collect();
        let (residual, weight) = self.residual_and_weight();
        let acc = match p.ran {
            NormImpl::Fused(_) => Accumulation::F32,
            _ => Accumulation::ElementType,
        };
        let want = reference::add_rmsnorm(
            spec.dtype,
            &inputs,
            &residual,
            &weight,
            f64::from(spec.eps),
            0,
            acc,
        );
        let wrong = |got: &[u8], want: &[f64], tol: &[f64]| {
            reference::compare(spec.dtype, got, want, |k| tol[k]).map_or_else(|m| m.wrong, |()| 0)
        };
        let res = g.download_bytes(&p.bufs.residual_out)?;
        let normed = g.download_bytes(&p.bufs.normed)?;
        Ok(wrong(&res, &want.residual_out, &want.residual_tol)
            + wrong(&normed, &want.normed, &want.normed_tol))
    }

    /// `p`'s row: checked once more, then the slowest rank's median and the wrong elements of
    /// every rank (collective).
    fn row(&self, p: Prepared) -> Result<Row> {
        let (g, spec) = (self.group, self.spec);
        let backend = self.comm.backend();
        let wrong = self.count_wrong(&p)?;
        if wrong > 0 {
            tracing::warn!(
                hidden = self.hidden,
                tokens = self.tokens,
                implementation = %p.ran_name,
                rank = g.rank(),
                "ar_rmsnorm: {wrong} elements wrong"
            );
        }
        let (us, wrong_total) = slowest_rank(g, "ar_rmsnorm row", median(p.samples), wrong)?;
        let bytes = self.tokens * self.hidden * spec.dtype.size();
        let algbw = bytes as f64 / (us * 1e-6) / 1e9;
        let factor = Collective::AllReduce(ReduceOp::Sum).busbw_factor(g.size());
        Ok(Row {
            op: "ar_rmsnorm".into(),
            dtype: spec.dtype,
            bytes,
            world: g.size(),
            implementation: p.imp.name(backend),
            mode: self.mode,
            us,
            algbw_gbps: algbw,
            busbw_gbps: algbw * factor,
            ok: wrong_total == 0,
            ran: Some(p.ran_name),
            wrong: wrong_total,
            config: Some(format!("hidden={}", self.hidden)),
        })
    }
}

/// Measure every implementation at one (hidden, tokens, mode) on every rank of `group`
/// (collective); implementations that cannot run are skipped with a log line. One row per
/// implementation.
pub fn measure_norm_point(
    comm: &Communicator,
    group: &Group,
    spec: &NormBenchSpec,
    (hidden, tokens): (usize, usize),
    mode: Mode,
) -> Result<Vec<Row>> {
    let point = NormPoint {
        comm,
        group,
        spec,
        hidden,
        tokens,
        mode,
    };
    let mut prepared = Vec::new();
    for &imp in &spec.impls {
        prepared.extend(point.prepare(imp)?);
    }
    comm.synchronize()?;
    group.barrier()?;
    point.time_interleaved(&mut prepared)?;
    prepared.into_iter().map(|p| point.row(p)).collect()
}

/// The whole sweep on `group` (the tensor-parallel group); `progress(done, total, what)` after
/// each point.
pub fn run_norm(
    comm: &Communicator,
    group: &Group,
    spec: &NormBenchSpec,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Row>> {
    let largest = spec.hiddens.iter().max().copied().unwrap_or(0)
        * spec.tokens.iter().max().copied().unwrap_or(0)
        * spec.dtype.size();
    // The kernels load and the staging scratch grows now, never inside a capture.
    group.prepare(largest.max(4096))?;
    let total = spec.rows();
    let mut done = 0;
    let mut rows = Vec::new();
    for &hidden in &spec.hiddens {
        for &tokens in &spec.tokens {
            for &mode in &spec.timing.modes {
                rows.extend(measure_norm_point(
                    comm,
                    group,
                    spec,
                    (hidden, tokens),
                    mode,
                )?);
                done += spec.impls.len();
                let what = format!("ar_rmsnorm H={hidden} T={tokens} {}", mode.name());
                progress(done, total, &what);
            }
        }
    }
    Ok(rows)
}

/// Per hidden size, token count and mode: µs of each implementation, and the fused kernel over
/// the unfused path and over NCCL's.
pub fn norm_table(rows: &[Row], backend: BackendKind) -> String {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.op == "ar_rmsnorm").collect();
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let mut impls: Vec<String> = Vec::new();
    for r in &rows {
        if !impls.contains(&r.implementation) {
            impls.push(r.implementation.clone());
        }
    }
    let [fused, unfused, nccl] =
        [NormImpl::Fused(None), NormImpl::Unfused, NormImpl::Nccl].map(|i| i.name(backend));
    let _ = write!(
        out,
        "ar_rmsnorm {:>12} {:>6} {:>6}",
        "hidden", "tokens", "mode"
    );
    for i in &impls {
        let _ = write!(out, " {i:>14}");
    }
    let _ = writeln!(
        out,
        " {:>14} {:>14}",
        format!("{fused}/{unfused}"),
        format!("{fused}/{nccl}")
    );
    let mut keys: Vec<(String, usize, Mode)> = rows
        .iter()
        .map(|r| (r.config.clone().unwrap_or_default(), r.bytes, r.mode))
        .collect();
    keys.sort();
    keys.dedup();
    for (config, bytes, mode) in keys {
        let find = |i: &str| {
            rows.iter().find(|r| {
                r.config.as_deref().unwrap_or_default() == config
                    && r.bytes == bytes
                    && r.mode == mode
                    && r.implementation == i
            })
        };
        let hidden: usize = config
            .strip_prefix("hidden=")
            .and_then(|h| h.parse().ok())
            .unwrap_or(0);
        let elem = rows[0].dtype.size();
        let tokens = bytes / (hidden * elem).max(1);
        let _ = write!(out, "{:10} {hidden:>12} {tokens:>6} {:>6}", "", mode.name());
        for i in &impls {
            let cell = find(i).map_or("-".to_string(), |r| {
                format!("{:.2}{}", r.us, if r.ok { "" } else { " WRONG" })
            });
            let _ = write!(out, " {cell:>14}");
        }
        let ratio = |other: &str| match (find(&fused), find(other)) {
            (Some(f), Some(o)) => format!("{:.3}", f.us / o.us),
            _ => "-".to_string(),
        };
        let _ = writeln!(out, " {:>14} {:>14}", ratio(&unfused), ratio(&nccl));
    }
    out
}
