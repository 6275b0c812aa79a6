//! Benchmark rows of the DCP combine (`op: "dcp_combine"`): DeepSeek-V3's MLA decode shapes
//! (128 gathered heads, D = 512, bf16 partial outputs, f32 LSEs) per batch, for the all-gather /
//! correct / reduce-scatter sequence on plain buffers (`nccl`) and on windows (`nccl_symm`), and
//! the fused kernel (`fused`); eager and in graphs; every row checked against the f64 merge of
//! the very inputs it ran on. `bytes` is one rank's partial output.

use std::fmt::Write as _;

use super::{Mode, Row, Timing, median, slowest_rank};
use symmcomm::Communicator;
use symmcomm::DType;
use symmcomm::Group;
use symmcomm::Result;
use symmcomm::dcp::{CombineImpl, CombineSpec, DcpCombine, LseBase, merge_reference};
use symmcomm::{BackendKind, Impl};

/// What to measure.
#[derive(Clone, Debug)]
pub struct DcpBenchSpec {
    /// Decode tokens per run.
    pub batches: Vec<usize>,
    /// Gathered heads.
    pub heads: usize,
    /// Values per head.
    pub dim: usize,
    /// Partial-output element type (the output has the same).
    pub dtype: DType,
    /// LSE base.
    pub base: LseBase,
    /// Implementations.
    pub impls: Vec<CombineImpl>,
    /// How each row is timed (a run of the combine counts as one operation).
    pub timing: Timing,
}

impl DcpBenchSpec {
    /// DeepSeek-V3 MLA (128 heads, D = 512, bf16, base 2) at B = 1, 8, 32, 128, with the
    /// timing parameters of `timing`.
    pub fn deepseek_v3(impls: Vec<CombineImpl>, timing: &Timing) -> Self {
        DcpBenchSpec {
            batches: vec![1, 8, 32, 128],
            heads: 128,
            dim: 512,
            dtype: DType::BF16,
            base: LseBase::Two,
            impls,
            timing: Timing {
                seed: timing.seed ^ 0xDC9,
                ..timing.clone()
            },
        }
    }

    /// The default implementations on `backend`: the sequence on plain buffers and on windows,
    /// and the fused kernel.
    pub fn default_impls() -> Vec<CombineImpl> {
        vec![
            CombineImpl::Sequence(Impl::Regular),
            CombineImpl::Sequence(Impl::Symmetric),
            CombineImpl::Fused,
        ]
    }

    /// Rows the sweep produces at most.
    pub fn rows(&self) -> usize {
        self.batches.len() * self.impls.len() * self.timing.modes.len()
    }
}

struct Prepared {
    imp: CombineImpl,
    combine: DcpCombine,
    graph: Option<symmcomm::Graph>,
    samples: Vec<f64>,
}

/// Every rank's inputs as the fill generator makes them (epoch 0), as f64.
fn inputs(spec: &DcpBenchSpec, batch: usize, world: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = batch * spec.heads * spec.dim;
    let (mut os, mut ls) = (Vec::new(), Vec::new());
    for r in 0..world as u64 {
        let mut b = vec![0u8; n * spec.dtype.size()];
        symmcomm::lab::fill::fill_bytes(spec.dtype, spec.timing.seed, r, 0, 0, &mut b);
        os.push((0..n).map(|i| spec.dtype.read_f64(&b, i)).collect());
        let mut b = vec![0u8; batch * spec.heads * 4];
        symmcomm::lab::fill::fill_bytes(DType::F32, !spec.timing.seed, r, 0, 0, &mut b);
        ls.push(
            (0..batch * spec.heads)
                .map(|i| DType::F32.read_f64(&b, i))
                .collect(),
        );
    }
    (os, ls)
}

/// Elements of `got` (merged output, `dtype`) that differ from `want` beyond the tolerance of
/// a bf16 / f32 merge over `world` ranks.
pub(crate) fn count_wrong(got: &[u8], want: &[f64], dtype: DType, world: usize) -> usize {
    let eps = match dtype {
        DType::BF16 => 2f64.powi(-8),
        _ => 2e-6,
    };
    let tol = (world as f64 + 1.0) * eps + 1e-5;
    want.iter()
        .enumerate()
        .filter(|&(i, &w)| {
            let g = dtype.read_f64(got, i);
            g.is_nan() || (g - w).abs() > tol * w.abs().max(1.0)
        })
        .count()
}

