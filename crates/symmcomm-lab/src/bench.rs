//! The benchmark: per (op, dtype, size, implementation, mode) the median time per operation,
//! measured with device events (eager: back-to-back launches; graph: a graph of several
//! operations, replayed), every row's output checked against the reference, and the results
//! in nccl-tests' columns and in the results file of `benchmarks/results/` (schema: [`Results`];
//! BENCHMARKS.md explains it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::verify::{self, Case};
use symmcomm::Communicator;
use symmcomm::Group;
use symmcomm::{BackendKind, Collective, Impl};
use symmcomm::{DType, ReduceOp};
use symmcomm::{Error, Result};

pub use symmcomm::dispatch::Mode;

mod dcp;
mod rmsnorm;
pub(crate) use dcp::count_wrong as dcp_count_wrong;
pub use dcp::{DcpBenchSpec, dcp_table, measure_dcp_point, run_dcp};
pub use rmsnorm::{NormBenchSpec, measure_norm_point, norm_table, run_norm};

/// An implementation and where its buffers live: `nccl` on plain memory, the others on
/// windows, and `auto_plain` (`auto` on plain memory, which stages where the table says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// The implementation requested.
    pub imp: Impl,
    /// Input and output in the group's windows.
    pub windows: bool,
}

impl Variant {
    /// The usual placement for `imp`: plain memory for the regular path, windows otherwise.
    pub fn of(imp: Impl) -> Self {
        Variant {
            imp,
            windows: imp != Impl::Regular,
        }
    }

    /// Name in tables and results.
    pub fn name(&self, backend: BackendKind) -> String {
        let base = self.imp.name(backend);
        match (self.imp, self.windows) {
            (Impl::Auto, false) => format!("{base}_plain"),
            (Impl::Regular, true) => format!("{base}_on_windows"),
            _ => base,
        }
    }

    /// Parse `nccl`, `nccl_symm`, `auto`, `auto_plain`, `oneshot`, ...
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if let Some(base) = s.strip_suffix("_plain") {
            return Ok(Variant {
                imp: base.parse()?,
                windows: false,
            });
        }
        if let Some(base) = s.strip_suffix("_on_windows") {
            return Ok(Variant {
                imp: base.parse()?,
                windows: true,
            });
        }
        Ok(Variant::of(s.parse()?))
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    /// Collectives (reductions use sum).
    pub ops: Vec<Collective>,
    /// Element types.
    pub dtypes: Vec<DType>,
    /// Sizes in bytes of the larger buffer (nccl-tests' convention).
    pub sizes: Vec<usize>,
    /// Implementations and buffer placements.
    pub impls: Vec<Variant>,
    /// How each row is timed.
    pub timing: Timing,
}

/// How each row of a benchmark is timed: shared by the collective and the DCP-combine rows.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Modes.
    pub modes: Vec<Mode>,
    /// Untimed operations before timing.
    pub warmup: usize,
    /// Operations per timed region in eager mode.
    pub iters: usize,
    /// Operations captured in one graph.
    pub graph_ops: usize,
    /// Replays per timed region in graph mode.
    pub replays: usize,
    /// Timed regions per row; the median is reported.
    pub repeats: usize,
    /// Seed of the inputs.
    pub seed: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            modes: vec![Mode::Eager, Mode::Graph],
            warmup: 5,
            iters: 20,
            graph_ops: 20,
            replays: 10,
            repeats: 7,
            seed: 0x5EED,
        }
    }
}

impl BenchSpec {
    /// The sweep of the issue: 2 KiB to 256 MiB, AllGather, ReduceScatter, AllReduce in bf16, with
    /// 512 KiB added (one DeepSeek-V3 decode all-reduce at 32 tokens: 458752 B).
    pub fn standard(impls: Vec<Variant>) -> Self {
        BenchSpec {
            ops: vec![
                Collective::AllGather,
                Collective::ReduceScatter(ReduceOp::Sum),
                Collective::AllReduce(ReduceOp::Sum),
            ],
            dtypes: vec![DType::BF16],
            sizes: [
                2 << 10,
                8 << 10,
                32 << 10,
                64 << 10,
                256 << 10,
                512 << 10,
                1 << 20,
                4 << 20,
                16 << 20,
                64 << 20,
                256 << 20,
            ]
            .to_vec(),
            impls,
            timing: Timing::default(),
        }
    }

    /// Number of rows the sweep produces.
    pub fn rows(&self) -> usize {
        self.ops.len()
            * self.dtypes.len()
            * self.sizes.len()
            * self.impls.len()
            * self.timing.modes.len()
    }
}

