//! The NCCL environment symmcomm wants (the library's plan: `NCCL_CUMEM_ENABLE`,
//! `NCCL_RUNTIME_CONNECT`, `NCCL_GRAPH_MIXING_SUPPORT`, NVLink multicast never forced), as
//! data for Python: the package applies it only when asked, before NCCL starts.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use symmcomm::SymmPolicy;
use symmcomm::policy::{EnvAction, nccl_env_plan};

/// The plan for a deployment: one dict per variable with `name`, `action` (`set`,
/// `keep_user`, `observe`), `value` (what symmcomm sets or wanted, or None), `user` (the
/// process's value, or None) and `why`.
#[pyfunction]
#[pyo3(signature = (symmetric=true, dcp_size=1))]
pub(crate) fn nccl_env_plan_of<'py>(
    py: Python<'py>,
    symmetric: bool,
    dcp_size: usize,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let policy = SymmPolicy {
        enabled: symmetric,
        dcp_size,
    };
    let mut out = Vec::new();
    for d in nccl_env_plan(&policy, |k| std::env::var(k).ok()) {
        let line = PyDict::new(py);
        line.set_item("name", d.name)?;
        let (action, value, user) = match d.action {
            EnvAction::Set { value } => ("set", Some(value), None),
            EnvAction::KeepUser { user, wanted } => ("keep_user", Some(wanted), Some(user)),
            EnvAction::Observe { user } => ("observe", None, user),
        };
        line.set_item("action", action)?;
        line.set_item("value", value)?;
        line.set_item("user", user)?;
        line.set_item("why", d.why)?;
        out.push(line);
    }
    Ok(out)
}
