//! Fake NCCL libraries, compiled at test time with the system C compiler, so the loader can be
//! tested on machines without CUDA or NCCL.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The handle the fake's init functions return, and that its other functions expect.
pub const FAKE_COMM: usize = 0x1234;
/// The stream the fake's `ncclAllReduce` expects.
pub const FAKE_STREAM: usize = 0x5678;
/// The user pointer the fake's `ncclWinGetUserPtr` reports.
pub const FAKE_USER_PTR: usize = 0x9abc;

/// Every function of the fake; each is left out when `OMIT_<name>` is defined. Arguments are
/// checked against the values the tests pass, so a wrong signature or argument order in the
/// table shows up as `ncclInvalidArgument` (4).
const FAKE_FUNCTIONS: &[(&str, &str)] = &[
    (
        "ncclGetVersion",
        "ncclResult_t ncclGetVersion(int *version) {
            if (version == NULL) return 4;
            *version = FAKE_VERSION;
            return FAKE_VERSION_RESULT;
        }",
    ),
    (
        "ncclGetUniqueId",
        "ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
            for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 7 + 1);
            return 0;
        }",
    ),
    (
        "ncclCommInitRank",
        "ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
            if ((unsigned char)id.internal[0] != 0xAB || (unsigned char)id.internal[127] != 0xCD
                || nranks != 4 || rank != 3) return 4;
            *comm = FAKE_COMM;
            return 0;
        }",
    ),
    (
        "ncclCommInitRankConfig",
        "ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id,
                                             int rank, ncclConfig_t *config) {
            if ((unsigned char)id.internal[5] != 0xEF || nranks != 2 || rank != 1) return 4;
            if (config->size != sizeof(ncclConfig_t) || config->magic != 0xcafebeef
                || config->version != 22800 || config->blocking != 0
                || config->cgaClusterSize != INT_MIN || config->netName != NULL
                || config->commName == NULL || strcmp(config->commName, \"fake\") != 0
                || config->CTAPolicy != 2 || config->nvlsCTAs != INT_MIN
                || config->nvlinkCentricSched != 1) return 4;
            *comm = FAKE_COMM;
            return 0;
        }",
    ),
    (
        "ncclCommSplit",
        "ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                                    ncclConfig_t *config) {
            if (comm != FAKE_COMM || config != NULL) return 4;
            *newcomm = color == -1 ? NULL : (ncclComm_t)(0x1000 + 16 * color + key);
            return 0;
        }",
    ),
    (
        "ncclCommFinalize",
        "ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm == FAKE_COMM ? 0 : 4; }",
    ),
    (
        "ncclCommDestroy",
        "ncclResult_t ncclCommDestroy(ncclComm_t comm) { return comm == FAKE_COMM ? 0 : 4; }",
    ),
    (
        "ncclCommAbort",
        "ncclResult_t ncclCommAbort(ncclComm_t comm) { return comm == FAKE_COMM ? 0 : 4; }",
    ),
    (
        "ncclCommGetAsyncError",
        "ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *error) {
            if (comm != FAKE_COMM) return 4;
            *error = 7;
            return 0;
        }",
    ),
    (
        "ncclGetErrorString",
        "const char *ncclGetErrorString(ncclResult_t result) {
            return result == 5 ? \"fake: invalid usage\" : \"fake: other\";
        }",
    ),
    (
        "ncclGetLastError",
        "const char *ncclGetLastError(ncclComm_t comm) {
            return comm == NULL ? \"fake: last error \\xff\" : NULL;
        }",
    ),
    (
        "ncclCommCount",
        "ncclResult_t ncclCommCount(ncclComm_t comm, int *count) {
            if (comm != FAKE_COMM) return 4;
            *count = 4;
            return 0;
        }",
    ),
    (
        "ncclCommCuDevice",
        "ncclResult_t ncclCommCuDevice(ncclComm_t comm, int *device) {
            if (comm != FAKE_COMM) return 4;
            *device = 6;
            return 0;
        }",
    ),
    (
        "ncclCommUserRank",
        "ncclResult_t ncclCommUserRank(ncclComm_t comm, int *rank) {
            if (comm != FAKE_COMM) return 4;
            *rank = 3;
            return 0;
        }",
    ),
    (
        "ncclGroupStart",
        "ncclResult_t ncclGroupStart(void) { return 0; }",
    ),
    (
        "ncclGroupEnd",
        "ncclResult_t ncclGroupEnd(void) { return 0; }",
    ),
    (
        "ncclAllReduce",
        "ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, int datatype,
                                    int op, ncclComm_t comm, void *stream) {
            if (send == (const void *)0x10 && recv == (void *)0x20 && count == 42
                && datatype == 7 && op == 4 && comm == FAKE_COMM && stream == FAKE_STREAM)
                return 5;
            return 4;
        }",
    ),
    (
        "ncclAllGather",
        "ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, int datatype,
                                    ncclComm_t comm, void *stream) { return 0; }",
    ),
    (
        "ncclReduceScatter",
        "ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count, int datatype,
                                        int op, ncclComm_t comm, void *stream) { return 0; }",
    ),
    (
        "ncclBroadcast",
        "ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, int datatype,
                                    int root, ncclComm_t comm, void *stream) { return 0; }",
    ),
    (
        "ncclSend",
        "ncclResult_t ncclSend(const void *send, size_t count, int datatype, int peer,
                               ncclComm_t comm, void *stream) { return 0; }",
    ),
    (
        "ncclRecv",
        "ncclResult_t ncclRecv(void *recv, size_t count, int datatype, int peer,
                               ncclComm_t comm, void *stream) { return 0; }",
    ),
    (
        "ncclMemAlloc",
        "ncclResult_t ncclMemAlloc(void **ptr, size_t size) {
            *ptr = malloc(size);
            return *ptr != NULL ? 0 : 2;
        }",
    ),
    (
        "ncclMemFree",
        "ncclResult_t ncclMemFree(void *ptr) { free(ptr); return 0; }",
    ),
    (
        "ncclCommWindowRegister",
        "ncclResult_t ncclCommWindowRegister(ncclComm_t comm, void *buff, size_t size,
                                             void **win, int flags) {
            if (comm != FAKE_COMM || flags != 1) return 4;
            *win = buff;
            return 0;
        }",
    ),
    (
        "ncclCommWindowDeregister",
        "ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, void *win) { return 0; }",
    ),
    (
        "ncclWinGetUserPtr",
        "#ifdef WITH_OPTIONAL
        ncclResult_t ncclWinGetUserPtr(ncclComm_t comm, void *win, void **out) {
            if (comm != FAKE_COMM) return 4;
            *out = FAKE_USER_PTR;
            return 0;
        }
        #endif",
    ),
];