/// One measured row of the results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `all_reduce`, `all_gather`, `reduce_scatter`.
    pub op: String,
    /// Element type.
    pub dtype: DType,
    /// Bytes of the larger buffer.
    pub bytes: usize,
    /// Ranks.
    pub world: usize,
    /// Implementation name (`nccl`, `nccl_symm`, `auto`, ...).
    #[serde(rename = "impl")]
    pub implementation: String,
    /// `eager` or `graph`.
    pub mode: Mode,
    /// Median µs per operation (the slowest rank's median).
    pub us: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw_gbps: f64,
    /// Bus bandwidth, GB/s (nccl-tests' factors).
    pub busbw_gbps: f64,
    /// Whether every rank's output matched the reference.
    pub ok: bool,
    /// For `auto`: what ran (for `ar_rmsnorm` rows: the fused algorithm, or the all-reduce of
    /// the unfused paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<String>,
    /// Elements whose value was wrong, summed over ranks.
    #[serde(default)]
    pub wrong: usize,
    /// For `decode_step` rows: the parallel configuration (`tp`, `dp_attn`, `dcp`); for
    /// `ar_rmsnorm` rows: the shape (`hidden=7168`); for collective rows of a group across
    /// hosts: `domains=K` (the NVLink domains it spans; see [`domains_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

#[cfg(test)]
impl Row {
    /// A correct graph-mode bf16 row of 2 ranks, for tests of what reads rows.
    pub(crate) fn graph_bf16_for_tests(op: &str, bytes: usize, imp: &str, us: f64) -> Row {
        Row {
            op: op.into(),
            dtype: DType::BF16,
            bytes,
            world: 2,
            implementation: imp.into(),
            mode: Mode::Graph,
            us,
            algbw_gbps: 0.0,
            busbw_gbps: 0.0,
            ok: true,
            ran: None,
            wrong: 0,
            config: None,
        }
    }
}

/// `domains=K` for a group that spans K > 1 NVLink domains (hosts), else nothing.
fn domains_config(group: &Group) -> Option<String> {
    let k = group.topology().domains().len();
    (k > 1).then(|| format!("domains={k}"))
}

/// The NVLink domains a collective row's group spanned (`config` `domains=K`; 1 without).
pub fn domains_of(row: &Row) -> usize {
    row.config
        .as_deref()
        .and_then(|c| c.strip_prefix("domains="))
        .and_then(|k| k.parse().ok())
        .unwrap_or(1)
}

pub use symmcomm::lab::Limits;

/// Where and how the results were produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// GPU model (or `host`).
    pub gpu: String,
    /// GPUs (ranks) used.
    pub gpus: usize,
    /// NCCL version.
    pub nccl: String,
    /// Driver version.
    pub driver: String,
    /// Git commit of the code.
    pub commit: String,
    /// Date (YYYY-MM-DD).
    pub date: String,
    /// The exact command.
    pub command: String,
    /// Extra facts (backend, PDL guard, ...).
    #[serde(default, flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Meta {
    /// The provenance of a run on `comm`'s device: GPU, NCCL, driver, backend, PDL guard, the
    /// NCCL library's path, which GPUs of the host ran (`CUDA_VISIBLE_DEVICES`) and which lent
    /// machine (`SYMMCOMM_MACHINE`), with the program's `commit` and `command`, dated today.
    pub fn of(comm: &Communicator, commit: &str, command: String) -> Meta {
        let facts = comm.facts();
        let mut extra = BTreeMap::new();
        extra.insert("backend".into(), serde_json::json!(comm.backend()));
        if let Some(g) = facts.pdl_guard {
            extra.insert("pdl_guard".into(), serde_json::json!(g));
        }
        if let Some(p) = &facts.nccl_path {
            extra.insert("nccl_path".into(), serde_json::json!(p));
        }
        // Which GPUs of the host ran (a 2-GPU run on a larger machine says so).
        for (var, key) in [
            ("CUDA_VISIBLE_DEVICES", "cuda_visible_devices"),
            ("SYMMCOMM_MACHINE", "machine"),
        ] {
            if let Ok(v) = std::env::var(var) {
                extra.insert(key.into(), serde_json::json!(v));
            }
        }
        Meta {
            gpu: facts.name,
            gpus: comm.world_size(),
            nccl: facts.nccl.unwrap_or_else(|| "none".into()),
            driver: facts.driver.unwrap_or_else(|| "none".into()),
            commit: commit.into(),
            date: today(),
            command,
            extra,
        }
    }
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

/// A results file of `benchmarks/results/`: where it ran (`meta`), the limits measured, and one
/// row per (op, dtype, bytes, world, implementation, mode).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Provenance.
    pub meta: Meta,
    /// Physical limits.
    pub limits: Limits,
    /// Measured rows.
    pub rows: Vec<Row>,
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Elements of one rank's piece (all-reduce: the whole buffer) for a per-rank input `shape`.
fn piece_of(coll: Collective, shape: &[usize], world: usize) -> usize {
    let n: usize = shape.iter().product();
    if matches!(coll, Collective::ReduceScatter(_)) {
        n / world
    } else {
        n
    }
}

