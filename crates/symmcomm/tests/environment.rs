//! What the machine lacks is a clear error, never a crash or a hang: no GPU (the CUDA backend
//! asked for where the driver sees none), the NCCL library missing, or a file that is not a
//! library where `SYMMCOMM_NCCL_LIBRARY` points. (A library too old, or lacking a symbol, is
//! tested against fake libraries in nccl-sys's tests/loader.rs.)
//!
//! Each case runs in a child process (this binary again, `SYMMCOMM_TEST_CHILD=start`), because
//! the CUDA driver and the NCCL loader read their environment once per process.

mod common;

use std::time::{Duration, Instant};

use common::procs::{self, after};
use symmcomm::{BackendChoice, Bootstrap, CommConfig, Communicator, Error};

const ROLE: &str = "SYMMCOMM_TEST_CHILD";

/// A one-rank CUDA communicator; prints `RESULT <variant> <message>`.
#[test]
fn child_start() {
    if std::env::var(ROLE).as_deref() != Ok("start") {
        return;
    }
    let boot = Bootstrap::threads(1, Duration::from_secs(10)).remove(0);
    let cfg = CommConfig {
        backend: BackendChoice::Cuda,
        ..CommConfig::default()
    };
    match Communicator::new(boot, cfg) {
        Ok(c) => println!("RESULT Ok {}", c.describe()),
        Err(e) => {
            let v = match &e {
                Error::NoGpu { .. } => "NoGpu",
                Error::NcclLoad(_) => "NcclLoad",
                _ => "Other",
            };
            println!("RESULT {v} {}", e.to_string().replace('\n', " | "));
        }
    }
}

fn start_with(env: &[(&str, String)]) -> (String, String) {
    let mut all = vec![(ROLE, "start".to_string())];
    all.extend(env.iter().cloned());
    let p = procs::spawn("start", "child_start", &all);
    let out = p.finish(Instant::now() + Duration::from_secs(60));
    let res = out
        .iter()
        .find_map(|l| after(l, "RESULT "))
        .unwrap_or_else(|| panic!("no RESULT; output:\n{}", out.join("\n")));
    let (v, m) = res.split_once(' ').unwrap_or((res, ""));
    println!("{v}: {m}");
    (v.to_string(), m.to_string())
}

/// Whether the CUDA driver sees a GPU here (no NCCL needed to know).
fn driver_sees_gpus() -> bool {
    symmcomm::info::gpus().is_ok_and(|g| !g.is_empty())
}

#[test]
fn no_gpu_is_a_clear_error() {
    let (v, m) = start_with(&[("CUDA_VISIBLE_DEVICES", String::new())]);
    assert_eq!(v, "NoGpu", "{m}");
    assert!(m.starts_with("no usable GPU"), "{m}");
}

/// Where the driver sees no GPU, the NCCL cases can only report that; with GPUs they must name
/// the library.
fn expect_nccl_error(v: &str, m: &str, path: &str) {
    if driver_sees_gpus() {
        assert_eq!(v, "NcclLoad", "{m}");
        assert!(m.contains(path), "the error names the library path: {m}");
    } else {
        eprintln!("note: no GPU here, so the driver check answers first: {m}");
        assert_eq!(v, "NoGpu", "{m}");
    }
}

#[test]
fn nccl_library_missing_is_a_clear_error() {
    let path = "/nonexistent/symmcomm-test/libnccl.so.2";
    let (v, m) = start_with(&[("SYMMCOMM_NCCL_LIBRARY", path.into())]);
    expect_nccl_error(&v, &m, path);
}

#[test]
fn nccl_library_that_is_not_a_library_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("libnccl.so.2");
    std::fs::write(&path, b"\x7fELF but not really a shared object").expect("write");
    let path = path.display().to_string();
    let (v, m) = start_with(&[("SYMMCOMM_NCCL_LIBRARY", path.clone())]);
    expect_nccl_error(&v, &m, &path);
}
