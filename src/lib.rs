//! ferromp: Python's `multiprocessing` with a Rust core.
//!
//! The crate has two layers. The core (every module except `py`) owns the OS work:
//! process lifecycle, framed connections over file descriptors, process-shared
//! semaphores. It has no pyo3 import, so `cargo test` drives it across real processes.
//! The `py` module (behind the `python` feature, which maturin turns on) holds the thin
//! bindings that make up the `ferromp._core` extension module.

pub mod connection;
pub mod error;
pub mod message;
pub mod process;
pub mod ring;
pub mod scalar;
pub mod shm;
pub mod spin;
pub mod sync;

#[cfg(feature = "python")]
mod py;
