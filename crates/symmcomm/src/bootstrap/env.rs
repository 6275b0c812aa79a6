//! torchrun's environment contract: reading it in a rank, writing it for launched ranks.

use crate::error::Result;

/// What a rank reads from torchrun-style variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvRanks {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK` (defaults to `RANK`).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE` (defaults to `WORLD_SIZE`).
    pub local_world_size: usize,
    /// `MASTER_ADDR` (defaults to 127.0.0.1).
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

impl EnvRanks {
    /// Read the variables of this process.
    pub fn from_env() -> Result<Self> {
        todo!("helper: parse torchrun variables")
    }
}

/// The variables `symmcomm launch` gives rank `rank` of `world_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Pairs to set in the child's environment.
    pub vars: Vec<(String, String)>,
}
