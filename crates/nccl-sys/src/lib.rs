//! Hand-written FFI for NCCL >= 2.27, loaded at run time.

/// Why NCCL could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Placeholder until the loader lands.
    #[error("NCCL not loaded: {0}")]
    NotFound(String),
}