/// The per-rank input shape for a row of `bytes` (the larger buffer), or `None` when the size
/// does not split over the ranks.
pub fn case_shape(
    coll: Collective,
    dtype: DType,
    bytes: usize,
    world: usize,
) -> Option<Vec<usize>> {
    let elems = bytes / dtype.size();
    match coll {
        Collective::AllReduce(_) => (elems > 0).then(|| vec![elems]),
        Collective::AllGather => {
            (elems.is_multiple_of(world) && elems > 0).then(|| vec![elems / world])
        }
        Collective::ReduceScatter(_) => {
            (elems.is_multiple_of(world) && elems > 0).then(|| vec![elems])
        }
    }
}

fn to_f64(b: &[u8]) -> f64 {
    f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

/// One implementation's buffers (and graph) at one point of the sweep.
struct Prepared {
    variant: Variant,
    case: Case,
    bufs: verify::CaseBuffers,
    graph: Option<symmcomm::Graph>,
    ran: Option<String>,
    samples: Vec<f64>,
}

/// One (op, dtype, size, mode) of the sweep on one group: what each step of measuring it
/// reads.
struct Point<'a> {
    comm: &'a Communicator,
    group: &'a Group,
    spec: &'a BenchSpec,
    coll: Collective,
    dtype: DType,
    bytes: usize,
    mode: Mode,
}

impl Point<'_> {
    /// The per-rank input shape, or an error when the size does not split over the ranks.
    fn shape(&self) -> Result<Vec<usize>> {
        let (group, bytes, dtype) = (self.group, self.bytes, self.dtype);
        let world = group.size();
        case_shape(self.coll, dtype, bytes, world).ok_or_else(|| Error::InvalidArgument {
            ctx: symmcomm::OpCtx {
                op: symmcomm::Op::Init,
                group: group.label().into(),
                rank: group.rank(),
                world,
                bytes,
            },
            detail: format!("{bytes} B of {dtype} does not split over {world} ranks"),
        })
    }

    /// `variant`'s buffers with a filled input, run `warmup` times (at least once) eagerly and,
    /// in graph mode, captured as `graph_ops` operations and replayed twice.
    fn prepare(&self, shape: &[usize], variant: Variant) -> Result<Prepared> {
        let (group, timing) = (self.group, &self.spec.timing);
        let case = Case {
            coll: self.coll,
            dtype: self.dtype,
            shape: shape.to_vec(),
            dim: None,
            imp: variant.imp,
            input_symm: variant.windows,
            output_symm: variant.windows,
            seed: timing.seed ^ self.bytes as u64,
        };
        let bufs = verify::alloc(group, &case)?;
        group.fill_random(&bufs.input, case.seed, None)?;
        let run = || group.collective(self.coll, &bufs.input, &bufs.output, None, variant.imp);
        let mut ran = None;
        for _ in 0..timing.warmup.max(1) {
            ran = Some(run()?.name());
        }
        let graph = match self.mode {
            Mode::Eager => None,
            Mode::Graph => {
                let (graph, ()) = self.comm.capture(|| {
                    (0..timing.graph_ops).try_for_each(|_| -> Result<()> {
                        ran = Some(run()?.name());
                        Ok(())
                    })
                })?;
                for _ in 0..2 {
                    graph.replay()?;
                }
                Some(graph)
            }
        };
        Ok(Prepared {
            variant,
            case,
            bufs,
            graph,
            ran,
            samples: Vec::with_capacity(timing.repeats),
        })
    }

    /// The timed regions, interleaved over the variants repeat by repeat; each sample is µs
    /// per operation.
    fn time_interleaved(&self, prepared: &mut [Prepared]) -> Result<()> {
        let (comm, timing) = (self.comm, &self.spec.timing);
        for _ in 0..timing.repeats {
            for p in prepared.iter_mut() {
                let (bufs, imp) = (&p.bufs, p.variant.imp);
                let t = match &p.graph {
                    None => comm.time(&mut || {
                        for _ in 0..timing.iters {
                            self.group.collective(
                                self.coll,
                                &bufs.input,
                                &bufs.output,
                                None,
                                imp,
                            )?;
                        }
                        Ok(())
                    })?,
                    Some(g) => {
                        p.samples
                            .push(replay_us(comm, g, timing.replays)? / timing.graph_ops as f64);
                        continue;
                    }
                };
                p.samples.push(t.as_secs_f64() * 1e6 / timing.iters as f64);
            }
        }
        Ok(())
    }

    /// Check the output of exactly this configuration: poison, run once more, compare. Returns
    /// the elements wrong on this rank.
    fn count_wrong(&self, p: &Prepared) -> Result<usize> {
        let (group, coll, bytes) = (self.group, self.coll, self.bytes);
        group.poison(&p.bufs.output)?;
        match &p.graph {
            Some(g) => g.replay()?,
            None => {
                group.collective(coll, &p.bufs.input, &p.bufs.output, None, p.variant.imp)?;
            }
        }
        let got = group.download_bytes(&p.bufs.output)?;
        let wrong = match verify::compare(&p.case, group.size(), group.rank(), 0, &got) {
            Ok(()) => 0usize,
            Err(m) => {
                tracing::warn!(
                    op = coll.name(),
                    bytes,
                    implementation = %p.variant.name(self.comm.backend()),
                    rank = group.rank(),
                    "wrong result: {} of {} elements, first at {} (got {}, want {})",
                    m.wrong,
                    m.total,
                    m.first_index,
                    m.got,
                    m.want
                );
                m.wrong
            }
        };
        Ok(wrong)
    }

    /// `p`'s row: checked once more, then the slowest rank's median and the wrong elements of
    /// every rank (collective).
    fn row(&self, p: Prepared) -> Result<Row> {
        let (coll, bytes) = (self.coll, self.bytes);
        let world = self.group.size();
        let wrong = self.count_wrong(&p)?;
        let (us, wrong_total) = slowest_rank(self.group, "bench row", median(p.samples), wrong)?;
        let algbw = bytes as f64 / (us * 1e-6) / 1e9;
        Ok(Row {
            op: coll.name().into(),
            dtype: self.dtype,
            bytes,
            world,
            implementation: p.variant.name(self.comm.backend()),
            mode: self.mode,
            us,
            algbw_gbps: algbw,
            busbw_gbps: algbw * coll.busbw_factor(world),
            ok: wrong_total == 0,
            ran: (p.variant.imp == Impl::Auto).then(|| p.ran.unwrap_or_default()),
            wrong: wrong_total,
            config: domains_config(self.group),
        })
    }
}

