//! The two policies decided in one place: which groups put their buffers in symmetric memory
//! (SGLang's DCP symmetric-memory flowchart), and which NCCL environment variables symmcomm sets, and why.

use std::fmt;

use serde::Serialize;

/// The kinds of parallel groups an inference engine builds. Typed, so that a policy never
/// hangs on the spelling of a group's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupKind {
    /// Every rank.
    World,
    /// Tensor parallel.
    Tp,
    /// Data parallel (DP attention).
    Dp,
    /// Decode context parallel.
    Dcp,
    /// Pipeline parallel.
    Pp,
}

impl GroupKind {
    /// Short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::World => "world",
            GroupKind::Tp => "tp",
            GroupKind::Dp => "dp",
            GroupKind::Dcp => "dcp",
            GroupKind::Pp => "pp",
        }
    }
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The deployment-wide switches the symmetric-memory policy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SymmPolicy {
    /// The feature switch (SGLang's `--enable-symm-mem`).
    pub enabled: bool,
    /// Decode-context-parallel size of the deployment (1 when DCP is off).
    pub dcp_size: usize,
}

impl Default for SymmPolicy {
    fn default() -> Self {
        SymmPolicy {
            enabled: true,
            dcp_size: 1,
        }
    }
}

/// Why a group's buffers are plain memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlainReason {
    /// The feature switch is off.
    FeatureOff,
    /// The caller disabled symmetric memory for this scope.
    ScopeDisabled,
    /// With DCP > 1 only the DCP group uses symmetric memory.
    DcpOnly,
    /// A group of one rank has nobody to share with.
    SingleRank,
}

impl fmt::Display for PlainReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlainReason::FeatureOff => "symmetric memory is switched off",
            PlainReason::ScopeDisabled => "the scope was opened disabled",
            PlainReason::DcpOnly => "DCP > 1: only the DCP group uses symmetric memory",
            PlainReason::SingleRank => "the group has one rank",
        })
    }
}

/// Where a scope's allocations go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// In the group's symmetric pool.
    Symmetric,
    /// Plain device memory, for the given reason.
    Plain(PlainReason),
}

impl Placement {
    /// Whether allocations go to the symmetric pool.
    pub fn is_symmetric(self) -> bool {
        matches!(self, Placement::Symmetric)
    }
}

impl SymmPolicy {
    /// Whether a group of `kind` may use symmetric memory at all (the group-construction half
    /// of SGLang's DCP symmetric-memory flowchart).
    pub fn group_allows(&self, kind: GroupKind) -> Result<(), PlainReason> {
        if !self.enabled {
            return Err(PlainReason::FeatureOff);
        }
        if self.dcp_size > 1 && kind != GroupKind::Dcp {
            return Err(PlainReason::DcpOnly);
        }
        Ok(())
    }

    /// Where a scope opened on a group goes (the allocation half of the flowchart: the
    /// SGLang's `use_symmetric_memory(group, disabled)`).
    pub fn placement(&self, kind: GroupKind, group_size: usize, scope_disabled: bool) -> Placement {
        if scope_disabled {
            return Placement::Plain(PlainReason::ScopeDisabled);
        }
        if let Err(r) = self.group_allows(kind) {
            return Placement::Plain(r);
        }
        if group_size <= 1 {
            return Placement::Plain(PlainReason::SingleRank);
        }
        Placement::Symmetric
    }
}

/// What symmcomm does with one environment variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum EnvAction {
    /// Set to `value` because the user had not set it.
    Set {
        /// The value symmcomm sets.
        value: String,
    },
    /// The user's value stays, though symmcomm would have set `wanted`.
    KeepUser {
        /// The user's value.
        user: String,
        /// What symmcomm would have set.
        wanted: String,
    },
    /// The user's value stays and symmcomm has no wish for this variable.
    Observe {
        /// The user's value, if set.
        user: Option<String>,
    },
}

/// One line of the environment plan: a variable, what happens to it, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnvDecision {
    /// Variable name.
    pub name: &'static str,
    /// What happens.
    #[serde(flatten)]
    pub action: EnvAction,
    /// Why, in a sentence.
    pub why: String,
}

