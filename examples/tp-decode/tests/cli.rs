//! `tp-decode` as a user runs it without a GPU: the tiny preset on the host backend prints its
//! table, every point passes its check, and `--json` replaces the engine_step rows of an
//! existing results file, keeping its other rows and its provenance. Bad arguments are refused
//! with a message naming what is allowed, before anything starts.

use std::process::{Command, Output};

fn tp_decode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tp-decode"))
        .args(args)
        .output()
        .expect("running tp-decode")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn host_run_merges_its_rows_into_a_results_file() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("results.json");
    let old = serde_json::json!({
        "meta": { "gpu": "NVIDIA H200", "gpus": 2, "nccl": "2.28.3", "driver": "x",
                  "commit": "abc", "date": "2026-11-22", "command": "symmcomm bench" },
        "limits": { "p2p_copy_gbps": 1.0, "flag_roundtrip_us": 2.0 },
        "rows": [
            { "op": "all_reduce", "dtype": "bf16", "bytes": 2048, "world": 2, "impl": "nccl",
              "mode": "graph", "us": 9.0, "algbw_gbps": 0.2, "busbw_gbps": 0.2, "ok": true },
            { "op": "engine_step", "dtype": "bf16", "bytes": 999, "world": 2, "impl": "nccl",
              "mode": "graph", "us": 1.0, "algbw_gbps": 0.0, "busbw_gbps": 0.0, "ok": true }
        ]
    });
    std::fs::write(&path, serde_json::to_string(&old).unwrap()).unwrap();
    let out = tp_decode(&[
        "--backend",
        "host",
        "--preset",
        "tiny",
        "--batch",
        "1,3",
        "--replays",
        "2",
        "--json",
        path.to_str().unwrap(),
    ]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("us/step") && all.contains("tokens/s"), "{all}");
    assert!(!all.contains("WRONG"), "{all}");

    let new: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(new["meta"]["command"], "symmcomm bench", "provenance kept");
    assert!(
        new["meta"]["tp_decode_command"]
            .as_str()
            .unwrap()
            .contains("--preset tiny")
    );
    let rows = new["rows"].as_array().unwrap();
    assert_eq!(rows[0]["op"], "all_reduce", "other rows kept");
    let steps: Vec<_> = rows.iter().filter(|r| r["op"] == "engine_step").collect();
    assert_eq!(steps.len(), 6, "2 batches x 3 implementations: {steps:?}");
    for r in &steps {
        assert_eq!(r["ok"], true, "{r}");
        assert!(matches!(r["bytes"].as_u64(), Some(1 | 3)), "{r}");
        assert!(
            matches!(r["impl"].as_str(), Some("auto" | "host" | "host_fused")),
            "{r}"
        );
        if r["impl"] == "host_fused" {
            let ran = r["ran"].as_str().unwrap();
            assert!(ran.starts_with("host_fused_"), "the fused call ran: {r}");
        }
        assert_eq!(r["world"], 2);
        assert_eq!(r["config"], "tp");
        assert!(r["us"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for (args, expect) in [
        (&["--preset", "llama-70b"][..], "llama-3.1-8b, tiny"),
        (&["--backend", "gpu"], "auto, host, cuda"),
        (&["--batch", "1,0"], "at least 1"),
        (&["--impls", "auto,fast"], "unknown implementation \"fast\""),
        (&["--host-dtype", "f16"], "f32, bf16"),
        (&["--replays", "0"], "at least 1"),
        (&["--layers", "0"], "layers must be at least 1"),
        (&["--context", "100000"], "context 100000"),
        (
            &["--backend", "host", "--preset", "tiny", "--world", "4"],
            "do not split over 4",
        ),
        (
            &["--backend", "host", "--preset", "llama-3.1-8b"],
            "use --preset tiny",
        ),
    ] {
        let out = tp_decode(args);
        let all = text(&out);
        assert!(!out.status.success(), "{args:?} accepted: {all}");
        assert!(all.contains(expect), "{args:?}: {all}");
    }
}
