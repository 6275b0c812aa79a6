//! symmcomm's lab: everything that measures or checks the library rather than being part of
//! what an engine links. The `symmcomm` command (crates/symmcomm-cli) is glue over it.
//!
//! - [`bench`](mod@bench): the benchmark of every collective and implementation against NCCL's regular
//!   path (nccl-tests columns, results files, the dispatch table `tune` writes);
//! - [`decode_sim`]: the collectives of one decode step (TP, DP attention, DCP) replayed in CUDA
//!   graphs, checked;
//! - [`verify`] and [`reference`](mod@reference): checked runs of collectives against an f64 reference on
//!   fresh inputs, outputs poisoned first;
//! - [`launch`]: torchrun-style launching of one process per rank.

#![warn(missing_docs, unreachable_pub)]
#![deny(unused_must_use)]

pub mod bench;
pub mod decode_sim;
pub mod launch;
pub mod reference;
pub mod verify;