/// The NCCL environment symmcomm wants for a deployment: `NCCL_CUMEM_ENABLE=1` whenever
/// symmetric memory is on (windows need cuMem memory), `NCCL_GRAPH_MIXING_SUPPORT=0` for DCP > 1
/// with symmetric memory (as SGLang's DCP symmetric-memory change does), `NCCL_RUNTIME_CONNECT=0` (peers connected before any
/// capture), and `NCCL_NVLS_ENABLE` never touched (NVLink multicast
/// stays the user's or the machine's choice; it is never forced on). A user's value always wins.
/// Nothing is applied: an engine reads the plan, and applies it ([`apply_env_plan`]) before
/// NCCL starts only if it wants to.
///
/// ```
/// use symmcomm::SymmPolicy;
/// use symmcomm::policy::nccl_env_plan;
/// let plan = nccl_env_plan(&SymmPolicy { enabled: true, dcp_size: 8 }, |name| {
///     (name == "NCCL_NVLS_ENABLE").then(|| "0".to_string())
/// });
/// for d in &plan {
///     println!("{}: {:?} ({})", d.name, d.action, d.why);
/// }
/// assert!(plan.iter().any(|d| d.name == "NCCL_GRAPH_MIXING_SUPPORT"));
/// ```
pub fn nccl_env_plan(
    policy: &SymmPolicy,
    get: impl Fn(&str) -> Option<String>,
) -> Vec<EnvDecision> {
    let mut plan = Vec::new();
    let mut want = |name: &'static str, wanted: Option<&str>, why: String| {
        let user = get(name);
        let action = match (user, wanted) {
            (Some(u), Some(w)) => EnvAction::KeepUser {
                user: u,
                wanted: w.to_string(),
            },
            (None, Some(w)) => EnvAction::Set {
                value: w.to_string(),
            },
            (u, None) => EnvAction::Observe { user: u },
        };
        plan.push(EnvDecision { name, action, why });
    };
    if policy.enabled {
        want(
            "NCCL_CUMEM_ENABLE",
            Some("1"),
            "symmetric windows need cuMem (VMM) allocations".into(),
        );
    } else {
        want(
            "NCCL_CUMEM_ENABLE",
            None,
            "symmetric memory is off: NCCL's default applies".into(),
        );
    }
    if policy.enabled && policy.dcp_size > 1 {
        want(
            "NCCL_GRAPH_MIXING_SUPPORT",
            Some("0"),
            format!(
                "DCP size {} with symmetric memory: NCCL's graph-mixing events put a bubble before every symmetric kernel",
                policy.dcp_size
            ),
        );
    } else {
        want(
            "NCCL_GRAPH_MIXING_SUPPORT",
            None,
            "no DCP with symmetric memory: NCCL's default applies".into(),
        );
    }
    want(
        "NCCL_RUNTIME_CONNECT",
        Some("0"),
        "connect peers when a communicator starts, so the first collective inside a CUDA graph capture does not try to".into(),
    );
    want(
        "NCCL_NVLS_ENABLE",
        None,
        "never set by symmcomm: NVLink multicast is the machine's choice and is never forced on"
            .into(),
    );
    plan
}

