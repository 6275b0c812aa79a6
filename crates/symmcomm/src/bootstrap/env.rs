//! torchrun's environment contract: reading it in a rank ([`EnvRanks`]), writing it for the
//! ranks that `symmcomm launch` starts ([`LaunchEnv`]).

// The crate's one error enum is larger than clippy's threshold; boxing it is error.rs's call.

use crate::error::{Error, Result};

/// The variable that overrides this process's host identity (tests, simulated hosts on one
/// machine; `symmcomm launch --simulate-hosts` sets it per rank, and `NCCL_HOSTID` with it).
pub const HOST_ID_ENV: &str = "SYMMCOMM_HOST_ID";

/// Name of the variable holding the global rank.
const RANK: &str = "RANK";
/// Name of the variable holding the number of ranks in the job.
const WORLD_SIZE: &str = "WORLD_SIZE";
/// Name of the variable holding the rank among this node's processes.
const LOCAL_RANK: &str = "LOCAL_RANK";
/// Name of the variable holding the number of ranks on this node.
const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Name of the variable holding the rendezvous host.
const MASTER_ADDR: &str = "MASTER_ADDR";
/// Name of the variable holding the rendezvous port.
const MASTER_PORT: &str = "MASTER_PORT";
/// symmcomm's own rendezvous port, when given: it wins over `MASTER_PORT`.
const SYMMCOMM_MASTER_PORT: &str = "SYMMCOMM_MASTER_PORT";
/// Set by torchrun in every rank it starts; its agent then serves its own store on
/// `MASTER_PORT`, so symmcomm's rank 0 cannot listen there.
const TORCHELASTIC_RUN_ID: &str = "TORCHELASTIC_RUN_ID";
/// torchrun's name for the node's index among the job's nodes.
const GROUP_RANK: &str = "GROUP_RANK";
/// The node's index under the name many launch scripts read.
const NODE_RANK: &str = "NODE_RANK";
/// NCCL's override of its host hash: ranks with different values are different nodes to it.
const NCCL_HOSTID: &str = "NCCL_HOSTID";

/// `MASTER_ADDR` when the variable is absent: loopback, never a wildcard address.
const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// `MASTER_PORT` when the variable is absent and the job has a single rank (torchrun's default).
const DEFAULT_MASTER_PORT: u16 = 29500;

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
    /// The port rank 0 serves the rendezvous on: `SYMMCOMM_MASTER_PORT` when set; else
    /// `MASTER_PORT` + 1 under torchrun (its agent holds `MASTER_PORT`); else `MASTER_PORT`
    /// (required when `WORLD_SIZE` > 1, else defaults to 29500).
    pub master_port: u16,
}

