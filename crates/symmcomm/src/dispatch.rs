//! Dispatch: which implementation `auto` runs for (op, dtype, bytes, world), read from a
//! measured table (`symmcomm tune` writes it; a built-in one ships for 2×H200). Without a row
//! NCCL's own rule applies: the symmetric path when both buffers are in windows, else the
//! regular one. A decision always carries why ([`Why`]), which the trace prints.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{Algo, BackendKind, Collective, Impl};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Eager launches or graph replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Back-to-back launches timed with events.
    Eager,
    /// A graph of `graph_ops` operations, replayed.
    Graph,
}

impl Mode {
    /// `eager` or `graph`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Graph => "graph",
        }
    }
}

/// One measured size bucket: for sizes up to `max_bytes` (and above the previous row's), which
/// implementation is fastest when both buffers are symmetric, and whether staging a plain
/// buffer into a window still beats the regular path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchRow {
    /// `all_reduce`, `all_gather` or `reduce_scatter`.
    pub op: String,
    /// Element type.
    pub dtype: DType,
    /// Ranks in the group.
    pub world: usize,
    /// Largest size (nccl-tests bytes: the larger buffer) this row covers.
    pub max_bytes: usize,
    /// Eager launches or graph capture (`None`: both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// NVLink domains (hosts) the measured group spanned: 1 inside one; from 2 on the row is
    /// for groups across that many hosts, and picks between NCCL's two paths only.
    #[serde(default = "one_domain", skip_serializing_if = "is_one_domain")]
    pub domains: usize,
    /// Fastest implementation with both buffers symmetric.
    pub best: Impl,
    /// Whether copying a plain input into a window (and a window output back out) and running
    /// `best` still beats the regular path.
    #[serde(default)]
    pub stage: bool,
    /// What was measured, µs per operation by implementation name (for `info`).
    #[serde(default)]
    pub measured_us: BTreeMap<String, f64>,
}

/// A row's default `domains`: one NVLink domain.
fn one_domain() -> usize {
    1
}

fn is_one_domain(d: &usize) -> bool {
    *d == 1
}

/// A dispatch table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchTable {
    /// Where it came from (`builtin:h200x2`, a file path, `tune`).
    pub source: String,
    /// The device it was measured on.
    pub device: String,
    /// Backend it applies to.
    pub backend: BackendKind,
    /// Rows in any order.
    pub rows: Vec<DispatchRow>,
    /// What `auto` runs for the collective + residual add + RMSNorm ([`crate::norm`]), where
    /// `symmcomm tune --ops ar_rmsnorm` measured it; without a row it follows its size rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub norm_rows: Vec<NormRow>,
}

/// One size bucket of the collective + residual add + RMSNorm: the fastest way measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormRow {
    /// `all_reduce_add_rmsnorm` or `reduce_scatter_add_rmsnorm`.
    pub op: String,
    /// Element type (bf16 or f16).
    pub dtype: DType,
    /// Ranks in the group.
    pub world: usize,
    /// Largest input size (bytes) this row covers.
    pub max_bytes: usize,
    /// Eager launches or graph capture (`None`: both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The fastest way measured.
    pub best: NormBest,
    /// What was measured, µs per call by implementation name.
    #[serde(default)]
    pub measured_us: BTreeMap<String, f64>,
}

/// What a [`NormRow`] picks: one fused kernel, or the collective then the separate kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormBest {
    /// The fused low-latency kernel.
    FusedLl,
    /// The fused one-shot kernel.
    FusedOneshot,
    /// The fused two-shot kernel (all-reduce form).
    FusedTwoshot,
    /// symmcomm's `auto` collective, then the separate add-RMSNorm kernel.
    Unfused,
    /// NCCL's regular collective, then the same kernel.
    Nccl,
}

impl NormBest {
    /// The fused algorithm, for the fused choices.
    pub fn algo(self) -> Option<Algo> {
        match self {
            NormBest::FusedLl => Some(Algo::LowLatency),
            NormBest::FusedOneshot => Some(Algo::OneShot),
            NormBest::FusedTwoshot => Some(Algo::TwoShot),
            NormBest::Unfused | NormBest::Nccl => None,
        }
    }

    /// From an implementation's name in results (`fused_ll`, `host_unfused`, `nccl`, `host`,
    /// ...); `None` for `auto`, `fused` (the size rule's pick) and unknown names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.strip_prefix("host_").unwrap_or(name) {
            "fused_ll" => NormBest::FusedLl,
            "fused_oneshot" => NormBest::FusedOneshot,
            "fused_twoshot" => NormBest::FusedTwoshot,
            "unfused" => NormBest::Unfused,
            "nccl" | "host" => NormBest::Nccl,
            _ => return None,
        })
    }

    /// The name in tables and messages: `fused_ll`, ..., `unfused`, `nccl`.
    pub fn name(self) -> &'static str {
        match self {
            NormBest::FusedLl => "fused_ll",
            NormBest::FusedOneshot => "fused_oneshot",
            NormBest::FusedTwoshot => "fused_twoshot",
            NormBest::Unfused => "unfused",
            NormBest::Nccl => "nccl",
        }
    }
}

/// What `auto` decided.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The implementation to run.
    pub imp: Impl,
    /// Copy a plain input into a window first.
    pub stage_input: bool,
    /// Run into a window and copy out to a plain output.
    pub stage_output: bool,
    /// Why; formatted only when shown.
    pub why: Why,
}

