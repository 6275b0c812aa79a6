//! `Nccl::load_from` against fake NCCL libraries built at test time: versions, missing symbols,
//! and calls through the function table.

mod common;

use std::ffi::{CString, c_int, c_void};
use std::path::Path;
use std::ptr;

use common::{FAKE_COMM, FAKE_STREAM, FAKE_USER_PTR, build_fake, have_cc};
use nccl_sys::{
    Config, DataType, LoadError, Nccl, NcclComm, NcclResult, NcclWindow, RedOp, UniqueId, Version,
    WIN_COLL_SYMMETRIC,
};

/// The required functions the brief names, listed independently of the crate's table.
const EXPECTED_REQUIRED: [&str; 26] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommInitRankConfig",
    "ncclCommSplit",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclCommGetAsyncError",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclCommCount",
    "ncclCommCuDevice",
    "ncclCommUserRank",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclAllReduce",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclBroadcast",
    "ncclSend",
    "ncclRecv",
    "ncclMemAlloc",
    "ncclMemFree",
    "ncclCommWindowRegister",
    "ncclCommWindowDeregister",
];

#[test]
fn symbol_lists_are_the_expected_ones() {
    let mut required = Nccl::REQUIRED_SYMBOLS.to_vec();
    let mut expected = EXPECTED_REQUIRED.to_vec();
    required.sort_unstable();
    expected.sort_unstable();
    assert_eq!(required, expected);
    assert_eq!(
        Nccl::OPTIONAL_SYMBOLS,
        [
            "ncclWinGetUserPtr",
            "ncclCommQueryProperties",
            "ncclCommShrink"
        ]
    );
}

#[test]
fn loads_a_complete_fake() {
    if !have_cc("loads_a_complete_fake") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = build_fake(dir.path(), "libnccl.so.2", &[]);
    let nccl = Nccl::load_from(&path).expect("the fake is a complete NCCL 2.28.9");

    assert_eq!(nccl.version(), Version::new(2, 28, 9));
    assert_eq!(nccl.path(), path);
    for symbol in Nccl::REQUIRED_SYMBOLS {
        assert!(nccl.has_symbol(symbol), "{symbol}");
    }
    for symbol in Nccl::OPTIONAL_SYMBOLS {
        assert!(!nccl.has_symbol(symbol), "{symbol}");
    }
    assert!(!nccl.has_symbol("ncclNoSuchFunction"));
    let mut user_ptr = ptr::null_mut();
    // SAFETY: the optional function is absent, so nothing is called.
    let result =
        unsafe { nccl.win_get_user_ptr(FAKE_COMM as NcclComm, ptr::null_mut(), &mut user_ptr) };
    assert_eq!(result, None);
    let shown = format!("{nccl:?}");
    assert!(
        shown.contains("minor: 28") && shown.contains("libnccl.so.2"),
        "{shown}"
    );
}

#[test]
fn an_optional_symbol_is_found_and_called_when_present() {
    if !have_cc("an_optional_symbol_is_found_and_called_when_present") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = build_fake(
        dir.path(),
        "libnccl.so.2",
        &["WITH_OPTIONAL", "FAKE_VERSION=22902"],
    );
    let nccl = Nccl::load_from(&path).unwrap();
    assert_eq!(nccl.version().to_string(), "2.29.2");
    assert!(nccl.has_symbol("ncclWinGetUserPtr"));
    assert!(!nccl.has_symbol("ncclCommShrink"));
    let mut user_ptr = ptr::null_mut();
    // SAFETY: the fake only writes `user_ptr`, a valid out-pointer.
    let result =
        unsafe { nccl.win_get_user_ptr(FAKE_COMM as NcclComm, ptr::null_mut(), &mut user_ptr) };
    assert_eq!(result, Some(NcclResult::SUCCESS));
    assert_eq!(user_ptr as usize, FAKE_USER_PTR);
}