impl EnvRanks {
    /// Read the variables of this process. A variable whose value is not valid UTF-8 is
    /// reported as unparsable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| {
            std::env::var_os(name).map(|v| match v.into_string() {
                Ok(s) => s,
                // Keep it visibly wrong so parsing fails with the value shown.
                Err(raw) => raw.to_string_lossy().into_owned(),
            })
        })
    }

    /// Read the variables through `lookup` (`None` = unset), so tests need not touch the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let world_size: usize = parse_required(&lookup, WORLD_SIZE)?;
        if world_size == 0 {
            return Err(bad(WORLD_SIZE, "must be at least 1, got 0"));
        }
        let rank: usize = parse_required(&lookup, RANK)?;
        if rank >= world_size {
            return Err(Error::RankOutOfRange {
                rank,
                world: world_size,
            });
        }
        let local_world_size: usize =
            parse_optional(&lookup, LOCAL_WORLD_SIZE)?.unwrap_or(world_size);
        if local_world_size == 0 || local_world_size > world_size {
            return Err(bad(
                LOCAL_WORLD_SIZE,
                format!("must be in 1..={world_size} (WORLD_SIZE), got {local_world_size}"),
            ));
        }
        let local_rank: usize = match parse_optional(&lookup, LOCAL_RANK)? {
            Some(lr) => lr,
            // torchrun always sets LOCAL_RANK; without it, assume a single node.
            None => rank,
        };
        if local_rank >= local_world_size {
            return Err(bad(
                LOCAL_RANK,
                format!(
                    "{local_rank} is out of range for LOCAL_WORLD_SIZE {local_world_size}{}",
                    if lookup(LOCAL_RANK).is_none() {
                        " (LOCAL_RANK is unset and defaults to RANK)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let master_addr = match lookup(MASTER_ADDR) {
            None => DEFAULT_MASTER_ADDR.to_string(),
            Some(a) => {
                let a = a.trim();
                if a.is_empty() {
                    return Err(bad(MASTER_ADDR, "is set but empty"));
                }
                a.to_string()
            }
        };
        let master_port = master_port(&lookup, world_size)?;
        Ok(EnvRanks {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        })
    }
}

/// The rendezvous port (see [`EnvRanks::master_port`]).
fn master_port(lookup: &impl Fn(&str) -> Option<String>, world_size: usize) -> Result<u16> {
    if let Some(p) = parse_optional::<u16>(lookup, SYMMCOMM_MASTER_PORT)? {
        if p == 0 && world_size > 1 {
            return Err(bad(
                SYMMCOMM_MASTER_PORT,
                "0 is not a port other ranks can connect to",
            ));
        }
        return Ok(p);
    }
    let under_torchrun = lookup(TORCHELASTIC_RUN_ID).is_some();
    let port: u16 = match parse_optional(lookup, MASTER_PORT)? {
        Some(0) if world_size > 1 => {
            return Err(bad(
                MASTER_PORT,
                "0 is not a port other ranks can connect to",
            ));
        }
        Some(p) => p,
        None if world_size > 1 => {
            return Err(bad(
                MASTER_PORT,
                format!("is required when WORLD_SIZE is {world_size} (> 1)"),
            ));
        }
        None => DEFAULT_MASTER_PORT,
    };
    if !under_torchrun {
        return Ok(port);
    }
    port.checked_add(1).ok_or_else(|| {
        bad(
            MASTER_PORT,
            format!(
                "is {port}: under torchrun symmcomm listens on MASTER_PORT + 1, which does not \
                 exist; set {SYMMCOMM_MASTER_PORT}"
            ),
        )
    })
}

fn bad(name: &str, detail: impl Into<String>) -> Error {
    Error::BadEnv {
        name: name.to_string(),
        detail: detail.into(),
    }
}

fn parse_optional<T>(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match lookup(name) {
        None => Ok(None),
        Some(raw) => raw.trim().parse::<T>().map(Some).map_err(|e| {
            bad(
                name,
                format!(
                    "cannot parse {raw:?} as a non-negative integer{}: {e}",
                    if name == MASTER_PORT {
                        " below 65536"
                    } else {
                        ""
                    }
                ),
            )
        }),
    }
}

fn parse_required<T>(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    parse_optional(lookup, name)?.ok_or_else(|| bad(name, "is required but unset"))
}

/// The variables `symmcomm launch` gives rank `rank` of `world_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Pairs to set in the child's environment.
    pub vars: Vec<(String, String)>,
}

impl LaunchEnv {
    /// The six torchrun variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
    /// `MASTER_ADDR`, `MASTER_PORT`) for one launched rank; [`EnvRanks::from_lookup`] reads
    /// them back unchanged.
    pub fn for_rank(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: usize,
        master_addr: &str,
        master_port: u16,
    ) -> LaunchEnv {
        let vars = [
            (RANK, rank.to_string()),
            (WORLD_SIZE, world_size.to_string()),
            (LOCAL_RANK, local_rank.to_string()),
            (LOCAL_WORLD_SIZE, local_world_size.to_string()),
            (MASTER_ADDR, master_addr.to_string()),
            (MASTER_PORT, master_port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        LaunchEnv { vars }
    }

    /// The rank on node `node_rank` of a job of several nodes: torchrun's `GROUP_RANK`, and
    /// `NODE_RANK`, which many launch scripts read.
    pub fn on_node(mut self, node_rank: usize) -> LaunchEnv {
        for name in [GROUP_RANK, NODE_RANK] {
            self.vars.push((name.into(), node_rank.to_string()));
        }
        self
    }

    /// The rank on simulated host `id` (several hosts on one machine): symmcomm's
    /// `SYMMCOMM_HOST_ID` (its NVLink domains) and NCCL's `NCCL_HOSTID` (its nodes, which it
    /// then connects over its network transport), both `id`.
    pub fn on_simulated_host(mut self, id: &str) -> LaunchEnv {
        for name in [HOST_ID_ENV, NCCL_HOSTID] {
            self.vars.push((name.into(), id.to_string()));
        }
        self
    }

    /// The value given to `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<EnvRanks> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EnvRanks::from_lookup(|n| map.get(n).cloned())
    }

    fn bad_env_name(r: Result<EnvRanks>) -> (String, String) {
        match r {
            Err(Error::BadEnv { name, detail }) => (name, detail),
            other => panic!("expected BadEnv, got {other:?}"),
        }
    }

    #[test]
    fn port_under_torchrun_and_override() {
        let base = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29400")];
        assert_eq!(read(&base).unwrap().master_port, 29400);
        // torchrun's agent holds MASTER_PORT: listen on the next one.
        let mut tr = base.to_vec();
        tr.push(("TORCHELASTIC_RUN_ID", "abc"));
        assert_eq!(read(&tr).unwrap().master_port, 29401);
        // An explicit port wins, with or without torchrun.
        let mut ex = tr.clone();
        ex.push(("SYMMCOMM_MASTER_PORT", "31000"));
        assert_eq!(read(&ex).unwrap().master_port, 31000);
        let mut zero = base.to_vec();
        zero.push(("SYMMCOMM_MASTER_PORT", "0"));
        assert_eq!(bad_env_name(read(&zero)).0, "SYMMCOMM_MASTER_PORT");
        let top = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "65535"),
            ("TORCHELASTIC_RUN_ID", "x"),
        ];
        assert_eq!(bad_env_name(read(&top)).0, "MASTER_PORT");
    }

    #[test]
    fn full_torchrun_set() {
        let e = read(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            e,
            EnvRanks {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "node0".into(),
                master_port: 29400,
            }
        );
    }

    #[test]
    fn defaults_for_optional_variables() {
        let e = read(&[("RANK", "2"), ("WORLD_SIZE", "3"), ("MASTER_PORT", "1234")]).unwrap();
        assert_eq!(e.local_rank, 2);
        assert_eq!(e.local_world_size, 3);
        assert_eq!(e.master_addr, "127.0.0.1");
        assert_eq!(e.master_port, 1234);
    }

    #[test]
    fn single_rank_needs_no_port() {
        let e = read(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!(e.master_port, DEFAULT_MASTER_PORT);
        // An explicit port 0 is fine for a job of one.
        let e = read(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "0")]).unwrap();
        assert_eq!(e.master_port, 0);
    }

    #[test]
    fn whitespace_is_trimmed() {
        let e = read(&[
            ("RANK", " 1 "),
            ("WORLD_SIZE", "2\n"),
            ("MASTER_PORT", " 99"),
            ("MASTER_ADDR", " ::1 "),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.master_port), (1, 2, 99));
        assert_eq!(e.master_addr, "::1");
    }

    #[test]
    fn missing_required() {
        let (n, d) = bad_env_name(read(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]));
        assert_eq!(n, "RANK");
        assert!(d.contains("unset"), "{d}");
        let (n, _) = bad_env_name(read(&[("RANK", "0")]));
        assert_eq!(n, "WORLD_SIZE");
        let (n, d) = bad_env_name(read(&[("RANK", "0"), ("WORLD_SIZE", "2")]));
        assert_eq!(n, "MASTER_PORT");
        assert!(d.contains("required"), "{d}");
    }

    #[test]
    fn unparsable_values() {
        for (var, val) in [
            ("RANK", "one"),
            ("RANK", "-1"),
            ("WORLD_SIZE", "2.0"),
            ("WORLD_SIZE", ""),
            ("LOCAL_RANK", "x"),
            ("LOCAL_WORLD_SIZE", "-2"),
            ("MASTER_PORT", "65536"),
            ("MASTER_PORT", "http"),
        ] {
            let mut pairs = vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_PORT", "1000"),
            ];
            pairs.retain(|(k, _)| *k != var);
            pairs.push((var, val));
            let (n, d) = bad_env_name(read(&pairs));
            assert_eq!(n, var, "{var}={val:?}");
            assert!(d.contains(&format!("{val:?}")), "{d}");
        }
    }

    #[test]
    fn zero_world_size() {
        let (n, d) = bad_env_name(read(&[("RANK", "0"), ("WORLD_SIZE", "0")]));
        assert_eq!(n, "WORLD_SIZE");
        assert!(d.contains("at least 1"), "{d}");
    }

    #[test]
    fn rank_out_of_range() {
        match read(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "1")]) {
            Err(Error::RankOutOfRange { rank: 4, world: 4 }) => {}
            other => panic!("expected RankOutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn local_sizes_checked() {
        let base = [("RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "1")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            read(&v)
        };
        let (n, _) = bad_env_name(with(&[("LOCAL_WORLD_SIZE", "0")]));
        assert_eq!(n, "LOCAL_WORLD_SIZE");
        let (n, _) = bad_env_name(with(&[("LOCAL_WORLD_SIZE", "5")]));
        assert_eq!(n, "LOCAL_WORLD_SIZE");
        let (n, d) = bad_env_name(with(&[("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "2")]));
        assert_eq!(n, "LOCAL_RANK");
        assert!(!d.contains("defaults"), "{d}");
        // LOCAL_RANK defaults to RANK, which is too big for two local ranks.
        let (n, d) = bad_env_name(with(&[("LOCAL_WORLD_SIZE", "2")]));
        assert_eq!(n, "LOCAL_RANK");
        assert!(d.contains("defaults to RANK"), "{d}");
        let e = with(&[("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")]).unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 2));
    }

    #[test]
    fn master_addr_and_port_edge_cases() {
        let (n, _) = bad_env_name(read(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "1"),
            ("MASTER_ADDR", "  "),
        ]));
        assert_eq!(n, "MASTER_ADDR");
        let (n, d) = bad_env_name(read(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "0"),
        ]));
        assert_eq!(n, "MASTER_PORT");
        assert!(d.contains("0 is not a port"), "{d}");
    }

    #[test]
    fn launch_env_round_trips() {
        let l = LaunchEnv::for_rank(3, 4, 1, 2, "10.0.0.7", 4242);
        let names: Vec<&str> = l.vars.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT"
            ]
        );
        assert_eq!(l.get("MASTER_PORT"), Some("4242"));
        assert_eq!(l.get("GROUP_RANK"), None);
        let on = l.clone().on_node(1).on_simulated_host("sim-host-3");
        for (name, value) in [
            ("GROUP_RANK", "1"),
            ("NODE_RANK", "1"),
            ("SYMMCOMM_HOST_ID", "sim-host-3"),
            ("NCCL_HOSTID", "sim-host-3"),
        ] {
            assert_eq!(on.get(name), Some(value), "{name}");
        }
        let e = EnvRanks::from_lookup(|n| l.get(n).map(str::to_string)).unwrap();
        assert_eq!(
            e,
            EnvRanks {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "10.0.0.7".into(),
                master_port: 4242,
            }
        );
    }
}
