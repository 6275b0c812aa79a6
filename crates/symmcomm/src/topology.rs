//! Which ranks share an NVLink domain. Every rank reports its host identity once per
//! communicator (hostname and boot id, or an override: [`HOST_ID_ENV`], or
//! [`crate::Bootstrap::on_host`] for thread ranks), and each group's domains are derived from
//! those reports without another exchange. A domain is the ranks of one host: they can import
//! each other's memory (peers.rs) and reach it over NVLink. Our kernels, peer imports and the
//! copy engine run only inside one domain; a group that spans domains runs NCCL, which reaches
//! the other hosts over its network transport, and, asked for, the hierarchical all-reduce.

use std::fmt;
use std::sync::Mutex;

use crate::bootstrap::ControlPlane;
use crate::error::{Error, OpCtx, Result};

pub use crate::bootstrap::HOST_ID_ENV;

/// The longest host identity a rank may report (an override is a name, not a document).
pub const MAX_HOST_ID_BYTES: usize = 256;

/// Where a host identity came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostIdSource {
    /// Given to the bootstrap in code ([`crate::Bootstrap::on_host`]).
    Bootstrap,
    /// The [`HOST_ID_ENV`] variable.
    Env,
    /// The machine: its hostname and the kernel's boot id.
    Machine,
}

impl fmt::Display for HostIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostIdSource::Bootstrap => "given to the bootstrap",
            HostIdSource::Env => "from SYMMCOMM_HOST_ID",
            HostIdSource::Machine => "hostname and boot id",
        })
    }
}

/// One rank's host identity: ranks that report the same one share an NVLink domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostId {
    /// The identity (`gpu-node-3/6f1c...`, or an override such as `sim-host-1`).
    pub id: String,
    /// Where it came from.
    pub source: HostIdSource,
}

impl HostId {
    /// The identity of a rank whose bootstrap was given `given` (if any): `given`, else
    /// [`HOST_ID_ENV`] when set and not empty, else the machine's.
    pub fn resolve(given: Option<&str>) -> Result<HostId> {
        let (id, source) = match given {
            Some(g) => (g.to_string(), HostIdSource::Bootstrap),
            None => match std::env::var(HOST_ID_ENV) {
                Ok(v) if !v.trim().is_empty() => (v.trim().to_string(), HostIdSource::Env),
                _ => (machine_host_id(), HostIdSource::Machine),
            },
        };
        if id.is_empty() || id.len() > MAX_HOST_ID_BYTES {
            return Err(Error::BadEnv {
                name: HOST_ID_ENV.into(),
                detail: format!(
                    "a host identity has 1 to {MAX_HOST_ID_BYTES} bytes; {id:?} ({source}) has {}",
                    id.len()
                ),
            });
        }
        Ok(HostId { id, source })
    }

    /// This process's identity without a bootstrap override.
    pub fn local() -> Result<HostId> {
        Self::resolve(None)
    }
}

/// `hostname/boot_id`: two processes on one machine agree, two machines (or one machine
/// before and after a reboot, or two containers with one hostname on different machines)
/// differ. Where either part cannot be read, a placeholder stands in, so every rank of such a
/// machine reports the same identity (one domain, as before this module existed).
fn machine_host_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "no-boot-id".into());
    format!("{}/{boot}", hostname())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writing `buf.len()` bytes; gethostname writes at most that
    // many and we read up to the first NUL (or the whole buffer if it was truncated).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Every rank's host identity, in global rank order: the communicator's view of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    hosts: Vec<String>,
}

impl Topology {
    /// The topology of ranks whose host identities are `hosts` (rank order).
    pub fn from_hosts(hosts: Vec<String>) -> Self {
        Topology { hosts }
    }