/// Why an implementation runs: the facts of the decision, put into words only when shown
/// (`Display`), so that a call does not format a string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Why {
    /// The caller named the implementation.
    Explicit,
    /// A group of one rank: the result is the input (a copy, or nothing in place).
    OneRank,
    /// No table row: NCCL's own rule (symmetric kernels when both buffers are in windows).
    NoRow {
        /// Both buffers lie in windows.
        both_in_windows: bool,
        /// The implementation that ran.
        ran: Impl,
    },
    /// Between two measured sizes, `imp`'s interpolated time was least.
    Interpolated {
        /// The winner at `bytes`.
        imp: Impl,
        /// Its interpolated time, µs.
        us: f64,
        /// The size asked for.
        bytes: usize,
        /// The bucket's measured winner and its top size.
        best: Impl,
        /// The bucket's top size.
        max_bytes: usize,
    },
    /// The table's fastest implementation for the bucket up to `max_bytes`.
    Fastest {
        /// The implementation.
        imp: Impl,
        /// The bucket's top size.
        max_bytes: usize,
    },
    /// Staging plain memory into windows and running `imp` beats the regular path.
    Staged {
        /// The implementation.
        imp: Impl,
        /// The bucket's top size.
        max_bytes: usize,
    },
    /// A plain buffer, and no scratch window can be had now (capture, or policy).
    NoScratch,
    /// A plain buffer, and staging it into a window loses at this size.
    StagingLoses {
        /// The size asked for.
        bytes: usize,
    },
    /// The group spans several NVLink domains (hosts): our kernels cannot reach every rank's
    /// memory, so one of NCCL's paths runs: the one the table's row for groups across that many
    /// domains measured faster, where there is one (rows measured inside one domain never
    /// apply), else NCCL's rule: its symmetric path when both buffers are in windows NCCL
    /// accepted, else its regular one.
    CrossDomain {
        /// The group's domains.
        domains: usize,
        /// Both buffers lie in the group's windows.
        both_in_windows: bool,
        /// The implementation that ran (`Symmetric`, `Regular`, or `Hierarchical` where the
        /// table's row named it).
        ran: Impl,
        /// Where the table has a row for groups across this many domains: the top of its
        /// bucket (its fastest path ran, where it could).
        measured_up_to: Option<usize>,
    },
    /// The hierarchical all-reduce, asked for explicitly, and what ran each of its steps.
    Hierarchical {
        /// Domains (hosts) of the group.
        domains: usize,
        /// The group's ranks on each.
        per_domain: usize,
        /// What ran the reduce-scatter inside this rank's domain.
        reduce_scatter: Impl,
        /// What ran the all-reduce of the piece across domains.
        all_reduce: Impl,
        /// What ran the all-gather inside this rank's domain.
        all_gather: Impl,
    },
}

impl std::fmt::Display for Why {
    // Long on purpose: a match with one arm per variant (two where one has a special case).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Why::Explicit => write!(f, "requested explicitly"),
            Why::OneRank => write!(
                f,
                "one rank: the result is the input (a device copy, or nothing in place)"
            ),
            Why::NoRow {
                both_in_windows: true,
                ran: Impl::Symmetric,
            } => write!(f, "no table row: NCCL's rule, both buffers in windows"),
            Why::NoRow {
                both_in_windows, ..
            } => write!(
                f,
                "no table row: NCCL's rule, {} in a window",
                if both_in_windows {
                    "symmetric path unavailable though both are"
                } else {
                    "not both buffers"
                }
            ),
            Why::Interpolated {
                imp: Impl::Regular,
                us,
                bytes,
                ..
            } => write!(
                f,
                "table: regular path interpolated fastest at {bytes} B ({us:.2} us)"
            ),
            Why::Interpolated {
                imp,
                us,
                bytes,
                best,
                max_bytes,
            } => write!(
                f,
                "table: {imp:?} interpolated fastest at {bytes} B ({us:.2} us), {best:?} \
                 measured fastest at {max_bytes} B"
            ),
            Why::Fastest {
                imp: Impl::Regular,
                max_bytes,
            } => write!(f, "table: regular path is fastest up to {max_bytes} B"),
            Why::Fastest { imp, max_bytes } => {
                write!(f, "table: {imp:?} is fastest up to {max_bytes} B")
            }
            Why::Staged { imp, max_bytes } => write!(
                f,
                "table: staging plain memory into windows and running {imp:?} wins up to \
                 {max_bytes} B"
            ),
            Why::NoScratch => write!(
                f,
                "plain buffer and no scratch window can be had now (capture, or policy): \
                 regular path"
            ),
            Why::StagingLoses { bytes } => write!(
                f,
                "plain buffer: staging into a window loses at {bytes} B, regular path"
            ),
            Why::CrossDomain {
                domains,
                both_in_windows,
                ran,
                measured_up_to,
            } => cross_domain_reason(f, domains, both_in_windows, ran, measured_up_to),
            Why::Hierarchical {
                domains,
                per_domain,
                reduce_scatter,
                all_reduce,
                all_gather,
            } => write!(
                f,
                "requested explicitly: hierarchical over {domains} domains of {per_domain} ranks \
                 (reduce-scatter in the domain by {}, all-reduce of the piece across domains by \
                 {}, all-gather in the domain by {})",
                step_label(reduce_scatter),
                step_label(all_reduce),
                step_label(all_gather)
            ),
        }
    }
}

/// [`Why::CrossDomain`] in words.
fn cross_domain_reason(
    f: &mut std::fmt::Formatter<'_>,
    domains: usize,
    both_in_windows: bool,
    ran: Impl,
    measured_up_to: Option<usize>,
) -> std::fmt::Result {
    if ran == Impl::Hierarchical {
        write!(f, "the group spans {domains} NVLink domains (hosts): ")?;
    } else {
        write!(
            f,
            "the group spans {domains} NVLink domains (hosts): NCCL only, our kernels need one \
             domain; "
        )?;
    }
    if let Some(top) = measured_up_to {
        let upto = match top {
            usize::MAX => "above the last measured size".to_string(),
            b => format!("up to {b} B"),
        };
        write!(
            f,
            "the table's fastest path {upto} across {domains} hosts, "
        )?;
    }
    match (both_in_windows, ran) {
        (_, Impl::Hierarchical) => write!(
            f,
            "the hierarchical all-reduce (our kernels inside each host, NCCL across)"
        ),
        (true, Impl::Symmetric) => {
            write!(f, "both buffers in windows NCCL accepted, symmetric path")
        }
        (true, _) if measured_up_to.is_some() => write!(f, "regular path"),
        (true, _) => write!(
            f,
            "symmetric path unavailable though both buffers are in the pool, regular path"
        ),
        (false, _) => write!(f, "not both buffers in windows, regular path"),
    }
}

