//! What a run reports: the table on stdout, and `engine_step` rows in a results file
//! (`design.md`, "Benchmark results file"), merged into an existing file as `decode-sim` does:
//! its `engine_step` rows replaced, every other row and its provenance kept.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use symmcomm::dispatch::Mode;
use symmcomm::{BackendKind, Communicator, DType, Impl};
use symmcomm_lab::bench::{Meta, Results, Row};

use crate::run::Measure;

/// The `op` of this example's rows.
pub const ENGINE_STEP_OP: &str = "engine_step";

/// Tokens per second of a step of `batch` sequences taking `us`.
fn tokens_per_s(batch: usize, us: f64) -> f64 {
    batch as f64 / (us * 1e-6)
}

/// The printed table: per batch and implementation the median µs per step, tokens/s, the
/// ratio to NCCL's regular path, the check.
pub fn table(measures: &[Measure], backend: BackendKind, tol: f64) -> String {
    let regular = Impl::Regular.name(backend);
    let mut out = format!(
        "{:>5}  {:<10} {:>10} {:>11} {:>8} {:>12}  {:<5}  ran\n",
        "batch",
        "impl",
        "us/step",
        "tokens/s",
        format!("/{regular}"),
        "max rel err",
        "check"
    );
    for m in measures {
        let base = measures
            .iter()
            .find(|b| b.batch == m.batch && b.imp == regular)
            .map(|b| m.us / b.us);
        let _ = writeln!(
            out,
            "{:>5}  {:<10} {:>10.1} {:>11.0} {:>8} {:>12}  {:<5}  {}",
            m.batch,
            m.imp,
            m.us,
            tokens_per_s(m.batch, m.us),
            base.map_or("-".into(), |r| format!("{r:.3}")),
            m.rel_err
                .map_or("not finite".into(), |e| format!("{e:.2e}")),
            if m.ok { "ok" } else { "WRONG" },
            m.ran.join(",")
        );
    }
    let _ = write!(
        out,
        "check: final hidden state of every batch row against the unsharded model, relative L2 \
         error per row <= {tol:.0e}"
    );
    let bf16_tol = crate::check::tolerance(true);
    if tol < bf16_tol && measures.iter().any(|m| m.imp.ends_with("fused")) {
        let _ = write!(
            out,
            " (fused rows: <= {bf16_tol:.0e}, the fused operation rounds to bf16)"
        );
    }
    out
}

/// The results-file rows: `bytes` is the batch size, `us` the slowest rank's median.
pub fn rows(measures: &[Measure], world: usize, backend: BackendKind) -> Vec<Row> {
    let (dtype, mode) = match backend {
        BackendKind::Cuda => (DType::BF16, Mode::Graph),
        BackendKind::Host => (DType::F32, Mode::Eager),
    };
    measures
        .iter()
        .map(|m| Row {
            op: ENGINE_STEP_OP.into(),
            dtype,
            bytes: m.batch,
            world,
            implementation: m.imp.clone(),
            mode,
            us: m.us,
            algbw_gbps: 0.0,
            busbw_gbps: 0.0,
            ok: m.ok,
            ran: Some(m.ran.join(",")),
            wrong: 0,
            config: Some("tp".into()),
        })
        .collect()
}

/// Replace the `engine_step` rows of `results` with `rows`, keeping every other row.
pub fn merge_rows(results: &mut Results, rows: Vec<Row>) {
    results.rows.retain(|r| r.op != ENGINE_STEP_OP);
    results.rows.extend(rows);
}

/// This process's command line, without the launcher's internal flag.
pub fn command_line() -> String {
    std::env::args()
        .filter(|a| a != "--rank-child")
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read `path` if it exists (else start a results file), replace its `engine_step` rows, write
/// it back through a temporary file.
pub fn write_json(path: &Path, comm: &Communicator, rows: Vec<Row>) -> Result<()> {
    let command = command_line();
    let mut results = if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", path.display()))?;
        r.meta
            .extra
            .insert("tp_decode_command".into(), serde_json::json!(command));
        r
    } else {
        Results {
            meta: meta(comm, command),
            ..Results::default()
        }
    };
    merge_rows(&mut results, rows);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn meta(comm: &Communicator, command: String) -> Meta {
    Meta::of(comm, env!("TP_DECODE_GIT_COMMIT"), command)
}
