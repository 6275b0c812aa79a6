//! Dispatch: which implementation `auto` runs for (op, dtype, bytes, world), read from a
//! measured table (`symmcomm tune` writes it; a built-in one ships for 2×H200). Without a row
//! NCCL's own rule applies: the symmetric path when both buffers are in windows, else the
//! regular one. A decision always carries the reason, which the trace prints.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{BackendKind, Collective, Impl};
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
}

/// What `auto` decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The implementation to run.
    pub imp: Impl,
    /// Copy a plain input into a window first.
    pub stage_input: bool,
    /// Run into a window and copy out to a plain output.
    pub stage_output: bool,
    /// Why, in words.
    pub reason: String,
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

    /// Check that rows are usable: known ops, world ≥ 1, `auto` never a row's choice.
    pub fn validate(&self) -> std::result::Result<(), String> {
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
        }
        Ok(())
    }

    /// The row covering `bytes` in `mode` (rows measured in that mode first, then rows for
    /// both modes), if any.
    pub fn lookup(
        &self,
        coll: Collective,
        dtype: DType,
        world: usize,
        bytes: usize,
        mode: Mode,
    ) -> Option<&DispatchRow> {
        let covering = |m: Option<Mode>| {
            self.rows
                .iter()
                .filter(|r| {
                    r.op == coll.name()
                        && r.dtype == dtype
                        && r.world == world
                        && bytes <= r.max_bytes
                        && r.mode == m
                })
                .min_by_key(|r| r.max_bytes)
        };
        covering(Some(mode)).or_else(|| covering(None))
    }

    /// The table shipped for a device, if one was measured for it: 2 and 4 H200s (written by
    /// `symmcomm tune` on the GPU machines; see BENCHMARKS.md).
    pub fn builtin(backend: BackendKind, device: &str, world: usize) -> Option<Self> {
        const H200X2: &str = include_str!("../tables/h200x2.json");
        const H200X4: &str = include_str!("../tables/h200x4.json");
        if backend != BackendKind::Cuda || !device.contains("H200") {
            return None;
        }
        let (name, json) = match world {
            2 => ("h200x2", H200X2),
            4 => ("h200x4", H200X4),
            _ => return None,
        };
        let mut t: DispatchTable = serde_json::from_str(json).ok()?;
        if t.rows.iter().any(|r| r.world != world) {
            return None;
        }
        t.source = format!("builtin {name} ({})", t.source);
        t.validate().ok()?;
        Some(t)
    }
}

/// Decide what `auto` runs. `input_symm`/`output_symm` say whether each buffer lies in this
/// group's windows; `can_stage` whether scratch windows can be had now (not when capture
/// would have to grow the pool, not when the group's policy forbids symmetric memory);
/// `available` whether the backend can run an implementation for this call.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    table: Option<&DispatchTable>,
    mode: Mode,
    coll: Collective,
    dtype: DType,
    world: usize,
    bytes: usize,
    input_symm: bool,
    output_symm: bool,
    can_stage: bool,
    available: &dyn Fn(Impl) -> bool,
) -> Decision {
    let both = input_symm && output_symm;
    let regular = |reason: String| Decision {
        imp: Impl::Regular,
        stage_input: false,
        stage_output: false,
        reason,
    };
    let Some(row) = table.and_then(|t| t.lookup(coll, dtype, world, bytes, mode)) else {
        return if both && available(Impl::Symmetric) {
            Decision {
                imp: Impl::Symmetric,
                stage_input: false,
                stage_output: false,
                reason: "no table row: NCCL's rule, both buffers in windows".into(),
            }
        } else {
            regular(format!(
                "no table row: NCCL's rule, {} in a window",
                if both {
                    "symmetric path unavailable though both are"
                } else {
                    "not both buffers"
                }
            ))
        };
    };
    let best = if available(row.best) {
        row.best
    } else if available(Impl::Symmetric) {
        Impl::Symmetric
    } else {
        Impl::Regular
    };
    if best == Impl::Regular {
        return regular(format!(
            "table: regular path is fastest up to {} B",
            row.max_bytes
        ));
    }
    let stage_input = best.needs_input_window() && !input_symm;
    let stage_output = best.needs_output_window() && !output_symm;
    if !stage_input && !stage_output {
        return Decision {
            imp: best,
            stage_input: false,
            stage_output: false,
            reason: format!("table: {best:?} is fastest up to {} B", row.max_bytes),
        };
    }
    if row.stage && can_stage {
        return Decision {
            imp: best,
            stage_input,
            stage_output,
            reason: format!(
                "table: staging plain memory into windows and running {best:?} wins up to {} B",
                row.max_bytes
            ),
        };
    }
    regular(if row.stage {
        "plain buffer and no scratch window can be had now (capture, or policy): regular path"
            .into()
    } else {
        format!("plain buffer: staging into a window loses at {bytes} B, regular path")
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

    #[test]
    fn decisions() {
        let t = table();
        let all = |_: Impl| true;
        // both symmetric, small: own kernel
        let d = decide(
            Some(&t),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            true,
            true,
            true,
            &all,
        );
        assert_eq!(d.imp, Impl::Kernel(Algo::OneShot));
        assert!(!d.stage_input && !d.stage_output);
        // plain input, small: our kernels push from any memory, nothing to stage
        let d = decide(
            Some(&t),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            false,
            false,
            true,
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
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            false,
            true,
            true,
            &all,
        );
        assert_eq!(
            (d.imp, d.stage_input, d.stage_output),
            (Impl::Symmetric, true, false)
        );
        // ...but not when no scratch window can be had now
        let d = decide(
            Some(&st),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            false,
            true,
            false,
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        // the copy engine needs only the output in a window
        st.rows[1].best = Impl::Kernel(Algo::CopyEngine);
        let d = decide(
            Some(&st),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            false,
            false,
            true,
            &all,
        );
        assert_eq!((d.stage_input, d.stage_output), (false, true));
        // plain input, medium: staging loses
        let d = decide(
            Some(&t),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            512 << 10,
            false,
            false,
            true,
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        assert!(d.reason.contains("loses"), "{}", d.reason);
        // large: regular even with windows
        let d = decide(
            Some(&t),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            64 << 20,
            true,
            true,
            true,
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        // own kernel unavailable: fall back to the symmetric path
        let no_kernel = |i: Impl| !matches!(i, Impl::Kernel(_));
        let d = decide(
            Some(&t),
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            4096,
            true,
            true,
            true,
            &no_kernel,
        );
        assert_eq!(d.imp, Impl::Symmetric);
    }

    #[test]
    fn without_a_table_nccl_rules_apply() {
        let all = |_: Impl| true;
        let d = decide(
            None,
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            1 << 30,
            true,
            true,
            true,
            &all,
        );
        assert_eq!(d.imp, Impl::Symmetric);
        let d = decide(
            None,
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            1024,
            true,
            false,
            true,
            &all,
        );
        assert_eq!(d.imp, Impl::Regular);
        let none = |i: Impl| i == Impl::Regular;
        let d = decide(
            None,
            Mode::Graph,
            AR,
            DType::BF16,
            2,
            1024,
            true,
            true,
            true,
            &none,
        );
        assert_eq!(d.imp, Impl::Regular);
    }

    #[test]
    fn the_builtin_tables_parse_and_cover_every_op() {
        for world in [2, 4] {
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
        assert!(DispatchTable::builtin(BackendKind::Cuda, "NVIDIA H200", 8).is_none());
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