/// An implementation as a reason names it, whatever the backend.
fn step_label(i: Impl) -> &'static str {
    match i {
        Impl::Auto => "auto",
        Impl::Regular => "the regular path",
        Impl::Symmetric => "the symmetric path",
        Impl::Kernel(a) => a.name(),
        Impl::Local => "a local copy",
        Impl::Hierarchical => "the hierarchical path",
    }
}

/// One call `auto` decides for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchRequest {
    /// Eager, or inside a capture (the graph row of the table).
    pub mode: Mode,
    /// The collective.
    pub coll: Collective,
    /// Element type.
    pub dtype: DType,
    /// Ranks in the group.
    pub world: usize,
    /// nccl-tests bytes: the larger buffer.
    pub bytes: usize,
    /// The input lies in one of the group's windows (or will, through scratch).
    pub input_in_window: bool,
    /// The output lies in one of the group's windows (or will, through scratch).
    pub output_in_window: bool,
    /// Scratch windows can be had now to stage plain buffers.
    pub can_stage: bool,
}

/// What a size bucket of a table is looked up by, besides the size and mode.
struct BucketKey<'a> {
    op: &'a str,
    dtype: DType,
    world: usize,
    domains: usize,
}

/// A row of a table: a size bucket for one key and mode.
trait Bucket {
    fn matches(&self, key: &BucketKey<'_>) -> bool;
    fn max_bytes(&self) -> usize;
    fn mode(&self) -> Option<Mode>;
}

impl Bucket for DispatchRow {
    fn matches(&self, k: &BucketKey<'_>) -> bool {
        self.op == k.op
            && self.dtype == k.dtype
            && self.world == k.world
            && self.domains == k.domains
    }
    fn max_bytes(&self) -> usize {
        self.max_bytes
    }
    fn mode(&self) -> Option<Mode> {
        self.mode
    }
}

impl Bucket for NormRow {
    fn matches(&self, k: &BucketKey<'_>) -> bool {
        self.op == k.op && self.dtype == k.dtype && self.world == k.world && k.domains == 1
    }
    fn max_bytes(&self) -> usize {
        self.max_bytes
    }
    fn mode(&self) -> Option<Mode> {
        self.mode
    }
}

/// The smallest bucket of `rows` for `key` that covers `bytes`: rows measured in `mode` first,
/// then rows for both modes.
fn covering<'r, R: Bucket>(
    rows: &'r [R],
    key: &BucketKey<'_>,
    bytes: usize,
    mode: Mode,
) -> Option<&'r R> {
    let in_mode = |m: Option<Mode>| {
        rows.iter()
            .filter(|r| r.matches(key) && bytes <= r.max_bytes() && r.mode() == m)
            .min_by_key(|r| r.max_bytes())
    };
    in_mode(Some(mode)).or_else(|| in_mode(None))
}

impl DispatchTable {
    /// Read a table from JSON.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading dispatch table {}", path.display()), e))?;
        let t: DispatchTable = serde_json::from_str(&text).map_err(|e| Error::Table {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        t.validate().map_err(|detail| Error::Table {
            path: path.display().to_string(),
            detail,
        })?;
        Ok(t)
    }

    /// Write the table as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a table serialises");
        std::fs::write(path, text + "\n")
            .map_err(|e| Error::io(format!("writing dispatch table {}", path.display()), e))
    }