/// Measure every variant at one (op, dtype, size, mode) on every rank of `group`
/// (collective). The variants' timed regions are interleaved, repeat by repeat, so clock or
/// thermal drift during the sweep does not favour whichever ran first. Returns one row per
/// variant, as rank 0 reports them (every rank gets the same values).
#[allow(clippy::too_many_arguments)]
pub fn measure_point(
    comm: &Communicator,
    group: &Group,
    spec: &BenchSpec,
    coll: Collective,
    dtype: DType,
    bytes: usize,
    variants: &[Variant],
    mode: Mode,
) -> Result<Vec<Row>> {
    let point = Point {
        comm,
        group,
        spec,
        coll,
        dtype,
        bytes,
        mode,
    };
    let shape = point.shape()?;
    let mut prepared = Vec::with_capacity(variants.len());
    for &variant in variants {
        prepared.push(point.prepare(&shape, variant)?);
    }
    comm.synchronize()?;
    group.barrier()?;
    point.time_interleaved(&mut prepared)?;
    prepared.into_iter().map(|p| point.row(p)).collect()
}

/// Time `replays` back-to-back replays of `graph` between two device events; µs per replay.
pub fn replay_us(comm: &Communicator, graph: &symmcomm::Graph, replays: usize) -> Result<f64> {
    let t = comm.time(&mut || {
        for _ in 0..replays {
            graph.replay()?;
        }
        Ok(())
    })?;
    Ok(t.as_secs_f64() * 1e6 / replays.max(1) as f64)
}

/// Agree on a row over `group` (collective): the slowest rank's time and the wrong elements
/// summed over ranks.
pub fn slowest_rank(group: &Group, tag: &str, us: f64, wrong: usize) -> Result<(f64, usize)> {
    let mut msg = us.to_le_bytes().to_vec();
    msg.extend_from_slice(&(wrong as u64).to_le_bytes());
    let all = group.control().all_gather(tag, &msg)?;
    let us = all.iter().map(|m| to_f64(&m[..8])).fold(0.0, f64::max);
    let wrong_total: usize = all
        .iter()
        .map(|m| u64::from_le_bytes(m[8..16].try_into().unwrap_or([0; 8])) as usize)
        .sum();
    Ok((us, wrong_total))
}