/// The C source of the fake: the 2.28 declarations it needs, written out by hand, then every
/// function of [`FAKE_FUNCTIONS`] guarded by `OMIT_<name>`.
pub fn fake_source() -> String {
    let mut source = format!(
        "#include <limits.h>
        #include <stddef.h>
        #include <stdlib.h>
        #include <string.h>
        #ifndef FAKE_VERSION
        #define FAKE_VERSION 22809
        #endif
        #ifndef FAKE_VERSION_RESULT
        #define FAKE_VERSION_RESULT 0
        #endif
        #define FAKE_COMM ((ncclComm_t){FAKE_COMM:#x})
        #define FAKE_STREAM ((void *){FAKE_STREAM:#x})
        #define FAKE_USER_PTR ((void *){FAKE_USER_PTR:#x})
        typedef int ncclResult_t;
        typedef void *ncclComm_t;
        typedef struct {{ char internal[128]; }} ncclUniqueId;
        {CONFIG_STRUCT}
        "
    );
    for (name, body) in FAKE_FUNCTIONS {
        source.push_str(&format!("#ifndef OMIT_{name}\n{body}\n#endif\n"));
    }
    source
}

/// `struct ncclConfig_v22800` of NCCL 2.28.3's `nccl.h`, transcribed.
pub const CONFIG_STRUCT: &str = "typedef struct ncclConfig_v22800 {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
    int cgaClusterSize;
    int minCTAs;
    int maxCTAs;
    const char *netName;
    int splitShare;
    int trafficClass;
    const char *commName;
    int collnetEnable;
    int CTAPolicy;
    int shrinkShare;
    int nvlsCTAs;
    int nChannelsPerNetPeer;
    int nvlinkCentricSched;
} ncclConfig_t;";

/// Whether a C compiler runs; if not, says so, for a test that then returns early.
pub fn have_cc(test: &str) -> bool {
    let found = Command::new("cc")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        eprintln!("skipping {test}: no C compiler (`cc`) to build a fake NCCL");
    }
    found
}

/// Compiles `source` with `cc` and `extra_args` into `output`; panics with the compiler's
/// message on failure.
pub fn compile(source: &str, output: &Path, extra_args: &[&str]) {
    let source_path = output.with_extension("c");
    std::fs::write(&source_path, source).expect("write C source");
    let result = Command::new("cc")
        .args(extra_args)
        .arg("-o")
        .arg(output)
        .arg(&source_path)
        .output()
        .expect("run cc");
    assert!(
        result.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// Builds a fake libnccl in `dir` named `name`, with `-D` defines such as `FAKE_VERSION=22605`,
/// `OMIT_ncclAllGather` or `WITH_OPTIONAL`.
pub fn build_fake(dir: &Path, name: &str, defines: &[&str]) -> PathBuf {
    let output = dir.join(name);
    let mut args = vec!["-shared".to_owned(), "-fPIC".to_owned()];
    args.extend(defines.iter().map(|define| format!("-D{define}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    compile(&fake_source(), &output, &args);
    output
}
