//! `symmcomm bench --ops ar_rmsnorm` on the host backend: the all-reduce + add + RMSNorm rows
//! of every default implementation, both modes, every hidden size and token count asked for,
//! each checked, in the results file and in the table.

use std::collections::BTreeSet;
use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_symmcomm");

/// Run `symmcomm args`; its output, and both its streams as one text for messages.
fn symmcomm(args: &[&str]) -> (std::process::Output, String) {
    let out = Command::new(EXE)
        .args(args)
        .output()
        .expect("running symmcomm");
    let shown = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, shown)
}

#[test]
fn bench_measures_and_checks_ar_rmsnorm_rows() {
    let path = std::env::temp_dir().join(format!(
        "symmcomm-bench-ar-rmsnorm-{}.json",
        std::process::id()
    ));
    let (out, shown) = symmcomm(&[
        "bench",
        "--backend",
        "host",
        "--world",
        "2",
        "--ops",
        "ar_rmsnorm",
        "--norm-hiddens",
        "64,4096",
        "--norm-tokens",
        "1,3",
        "--iters",
        "2",
        "--replays",
        "1",
        "--repeats",
        "1",
        "--json",
        path.to_str().expect("a UTF-8 temporary path"),
    ]);
    assert!(out.status.success(), "{shown}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("WRONG"), "{shown}");
    assert!(stdout.contains("host_fused/host_unfused"), "{shown}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the results file"))
            .expect("a results file");
    let _ = std::fs::remove_file(&path);
    let rows = results["rows"].as_array().expect("rows");
    // 2 hidden sizes x 2 token counts x 3 implementations x 2 modes.
    assert_eq!(rows.len(), 24, "{shown}");
    let field = |k: &str| -> BTreeSet<String> {
        rows.iter()
            .map(|r| r[k].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(field("op"), BTreeSet::from(["ar_rmsnorm".to_string()]));
    assert_eq!(
        field("impl"),
        BTreeSet::from(["host", "host_fused", "host_unfused"].map(String::from))
    );
    assert_eq!(
        field("config"),
        BTreeSet::from(["hidden=4096", "hidden=64"].map(String::from))
    );
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["dtype"], "bf16", "{r}");
        let hidden: usize = r["config"].as_str().unwrap()[7..].parse().unwrap();
        let tokens = r["bytes"].as_u64().unwrap() as usize / (2 * hidden);
        assert!(tokens == 1 || tokens == 3, "{r}");
        assert!(
            r["ran"].as_str().is_some_and(|x| x.starts_with("host")),
            "{r}"
        );
    }
}

/// `symmcomm tune --ops ar_rmsnorm` on the host backend: the table gets a norm row per mode and
/// measured size, each naming the fastest of what was measured there, and loads back.
#[test]
fn tune_writes_norm_rows_that_name_the_fastest() {
    let path = std::env::temp_dir().join(format!(
        "symmcomm-tune-ar-rmsnorm-{}.json",
        std::process::id()
    ));
    let (out, shown) = symmcomm(&[
        "tune",
        "--backend",
        "host",
        "--world",
        "2",
        "--ops",
        "all_reduce,ar_rmsnorm",
        "--sizes",
        "2K",
        "--norm-hiddens",
        "64",
        "--norm-tokens",
        "1,2",
        "--iters",
        "2",
        "--replays",
        "1",
        "--repeats",
        "1",
        "--out",
        path.to_str().expect("a UTF-8 temporary path"),
    ]);
    assert!(out.status.success(), "{shown}");
    let table = symmcomm::dispatch::DispatchTable::load(&path).expect("the table loads");
    let _ = std::fs::remove_file(&path);
    // 2 token counts x 2 modes, the larger size of each mode without a bound.
    assert_eq!(table.norm_rows.len(), 4, "{:#?}", table.norm_rows);
    for r in &table.norm_rows {
        assert_eq!(
            (r.op.as_str(), r.world),
            ("all_reduce_add_rmsnorm", 2),
            "{r:?}"
        );
        let fastest = r
            .measured_us
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(name, _)| name.as_str());
        assert_eq!(Some(r.best.name()), fastest, "{r:?}");
        // Every fused kernel the form has, unfused and NCCL's path were measured.
        assert_eq!(r.measured_us.len(), 5, "{r:?}");
    }
    assert!(!table.rows.is_empty(), "the collectives' rows too");
}
