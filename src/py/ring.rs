//! Bindings for `ring.rs`: the `Ring` type under `ferromp.queues`.
//!
//! Every operation first tries its fast path with the GIL held: a put that finds room
//! and a get that finds a whole message cost one call, two lock CASes and one copy,
//! without releasing the GIL. Only when it must wait does a call detach (through
//! [`blocking`]); a message taken then is copied straight into a fresh bytes object,
//! allocated with the GIL taken back for just that moment.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;

use nix::errno::Errno;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PySlice, PyType};

use crate::error::{Error, Result};
use crate::py::{blocking, deadline};
use crate::ring;
use crate::shm::Segment;

/// A process's handle on a shared-memory message ring.
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct Ring {
    inner: ring::Ring,
    /// A buffer that large messages are copied into before unpickling, kept between
    /// calls: a fresh multi-MiB allocation per message costs more in page faults than
    /// the copy itself. Taken out while in use, so threads never share it.
    scratch: Mutex<Option<Py<PyByteArray>>>,
}

/// How long `offer` waits for room before leaving the message to the caller's feeder.
const SHORT_WAIT: std::time::Duration = std::time::Duration::from_millis(2);
/// Messages from this size up are unpickled from the scratch buffer.
const BIG: usize = 1 << 16;
/// Scratch buffers up to this size are kept for the next message.
const SCRATCH_KEEP: usize = 1 << 26;

/// Where `get_obj` copied a message.
enum Landing {
    Bytes(Py<PyBytes>),
    Scratch(Py<PyByteArray>, usize),
}

fn empty_exc(py: Python<'_>) -> PyResult<PyErr> {
    static EMPTY: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let t = EMPTY.get_or_try_init(py, || -> PyResult<_> {
        Ok(py
            .import("queue")?
            .getattr("Empty")?
            .cast_into::<PyType>()?
            .unbind())
    })?;
    Ok(PyErr::from_type(t.bind(py).clone(), ()))
}

/// A new, uninitialised bytes object of `n` bytes and its buffer.
fn new_bytes(py: Python<'_>, n: usize) -> Result<(Py<PyBytes>, *mut u8)> {
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of n bytes;
    // the ring fills it completely before anyone else can see it.
    let raw = unsafe {
        pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as pyo3::ffi::Py_ssize_t)
    };
    if raw.is_null() {
        // MemoryError is set; drop it and report ENOMEM through the core's error type.
        let _ = PyErr::take(py);
        return Err(Error::Os(Errno::ENOMEM));
    }
    // SAFETY: raw is a new, owned reference to a bytes object.
    let obj: Py<PyBytes> = unsafe { Bound::from_owned_ptr(py, raw).cast_into_unchecked() }.unbind();
    // SAFETY: obj is a bytes object; its buffer is n bytes long and stays put.
    let ptr = unsafe { pyo3::ffi::PyBytes_AsString(obj.as_ptr()) } as *mut u8;
    Ok((obj, ptr))
}

impl Ring {
    /// The buffer for a message of `n` bytes: a fresh bytes object for a small one,
    /// the scratch buffer (taken out of its slot, grown as needed) for a large one.
    fn landing(&self, py: Python<'_>, n: usize) -> Result<(Landing, *mut u8)> {
        if n < BIG {
            let (b, p) = new_bytes(py, n)?;
            return Ok((Landing::Bytes(b), p));
        }
        let kept = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let ba = match kept {
            Some(ba) if ba.bind(py).len() >= n => ba,
            _ => {
                // SAFETY: a NULL source asks for an uninitialised bytearray of n bytes;
                // the ring fills the first n bytes before Python sees them.
                let raw = unsafe {
                    pyo3::ffi::PyByteArray_FromStringAndSize(
                        std::ptr::null(),
                        n as pyo3::ffi::Py_ssize_t,
                    )
                };
                if raw.is_null() {
                    let _ = PyErr::take(py);
                    return Err(Error::Os(Errno::ENOMEM));
                }
                // SAFETY: raw is a new, owned reference to a bytearray.
                unsafe { Bound::from_owned_ptr(py, raw).cast_into_unchecked::<PyByteArray>() }
                    .unbind()
            }
        };
        // SAFETY: ba is a bytearray of at least n bytes that only this call holds (it
        // was taken out of the slot or just made); nothing resizes it until it is
        // handed to Python after the copy.
        let p = unsafe { pyo3::ffi::PyByteArray_AsString(ba.as_ptr()) } as *mut u8;
        Ok((Landing::Scratch(ba, n), p))
    }
}

