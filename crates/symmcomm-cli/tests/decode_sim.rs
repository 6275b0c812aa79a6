//! `symmcomm decode-sim` as a user runs it, on the host backend with the tiny preset: it prints
//! the per-step table, every row (the `dcp` rows' DCP combines included) matches its reference,
//! and `--json` replaces the decode-step rows of an existing results file while keeping every
//! other row and the file's provenance.

use std::process::Command;

fn scratch_file(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "symmcomm-{name}-{}-{nanos}.json",
        std::process::id()
    ))
}

#[test]
fn decode_sim_merges_its_rows_into_a_results_file() {
    let path = scratch_file("decode-sim");
    let old = serde_json::json!({
        "meta": { "gpu": "NVIDIA H200", "gpus": 2, "nccl": "2.28.3", "driver": "x",
                  "commit": "abc", "date": "2026-11-22", "command": "symmcomm bench" },
        "limits": { "p2p_copy_gbps": 1.0, "flag_roundtrip_us": 2.0 },
        "rows": [
            { "op": "all_reduce", "dtype": "bf16", "bytes": 2048, "world": 2, "impl": "nccl",
              "mode": "graph", "us": 9.0, "algbw_gbps": 0.2, "busbw_gbps": 0.2, "ok": true },
            { "op": "decode_step", "dtype": "bf16", "bytes": 999, "world": 2, "impl": "nccl",
              "mode": "graph", "us": 1.0, "algbw_gbps": 0.0, "busbw_gbps": 0.0, "ok": true,
              "config": "tp" }
        ]
    });
    std::fs::write(&path, serde_json::to_string(&old).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symmcomm"))
        .args([
            "decode-sim",
            "--backend",
            "host",
            "--model",
            "tiny",
            "--layers",
            "2",
            "--batch",
            "1,3",
            "--configs",
            "tp,dp_attn,dcp",
            "--json",
        ])
        .arg(&path)
        .output()
        .expect("running symmcomm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("us/step"), "{stdout}");
    let new: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(new["meta"]["command"], "symmcomm bench", "provenance kept");
    assert!(
        new["meta"]["decode_sim_command"]
            .as_str()
            .unwrap()
            .contains("decode-sim")
    );
    let rows = new["rows"].as_array().unwrap();
    assert_eq!(rows[0]["op"], "all_reduce", "other rows kept");
    let steps: Vec<_> = rows.iter().filter(|r| r["op"] == "decode_step").collect();
    // 3 configs × 2 batches × 3 implementations; the old row is gone.
    assert_eq!(steps.len(), 18, "{steps:?}");
    for r in &steps {
        assert_eq!(r["ok"], true, "{r}");
        assert_ne!(r["bytes"], 999);
        assert!(
            matches!(r["config"].as_str(), Some("tp" | "dp_attn" | "dcp")),
            "{r}"
        );
        assert_eq!(r["mode"], "graph");
    }
    // The auto dcp rows say which combine ran: the fused one, on thread ranks.
    let dcp_auto: Vec<_> = steps
        .iter()
        .filter(|r| r["config"] == "dcp" && r["impl"] == "auto")
        .collect();
    assert_eq!(dcp_auto.len(), 2, "{dcp_auto:?}");
    for r in dcp_auto {
        let ran = r["ran"].as_str().unwrap_or_default();
        assert!(
            ran.split(' ').any(|op| op == "dcp_combine:host_fused"),
            "{r}"
        );
    }
    assert!(stdout.contains("dcp_combine:host_fused"), "{stdout}");
}
