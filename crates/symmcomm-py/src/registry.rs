//! Handles: the integers that the hot path and torch's custom ops take instead of objects
//! (a torch op's schema has no place for a Python object). Each registry maps a handle to what
//! it names for as long as the Python object that owns the handle lives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use symmcomm::norm::NormDispatched;
use symmcomm::{Dispatched, Group, Op};

use crate::errors::{invalid, no_group};

/// Where a communicator's memory lives, as DLPack and the callers' arrays name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Device {
    /// Host memory (the host backend).
    Host,
    /// A CUDA device, by ordinal.
    Cuda(i32),
}

impl Device {
    /// The code Python passes: -1 for the host, the ordinal for a GPU.
    pub(crate) fn code(self) -> i64 {
        match self {
            Device::Host => -1,
            Device::Cuda(d) => d as i64,
        }
    }

    /// In words, for messages.
    pub(crate) fn describe(code: i64) -> String {
        if code < 0 {
            "host memory".into()
        } else {
            format!("cuda:{code}")
        }
    }
}

/// What a group's last call ran: a collective, or a collective with its add-RMSNorm.
#[derive(Clone, Debug)]
pub(crate) enum LastRun {
    /// `all_reduce`, `all_gather`, `reduce_scatter`.
    Collective(Dispatched),
    /// `all_reduce_add_rmsnorm`, `reduce_scatter_add_rmsnorm`.
    Norm(NormDispatched),
}

/// One group as the hot path sees it.
#[derive(Debug)]
pub(crate) struct GroupEntry {
    /// The group, bound to its communicator's own stream.
    pub(crate) group: Group,
    /// Its communicator's device.
    pub(crate) device: Device,
    /// What the group's last call ran.
    pub(crate) last: Mutex<Option<LastRun>>,
}

impl GroupEntry {
    pub(crate) fn new(group: Group, device: Device) -> Self {
        GroupEntry {
            group,
            device,
            last: Mutex::new(None),
        }
    }

    /// Remember what ran.
    pub(crate) fn record(&self, ran: LastRun) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(ran);
    }

    /// What the last call ran, if any ran.
    pub(crate) fn last(&self) -> Option<LastRun> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Handles to shared values of one type.
#[derive(Debug)]
pub(crate) struct Registry<T> {
    what: &'static str,
    next: AtomicU64,
    map: RwLock<BTreeMap<u64, Arc<T>>>,
}

impl<T> Registry<T> {
    pub(crate) const fn new(what: &'static str) -> Self {
        Registry {
            what,
            next: AtomicU64::new(1),
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// A fresh handle for `value`.
    pub(crate) fn insert(&self, value: Arc<T>) -> u64 {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, value);
        handle
    }

    /// What `handle` names, or an error saying it names nothing (any more).
    pub(crate) fn get(&self, handle: u64, op: Op) -> symmcomm::Result<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&handle)
            .cloned()
            .ok_or_else(|| {
                invalid(
                    no_group(op),
                    format!(
                        "{} handle {handle} names nothing: its Python object was dropped, or it never existed",
                        self.what
                    ),
                )
            })
    }

    /// Forget `handle` (its Python object is gone).
    pub(crate) fn remove(&self, handle: u64) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle);
    }

    /// The first value `pick` accepts.
    pub(crate) fn find(&self, pick: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|v| pick(v))
            .cloned()
    }

    /// How many handles are live.
    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Every group that has a Python object.
pub(crate) static GROUPS: Registry<GroupEntry> = Registry::new("group");

/// How many handles of each kind are live: `(groups, combines, buffers, steps)` (for tests
/// that check nothing leaks).
#[pyo3::pyfunction]
pub(crate) fn live_handles() -> (usize, usize, usize, usize) {
    (
        GROUPS.len(),
        crate::dcp::COMBINES.len(),
        crate::dp::BUFFERS.len(),
        crate::dp::STEPS.len(),
    )
}