#[pymethods]
impl Ring {
    /// A new ring of at least `capacity` data bytes holding at most `maxsize` messages
    /// (0: unbounded).
    #[new]
    fn new(capacity: usize, maxsize: u64) -> PyResult<Self> {
        Ok(Ring {
            inner: ring::Ring::new(capacity, maxsize)?,
            scratch: Mutex::new(None),
        })
    }

    /// Maps the ring of another handle from its three fds, which this call owns from
    /// now on (pass duplicates).
    #[staticmethod]
    fn attach(fd: i32, bell_r: i32, bell_w: i32) -> PyResult<Self> {
        // SAFETY: the caller hands over three open fds it no longer uses.
        let (seg, r, w) = unsafe {
            (
                OwnedFd::from_raw_fd(fd),
                OwnedFd::from_raw_fd(bell_r),
                OwnedFd::from_raw_fd(bell_w),
            )
        };
        let seg = Segment::from_fd(seg)?;
        Ok(Ring {
            inner: ring::Ring::attach(seg, r, w)?,
            scratch: Mutex::new(None),
        })
    }

    /// The segment's memfd.
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.fd()
    }

    /// The bell pipe's (read, write) fds.
    #[getter]
    fn bell_fds(&self) -> (i32, i32) {
        self.inner.bell_fds()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    #[getter]
    fn maxsize(&self) -> u64 {
        self.inner.maxsize()
    }

    /// Puts `data` on an unbounded ring, waiting for room if needed.
    fn put(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let r = &self.inner;
        if !r.reserve(Some(std::time::Instant::now()), &mut || Ok(()))? {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "put() without a timeout needs an unbounded ring",
            ));
        }
        if r.try_write(data) {
            return Ok(());
        }
        blocking(py, |intr| r.write(data, intr))
    }

    /// Reserves a slot (waiting up to `timeout` while `maxsize` messages are queued)
    /// and, if `write`, writes `data` when there is room right now. Returns 0 when the
    /// ring stayed full, 1 when `data` is in the ring, 2 when a slot is reserved but
    /// `data` still has to be written with `write()`.
    #[pyo3(signature = (data, block=true, timeout=None, write=true))]
    fn offer(
        &self,
        py: Python<'_>,
        data: &[u8],
        block: bool,
        timeout: Option<f64>,
        write: bool,
    ) -> PyResult<u8> {
        let r = &self.inner;
        let dl = if block {
            deadline(timeout)?
        } else {
            Some(std::time::Instant::now())
        };
        // Fast path: a slot and room right now.
        let first = r.offer(data, Some(std::time::Instant::now()), write, &mut || Ok(()))?;
        let outcome = match first {
            ring::Offer::Full if dl.is_none_or(|d| d > std::time::Instant::now()) => {
                blocking(py, |intr| r.offer(data, dl, write, intr))?
            }
            o => o,
        };
        let outcome = match outcome {
            // No room right now: rather than hand the message to a feeder thread at
            // once, wait briefly (GIL released) for the consumer to make room.
            ring::Offer::Reserved if write => {
                let until = std::time::Instant::now() + SHORT_WAIT;
                if blocking(py, |intr| r.write_until(data, until, intr))? {
                    ring::Offer::Written
                } else {
                    ring::Offer::Reserved
                }
            }
            o => o,
        };
        Ok(match outcome {
            ring::Offer::Full => 0,
            ring::Offer::Written => 1,
            ring::Offer::Reserved => 2,
        })
    }

    /// Writes `data` into a slot reserved by `offer()`, waiting for room.
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let r = &self.inner;
        if r.try_write(data) {
            return Ok(());
        }
        blocking(py, |intr| r.write(data, intr))
    }

    /// Writes `data` into a reserved slot if there is room right now; never waits.
    fn try_write(&self, data: &[u8]) -> bool {
        self.inner.try_write(data)
    }

    /// Gives back a slot reserved by `offer()` whose message will not be written.
    fn unreserve(&self) {
        self.inner.unreserve();
    }

    /// Takes the next message: waits up to `timeout` (forever if None) when `block`,
    /// else only takes what is there. None when nothing came.
    #[pyo3(signature = (block=true, timeout=None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let r = &self.inner;
        let fast = r.try_get(&mut |n| new_bytes(py, n))?;
        if let Some(b) = fast {
            return Ok(Some(b.into_bound(py)));
        }
        let dl = if block {
            deadline(timeout)?
        } else {
            Some(std::time::Instant::now())
        };
        let got = blocking(py, |intr| {
            r.get(dl, &mut |n| Python::attach(|py| new_bytes(py, n)), intr)
        })?;
        Ok(got.map(|b| b.into_bound(py)))
    }

    /// Takes the next message and returns `loads(message)`: waits up to `timeout`
    /// (forever if None) when `block`, else only takes what is there; raises
    /// queue.Empty when nothing came. Large messages are copied into a kept buffer
    /// and unpickled from there.
    #[pyo3(signature = (loads, block=true, timeout=None))]
    fn get_obj<'py>(
        &self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let r = &self.inner;
        if r.is_abandoned() {
            return Err(pyo3::exceptions::PyOSError::new_err("handle is closed"));
        }
        let fast = r.try_get(&mut |n| self.landing(py, n))?;
        let got = match fast {
            Some(l) => Some(l),
            None => {
                let dl = if block {
                    deadline(timeout)?
                } else {
                    Some(std::time::Instant::now())
                };
                blocking(py, |intr| {
                    r.get(dl, &mut |n| Python::attach(|py| self.landing(py, n)), intr)
                })?
            }
        };
        match got {
            None => Err(empty_exc(py)?),
            Some(Landing::Bytes(b)) => loads.call1((b,)),
            Some(Landing::Scratch(ba, n)) => {
                let ba = ba.into_bound(py);
                let whole = PyMemoryView::from(&ba)?;
                let view = whole.get_item(PySlice::new(py, 0, n as isize, 1))?;
                let out = loads.call1((&view,));
                // Recycle the buffer only if nothing kept a view of it.
                let free =
                    view.call_method0("release").is_ok() && whole.call_method0("release").is_ok();
                drop(view);
                drop(whole);
                // SAFETY: ba is a live object; reading its reference count is harmless.
                let alone = unsafe { pyo3::ffi::Py_REFCNT(ba.as_ptr()) } == 1;
                if free && alone && ba.len() <= SCRATCH_KEEP {
                    *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = Some(ba.unbind());
                }
                out
            }
        }
    }

    /// This process stops reading: a write waiting for room gives up with EPIPE and
    /// later gets raise OSError, as with a closed pipe end.
    fn abandon(&self) {
        self.inner.abandon();
    }

    /// Messages put and not yet taken.
    fn qsize(&self) -> u64 {
        self.inner.items()
    }

    /// Whether no message is waiting.
    fn empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Whether `maxsize` messages are queued.
    fn full(&self) -> bool {
        self.inner.is_full()
    }

    /// From now on, keep the bell pipe readable exactly while a message waits.
    fn arm_bell(&self) {
        self.inner.arm_bell();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Ring>()
}