/// Apply the `Set` lines of a plan to this process's environment.
///
/// # Safety
/// Changing the environment races with any other thread reading or writing it (NCCL reads it
/// with `getenv`). Call this before any other thread exists, or while no other thread can touch
/// the environment.
pub unsafe fn apply_env_plan(plan: &[EnvDecision]) {
    for d in plan {
        if let EnvAction::Set { value } = &d.action {
            // SAFETY: the caller guarantees no other thread reads or writes the environment now.
            unsafe { std::env::set_var(d.name, value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn action<'a>(plan: &'a [EnvDecision], name: &str) -> &'a EnvAction {
        &plan.iter().find(|d| d.name == name).unwrap().action
    }

    // Every branch of SGLang's DCP symmetric-memory flowchart.
    #[test]
    fn flowchart_branches() {
        let off = SymmPolicy {
            enabled: false,
            dcp_size: 1,
        };
        let on = SymmPolicy {
            enabled: true,
            dcp_size: 1,
        };
        let dcp = SymmPolicy {
            enabled: true,
            dcp_size: 4,
        };
        // disabled scope -> plain, whatever else holds
        assert_eq!(
            on.placement(GroupKind::Tp, 8, true),
            Placement::Plain(PlainReason::ScopeDisabled)
        );
        // feature off -> plain
        assert_eq!(
            off.placement(GroupKind::Dcp, 8, false),
            Placement::Plain(PlainReason::FeatureOff)
        );
        // dcp_size <= 1 -> any group may
        for k in [
            GroupKind::World,
            GroupKind::Tp,
            GroupKind::Dp,
            GroupKind::Pp,
            GroupKind::Dcp,
        ] {
            assert_eq!(on.placement(k, 2, false), Placement::Symmetric, "{k}");
        }
        // dcp_size > 1 -> only the DCP group
        assert_eq!(
            dcp.placement(GroupKind::Dcp, 4, false),
            Placement::Symmetric
        );
        for k in [
            GroupKind::World,
            GroupKind::Tp,
            GroupKind::Dp,
            GroupKind::Pp,
        ] {
            assert_eq!(
                dcp.placement(k, 4, false),
                Placement::Plain(PlainReason::DcpOnly),
                "{k}"
            );
        }
        // world size 1 -> plain
        assert_eq!(
            dcp.placement(GroupKind::Dcp, 1, false),
            Placement::Plain(PlainReason::SingleRank)
        );
        assert_eq!(
            on.placement(GroupKind::Tp, 1, false),
            Placement::Plain(PlainReason::SingleRank)
        );
    }

    #[test]
    fn env_plan_sets_only_unset_variables() {
        let dcp = SymmPolicy {
            enabled: true,
            dcp_size: 2,
        };
        let plan = nccl_env_plan(&dcp, env(&[]));
        assert_eq!(
            action(&plan, "NCCL_CUMEM_ENABLE"),
            &EnvAction::Set { value: "1".into() }
        );
        assert_eq!(
            action(&plan, "NCCL_GRAPH_MIXING_SUPPORT"),
            &EnvAction::Set { value: "0".into() }
        );
        assert_eq!(
            action(&plan, "NCCL_NVLS_ENABLE"),
            &EnvAction::Observe { user: None }
        );
    }

    #[test]
    fn env_plan_user_value_always_wins() {
        let dcp = SymmPolicy {
            enabled: true,
            dcp_size: 2,
        };
        let plan = nccl_env_plan(
            &dcp,
            env(&[
                ("NCCL_CUMEM_ENABLE", "0"),
                ("NCCL_GRAPH_MIXING_SUPPORT", "1"),
                ("NCCL_NVLS_ENABLE", "0"),
            ]),
        );
        assert_eq!(
            action(&plan, "NCCL_CUMEM_ENABLE"),
            &EnvAction::KeepUser {
                user: "0".into(),
                wanted: "1".into()
            }
        );
        assert_eq!(
            action(&plan, "NCCL_GRAPH_MIXING_SUPPORT"),
            &EnvAction::KeepUser {
                user: "1".into(),
                wanted: "0".into()
            }
        );
        assert_eq!(
            action(&plan, "NCCL_NVLS_ENABLE"),
            &EnvAction::Observe {
                user: Some("0".into())
            }
        );
    }

    #[test]
    fn env_plan_never_forces_nvls_on() {
        for enabled in [false, true] {
            for dcp_size in [1, 2, 8] {
                let p = SymmPolicy { enabled, dcp_size };
                for d in nccl_env_plan(&p, env(&[])) {
                    if d.name == "NCCL_NVLS_ENABLE" {
                        assert!(matches!(d.action, EnvAction::Observe { .. }));
                    }
                    if let EnvAction::Set { value } = &d.action {
                        assert!(!(d.name == "NCCL_NVLS_ENABLE" && value == "1"));
                    }
                }
            }
        }
    }

    #[test]
    fn env_plan_without_dcp_leaves_graph_mixing() {
        let p = SymmPolicy {
            enabled: true,
            dcp_size: 1,
        };
        let plan = nccl_env_plan(&p, env(&[]));
        assert_eq!(
            action(&plan, "NCCL_GRAPH_MIXING_SUPPORT"),
            &EnvAction::Observe { user: None }
        );
        let off = SymmPolicy {
            enabled: false,
            dcp_size: 8,
        };
        let plan = nccl_env_plan(&off, env(&[]));
        let set: Vec<&str> = plan
            .iter()
            .filter(|d| matches!(d.action, EnvAction::Set { .. }))
            .map(|d| d.name)
            .collect();
        assert_eq!(set, vec!["NCCL_RUNTIME_CONNECT"]);
    }
}