    /// Every rank's identity over the world's control plane (collective, once per
    /// communicator).
    pub(crate) fn exchange(control: &ControlPlane, mine: &HostId, ctx: &OpCtx) -> Result<Self> {
        let all = control.all_gather_for("host identity", mine.id.as_bytes(), ctx)?;
        let hosts = all
            .into_iter()
            .enumerate()
            .map(|(r, b)| {
                String::from_utf8(b).map_err(|_| Error::InvalidArgument {
                    ctx: ctx.clone(),
                    detail: format!("rank {r} reported a host identity that is not UTF-8"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Topology { hosts })
    }

    /// The host identity of global rank `rank`.
    pub fn host_of(&self, rank: usize) -> &str {
        &self.hosts[rank]
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.hosts.len()
    }

    /// The whole job as one group (every rank, this rank being `me`).
    pub fn world_group(&self, me: usize) -> GroupTopology {
        let members: Vec<usize> = (0..self.hosts.len()).collect();
        self.group(&members, me)
    }

    /// The domains of the group of `members` (global ranks, in group order) as group rank
    /// `me_in_group` sees them: one per host, in the order of each host's first member.
    pub fn group(&self, members: &[usize], me_in_group: usize) -> GroupTopology {
        let mut domains: Vec<Domain> = Vec::new();
        for (g, &global) in members.iter().enumerate() {
            let host = &self.hosts[global];
            match domains.iter_mut().find(|d| &d.host == host) {
                Some(d) => d.ranks.push(g),
                None => domains.push(Domain {
                    host: host.clone(),
                    ranks: vec![g],
                }),
            }
        }
        let mine = domains
            .iter()
            .position(|d| d.ranks.contains(&me_in_group))
            .expect("every member lies in a domain");
        GroupTopology {
            domains,
            rank: me_in_group,
            mine,
        }
    }
}

/// The ranks of one group on one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// The host identity its ranks reported.
    pub host: String,
    /// Their ranks in the group, ascending.
    pub ranks: Vec<usize>,
}

/// A group's NVLink domains, as one of its ranks sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupTopology {
    domains: Vec<Domain>,
    rank: usize,
    mine: usize,
}

impl GroupTopology {
    /// The group's domains, in the order of each one's first rank.
    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    /// Whether the group's ranks sit on more than one host.
    pub fn spans_domains(&self) -> bool {
        self.domains.len() > 1
    }

    /// The index of this rank's domain in [`GroupTopology::domains`].
    pub fn my_domain(&self) -> usize {
        self.mine
    }

    /// This rank's position among its domain's ranks.
    pub fn rank_in_domain(&self) -> usize {
        self.domains[self.mine]
            .ranks
            .iter()
            .position(|&r| r == self.rank)
            .expect("this rank lies in its domain")
    }

    /// The number of ranks of every domain, when all have the same.
    pub fn ranks_per_domain(&self) -> Option<usize> {
        let m = self.domains[0].ranks.len();
        self.domains.iter().all(|d| d.ranks.len() == m).then_some(m)
    }

    /// Why our NVLink kernels (and the copy engine, and the fused DCP combine) cannot run on
    /// this group: its ranks span several domains, and a rank can neither import nor reach the
    /// memory of a rank on another host.
    pub fn kernels_unavailable(&self) -> Option<String> {
        self.spans_domains().then(|| {
            format!(
                "our NVLink kernels need every rank of the group in one NVLink domain; this \
                 group spans {self} (NCCL's nccl and nccl_symm run it; hierarchical runs \
                 all-reduces)"
            )
        })
    }

    /// Why the hierarchical all-reduce cannot run on this group, if it cannot: it needs
    /// several domains with the same number of the group's ranks each.
    pub fn hierarchical_unavailable(&self) -> Option<String> {
        if !self.spans_domains() {
            return Some(format!(
                "the group lies in {self}: nothing to be hierarchical about (auto runs our \
                 kernels or NCCL's)"
            ));
        }
        if self.ranks_per_domain().is_none() {
            return Some(format!(
                "the hierarchical all-reduce needs the same number of ranks on every host; \
                 this group spans {self}"
            ));
        }
        None
    }
}

impl fmt::Display for GroupTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.spans_domains() {
            return write!(f, "one NVLink domain (host {})", self.domains[0].host);
        }
        write!(f, "{} NVLink domains (hosts):", self.domains.len())?;
        for (i, d) in self.domains.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{} ranks {:?}", d.host, d.ranks)?;
        }
        Ok(())
    }
}

/// The NCCL windows of a group that spans domains: NCCL may refuse to register them there
/// (a null window, or an error), and that must not fail the group. Each registration's outcome
/// is agreed on by every rank; the first refusal turns the group's windows off for good, its
/// reason recorded (`nccl_symm` then names it, and `auto` runs NCCL's regular path), and the
/// pool's segments stay as plain memory that every rank still allocates in the same order.
#[derive(Debug, Default)]
pub(crate) struct CrossDomainWindows {
    refused: Mutex<Option<String>>,
}

impl CrossDomainWindows {
    /// Why the group has no windows, once a registration was refused.
    pub(crate) fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Agree (collective over `control`) on this rank's registration outcome `mine`: `true`
    /// when every rank registered its segment as a window. Otherwise the first refusing rank's
    /// reason is recorded here on every rank, and `false`.
    pub(crate) fn settle(
        &self,
        control: &ControlPlane,
        mine: std::result::Result<(), String>,
        ctx: &OpCtx,
    ) -> Result<bool> {
        let wire = match &mine {
            Ok(()) => vec![0u8],
            Err(why) => [&[1u8][..], why.as_bytes()].concat(),
        };
        let all = control.all_gather_for("window registered", &wire, ctx)?;
        let refusal = all
            .iter()
            .enumerate()
            .find_map(|(r, b)| match b.split_first() {
                Some((0, _)) => None,
                Some((_, why)) => Some(format!(
                    "rank {r} of the group could not register the window: {}",
                    String::from_utf8_lossy(why)
                )),
                None => Some(format!("rank {r} sent no registration outcome")),
            });
        let Some(reason) = refusal else {
            return Ok(true);
        };
        tracing::warn!(
            group = %ctx.group,
            "NCCL windows off for this cross-host group, its pool is plain memory: {reason}"
        );
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        Ok(false)
    }