    /// Check that rows are usable: known ops, world ≥ 1, `auto` never a row's choice; norm
    /// rows of a known form, world ≥ 2, no two-shot for the reduce-scatter form.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (i, r) in self.norm_rows.iter().enumerate() {
            match r.op.as_str() {
                "all_reduce_add_rmsnorm" => {}
                "reduce_scatter_add_rmsnorm" if r.best != NormBest::FusedTwoshot => {}
                "reduce_scatter_add_rmsnorm" => {
                    return Err(format!(
                        "norm row {i}: no fused two-shot kernel for the reduce-scatter form"
                    ));
                }
                other => return Err(format!("norm row {i}: unknown op {other:?}")),
            }
            if r.world < 2 {
                return Err(format!(
                    "norm row {i}: world {} (a norm row needs 2 or more ranks)",
                    r.world
                ));
            }
        }
        for (i, r) in self.rows.iter().enumerate() {
            if !["all_reduce", "all_gather", "reduce_scatter"].contains(&r.op.as_str()) {
                return Err(format!("row {i}: unknown op {:?}", r.op));
            }
            if r.world == 0 {
                return Err(format!("row {i}: world 0"));
            }
            if r.best == Impl::Auto {
                return Err(format!("row {i}: best must be a concrete implementation"));
            }
            if r.domains == 0 {
                return Err(format!("row {i}: domains 0"));
            }
            let across_ok = match r.best {
                Impl::Regular | Impl::Symmetric => true,
                Impl::Hierarchical => r.op == "all_reduce",
                _ => false,
            };
            if r.domains > 1 && (r.stage || !across_ok) {
                return Err(format!(
                    "row {i}: a row for groups across {} domains picks NCCL's regular or \
                     symmetric path (or, for all_reduce, the hierarchical one), unstaged (our \
                     kernels need one domain)",
                    r.domains
                ));
            }
            if r.best == Impl::Hierarchical && r.domains == 1 {
                return Err(format!(
                    "row {i}: hierarchical is kept out of auto inside one domain (it is for \
                     groups across hosts: a row with domains >= 2 where it measured faster than \
                     NCCL's own all-reduce); request it explicitly"
                ));
            }
        }
        Ok(())
    }

    /// The row covering `bytes` in `mode` for groups inside one NVLink domain (rows measured
    /// in that mode first, then rows for both modes), if any.
    pub fn lookup(
        &self,
        coll: Collective,
        dtype: DType,
        world: usize,
        bytes: usize,
        mode: Mode,
    ) -> Option<&DispatchRow> {
        self.lookup_in(coll, dtype, world, 1, bytes, mode)
    }

    /// [`DispatchTable::lookup`] for groups that span `domains` NVLink domains.
    pub fn lookup_in(
        &self,
        coll: Collective,
        dtype: DType,
        world: usize,
        domains: usize,
        bytes: usize,
        mode: Mode,
    ) -> Option<&DispatchRow> {
        let key = BucketKey {
            op: coll.name(),
            dtype,
            world,
            domains,
        };
        covering(&self.rows, &key, bytes, mode)
    }

    /// The bucket measured just below `row` (same op, dtype, world, domains and mode), if any.
    pub fn below(&self, row: &DispatchRow) -> Option<&DispatchRow> {
        self.rows
            .iter()
            .filter(|r| {
                r.op == row.op
                    && r.dtype == row.dtype
                    && r.world == row.world
                    && r.domains == row.domains
                    && r.mode == row.mode
                    && r.max_bytes < row.max_bytes
            })
            .max_by_key(|r| r.max_bytes)
    }

    /// The norm row covering `bytes` of `op` (`all_reduce_add_rmsnorm`, ...) in `mode` (rows
    /// measured in that mode first, then rows for both modes), if any.
    pub fn lookup_norm(
        &self,
        op: &str,
        dtype: DType,
        world: usize,
        bytes: usize,
        mode: Mode,
    ) -> Option<&NormRow> {
        let key = BucketKey {
            op,
            dtype,
            world,
            domains: 1,
        };
        covering(&self.norm_rows, &key, bytes, mode)
    }

    /// The table shipped for a device, if one was measured for it: 2, 4 and 8 H200s (written by
    /// `symmcomm tune` on the GPU machines; see BENCHMARKS.md).
    pub fn builtin(backend: BackendKind, device: &str, world: usize) -> Option<Self> {
        const H200X2: &str = include_str!("../tables/h200x2.json");
        const H200X4: &str = include_str!("../tables/h200x4.json");
        const H200X8: &str = include_str!("../tables/h200x8.json");
        if backend != BackendKind::Cuda || !device.contains("H200") {
            return None;
        }
        let (name, json) = match world {
            2 => ("h200x2", H200X2),
            4 => ("h200x4", H200X4),
            8 => ("h200x8", H200X8),
            _ => return None,
        };
        let mut t: DispatchTable = serde_json::from_str(json).ok()?;
        if t.rows.iter().any(|r| r.world != world) || t.norm_rows.iter().any(|r| r.world != world) {
            return None;
        }
        t.source = format!("builtin {name} ({})", t.source);
        t.validate().ok()?;
        Some(t)
    }
}

/// What `auto` runs for `req`: the table's row for (op, dtype, world, mode) and size, among
/// the implementations `available` says can run it; NCCL's rule without a row.
pub fn decide(
    table: Option<&DispatchTable>,
    req: &DispatchRequest,
    available: &dyn Fn(Impl) -> bool,
) -> Decision {
    let Some((table, row)) = table.and_then(|t| {
        t.lookup(req.coll, req.dtype, req.world, req.bytes, req.mode)
            .map(|row| (t, row))
    }) else {
        return nccl_rule(req, available);
    };
    if let Some(decision) = interpolated(table, row, req, available) {
        return decision;
    }
    let best = row_best_available(row, available);
    staged_or_regular(row, req, best)
}

/// What `auto` runs for `req` in a group that spans `domains` NVLink domains (hosts): never
/// our kernels (which need every rank's memory in reach), nothing staged. The table's row for
/// groups across that many domains where it has one (measured across hosts, it names NCCL's
/// faster path), else NCCL's rule: the symmetric path when both buffers are in windows and it
/// can run (NCCL accepted the group's windows), else the regular one.
pub fn decide_cross_domain(
    table: Option<&DispatchTable>,
    req: &DispatchRequest,
    domains: usize,
    available: &dyn Fn(Impl) -> bool,
) -> Decision {
    let both = req.input_in_window && req.output_in_window;
    let row = table
        .and_then(|t| t.lookup_in(req.coll, req.dtype, req.world, domains, req.bytes, req.mode));
    let wanted = row.map(|r| r.best);
    let ran = if wanted == Some(Impl::Hierarchical) && available(Impl::Hierarchical) {
        Impl::Hierarchical
    } else if wanted.is_none_or(|w| w != Impl::Regular) && both && available(Impl::Symmetric) {
        Impl::Symmetric
    } else {
        Impl::Regular
    };
    Decision::unstaged(
        ran,
        Why::CrossDomain {
            domains,
            both_in_windows: both,
            ran,
            measured_up_to: row.map(|r| r.max_bytes),
        },
    )
}

impl Decision {
    /// Run `imp` on the buffers where they are.
    fn unstaged(imp: Impl, why: Why) -> Self {
        Decision {
            imp,
            stage_input: false,
            stage_output: false,
            why,
        }
    }
}

/// No table row: NCCL's rule, the symmetric path when both buffers are in windows and it can
/// run, else the regular one.
fn nccl_rule(req: &DispatchRequest, available: &dyn Fn(Impl) -> bool) -> Decision {
    let both = req.input_in_window && req.output_in_window;
    let ran = if both && available(Impl::Symmetric) {
        Impl::Symmetric
    } else {
        Impl::Regular
    };
    Decision::unstaged(
        ran,
        Why::NoRow {
            both_in_windows: both,
            ran,
        },
    )
}

/// Between two measured sizes, the times of each implementation are interpolated linearly and
/// the fastest one at `bytes` runs: the bucket's own winner was measured at its top size only,
/// and two kernels' lines can cross inside a 2x-4x bucket (2×H200: LL and one-shot
/// reduce-scatter within 1 % at 1 MiB, LL 4 % faster at 896 KiB). Only with both buffers in
/// windows, and only when the interpolated winner is not `row`'s own winner (or that one
/// cannot run); otherwise `None`, and the row decides.
fn interpolated(
    table: &DispatchTable,
    row: &DispatchRow,
    req: &DispatchRequest,
    available: &dyn Fn(Impl) -> bool,
) -> Option<Decision> {
    let both = req.input_in_window && req.output_in_window;
    let (imp, us) = table
        .below(row)
        .and_then(|lower| interpolated_best(lower, row, req.bytes, available))
        .filter(|_| both)?;
    (imp != row.best || !available(row.best)).then(|| {
        Decision::unstaged(
            imp,
            Why::Interpolated {
                imp,
                us,
                bytes: req.bytes,
                best: row.best,
                max_bytes: row.max_bytes,
            },
        )
    })
}