/// One (batch, mode) of the DCP sweep on one group: what each step of measuring it reads.
struct DcpPoint<'a> {
    comm: &'a Communicator,
    group: &'a Group,
    spec: &'a DcpBenchSpec,
    batch: usize,
    mode: Mode,
}

impl DcpPoint<'_> {
    /// `imp`'s combine with filled inputs, run `warmup` times (at least once) eagerly and, in
    /// graph mode, captured as `graph_ops` runs and replayed twice; `None` (and a log line)
    /// when `imp` cannot run it.
    fn prepare(&self, imp: CombineImpl) -> Result<Option<Prepared>> {
        let (group, spec, batch) = (self.group, self.spec, self.batch);
        let plain = imp == CombineImpl::Sequence(Impl::Regular);
        let cs = CombineSpec {
            fused: imp == CombineImpl::Fused,
            ..CombineSpec::new(batch, spec.heads, spec.dim, spec.dtype, spec.base)
        };
        let combine = DcpCombine::new(group, cs, plain)?;
        if let Some(why) = combine.unavailable(imp) {
            tracing::info!(
                "skipping dcp_combine B={batch} {}: {why}",
                imp.name(self.comm.backend())
            );
            return Ok(None);
        }
        group.fill_random(&combine.partial_out(batch)?, spec.timing.seed, None)?;
        group.fill_random(&combine.partial_lse(batch)?, !spec.timing.seed, None)?;
        for _ in 0..spec.timing.warmup.max(1) {
            combine.run(batch, imp)?;
        }
        let graph = match self.mode {
            Mode::Eager => None,
            Mode::Graph => {
                let (graph, ()) = self.comm.capture(|| {
                    (0..spec.timing.graph_ops).try_for_each(|_| combine.run(batch, imp).map(|_| ()))
                })?;
                for _ in 0..2 {
                    graph.replay()?;
                }
                Some(graph)
            }
        };
        Ok(Some(Prepared {
            imp,
            combine,
            graph,
            samples: Vec::with_capacity(spec.timing.repeats),
        }))
    }

    /// The timed regions, interleaved over the implementations repeat by repeat; each sample
    /// is µs per run of the combine.
    fn time_interleaved(&self, prepared: &mut [Prepared]) -> Result<()> {
        let (comm, timing, batch) = (self.comm, &self.spec.timing, self.batch);
        for _ in 0..timing.repeats {
            for p in prepared.iter_mut() {
                let t = match &p.graph {
                    None => comm.time(&mut || {
                        for _ in 0..timing.iters {
                            p.combine.run(batch, p.imp)?;
                        }
                        Ok(())
                    })?,
                    Some(g) => comm.time(&mut || {
                        for _ in 0..timing.replays {
                            g.replay()?;
                        }
                        Ok(())
                    })?,
                };
                let ops = match &p.graph {
                    None => timing.iters,
                    Some(_) => timing.replays * timing.graph_ops,
                };
                p.samples.push(t.as_secs_f64() * 1e6 / ops as f64);
            }
        }
        Ok(())
    }

    /// This rank's merged heads as the f64 merge of every rank's inputs computes them.
    fn reference(&self) -> Vec<f64> {
        let spec = self.spec;
        let (os, ls) = inputs(spec, self.batch, self.group.size());
        merge_reference(
            &os,
            &ls,
            self.batch,
            spec.heads,
            spec.dim,
            self.group.rank(),
            spec.base,
        )
        .out
    }

    /// `p`'s row: its output poisoned, run once more and compared with `want`, then the
    /// slowest rank's median and the wrong elements of every rank (collective).
    fn row(&self, p: Prepared, want: &[f64]) -> Result<Row> {
        let (group, spec, batch) = (self.group, self.spec, self.batch);
        let (world, backend) = (group.size(), self.comm.backend());
        let out = p.combine.output(batch)?;
        group.poison(&out)?;
        match &p.graph {
            Some(g) => g.replay()?,
            None => {
                p.combine.run(batch, p.imp)?;
            }
        }
        let got = group.download_bytes(&out)?;
        let wrong = count_wrong(&got, want, spec.dtype, world);
        if wrong > 0 {
            tracing::warn!(
                batch,
                implementation = %p.imp.name(backend),
                rank = group.rank(),
                "dcp_combine: {wrong} of {} elements wrong",
                want.len()
            );
        }
        let (us, wrong_total) = slowest_rank(group, "dcp bench row", median(p.samples), wrong)?;
        let bytes = batch * spec.heads * spec.dim * spec.dtype.size();
        let algbw = bytes as f64 / (us * 1e-6) / 1e9;
        Ok(Row {
            op: "dcp_combine".into(),
            dtype: spec.dtype,
            bytes,
            world,
            implementation: p.imp.name(backend),
            mode: self.mode,
            us,
            algbw_gbps: algbw,
            busbw_gbps: algbw * (world as f64 - 1.0) / world as f64,
            ok: wrong_total == 0,
            ran: None,
            wrong: wrong_total,
            config: None,
        })
    }
}

