//! The `ferromp._core` extension module: the only Rust code that touches Python.
//!
//! Functions here convert arguments, release the GIL around every blocking core call
//! (through [`blocking`], or [`blocking_sliced`] built on it) and map core errors to
//! Python exceptions in one place.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use pyo3::exceptions::{PyAssertionError, PyEOFError, PyInterruptedError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::{strerror, Error};

mod connection;
mod packed;
mod pool;
mod process;
mod ring;
pub(crate) mod shm;
mod sync;

/// The one conversion from core errors to Python exceptions: the classes and messages
/// the stdlib raises in the same situations.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            // `OSError(errno, strerror)`: CPython picks the subclass (FileNotFoundError...).
            Error::Os(errno) | Error::Exec(errno) => {
                PyOSError::new_err((errno as i32, strerror(errno)))
            }
            // Never escapes a SemLock call (`acquire` handles it); raised like its errno.
            Error::WouldBlock => Error::Os(Errno::EAGAIN).into(),
            Error::Eof => PyEOFError::new_err(()),
            Error::EofInMessage => PyOSError::new_err("got end of file during message"),
            Error::BadLength(_) => PyOSError::new_err("bad message length"),
            Error::Interrupted => PyInterruptedError::new_err("interrupted system call"),
            // Both messages are the stdlib's, word for word (see Error's Display).
            Error::NotOwner => PyAssertionError::new_err(e.to_string()),
            Error::OverRelease(_) => PyValueError::new_err(e.to_string()),
        }
    }
}

/// A new bytes object of `n` bytes whose contents the caller fills before anyone else
/// sees it, and a pointer to its buffer (stable for the object's lifetime).
pub(crate) fn uninit_bytes(py: Python<'_>, n: usize) -> PyResult<(Bound<'_, PyBytes>, *mut u8)> {
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of n bytes.
    let raw = unsafe {
        pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as pyo3::ffi::Py_ssize_t)
    };
    // SAFETY: raw is a new reference or NULL with an exception set.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, raw)? };
    // SAFETY: obj is a bytes object; its buffer is n bytes long and never moves.
    let ptr = unsafe { pyo3::ffi::PyBytes_AsString(obj.as_ptr()) } as *mut u8;
    // SAFETY: created as bytes above.
    Ok((unsafe { obj.cast_into_unchecked::<PyBytes>() }, ptr))
}

/// Turns an optional timeout in seconds into a deadline (negative means "now").
pub(crate) fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() => Err(PyValueError::new_err("timeout must be a number")),
        Some(t) if t <= 0.0 => Ok(Some(Instant::now())),
        Some(t) => Ok(Some(
            Instant::now() + Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX / 4),
        )),
    }
}

/// Runs a blocking core call without the GIL. On EINTR the core calls back here; we
/// take the GIL, run Python's signal handlers, and either let the call resume or, when
/// a handler raised (Ctrl-C), stop it and re-raise that exception.
pub(crate) fn blocking<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: Send + FnOnce(&mut dyn FnMut() -> crate::error::Result<()>) -> crate::error::Result<T>,
{
    let mut pending: Option<PyErr> = None;
    let r = py.detach(|| {
        let mut intr = || -> crate::error::Result<()> {
            Python::attach(|py| py.check_signals()).map_err(|e| {
                pending = Some(e);
                Error::Interrupted
            })
        };
        f(&mut intr)
    });
    match r {
        Ok(v) => Ok(v),
        Err(Error::Interrupted) if pending.is_some() => Err(pending.take().unwrap()),
        Err(e) => Err(e.into()),
    }
}

/// [`blocking`] for a wait that also runs Python's signal handlers every `slice`, not
/// only on EINTR: a signal interrupts a sleeping syscall only if it arrives during it,
/// and one that lands just before (while spinning, or between two sleeps) only sets
/// Python's flag, so a wait relying on EINTR alone would sleep on, deaf to Ctrl-C.
///
/// `step(until)` waits at most until `until` and returns `Ok(true)` when done,
/// `Ok(false)` when `until` came first, `Err(Interrupted)` on EINTR. Returns `Ok(false)`
/// once `deadline` (None: never) has passed.
pub(crate) fn blocking_sliced<F>(
    py: Python<'_>,
    deadline: Option<Instant>,
    slice: Duration,
    mut step: F,
) -> PyResult<bool>
where
    F: Send + FnMut(Instant) -> crate::error::Result<bool>,
{
    blocking(py, move |intr| loop {
        let slice_end = Instant::now() + slice;
        match step(deadline.map_or(slice_end, |d| d.min(slice_end))) {
            Ok(true) => return Ok(true),
            Ok(false) if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(false),
            // The end of a slice, or EINTR: run the handlers, then wait on.
            Ok(false) | Err(Error::Interrupted) => intr()?,
            Err(e) => return Err(e),
        }
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    process::register(m)?;
    connection::register(m)?;
    sync::register(m)?;
    shm::register(m)?;
    ring::register(m)?;
    pool::register(m)?;
    packed::register(m)?;
    Ok(())
}