/// `row`'s fastest implementation when it can run, else NCCL's symmetric path when that can,
/// else the regular path.
fn row_best_available(row: &DispatchRow, available: &dyn Fn(Impl) -> bool) -> Impl {
    if available(row.best) {
        row.best
    } else if available(Impl::Symmetric) {
        Impl::Symmetric
    } else {
        Impl::Regular
    }
}

/// Run `best` where the buffers are when it needs no window they lack; else stage the plain
/// ones into windows when the row says staging wins and scratch can be had now; else the
/// regular path.
fn staged_or_regular(row: &DispatchRow, req: &DispatchRequest, best: Impl) -> Decision {
    let fastest = Why::Fastest {
        imp: best,
        max_bytes: row.max_bytes,
    };
    if best == Impl::Regular {
        return Decision::unstaged(best, fastest);
    }
    let stage_input = best.needs_input_window() && !req.input_in_window;
    let stage_output = best.needs_output_window() && !req.output_in_window;
    if !stage_input && !stage_output {
        return Decision::unstaged(best, fastest);
    }
    if row.stage && req.can_stage {
        return Decision {
            imp: best,
            stage_input,
            stage_output,
            why: Why::Staged {
                imp: best,
                max_bytes: row.max_bytes,
            },
        };
    }
    Decision::unstaged(
        Impl::Regular,
        if row.stage {
            Why::NoScratch
        } else {
            Why::StagingLoses { bytes: req.bytes }
        },
    )
}