/// Run the whole sweep on `group`; `progress(done, total, what)` is called after each row.
pub fn run(
    comm: &Communicator,
    group: &Group,
    spec: &BenchSpec,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Row>> {
    // One segment holds the largest input and output together: nothing registers mid-sweep.
    let world = group.size();
    let mut largest = 0;
    for &op in &spec.ops {
        for &d in &spec.dtypes {
            for &b in &spec.sizes {
                if let Some(shape) = case_shape(op, d, b, world) {
                    let (i, o) = op.io_elems(piece_of(op, &shape, world), world);
                    largest = largest.max((i + o) * d.size() + 4096);
                }
            }
        }
    }
    if spec.impls.iter().any(|v| v.windows || v.imp == Impl::Auto) {
        group.prepare(largest)?;
    }
    // A group across hosts makes the hierarchical all-reduce's groups and scratch once, here.
    if spec.impls.iter().any(|v| v.imp == Impl::Hierarchical)
        && group.topology().hierarchical_unavailable().is_none()
    {
        group.prepare_hierarchical(largest)?;
    }
    let total = spec.rows();
    let mut rows = Vec::with_capacity(total);
    let mut done = 0;
    for &op in &spec.ops {
        for &dtype in &spec.dtypes {
            for &bytes in &spec.sizes {
                for &mode in &spec.timing.modes {
                    let what = format!("{} {} {} B {}", op.name(), dtype, bytes, mode.name());
                    done += spec.impls.len();
                    let Some(shape) = case_shape(op, dtype, bytes, world) else {
                        tracing::info!("skipping {what}: the size does not split over the ranks");
                        progress(done, total, &what);
                        continue;
                    };
                    let piece = piece_of(op, &shape, world);
                    let runnable: Vec<Variant> = spec
                        .impls
                        .iter()
                        .copied()
                        .filter(|v| match group.supports(op, dtype, v.imp, piece) {
                            Ok(()) => true,
                            Err(why) => {
                                tracing::info!("skipping {what} {}: {why}", v.name(comm.backend()));
                                false
                            }
                        })
                        .collect();
                    if !runnable.is_empty() {
                        rows.extend(measure_point(
                            comm, group, spec, op, dtype, bytes, &runnable, mode,
                        )?);
                    }
                    progress(done, total, &what);
                }
            }
        }
    }
    Ok(rows)
}

/// Sizes in nccl-tests' style (`2K`, `16M`).
pub fn human_bytes(b: usize) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}G", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        format!("{b}")
    }
}

/// Parse `2K`, `64M`, `1G` or plain bytes.
pub fn parse_bytes(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("not a size: {s:?} (e.g. 2048, 2K, 64M, 1G)"))
}

/// One nccl-tests-style table per (op, implementation, mode).
pub fn nccl_tests_tables(rows: &[Row], backend: BackendKind) -> String {
    let _ = backend;
    let mut out = String::new();
    let mut keys: Vec<(String, String, Mode)> = rows
        .iter()
        .map(|r| (r.op.clone(), r.implementation.clone(), r.mode))
        .collect();
    keys.dedup();
    let mut seen = std::collections::BTreeSet::new();
    for k in keys {
        if !seen.insert(k.clone()) {
            continue;
        }
        let (op, imp, mode) = &k;
        let _ = writeln!(out, "# {op}  impl {imp}  mode {}", mode.name());
        let _ = writeln!(
            out,
            "# {:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}",
            "size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong"
        );
        let _ = writeln!(
            out,
            "# {:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}",
            "(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)", ""
        );
        for r in rows
            .iter()
            .filter(|r| &r.op == op && &r.implementation == imp && r.mode == *mode)
        {
            let count = r.bytes / r.dtype.size();
            let redop = match r.op.as_str() {
                "all_gather" => "none",
                "dcp_combine" => "lse",
                _ => "sum",
            };
            let wrong = if r.ok {
                "0".to_string()
            } else {
                r.wrong.to_string()
            };
            let _ = writeln!(
                out,
                "  {:>12} {:>12} {:>6} {:>6} {:>10.2} {:>8.2} {:>8.2} {:>7}{}",
                r.bytes,
                count,
                r.dtype.name(),
                redop,
                r.us,
                r.algbw_gbps,
                r.busbw_gbps,
                wrong,
                r.ran
                    .as_ref()
                    .map(|x| format!("  (ran {x})"))
                    .unwrap_or_default()
            );
        }
        out.push('\n');
    }
    out
}