    /// Why NCCL's symmetric path cannot run here, once the windows were refused.
    pub(crate) fn symmetric_unavailable(&self) -> Option<String> {
        self.refused().map(|why| {
            format!(
                "the group spans several hosts and its buffers are plain memory, not NCCL \
                 windows: {why}"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(hosts: &[&str]) -> Topology {
        Topology::from_hosts(hosts.iter().map(|h| h.to_string()).collect())
    }

    #[test]
    fn domains_follow_the_hosts_in_first_member_order() {
        let t = topo(&["b", "a", "b", "a"]);
        let g = t.world_group(2);
        assert!(g.spans_domains());
        assert_eq!(
            g.domains(),
            &[
                Domain {
                    host: "b".into(),
                    ranks: vec![0, 2]
                },
                Domain {
                    host: "a".into(),
                    ranks: vec![1, 3]
                }
            ]
        );
        assert_eq!((g.my_domain(), g.rank_in_domain()), (0, 1));
        assert_eq!(g.ranks_per_domain(), Some(2));
        assert!(
            g.kernels_unavailable()
                .unwrap()
                .contains("2 NVLink domains")
        );
        assert!(g.hierarchical_unavailable().is_none());
        assert_eq!(
            g.to_string(),
            "2 NVLink domains (hosts): b ranks [0, 2], a ranks [1, 3]"
        );
    }

    #[test]
    fn a_group_inside_one_host_is_one_domain() {
        let t = topo(&["a", "a", "b", "b"]);
        // Global ranks 2 and 3 as group ranks 0 and 1.
        let g = t.group(&[2, 3], 1);
        assert!(!g.spans_domains());
        assert_eq!(g.to_string(), "one NVLink domain (host b)");
        assert!(g.kernels_unavailable().is_none());
        assert!(
            g.hierarchical_unavailable()
                .unwrap()
                .contains("nothing to be hierarchical")
        );
    }

    #[test]
    fn uneven_domains_refuse_the_hierarchy() {
        let g = topo(&["a", "a", "b"]).world_group(2);
        assert_eq!(g.ranks_per_domain(), None);
        let why = g.hierarchical_unavailable().unwrap();
        assert!(
            why.contains("same number of ranks") && why.contains("a ranks [0, 1], b ranks [2]"),
            "{why}"
        );
    }

    #[test]
    fn host_ids_resolve_in_order_and_are_bounded() {
        let given = HostId::resolve(Some("sim-3")).unwrap();
        assert_eq!(
            (given.id.as_str(), given.source),
            ("sim-3", HostIdSource::Bootstrap)
        );
        let long = "x".repeat(MAX_HOST_ID_BYTES + 1);
        assert!(matches!(
            HostId::resolve(Some(&long)),
            Err(Error::BadEnv { .. })
        ));
        assert!(HostId::resolve(Some("")).is_err());
        // The machine's identity has both parts and is stable within a process.
        let m = machine_host_id();
        assert!(m.contains('/'), "{m}");
        assert_eq!(m, machine_host_id());
    }

    #[test]
    fn the_first_refusal_turns_windows_off_on_every_rank() {
        use crate::bootstrap::{Store, ThreadStore};
        use std::sync::Arc;
        use std::time::Duration;
        let store: Arc<dyn Store> = Arc::new(ThreadStore::new());
        let outcomes: Vec<(bool, bool, Option<String>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let store = store.clone();
                    s.spawn(move || {
                        let c = ControlPlane::new(
                            store,
                            "w".into(),
                            vec![0, 1, 2],
                            r,
                            Duration::from_secs(10),
                        );
                        let ctx = OpCtx {
                            op: crate::error::Op::Register,
                            group: "w".into(),
                            rank: r,
                            world: 3,
                            bytes: 64,
                        };
                        let w = CrossDomainWindows::default();
                        let first = w.settle(&c, Ok(()), &ctx).unwrap();
                        let mine = if r == 2 { Err("no".into()) } else { Ok(()) };
                        let second = w.settle(&c, mine, &ctx).unwrap();
                        (first, second, w.symmetric_unavailable())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (first, second, why) in outcomes {
            assert!(first && !second);
            let why = why.unwrap();
            assert!(why.contains("rank 2") && why.contains(": no"), "{why}");
        }
    }
}