/// Measure every implementation at one batch and mode on every rank of `group` (collective);
/// implementations that cannot run are skipped with a log line. One row per implementation.
pub fn measure_dcp_point(
    comm: &Communicator,
    group: &Group,
    spec: &DcpBenchSpec,
    batch: usize,
    mode: Mode,
) -> Result<Vec<Row>> {
    let point = DcpPoint {
        comm,
        group,
        spec,
        batch,
        mode,
    };
    let mut prepared = Vec::new();
    for &imp in &spec.impls {
        prepared.extend(point.prepare(imp)?);
    }
    comm.synchronize()?;
    group.barrier()?;
    point.time_interleaved(&mut prepared)?;
    if prepared.is_empty() {
        return Ok(Vec::new());
    }
    let want = point.reference();
    prepared.into_iter().map(|p| point.row(p, &want)).collect()
}

/// The whole DCP sweep on `group`; `progress(done, total, what)` after each point.
pub fn run_dcp(
    comm: &Communicator,
    group: &Group,
    spec: &DcpBenchSpec,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Row>> {
    let total = spec.rows();
    let mut done = 0;
    let mut rows = Vec::new();
    for &batch in &spec.batches {
        for &mode in &spec.timing.modes {
            rows.extend(measure_dcp_point(comm, group, spec, batch, mode)?);
            done += spec.impls.len();
            progress(
                done,
                total,
                &format!("dcp_combine B={batch} {}", mode.name()),
            );
        }
    }
    Ok(rows)
}

/// Per batch and mode: µs of each implementation, and the fused kernel over the sequence on
/// windows (`nccl_symm`, or `host_symm`). `token_bytes`: partial-output bytes per token (the
/// batch is `bytes / token_bytes`).
pub fn dcp_table(rows: &[Row], backend: BackendKind, token_bytes: usize) -> String {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.op == "dcp_combine").collect();
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
    let symm = CombineImpl::Sequence(Impl::Symmetric).name(backend);
    let fused = CombineImpl::Fused.name(backend);
    let _ = write!(out, "dcp_combine {:>5} {:>9} {:>6}", "B", "bytes", "mode");
    for i in &impls {
        let _ = write!(out, " {i:>12}");
    }
    let _ = writeln!(out, " {:>14}", format!("{fused}/{symm}"));
    let mut keys: Vec<(usize, Mode)> = rows.iter().map(|r| (r.bytes, r.mode)).collect();
    keys.sort();
    keys.dedup();
    for (bytes, mode) in keys {
        let find = |i: &str| {
            rows.iter()
                .find(|r| r.bytes == bytes && r.mode == mode && r.implementation == i)
        };
        let batch = bytes / token_bytes.max(1);
        let _ = write!(
            out,
            "{:11} {batch:>5} {:>9} {:>6}",
            "",
            super::human_bytes(bytes),
            mode.name()
        );
        for i in &impls {
            let cell = find(i).map_or("-".to_string(), |r| {
                format!("{:.2}{}", r.us, if r.ok { "" } else { " WRONG" })
            });
            let _ = write!(out, " {cell:>12}");
        }
        match (find(&fused), find(&symm)) {
            (Some(f), Some(s)) => {
                let _ = writeln!(out, " {:>14.3}", f.us / s.us);
            }
            _ => {
                let _ = writeln!(out, " {:>14}", "-");
            }
        }
    }
    out
}
