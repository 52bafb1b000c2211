//! Bindings for `connection.rs`: framed send/recv on an fd, poll, wait, fd passing.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::connection as conn;
use crate::py::{blocking, deadline, uninit_bytes};

/// A raw pointer into a bytes object we own, handed to a GIL-free read.
struct SendPtr(*mut u8, usize);
// SAFETY: the pointer targets the buffer of a freshly created bytes object that no
// other code can see until we return it; the GIL-free code is its only user.
unsafe impl Send for SendPtr {}

/// Sends one frame holding `data`.
#[pyfunction]
fn send_bytes(py: Python<'_>, fd: i32, data: &[u8]) -> PyResult<()> {
    // Any write may block on a full pipe, so it runs GIL-free. The bytes object is kept
    // alive by the caller's reference for the whole call.
    let p = SendPtr(data.as_ptr() as *mut u8, data.len());
    blocking(py, move |intr| {
        let p = p;
        // SAFETY: p points at `data`, borrowed for this call; bytes are immutable.
        let body = unsafe { std::slice::from_raw_parts(p.0 as *const u8, p.1) };
        conn::send_frame(fd, body, intr)
    })
}

/// Receives one frame. Raises EOFError at a clean end of stream; returns None when the
/// announced length exceeds `maxlength` (the body is left unread and the caller must
/// stop reading the connection, as the stdlib does).
#[pyfunction]
#[pyo3(signature = (fd, maxlength=None))]
fn recv_bytes<'py>(
    py: Python<'py>,
    fd: i32,
    maxlength: Option<usize>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let n = blocking(py, |intr| conn::recv_header(fd, intr))?;
    if let Some(m) = maxlength {
        if n > m {
            return Ok(None);
        }
    }
    // Filled completely below before anyone else can see it.
    let (obj, ptr) = uninit_bytes(py, n)?;
    let p = SendPtr(ptr, n);
    blocking(py, move |intr| {
        let p = p;
        // SAFETY: p covers the new bytes object's buffer, exclusively ours (see above).
        let body = unsafe { std::slice::from_raw_parts_mut(p.0, p.1) };
        conn::read_exact(fd, body, false, intr)
    })?;
    Ok(Some(obj))
}

/// Whether `fd` has something to read (data or EOF) within `timeout` seconds
/// (None waits forever).
#[pyfunction]
#[pyo3(signature = (fd, timeout=None))]
fn poll(py: Python<'_>, fd: i32, timeout: Option<f64>) -> PyResult<bool> {
    let d = deadline(timeout)?;
    blocking(py, move |intr| conn::poll_readable(fd, d, intr))
}

/// Waits until some of `fds` are readable; returns their indices (empty on timeout).
#[pyfunction]
#[pyo3(signature = (fds, timeout=None))]
fn wait(py: Python<'_>, fds: Vec<i32>, timeout: Option<f64>) -> PyResult<Vec<usize>> {
    let d = deadline(timeout)?;
    blocking(py, move |intr| conn::wait_any(&fds, d, intr))
}

/// Sends `data` plus the descriptors `fds` over the unix socket `sock`.
#[pyfunction]
fn sendfds(py: Python<'_>, sock: i32, data: &[u8], fds: Vec<i32>) -> PyResult<()> {
    let d = data.to_vec();
    blocking(py, move |intr| conn::send_fds(sock, &d, &fds, intr))
}

/// Receives up to `maxdata` bytes and the descriptors sent with them.
#[pyfunction]
#[pyo3(signature = (sock, maxdata, maxfds=253))]
fn recvfds<'py>(
    py: Python<'py>,
    sock: i32,
    maxdata: usize,
    maxfds: usize,
) -> PyResult<(Bound<'py, PyBytes>, Vec<i32>)> {
    let (data, fds) = blocking(py, move |intr| conn::recv_fds(sock, maxdata, maxfds, intr))?;
    Ok((PyBytes::new(py, &data), fds))
}

/// A connected pair of close-on-exec unix stream sockets (a duplex Pipe).
#[pyfunction]
fn socketpair() -> PyResult<(i32, i32)> {
    Ok(conn::socketpair()?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(send_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(recv_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(poll, m)?)?;
    m.add_function(wrap_pyfunction!(wait, m)?)?;
    m.add_function(wrap_pyfunction!(sendfds, m)?)?;
    m.add_function(wrap_pyfunction!(socketpair, m)?)?;
    m.add_function(wrap_pyfunction!(recvfds, m)?)?;
    Ok(())
}
