//! `Nccl::load` and `SYMMCOMM_NCCL_LIBRARY`. The environment is process-wide, so this binary
//! holds a single test that runs every case in order; the failing cases come first because
//! the first success is cached for the life of the process.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::{build_fake, have_cc};
use nccl_sys::{LIBRARY_ENV_VAR, LoadError, Nccl, SONAMES, Version};

fn set_env(value: impl AsRef<OsStr>) {
    // SAFETY: this is the only test in this binary, so no other thread reads or writes the
    // environment meanwhile.
    unsafe { std::env::set_var(LIBRARY_ENV_VAR, value) };
}

fn remove_env() {
    // SAFETY: as in `set_env`.
    unsafe { std::env::remove_var(LIBRARY_ENV_VAR) };
}

#[test]
fn load_honours_the_environment_then_caches() {
    // Unset (or empty): the sonames, in order. Only checkable where no NCCL is installed,
    // since a successful load would be cached and spoil the cases below.
    let system_has_nccl = SONAMES
        .iter()
        .any(|name| Nccl::load_from(Path::new(name)).is_ok());
    if system_has_nccl {
        eprintln!("skipping the no-variable case: this machine has an NCCL on the search path");
    } else {
        for unset in [None, Some("")] {
            match unset {
                None => remove_env(),
                Some(empty) => set_env(empty),
            }
            match Nccl::load() {
                Err(error @ LoadError::NotFound { .. }) => {
                    let LoadError::NotFound { tried } = &error else {
                        unreachable!()
                    };
                    let names: Vec<&str> = tried.iter().map(|(name, _)| name.as_str()).collect();
                    assert_eq!(names, SONAMES);
                    let message = error.to_string();
                    assert!(message.contains("libnccl.so.2"), "{message}");
                    assert!(message.contains(LIBRARY_ENV_VAR), "{message}");
                }
                other => {
                    panic!("expected NotFound with {LIBRARY_ENV_VAR}={unset:?}, got {other:?}")
                }
            }
        }
    }

    // Relative paths are refused, not searched.
    for relative in ["libnccl.so.2", "./lib/libnccl.so.2"] {
        set_env(relative);
        match Nccl::load() {
            Err(LoadError::RelativePath { path }) => assert_eq!(path, PathBuf::from(relative)),
            other => panic!("expected RelativePath for {relative}, got {other:?}"),
        }
    }

    // A set variable that does not load is the answer: no fallback to the sonames.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnccl.so.2");
    set_env(&missing);
    match Nccl::load() {
        Err(LoadError::NotFound { tried }) => {
            assert_eq!(tried.len(), 1, "{tried:?}");
            assert_eq!(Path::new(&tried[0].0), missing);
        }
        other => panic!("expected NotFound for {}, got {other:?}", missing.display()),
    }

    if !have_cc("the fake-library cases of load_honours_the_environment_then_caches") {
        return;
    }
    let old = build_fake(dir.path(), "libnccl-old.so", &["FAKE_VERSION=22605"]);
    set_env(&old);
    assert!(
        matches!(Nccl::load(), Err(LoadError::TooOld { ref path, .. }) if *path == old),
        "a too-old library named by the variable is an error"
    );

    // The good fake loads, and stays loaded whatever the variable says next.
    let good = build_fake(dir.path(), "libnccl.so.2", &[]);
    set_env(&good);
    let first = Nccl::load().expect("the fake named by the variable");
    assert_eq!(first.path(), good);
    assert_eq!(first.version(), Version::new(2, 28, 9));
    set_env("relative/now");
    let second = Nccl::load().expect("the cached library");
    assert!(std::ptr::eq(first, second));
    remove_env();
}
