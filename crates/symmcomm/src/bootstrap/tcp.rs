//! The TCP rendezvous and store: rank 0 listens, the others connect; afterwards the same
//! connections carry store requests. Every wait has a deadline; every fault is a specific error.

use std::time::{Duration, Instant};

use super::Store;
use crate::error::Result;

/// Where and how to meet.
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// Master address (host name or IP).
    pub addr: String,
    /// Master port.
    pub port: u16,
    /// This rank.
    pub rank: usize,
    /// Expected number of ranks.
    pub world_size: usize,
    /// Deadline for the whole rendezvous and for each later wait.
    pub timeout: Duration,
}

/// A [`Store`] reached over TCP; rank 0 also serves it.
#[derive(Debug)]
pub struct TcpStore {}

impl TcpStore {
    /// Meet the other ranks; returns once all `world_size` ranks have joined.
    pub fn rendezvous(cfg: &RendezvousConfig) -> Result<Self> {
        let _ = cfg;
        todo!("helper: TCP rendezvous")
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let _ = (key, value);
        todo!()
    }
    fn get(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let _ = (key, deadline);
        todo!()
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let _ = (key, delta);
        todo!()
    }
    fn delete(&self, key: &str) -> Result<()> {
        let _ = key;
        todo!()
    }
}
