//! Bindings for `sync/`: the `SemLock` type behind `ferromp.synchronize`.

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