/// The implementation with the least time at `bytes` on the line between its measured times at
/// `lower.max_bytes` and `upper.max_bytes`, among those measured at both sizes and available
/// now. `None` when `bytes` is not strictly between the two sizes, or when the upper bucket's
/// winner was not measured at both (its line is unknown, so nothing can be said to beat it).
fn interpolated_best(
    lower: &DispatchRow,
    upper: &DispatchRow,
    bytes: usize,
    available: &dyn Fn(Impl) -> bool,
) -> Option<(Impl, f64)> {
    // The last bucket reaches to usize::MAX: its times were measured at some size below that,
    // which the row does not record, so there is no line to draw.
    if !(lower.max_bytes < bytes && bytes < upper.max_bytes) || upper.max_bytes == usize::MAX {
        return None;
    }
    let has_best = |r: &DispatchRow| {
        r.measured_us
            .keys()
            .any(|k| k.parse::<Impl>() == Ok(upper.best))
    };
    if !(has_best(lower) && has_best(upper)) {
        return None;
    }
    let t = (bytes - lower.max_bytes) as f64 / (upper.max_bytes - lower.max_bytes) as f64;
    let lines = upper.measured_us.iter().filter_map(|(name, &hi)| {
        let imp: Impl = name.parse().ok()?;
        let lo = *lower.measured_us.get(name)?;
        // Neither `auto` nor the explicit-only hierarchical all-reduce is a choice here.
        (!matches!(imp, Impl::Auto | Impl::Hierarchical)
            && available(imp)
            && lo.is_finite()
            && hi.is_finite())
        .then_some((imp, lo + (hi - lo) * t))
    });
    let fastest = lines.clone().min_by(|a, b| a.1.total_cmp(&b.1))?;
    // The tuner's rule (bench::tune_table): our kernels replace NCCL only where they win by more
    // than 3 %, the noise of a measurement.
    let nccl = lines
        .filter(|(i, _)| matches!(i, Impl::Regular | Impl::Symmetric))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    Some(match (fastest, nccl) {
        ((Impl::Kernel(_), us), Some(n)) if us >= 0.97 * n.1 => n,
        _ => fastest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Algo;
    use crate::dtype::ReduceOp;

    fn row(max_bytes: usize, best: Impl, stage: bool) -> DispatchRow {
        DispatchRow {
            op: "all_reduce".into(),
            dtype: DType::BF16,
            world: 2,
            max_bytes,
            mode: None,
            domains: 1,
            best,
            stage,
            measured_us: BTreeMap::new(),
        }
    }

    fn table() -> DispatchTable {
        DispatchTable {
            source: "test".into(),
            device: "test".into(),
            backend: BackendKind::Cuda,
            rows: vec![
                row(1 << 20, Impl::Symmetric, false),
                row(64 << 10, Impl::Kernel(Algo::OneShot), true),
                row(usize::MAX, Impl::Regular, false),
            ],
            norm_rows: Vec::new(),
        }
    }

    const AR: Collective = Collective::AllReduce(ReduceOp::Sum);

    #[test]
    fn lookup_picks_the_smallest_covering_bucket() {
        let t = table();
        assert_eq!(
            t.lookup(AR, DType::BF16, 2, 2048, Mode::Graph)
                .unwrap()
                .max_bytes,
            64 << 10
        );
        assert_eq!(
            t.lookup(AR, DType::BF16, 2, 64 << 10, Mode::Graph)
                .unwrap()
                .max_bytes,
            64 << 10
        );
        assert_eq!(
            t.lookup(AR, DType::BF16, 2, (64 << 10) + 1, Mode::Graph)
                .unwrap()
                .max_bytes,
            1 << 20
        );
        assert_eq!(
            t.lookup(AR, DType::BF16, 2, 1 << 30, Mode::Graph)
                .unwrap()
                .best,
            Impl::Regular
        );
        assert!(t.lookup(AR, DType::F32, 2, 2048, Mode::Graph).is_none());
        assert!(t.lookup(AR, DType::BF16, 4, 2048, Mode::Graph).is_none());
        assert!(
            t.lookup(Collective::AllGather, DType::BF16, 2, 2048, Mode::Graph)
                .is_none()
        );
    }

    #[test]
    fn rows_of_a_mode_win_in_that_mode() {
        let mut t = table();
        let mut eager = row(1 << 30, Impl::Regular, false);
        eager.mode = Some(Mode::Eager);
        t.rows.push(eager);
        let e = t.lookup(AR, DType::BF16, 2, 2048, Mode::Eager).unwrap();
        assert_eq!((e.best, e.mode), (Impl::Regular, Some(Mode::Eager)));
        let g = t.lookup(AR, DType::BF16, 2, 2048, Mode::Graph).unwrap();
        assert_eq!(
            (g.best, g.max_bytes),
            (Impl::Kernel(Algo::OneShot), 64 << 10)
        );
    }

    /// Two buckets measured as on 2×H200 (reduce-scatter, graph): LL wins at 512 KiB, one-shot
    /// by a hair at 1 MiB, LL not measured above 512 KiB... except here, where it is.
    fn crossing_table() -> DispatchTable {
        let measured = |v: &[(&str, f64)]| -> BTreeMap<String, f64> {
            v.iter().map(|(k, us)| (k.to_string(), *us)).collect()
        };
        let mut lower = row(512 << 10, Impl::Kernel(Algo::LowLatency), false);
        lower.measured_us = measured(&[
            ("ll", 4.91),
            ("oneshot", 5.64),
            ("nccl", 7.7),
            ("auto_plain", 5.0),
        ]);
        let mut upper = row(1 << 20, Impl::Kernel(Algo::OneShot), false);
        upper.measured_us = measured(&[
            ("ll", 6.54),
            ("oneshot", 6.53),
            ("nccl", 9.74),
            ("twoshot", 1.0), // measured at one size only: never interpolated
        ]);
        DispatchTable {
            source: "test".into(),
            device: "test".into(),
            backend: BackendKind::Cuda,
            rows: vec![upper, lower],
            norm_rows: Vec::new(),
        }
    }

    fn norm_row(op: &str, max_bytes: usize, mode: Option<Mode>, best: NormBest) -> NormRow {
        NormRow {
            op: op.into(),
            dtype: DType::BF16,
            world: 2,
            max_bytes,
            mode,
            best,
            measured_us: BTreeMap::new(),
        }
    }

    #[test]
    fn norm_rows_are_looked_up_by_op_size_and_mode_and_checked() {
        let ar = "all_reduce_add_rmsnorm";
        let mut t = table();
        t.norm_rows = vec![
            norm_row(ar, usize::MAX, None, NormBest::Unfused),
            norm_row(ar, 64 << 10, Some(Mode::Graph), NormBest::FusedLl),
            norm_row(ar, usize::MAX, Some(Mode::Graph), NormBest::FusedOneshot),
        ];
        t.validate().unwrap();
        let best = |bytes, mode| {
            t.lookup_norm(ar, DType::BF16, 2, bytes, mode)
                .map(|r| r.best)
        };
        assert_eq!(best(8192, Mode::Graph), Some(NormBest::FusedLl));
        assert_eq!(best(1 << 20, Mode::Graph), Some(NormBest::FusedOneshot));
        assert_eq!(best(8192, Mode::Eager), Some(NormBest::Unfused));
        assert_eq!(t.lookup_norm(ar, DType::F16, 2, 8192, Mode::Graph), None);
        assert_eq!(
            t.lookup_norm(
                "reduce_scatter_add_rmsnorm",
                DType::BF16,
                2,
                8192,
                Mode::Graph
            ),
            None
        );
        // Serialised and read back, the norm rows come too; a table without them still reads.
        let back: DispatchTable =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let old: DispatchTable =
            serde_json::from_str(&serde_json::to_string(&table()).unwrap()).unwrap();
        assert!(old.norm_rows.is_empty());
        for (bad, why) in [
            (
                norm_row("ar_rmsnorm", 1, None, NormBest::Unfused),
                "unknown op",
            ),
            (
                norm_row(
                    "reduce_scatter_add_rmsnorm",
                    1,
                    None,
                    NormBest::FusedTwoshot,
                ),
                "two-shot",
            ),
            (
                NormRow {
                    world: 1,
                    ..norm_row(ar, 1, None, NormBest::Nccl)
                },
                "2 or more ranks",
            ),
        ] {
            let mut t = table();
            t.norm_rows = vec![bad];
            let e = t.validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        for b in [
            NormBest::FusedLl,
            NormBest::FusedOneshot,
            NormBest::FusedTwoshot,
            NormBest::Unfused,
            NormBest::Nccl,
        ] {
            assert_eq!(NormBest::from_name(b.name()), Some(b));
            assert_eq!(NormBest::from_name(&format!("host_{}", b.name())), Some(b));
        }
        assert_eq!(NormBest::from_name("host"), Some(NormBest::Nccl));
        assert_eq!(NormBest::from_name("fused"), None);
    }

    fn decide_ar(
        t: &DispatchTable,
        bytes: usize,
        both: bool,
        available: &dyn Fn(Impl) -> bool,
    ) -> Decision {
        decide(
            Some(t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes,
                input_in_window: both,
                output_in_window: both,
                can_stage: true,
            },
            available,
        )
    }

    #[test]
    fn between_buckets_the_interpolated_fastest_runs() {
        let t = crossing_table();
        let all = |_: Impl| true;
        // 896 KiB: LL 4.91 + 0.75 * 1.63 = 6.13 us, one-shot 5.64 + 0.75 * 0.89 = 6.31 us.
        let d = decide_ar(&t, 896 << 10, true, &all);
        assert_eq!(d.imp, Impl::Kernel(Algo::LowLatency), "{}", d.why);
        assert!(d.why.to_string().contains("interpolated"), "{}", d.why);
        // At the top of the bucket the measured winner runs.
        let d = decide_ar(&t, 1 << 20, true, &all);
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot), "{}", d.why);
        // An implementation measured at one of the two sizes only is never picked (twoshot),
        // and a bucket whose winner has no line is not interpolated.
        assert_ne!(
            decide_ar(&t, 900 << 10, true, &all).imp,
            Impl::Kernel(Algo::TwoShot)
        );
        let mut only_top = crossing_table();
        only_top.rows[0].best = Impl::Kernel(Algo::TwoShot);
        let d = decide_ar(&only_top, 896 << 10, true, &all);
        assert_eq!(d.imp, Impl::Kernel(Algo::TwoShot), "{}", d.why);
        // Not available now (say, LL beyond its slot): the next fastest line.
        let no_ll = |i: Impl| i != Impl::Kernel(Algo::LowLatency);
        let d = decide_ar(&t, 896 << 10, true, &no_ll);
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot), "{}", d.why);
        // In the lowest bucket there is nothing to interpolate from: its winner runs.
        let d = decide_ar(&t, 300 << 10, true, &all);
        assert_eq!(d.imp, Impl::Kernel(Algo::LowLatency), "{}", d.why);
        assert!(!d.why.to_string().contains("interpolated"), "{}", d.why);
        // Plain buffers keep the bucket's rule (staging is decided for its winner only).
        let d = decide_ar(&t, 896 << 10, false, &all);
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot), "{}", d.why);
    }

    #[test]
    fn interpolation_can_choose_the_regular_path() {
        let mut t = crossing_table();
        // NCCL's line falls below both kernels' inside the bucket: at 1000 KiB it is at 5.13 us,
        // LL at 6.46 us.
        t.rows[0].measured_us.insert("nccl".into(), 5.0);
        let d = decide_ar(&t, 1000 << 10, true, &|_| true);
        assert_eq!(d.imp, Impl::Regular, "{}", d.why);
        // A kernel within 3 % of NCCL's line does not replace it (the tuner's rule): NCCL at
        // 6.25 us against LL's 6.13 us at 896 KiB.
        let mut t = crossing_table();
        t.rows[0].measured_us.insert("nccl".into(), 6.42);
        t.rows[1].measured_us.insert("nccl".into(), 5.75);
        let d = decide_ar(&t, 896 << 10, true, &|_| true);
        assert_eq!(d.imp, Impl::Regular, "{}", d.why);
    }

    #[test]
    fn the_open_ended_bucket_is_not_interpolated() {
        let mut t = crossing_table();
        t.rows[0].max_bytes = usize::MAX;
        // LL would win on a line to usize::MAX; the bucket's measured winner runs instead.
        let d = decide_ar(&t, 896 << 10, true, &|_| true);
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot), "{}", d.why);
    }

    #[test]
    fn decisions() {
        let t = table();
        let all = |_: Impl| true;
        // both symmetric, small: own kernel
        let d = decide(
            Some(&t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: true,
                output_in_window: true,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot));
        assert!(!d.stage_input && !d.stage_output);
        // plain input, small: our kernels push from any memory, nothing to stage
        let d = decide(
            Some(&t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: false,
                output_in_window: false,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(
            (d.imp, d.stage_input, d.stage_output),
            (Impl::Kernel(Algo::OneShot), false, false)
        );
        // NCCL's symmetric path on plain memory: staging wins per the row...
        let mut st = table();
        st.rows[1].best = Impl::Symmetric;
        let d = decide(
            Some(&st),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: false,
                output_in_window: true,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(
            (d.imp, d.stage_input, d.stage_output),
            (Impl::Symmetric, true, false)
        );
        // ...but not when no scratch window can be had now
        let d = decide(
            Some(&st),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: false,
                output_in_window: true,
                can_stage: false,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        // the copy engine needs only the output in a window
        st.rows[1].best = Impl::Kernel(Algo::CopyEngine);
        let d = decide(
            Some(&st),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: false,
                output_in_window: false,
                can_stage: true,
            },
            &all,
        );
        assert_eq!((d.stage_input, d.stage_output), (false, true));
        // plain input, medium: staging loses
        let d = decide(
            Some(&t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 512 << 10,
                input_in_window: false,
                output_in_window: false,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        assert!(d.why.to_string().contains("loses"), "{}", d.why);
        // large: regular even with windows
        let d = decide(
            Some(&t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 64 << 20,
                input_in_window: true,
                output_in_window: true,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        // own kernel unavailable: fall back to the symmetric path
        let no_kernel = |i: Impl| !matches!(i, Impl::Kernel(_));
        let d = decide(
            Some(&t),
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 4096,
                input_in_window: true,
                output_in_window: true,
                can_stage: true,
            },
            &no_kernel,
        );
        assert_eq!(d.imp, Impl::Symmetric);
    }

    #[test]
    fn without_a_table_nccl_rules_apply() {
        let all = |_: Impl| true;
        let d = decide(
            None,
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 1 << 30,
                input_in_window: true,
                output_in_window: true,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Symmetric);
        let d = decide(
            None,
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 1024,
                input_in_window: true,
                output_in_window: false,
                can_stage: true,
            },
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        let none = |i: Impl| i == Impl::Regular;
        let d = decide(
            None,
            &DispatchRequest {
                mode: Mode::Graph,
                coll: AR,
                dtype: DType::BF16,
                world: 2,
                bytes: 1024,
                input_in_window: true,
                output_in_window: true,
                can_stage: true,
            },
            &none,
        );
        assert_eq!(d.imp, Impl::Regular);
    }

    #[test]
    fn the_builtin_tables_parse_and_cover_every_op() {
        for world in [2, 4, 8] {
            let t = DispatchTable::builtin(BackendKind::Cuda, "NVIDIA H200 (cuda:0, sm_90)", world)
                .unwrap_or_else(|| panic!("the {world}xH200 table parses"));
            assert!(t.source.contains(&format!("h200x{world}")), "{}", t.source);
            for op in ["all_reduce", "all_gather", "reduce_scatter"] {
                for mode in [Mode::Eager, Mode::Graph] {
                    assert!(
                        t.rows.iter().any(|r| r.op == op
                            && r.mode == Some(mode)
                            && r.max_bytes == usize::MAX
                            && r.world == world),
                        "{world} ranks: {op} {mode:?} has no open-ended row"
                    );
                }
            }
        }
        assert!(DispatchTable::builtin(BackendKind::Cuda, "NVIDIA H100", 2).is_none());
        assert!(DispatchTable::builtin(BackendKind::Host, "NVIDIA H200", 2).is_none());
        assert!(DispatchTable::builtin(BackendKind::Cuda, "NVIDIA H200", 3).is_none());
    }

    #[test]
    fn across_domains_nccl_decides_and_says_why() {
        let req = |both| DispatchRequest {
            mode: Mode::Graph,
            coll: AR,
            dtype: DType::BF16,
            world: 4,
            bytes: 4096,
            input_in_window: both,
            output_in_window: both,
            can_stage: true,
        };
        let d = decide_cross_domain(None, &req(true), 2, &|_| true);
        assert_eq!(
            (d.imp, d.stage_input, d.stage_output),
            (Impl::Symmetric, false, false)
        );
        let why = d.why.to_string();
        assert!(
            why.contains("spans 2 NVLink domains") && why.contains("symmetric"),
            "{why}"
        );
        let d = decide_cross_domain(None, &req(false), 2, &|_| true);
        assert_eq!(d.imp, Impl::Regular);
        assert!(d.why.to_string().contains("not both buffers"), "{}", d.why);
        // Windows NCCL refused: the symmetric path is unavailable, the regular one runs.
        let d = decide_cross_domain(None, &req(true), 3, &|i| i != Impl::Symmetric);
        assert_eq!(d.imp, Impl::Regular);
        assert!(d.why.to_string().contains("unavailable"), "{}", d.why);
        // A table row for groups across 2 domains: NCCL's regular path was faster up to 8 KiB,
        // the symmetric one above; rows inside one domain never apply across hosts.
        let mut t = table();
        t.rows.clear();
        for (max_bytes, best) in [(8192, Impl::Regular), (usize::MAX, Impl::Symmetric)] {
            t.rows.push(DispatchRow {
                world: 4,
                domains: 2,
                ..row(max_bytes, best, false)
            });
        }
        t.rows.push(DispatchRow {
            world: 4,
            ..row(usize::MAX, Impl::Kernel(Algo::OneShot), false)
        });
        t.validate().unwrap();
        let d = decide_cross_domain(Some(&t), &req(true), 2, &|_| true);
        assert_eq!(d.imp, Impl::Regular);
        assert!(
            d.why
                .to_string()
                .contains("the table's fastest path up to 8192 B"),
            "{}",
            d.why
        );
        let big = DispatchRequest {
            bytes: 1 << 20,
            ..req(true)
        };
        let d = decide_cross_domain(Some(&t), &big, 2, &|_| true);
        assert_eq!(d.imp, Impl::Symmetric, "{}", d.why);
        // The row's symmetric path where the buffers are not in windows: the regular one.
        let d = decide_cross_domain(
            Some(&t),
            &DispatchRequest {
                bytes: 1 << 20,
                ..req(false)
            },
            2,
            &|_| true,
        );
        assert_eq!(d.imp, Impl::Regular, "{}", d.why);
        // A row naming the hierarchical all-reduce: run where ready, else NCCL's path.
        let mut h = t.clone();
        h.rows[1].best = Impl::Hierarchical;
        h.validate().unwrap();
        let d = decide_cross_domain(Some(&h), &big, 2, &|_| true);
        assert_eq!(d.imp, Impl::Hierarchical, "{}", d.why);
        assert!(
            d.why.to_string().contains("hierarchical all-reduce"),
            "{}",
            d.why
        );
        let d = decide_cross_domain(Some(&h), &big, 2, &|i| i != Impl::Hierarchical);
        assert_eq!(d.imp, Impl::Symmetric, "{}", d.why);
        // 3 domains: no row, NCCL's rule.
        let d = decide_cross_domain(Some(&t), &req(true), 3, &|_| true);
        assert_eq!(d.imp, Impl::Symmetric);
        assert!(!d.why.to_string().contains("table"), "{}", d.why);
        // A cross-domain row may name only NCCL's paths, unstaged.
        for bad in [
            DispatchRow {
                domains: 2,
                ..row(1, Impl::Kernel(Algo::LowLatency), false)
            },
            DispatchRow {
                domains: 2,
                ..row(1, Impl::Symmetric, true)
            },
            DispatchRow {
                domains: 0,
                ..row(1, Impl::Regular, false)
            },
            DispatchRow {
                op: "all_gather".into(),
                domains: 2,
                ..row(1, Impl::Hierarchical, false)
            },
        ] {
            let mut t = table();
            t.rows = vec![bad];
            assert!(t.validate().is_err());
        }
    }

    #[test]
    fn hierarchical_stays_out_of_tables_and_interpolation() {
        let mut t = table();
        t.rows[0].best = Impl::Hierarchical;
        let e = t.validate().unwrap_err();
        assert!(e.contains("kept out of auto"), "{e}");
        // Measured and faster on the line between two buckets, it is still never chosen.
        let mut t = crossing_table();
        t.rows[0].measured_us.insert("hierarchical".into(), 0.1);
        t.rows[1].measured_us.insert("hierarchical".into(), 0.1);
        let d = decide_ar(&t, 896 << 10, true, &|_| true);
        assert_ne!(d.imp, Impl::Hierarchical, "{}", d.why);
    }

    #[test]
    fn table_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        let t = table();
        t.save(&p).unwrap();
        assert_eq!(DispatchTable::load(&p).unwrap(), t);
        std::fs::write(&p, r#"{"source":"x","device":"d","backend":"cuda","rows":[{"op":"all_reduce","dtype":"bf16","world":2,"max_bytes":1,"best":"auto"}]}"#).unwrap();
        assert!(matches!(DispatchTable::load(&p), Err(Error::Table { .. })));
        std::fs::write(&p, "not json").unwrap();
        assert!(matches!(DispatchTable::load(&p), Err(Error::Table { .. })));
    }
}