#[test]
fn an_old_nccl_is_too_old() {
    if !have_cc("an_old_nccl_is_too_old") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Complete but reporting 2.26.5; then like a real 2.26, without window registration.
    let complete = build_fake(dir.path(), "complete.so", &["FAKE_VERSION=22605"]);
    let realistic = build_fake(
        dir.path(),
        "realistic.so",
        &[
            "FAKE_VERSION=22605",
            "OMIT_ncclCommWindowRegister",
            "OMIT_ncclCommWindowDeregister",
        ],
    );
    for path in [complete, realistic] {
        match Nccl::load_from(&path) {
            Err(LoadError::TooOld {
                path: reported,
                version,
                minimum,
            }) => {
                assert_eq!(reported, path);
                assert_eq!(version, Version::new(2, 26, 5));
                assert_eq!(minimum, Version::new(2, 27, 0));
            }
            other => panic!("expected TooOld for {}, got {other:?}", path.display()),
        }
    }
    let error = Nccl::load_from(&dir.path().join("complete.so")).unwrap_err();
    assert!(error.to_string().contains("2.26.5"), "{error}");
}

#[test]
fn each_missing_required_symbol_is_named() {
    if !have_cc("each_missing_required_symbol_is_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for symbol in Nccl::REQUIRED_SYMBOLS {
        let omit = format!("OMIT_{symbol}");
        let path = build_fake(dir.path(), &format!("lib{symbol}.so"), &[&omit]);
        match Nccl::load_from(&path) {
            Err(error @ LoadError::MissingSymbol { .. }) => {
                let LoadError::MissingSymbol {
                    path: reported,
                    symbol: missing,
                } = &error
                else {
                    unreachable!()
                };
                assert_eq!(missing, symbol);
                assert_eq!(reported, &path);
                assert!(error.to_string().contains(symbol), "{error}");
            }
            other => panic!("expected MissingSymbol({symbol}), got {other:?}"),
        }
    }
}

#[test]
fn a_failing_version_call_is_reported() {
    if !have_cc("a_failing_version_call_is_reported") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = build_fake(dir.path(), "libnccl.so.2", &["FAKE_VERSION_RESULT=3"]);
    match Nccl::load_from(&path) {
        Err(LoadError::VersionCall {
            path: reported,
            code,
        }) => {
            assert_eq!(reported, path);
            assert_eq!(code, NcclResult::INTERNAL_ERROR);
        }
        other => panic!("expected VersionCall, got {other:?}"),
    }
}

#[test]
fn a_file_that_cannot_be_opened_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-libnccl.so.2");
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    for path in [missing, garbage] {
        match Nccl::load_from(&path) {
            Err(error @ LoadError::NotFound { .. }) => {
                let LoadError::NotFound { tried } = &error else {
                    unreachable!()
                };
                assert_eq!(tried.len(), 1);
                assert_eq!(Path::new(&tried[0].0), path);
                assert!(!tried[0].1.is_empty());
                let message = error.to_string();
                assert!(message.contains(&tried[0].0), "{message}");
                assert!(message.contains("SYMMCOMM_NCCL_LIBRARY"), "{message}");
            }
            other => panic!("expected NotFound for {}, got {other:?}", path.display()),
        }
    }
}

