//! `symmcomm._core`: the extension module of the Python package. It binds the library's
//! communicators, groups, symmetric buffers (handed over by DLPack), collectives on the
//! caller's memory and stream (integers in, nothing per call but the call), the collective +
//! residual add + RMSNorm of a decode layer, the DCP combine and DP attention's gathered
//! buffer, and exports the allocator functions torch's `CUDAPluggableAllocator` loads. It
//! never imports torch; `symmcomm.torch` does.
//!
//! One module per job: `comm` (start-up, groups by colour or rank lists, hosts), `group`
//! (memory, waits, topology), `ops` (the hot path), `norm` (the collective fused with the
//! residual add and RMSNorm), `dlpack` (export), `alloc` (torch's allocator), `dcp`,
//! `dp`, `env` (the NCCL environment plan), `registry` (handles), `codes` (small
//! integers), `errors` (the exception hierarchy).

use pyo3::prelude::*;

mod alloc;
mod codes;
mod comm;
mod dcp;
mod dlpack;
mod dp;
mod env;
mod errors;
mod group;
mod norm;
mod ops;
mod registry;

/// The module: classes, the hot path's functions, the codes it takes.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<comm::PyCommunicator>()?;
    m.add_class::<group::PyGroup>()?;
    m.add_class::<dlpack::DLPackBuffer>()?;
    m.add_class::<ops::Dispatch>()?;
    m.add_class::<norm::NormDispatch>()?;
    m.add_class::<dcp::PyDcpCombine>()?;
    m.add_class::<dcp::PyCombineRun>()?;
    m.add_class::<dp::PyDpGatheredBuffer>()?;
    m.add_class::<dp::PyDpStep>()?;
    m.add_function(wrap_pyfunction!(ops::collective, m)?)?;
    m.add_function(wrap_pyfunction!(norm::add_rmsnorm, m)?)?;
    m.add_function(wrap_pyfunction!(dcp::dcp_run, m)?)?;
    m.add_function(wrap_pyfunction!(dp::dp_gather, m)?)?;
    m.add_function(wrap_pyfunction!(dp::dp_scatter, m)?)?;
    m.add_function(wrap_pyfunction!(dp::dp_scatter_from, m)?)?;
    m.add_function(wrap_pyfunction!(codes::dtype_code, m)?)?;
    m.add_function(wrap_pyfunction!(codes::dtype_name, m)?)?;
    m.add_function(wrap_pyfunction!(codes::dtype_size, m)?)?;
    m.add_function(wrap_pyfunction!(codes::reduce_code, m)?)?;
    m.add_function(wrap_pyfunction!(codes::impl_code, m)?)?;
    m.add_function(wrap_pyfunction!(codes::norm_impl_code, m)?)?;
    m.add_function(wrap_pyfunction!(comm::free_port, m)?)?;
    m.add_function(wrap_pyfunction!(comm::abort_all, m)?)?;
    m.add_function(wrap_pyfunction!(env::nccl_env_plan_of, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::push_alloc_group, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::pop_alloc_group, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::take_alloc_error, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::live_allocations, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::_test_alloc, m)?)?;
    m.add_function(wrap_pyfunction!(alloc::_test_free, m)?)?;
    m.add_function(wrap_pyfunction!(registry::live_handles, m)?)?;
    m.add("ALL_REDUCE", codes::ALL_REDUCE)?;
    m.add("ALL_GATHER", codes::ALL_GATHER)?;
    m.add("REDUCE_SCATTER", codes::REDUCE_SCATTER)?;
    m.add("ALLOC_FN", "symmcomm_torch_alloc")?;
    m.add("FREE_FN", "symmcomm_torch_free")?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
