//! Test hooks, hidden from the docs and not part of the API: ways for the failure tests to
//! reach a state a correct program never does (or that only another machine shows). Each is
//! per thread and fires once. The NCCL creation hook serves the CUDA backend; the window hook
//! both backends.

// Public only with the `lab` feature (the lab's NVRTC tests and GPU failure tests reach in);
// without it these items serve the library alone.
#![cfg_attr(
    not(feature = "lab"),
    allow(unreachable_pub, dead_code, unused_imports)
)]

use std::cell::{Cell, RefCell};

/// An NCCL call that creates a communicator (blocking and collective: every peer must call it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclCreation {
    /// `ncclCommInitRankConfig`: the world group's communicator (in `Communicator::new`).
    InitRank,
    /// `ncclCommSplit`: a group split from another (`Group::split`; the first split a
    /// `Communicator::new` or `Group::split` reaches).
    Split,
}

thread_local! {
    static SKIP: Cell<Option<NcclCreation>> = const { Cell::new(None) };
    static REFUSE_WINDOW: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Make the next window registration this thread makes in a group that spans several hosts
/// count as refused by NCCL, with `reason` (as NCCL may refuse windows across hosts: a null
/// window, or an error). On CUDA the registration still happens (it is collective) and its
/// window is kept unused; the group's ranks then agree to run without windows. Groups inside
/// one host never consult it.
pub fn refuse_next_window_across_hosts(reason: &str) {
    REFUSE_WINDOW.with(|r| *r.borrow_mut() = Some(reason.to_string()));
}

/// The refusal this thread's registration is to report, if one was asked for (used up).
pub(crate) fn take_window_refusal() -> Option<String> {
    REFUSE_WINDOW.with(|r| r.borrow_mut().take())
}

/// Make the next `call` this thread reaches not happen: after the control plane has agreed (the
/// unique id shared, the split colours exchanged), this rank returns
/// `Error::InvalidArgument` ("skipped by the test hook") instead of calling NCCL, so its peers
/// wait inside NCCL for a rank that never joins: the state only the NCCL-level deadline ends.
/// The control plane's own handshake would catch a rank that is missing altogether first.
pub fn skip_next_nccl_creation(call: NcclCreation) {
    SKIP.with(|s| s.set(Some(call)));
}

/// Whether this thread's `call` is to be skipped (the hook is used up when it is).
pub(crate) fn take_skip(call: NcclCreation) -> bool {
    SKIP.with(|s| {
        let hit = s.get() == Some(call);
        if hit {
            s.set(None);
        }
        hit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_fires_once_for_its_call_and_this_thread_only() {
        assert!(!take_skip(NcclCreation::Split));
        skip_next_nccl_creation(NcclCreation::Split);
        assert!(!take_skip(NcclCreation::InitRank));
        std::thread::spawn(|| assert!(!take_skip(NcclCreation::Split)))
            .join()
            .unwrap();
        assert!(take_skip(NcclCreation::Split));
        assert!(!take_skip(NcclCreation::Split));
    }
}