#[test]
fn calls_go_through_the_table_with_their_arguments() {
    if !have_cc("calls_go_through_the_table_with_their_arguments") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nccl = Nccl::load_from(&build_fake(dir.path(), "libnccl.so.2", &[])).unwrap();
    let comm = FAKE_COMM as NcclComm;
    let stream = FAKE_STREAM as *mut c_void;
    let (send, recv) = (0x10 as *const c_void, 0x20 as *mut c_void);

    // SAFETY: the fake never dereferences buffers, comms or streams.
    let result =
        unsafe { nccl.all_reduce(send, recv, 42, DataType::FLOAT32, RedOp::AVG, comm, stream) };
    assert_eq!(result, NcclResult(5));
    assert_eq!(result.name(), "ncclInvalidUsage");
    assert_eq!(nccl.error_string(result), "fake: invalid usage");
    assert_eq!(nccl.error_string(NcclResult(99)), "fake: other");
    assert_eq!(NcclResult(99).name(), "unknown(99)");
    // Swapped op and type: the fake sees different arguments.
    // SAFETY: as above.
    let result = unsafe {
        nccl.all_reduce(
            send,
            recv,
            42,
            DataType(RedOp::AVG.0),
            RedOp(7),
            comm,
            stream,
        )
    };
    assert_eq!(result, NcclResult::INVALID_ARGUMENT);

    // SAFETY: null is allowed, and a comm the fake answers with a null string.
    let (message, from_null) = unsafe { (nccl.last_error(ptr::null_mut()), nccl.last_error(comm)) };
    assert_eq!(message, "fake: last error \u{fffd}");
    assert_eq!(from_null, "");

    let mut id = UniqueId::default();
    // SAFETY: `id` is a valid out-pointer.
    assert!(unsafe { nccl.get_unique_id(&mut id) }.is_success());
    assert_eq!(id.internal[3], 22);
    assert_eq!(id.internal[127], (127 * 7 + 1) as u8);

    // A by-value UniqueId reaches C intact.
    let mut id = UniqueId::default();
    id.internal[0] = 0xAB;
    id.internal[127] = 0xCD;
    let mut new_comm: NcclComm = ptr::null_mut();
    // SAFETY: `new_comm` is a valid out-pointer.
    assert!(unsafe { nccl.comm_init_rank(&mut new_comm, 4, id, 3) }.is_success());
    assert_eq!(new_comm as usize, FAKE_COMM);

    // The Config the fake reads field by field with its own C layout.
    let name = CString::new("fake").unwrap();
    let mut config = Config::new(Config::LAYOUT_VERSION);
    config.blocking = 0;
    config.cta_policy = nccl_sys::CTA_POLICY_ZERO;
    config.nvlink_centric_sched = 1;
    config.comm_name = name.as_ptr();
    let mut id = UniqueId::default();
    id.internal[5] = 0xEF;
    let mut new_comm: NcclComm = ptr::null_mut();
    // SAFETY: `config` and `name` outlive the call; `new_comm` is a valid out-pointer.
    let result = unsafe { nccl.comm_init_rank_config(&mut new_comm, 2, id, 1, &mut config) };
    assert_eq!(result, NcclResult::SUCCESS);
    assert_eq!(new_comm as usize, FAKE_COMM);

    let mut child: NcclComm = ptr::null_mut();
    // SAFETY: `child` is a valid out-pointer, the config is null.
    let result = unsafe { nccl.comm_split(comm, 2, 5, &mut child, ptr::null_mut()) };
    assert!(result.is_success());
    assert_eq!(child as usize, 0x1000 + 16 * 2 + 5);
    // SAFETY: as above.
    let result = unsafe {
        nccl.comm_split(
            comm,
            nccl_sys::SPLIT_NOCOLOR,
            0,
            &mut child,
            ptr::null_mut(),
        )
    };
    assert!(result.is_success());
    assert!(child.is_null());

    let (mut count, mut device, mut rank): (c_int, c_int, c_int) = (-1, -1, -1);
    let mut async_error = NcclResult(-1);
    // SAFETY: every out-pointer is a live local.
    unsafe {
        assert!(nccl.comm_count(comm, &mut count).is_success());
        assert!(nccl.comm_cu_device(comm, &mut device).is_success());
        assert!(nccl.comm_user_rank(comm, &mut rank).is_success());
        assert!(
            nccl.comm_get_async_error(comm, &mut async_error)
                .is_success()
        );
    }
    assert_eq!((count, device, rank), (4, 6, 3));
    assert_eq!(async_error, NcclResult::IN_PROGRESS);

    let mut buffer = ptr::null_mut();
    let mut window: NcclWindow = ptr::null_mut();
    // SAFETY: the fake allocates host memory for `buffer` and frees it once.
    unsafe {
        assert!(nccl.mem_alloc(&mut buffer, 4096).is_success());
        assert!(!buffer.is_null());
        let result = nccl.comm_window_register(comm, buffer, 4096, &mut window, WIN_COLL_SYMMETRIC);
        assert!(result.is_success());
        assert_eq!(window.cast::<c_void>(), buffer);
        assert!(nccl.comm_window_deregister(comm, window).is_success());
        assert!(nccl.mem_free(buffer).is_success());
        assert!(nccl.group_start().is_success());
        assert!(nccl.group_end().is_success());
        assert!(nccl.comm_finalize(comm).is_success());
        assert!(nccl.comm_destroy(comm).is_success());
        assert_eq!(
            nccl.comm_abort(ptr::null_mut()),
            NcclResult::INVALID_ARGUMENT
        );
    }
}