/// The seed-003-style comparison: per op and size, µs of each implementation and mode, and
/// `auto` against the best of the NCCL paths.
pub fn comparison_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut cols: Vec<(String, Mode)> = Vec::new();
    for r in rows {
        let c = (r.implementation.clone(), r.mode);
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    cols.sort_by_key(|(i, m)| (*m, i.clone()));
    let mut ops: Vec<&str> = Vec::new();
    for r in rows {
        if !ops.contains(&r.op.as_str()) {
            ops.push(&r.op);
        }
    }
    for op in ops {
        let _ = write!(out, "{op:<15} {:>6}", "size");
        for (i, m) in &cols {
            let _ = write!(out, " {:>16}", format!("{i} {}", m.name()));
        }
        let _ = writeln!(out, " {:>14}", "auto/best graph");
        let mut sizes: Vec<usize> = rows
            .iter()
            .filter(|r| r.op == op)
            .map(|r| r.bytes)
            .collect();
        sizes.sort();
        sizes.dedup();
        for b in sizes {
            let _ = write!(out, "{:<15} {:>6}", "", human_bytes(b));
            let find = |i: &str, m: Mode| {
                rows.iter()
                    .find(|r| r.op == op && r.bytes == b && r.implementation == i && r.mode == m)
            };
            for (i, m) in &cols {
                match find(i, *m) {
                    Some(r) => {
                        let _ = write!(
                            out,
                            " {:>16}",
                            format!("{:.2}{}", r.us, if r.ok { "" } else { " WRONG" })
                        );
                    }
                    None => {
                        let _ = write!(out, " {:>16}", "-");
                    }
                }
            }
            let best = ["nccl", "nccl_symm", "host", "host_symm"]
                .iter()
                .filter_map(|i| find(i, Mode::Graph))
                .map(|r| r.us)
                .fold(f64::INFINITY, f64::min);
            match find("auto", Mode::Graph) {
                Some(a) if best.is_finite() => {
                    let _ = writeln!(out, " {:>14.3}", a.us / best);
                }
                _ => {
                    let _ = writeln!(out, " {:>14}", "-");
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Total time a sweep took, for the log.
pub fn elapsed_line(d: Duration, rows: usize) -> String {
    format!("{rows} rows in {:.1} s", d.as_secs_f64())
}

/// Build a dispatch table from measured rows: for each collective (op, dtype, world, mode) and
/// measured size (a bucket up to that size), the fastest implementation with both buffers in
/// windows, and whether `auto_plain` (staging plain buffers into windows) beat `nccl` there.
/// Above the largest measured size the last bucket's choice holds. `ar_rmsnorm` rows make the
/// norm rows ([`norm_rows`]).
pub fn tune_table(
    rows: &[Row],
    backend: BackendKind,
    device: &str,
    source: &str,
) -> symmcomm::dispatch::DispatchTable {
    use symmcomm::dispatch::{DispatchRow, DispatchTable};
    let collectives = ["all_reduce", "all_gather", "reduce_scatter"];
    let mut keys: Vec<(String, DType, usize, usize, Mode)> = rows
        .iter()
        .filter(|r| collectives.contains(&r.op.as_str()))
        .map(|r| (r.op.clone(), r.dtype, r.world, domains_of(r), r.mode))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for (op, dtype, world, domains, mode) in keys {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.mode == mode
                    && r.op == op
                    && r.dtype == dtype
                    && r.world == world
                    && domains_of(r) == domains
                    && r.ok
            })
            .collect();
        let mut sizes: Vec<usize> = mine.iter().map(|r| r.bytes).collect();
        sizes.sort();
        sizes.dedup();
        let last = sizes.last().copied();
        for b in sizes {
            let at: Vec<&Row> = mine.iter().copied().filter(|r| r.bytes == b).collect();
            let Some(bucket) = Bucket::choose(&at, backend, domains) else {
                continue;
            };
            out.push(DispatchRow {
                op: op.clone(),
                dtype,
                world,
                max_bytes: if Some(b) == last { usize::MAX } else { b },
                mode: Some(mode),
                domains,
                best: bucket.best,
                stage: bucket.stage,
                measured_us: bucket.measured_us,
            });
        }
    }
    DispatchTable {
        source: source.into(),
        device: device.into(),
        backend,
        rows: out,
        norm_rows: norm_rows(rows),
    }
}

/// The norm rows of a table from measured `ar_rmsnorm` rows: per (dtype, world, mode) and
/// measured input size (a bucket up to that size, the last one without a bound), the fastest
/// of the fused kernels, unfused and NCCL's path (rows that failed their check left out; the
/// size rule's own pick, `fused`, is not a candidate: its algorithm is one of the others).
pub fn norm_rows(rows: &[Row]) -> Vec<symmcomm::dispatch::NormRow> {
    use symmcomm::dispatch::{NormBest, NormRow};
    let measured: Vec<(&Row, NormBest)> = rows
        .iter()
        .filter(|r| r.op == "ar_rmsnorm" && r.ok)
        .filter_map(|r| NormBest::from_name(&r.implementation).map(|b| (r, b)))
        .collect();
    let mut keys: Vec<(DType, usize, Mode)> = measured
        .iter()
        .map(|(r, _)| (r.dtype, r.world, r.mode))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for (dtype, world, mode) in keys {
        let mine: Vec<&(&Row, NormBest)> = measured
            .iter()
            .filter(|(r, _)| r.dtype == dtype && r.world == world && r.mode == mode)
            .collect();
        let mut sizes: Vec<usize> = mine.iter().map(|(r, _)| r.bytes).collect();
        sizes.sort();
        sizes.dedup();
        let last = sizes.last().copied();
        for b in sizes {
            let at = mine.iter().filter(|(r, _)| r.bytes == b);
            let mut measured_us = BTreeMap::new();
            let mut best: Option<(NormBest, f64)> = None;
            for (r, imp) in at {
                // Several hidden sizes may share a size: keep each implementation's slowest.
                let us = measured_us.entry(imp.name().to_string()).or_insert(r.us);
                *us = us.max(r.us);
            }
            for (name, &us) in &measured_us {
                let imp = NormBest::from_name(name).expect("named above");
                if best.is_none_or(|(_, b)| us < b) {
                    best = Some((imp, us));
                }
            }
            let Some((best, _)) = best else { continue };
            out.push(NormRow {
                op: "all_reduce_add_rmsnorm".into(),
                dtype,
                world,
                max_bytes: if Some(b) == last { usize::MAX } else { b },
                mode: Some(mode),
                best,
                measured_us,
            });
        }
    }
    out
}

/// What one size bucket of [`tune_table`] chose from the rows measured at its size.
struct Bucket {
    best: Impl,
    stage: bool,
    measured_us: BTreeMap<String, f64>,
}

impl Bucket {
    /// The choice at one size from its rows `at`; `None` when no candidate was measured there.
    /// Across `domains` > 1 (hosts) only NCCL's two paths are candidates, never staged.
    fn choose(at: &[&Row], backend: BackendKind, domains: usize) -> Option<Self> {
        let mut candidates = Self::candidates(at);
        if domains > 1 {
            candidates
                .retain(|(i, _)| matches!(i, Impl::Regular | Impl::Symmetric | Impl::Hierarchical));
        } else {
            candidates.retain(|(i, _)| *i != Impl::Hierarchical);
        }
        let (fastest, fastest_us) = candidates
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        let best = Self::unless_within_noise_of_nccl(fastest, fastest_us, &candidates);
        let regular = Impl::Regular.name(backend);
        let regular_us = at
            .iter()
            .find(|r| r.implementation == regular)
            .map(|r| r.us);
        let staged_us = at
            .iter()
            .find(|r| r.implementation == "auto_plain")
            .map(|r| r.us);
        let stage = domains == 1
            && best != Impl::Regular
            && matches!((staged_us, regular_us), (Some(s), Some(r)) if s < 0.98 * r);
        let mut measured_us: BTreeMap<String, f64> = candidates
            .into_iter()
            .map(|(i, t)| (i.name(backend), t))
            .collect();
        if let Some(s) = staged_us {
            measured_us.insert("auto_plain".into(), s);
        }
        Some(Bucket {
            best,
            stage,
            measured_us,
        })
    }

    /// The implementations a table row may choose, with their times: each concrete one in its
    /// usual placement (the regular path on plain memory, the others on windows); neither
    /// `auto` nor `*_on_windows`. `hierarchical` only for groups across hosts (see `choose`).
    fn candidates(at: &[&Row]) -> Vec<(Impl, f64)> {
        at.iter()
            .filter_map(|r| {
                let v = Variant::parse(&r.implementation).ok()?;
                (v.imp != Impl::Auto
                    && (v.windows || v.imp == Impl::Regular)
                    && !r.implementation.ends_with("_on_windows"))
                .then_some((v.imp, r.us))
            })
            .collect()
    }

    /// Our kernels (and the hierarchical all-reduce) replace NCCL only where they win by more
    /// than the noise of a measurement (3%); otherwise NCCL's faster path stays.
    fn unless_within_noise_of_nccl(
        fastest: Impl,
        fastest_us: f64,
        candidates: &[(Impl, f64)],
    ) -> Impl {
        let nccl_best = candidates
            .iter()
            .copied()
            .filter(|(i, _)| matches!(i, Impl::Regular | Impl::Symmetric))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match (fastest, nccl_best) {
            (Impl::Kernel(_) | Impl::Hierarchical, Some((ni, nus))) if fastest_us >= 0.97 * nus => {
                ni
            }
            _ => fastest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20") && d.as_bytes()[4] == b'-' && d.as_bytes()[7] == b'-');
    }

    #[test]
    fn sizes_parse_and_print() {
        for (s, b) in [
            ("2K", 2048),
            ("64M", 64 << 20),
            ("1G", 1 << 30),
            ("1000", 1000),
        ] {
            assert_eq!(parse_bytes(s).unwrap(), b);
        }
        assert!(parse_bytes("2X").is_err());
        assert_eq!(human_bytes(256 << 20), "256M");
        assert_eq!(human_bytes(2048), "2K");
        assert_eq!(human_bytes(1000), "1000");
    }

    #[test]
    fn shapes_follow_nccl_tests_bytes() {
        let ar = Collective::AllReduce(ReduceOp::Sum);
        assert_eq!(case_shape(ar, DType::BF16, 2048, 2), Some(vec![1024]));
        assert_eq!(
            case_shape(Collective::AllGather, DType::BF16, 2048, 2),
            Some(vec![512])
        );
        assert_eq!(
            case_shape(
                Collective::ReduceScatter(ReduceOp::Sum),
                DType::BF16,
                2048,
                2
            ),
            Some(vec![1024])
        );
        assert_eq!(
            case_shape(Collective::AllGather, DType::BF16, 2048, 3),
            None
        );
    }

    fn row(op: &str, bytes: usize, imp: &str, us: f64) -> Row {
        Row::graph_bf16_for_tests(op, bytes, imp, us)
    }

    #[test]
    fn tuning_prefers_nccl_within_noise_and_stages_only_when_it_wins() {
        let rows = vec![
            // our kernel only 1% faster: NCCL's symmetric path stays
            row("all_reduce", 2048, "nccl", 6.0),
            row("all_reduce", 2048, "nccl_symm", 5.0),
            row("all_reduce", 2048, "oneshot", 4.95),
            row("all_reduce", 2048, "auto_plain", 5.5),
            // our kernel clearly faster
            row("all_reduce", 1 << 20, "nccl", 14.0),
            row("all_reduce", 1 << 20, "nccl_symm", 16.0),
            row("all_reduce", 1 << 20, "oneshot", 9.0),
            // large: regular wins; a wrong row never counts
            row("all_reduce", 1 << 28, "nccl", 890.0),
            row("all_reduce", 1 << 28, "nccl_symm", 1170.0),
            Row {
                ok: false,
                ..row("all_reduce", 1 << 28, "oneshot", 1.0)
            },
        ];
        let t = tune_table(&rows, BackendKind::Cuda, "test", "test");
        let at = |b: usize| t.rows.iter().find(|r| r.max_bytes == b).unwrap();
        assert_eq!(at(2048).best, Impl::Symmetric);
        assert!(at(2048).stage, "staged 5.5 < 0.98 * 6.0");
        assert_eq!(at(1 << 20).best, Impl::Kernel(symmcomm::Algo::OneShot));
        let last = t.rows.iter().find(|r| r.max_bytes == usize::MAX).unwrap();
        assert_eq!(last.best, Impl::Regular);
        assert!(t.rows.iter().all(|r| r.mode == Some(Mode::Graph)));
    }

    #[test]
    fn rows_across_hosts_make_rows_of_their_own_that_pick_nccl_or_hierarchical() {
        let across = |bytes, imp: &str, us| Row {
            config: Some("domains=2".into()),
            ..row("all_reduce", bytes, imp, us)
        };
        let rows = vec![
            // Inside one domain our kernel wins.
            row("all_reduce", 2048, "nccl", 6.0),
            row("all_reduce", 2048, "ll", 3.0),
            // Across 2 hosts: the fastest of NCCL's paths, even where a kernel row was measured.
            across(2048, "nccl", 20.0),
            across(2048, "nccl_symm", 25.0),
            across(2048, "ll", 1.0),
            across(2048, "auto_plain", 2.0),
            across(1 << 20, "nccl", 90.0),
            across(1 << 20, "nccl_symm", 60.0),
            across(1 << 20, "hierarchical", 10.0),
            // Inside one domain hierarchical is never a candidate.
            row("all_reduce", 1 << 20, "nccl", 90.0),
            row("all_reduce", 1 << 20, "hierarchical", 1.0),
        ];
        let t = tune_table(&rows, BackendKind::Cuda, "test", "test");
        t.validate().unwrap();
        let of = |domains: usize, b: usize| {
            let r = t
                .rows
                .iter()
                .find(|r| r.domains == domains && r.max_bytes == b);
            r.map(|r| (r.best, r.stage)).unwrap()
        };
        let ll = Impl::Kernel(symmcomm::Algo::LowLatency);
        assert_eq!(of(1, 2048), (ll, false));
        assert_eq!(of(1, usize::MAX), (Impl::Regular, false));
        assert_eq!(of(2, 2048), (Impl::Regular, false));
        assert_eq!(of(2, usize::MAX), (Impl::Hierarchical, false));
        assert_eq!(domains_of(&rows[2]), 2);
        assert_eq!(domains_of(&rows[0]), 1);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
