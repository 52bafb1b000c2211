//! Bindings for `shm`: `ferromp._core.Segment`, the memfd behind `heap.Arena`, and the
//! named-segment functions behind `shared_memory.SharedMemory` (`shm_open`,
//! `shm_open_sized`, `shm_unlink`, with the signatures and errors of CPython's
//! `_posixshmem`).
//!
//! # Design
//!
//! pyo3's `abi3-py39` cannot implement the buffer protocol (`Py_buffer` entered the
//! limited API in 3.11), so a `Segment` does not hand out its bytes itself. It owns the
//! memfd and the core's mapping, and exposes `fd` and `size`; Python maps the same
//! file with `mmap.mmap(segment.fd, segment.size)`, which is a buffer (`memoryview`,
//! ctypes `from_buffer`, numpy) and keeps itself alive while views of it exist. Both
//! mappings are of the same pages, so the second one costs page-table entries, not
//! memory. (`address` gives the core mapping's start for Rust-side consumers.)
//!
//! The fd is what crosses to children: a forked child inherits it (and the mappings),
//! spawn and forkserver children receive it (`reduction.DupFd`) and call
//! [`PySegment::from_fd`]. The memory is freed by the kernel when the last process
//! closes its fd and mappings, so a SIGKILL leaks nothing and nothing is created in
//! `/dev/shm`.
//!
//! # `SharedCell`: the hot path of `sharedctypes`
//!
//! `SharedCell` is the native base of `sharedctypes.SynchronizedBase`. It holds the
//! wrapped ctypes object and the lock, and does "take the lock, get or set the value
//! or item, release the lock" in one native call, so `Value.value` and `Array[i]` run
//! no Python frame. When the lock is one of ferromp's `SemLock`s, the cell maps that
//! semaphore's memfd itself and keeps a handle of its own on it
//! ([`RawSemaphore::attach`]): an uncontended access is then two compare-and-swaps.
//! When that fails (the lock is held, possibly by this very thread through the
//! `RLock`: `with v.get_lock(): v.value += 1`), or the lock is of another kind, the
//! cell calls the lock's own `acquire()` / `release()`, exactly as the stdlib's
//! wrappers do. The value itself is read and written through the ctypes object, so
//! conversions and errors are ctypes' own.
//!
//! # Named segments
//!
//! `shm_open` / `shm_unlink` take the name as a `str` and raise `OSError(errno,
//! strerror, name)`, which CPython turns into `FileExistsError` / `FileNotFoundError`
//! with `.errno` and `.filename` set, as `_posixshmem` does. One difference: a name
//! with an embedded NUL raises `ValueError`, where `_posixshmem` silently cuts the name
//! at the NUL and opens another object. The mapping is not made here: the buffer
//! users see must be Python's `mmap.mmap` (see above), and a second, core-side
//! mapping would only double the cost of every `SharedMemory()`. None of these calls
//! releases the GIL: opening a tmpfs file does not block, and detaching would cost
//! more than the call.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::OnceLock;

use memmap2::{MmapMut, MmapOptions};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::error::Error;
use crate::shm::Segment;
use crate::sync::{RawSemaphore, STATE_SIZE};

/// A fixed-size anonymous shared-memory segment (a close-on-exec memfd).
#[pyclass(name = "Segment", module = "ferromp._core", frozen)]
pub(crate) struct PySegment {
    seg: Segment,
}

#[pymethods]
impl PySegment {
    /// `Segment(size)`: a fresh zero-filled segment of `size` bytes (at least 1).
    #[new]
    fn new(size: isize) -> PyResult<PySegment> {
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| PyValueError::new_err("segment size must be positive"))?;
        Ok(PySegment {
            seg: Segment::new(size)?,
        })
    }

    /// `Segment.from_fd(fd)`: the segment in memfd `fd`, which the new object owns from
    /// now on (it is closed when the object is collected, also when this raises).
    #[staticmethod]
    fn from_fd(fd: i32) -> PyResult<PySegment> {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: the caller hands over an open fd it will not use or close again (the
        // documented contract of this method, as for `SemLock._rebuild`).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PySegment {
            seg: Segment::from_fd(owned)?,
        })
    }

    /// The memfd (owned by this object: duplicate it to keep it beyond its life).
    #[getter]
    fn fd(&self) -> i32 {
        self.seg.as_raw_fd()
    }

    /// The size in bytes.
    #[getter]
    fn size(&self) -> usize {
        self.seg.len()
    }

    /// Where the core's mapping starts in this process.
    #[getter]
    fn address(&self) -> usize {
        self.seg.as_ptr() as usize
    }

    fn __len__(&self) -> usize {
        self.seg.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Segment fd={} size={}>",
            self.seg.as_raw_fd(),
            self.seg.len()
        )
    }
}

/// Our own handle on a SemLock's shared state. `raw` points into `_map`; declared
/// first so that it is dropped before the mapping.
struct FastLock {
    raw: RawSemaphore,
    _map: MmapMut,
}

impl FastLock {
    /// Maps the semaphore state in `fd` (a `SemLock.handle`); `None` if that fails or
    /// the file holds no semaphore, and the caller then uses the slow path only.
    fn attach(fd: i32) -> Option<FastLock> {
        if fd < 0 {
            return None;
        }
        // SAFETY: the fd is the handle of a live SemLock, open for this call (the
        // caller holds the lock object); it is only borrowed for fstat and mmap.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let size = nix::sys::stat::fstat(fd).ok()?.st_size;
        if !usize::try_from(size).is_ok_and(|s| s >= STATE_SIZE) {
            return None;
        }
        // SAFETY: a MAP_SHARED mapping of the first STATE_SIZE bytes of a memfd that
        // no one truncates (crate::sync sizes it once); its bytes are only accessed
        // through the atomics of `RawSemaphore`, as every other handle does.
        let mut map = unsafe { MmapOptions::new().len(STATE_SIZE).map_mut(fd.as_raw_fd()) }.ok()?;
        // SAFETY: page aligned, STATE_SIZE long, lives as long as the handle (same
        // struct, dropped after it); `attach` checks the magic of the state.
        let raw = unsafe { RawSemaphore::attach(map.as_mut_ptr(), map.len()) }.ok()?;
        Some(FastLock { raw, _map: map })
    }
}

struct Cell {
    obj: Py<PyAny>,
    acquire: Py<PyAny>,
    release: Py<PyAny>,
    fast: Option<FastLock>,
}

/// Native base of `sharedctypes.SynchronizedBase`: a ctypes object and its lock; see
/// the module docs. Bound once, by `_bind`, from the wrapper's `__init__`.
#[pyclass(name = "SharedCell", module = "ferromp._core", subclass, frozen)]
pub(crate) struct PySharedCell {
    cell: OnceLock<Cell>,
}

impl PySharedCell {
    fn bound(&self) -> PyResult<&Cell> {
        self.cell
            .get()
            .ok_or_else(|| PyRuntimeError::new_err("synchronized wrapper not initialised"))
    }

    /// Runs `f` on the ctypes object with the lock held.
    fn locked<'py, T>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
    ) -> PyResult<T> {
        let cell = self.bound()?;
        let obj = cell.obj.bind(py);
        if let Some(fast) = &cell.fast {
            if fast.raw.try_acquire().is_ok() {
                let r = f(obj);
                // Cannot fail: this handle holds it, in this thread, right now (the GIL
                // is held throughout, so no other thread of ours ran in between).
                let released = fast.raw.release();
                debug_assert!(released.is_ok());
                return r;
            }
        }
        cell.acquire.call0(py)?;
        let r = f(obj);
        // As a `finally:` clause: an error from release() wins.
        cell.release.call0(py)?;
        r
    }
}

#[pymethods]
impl PySharedCell {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        PySharedCell {
            cell: OnceLock::new(),
        }
    }

    /// `_bind(obj, acquire, release, handle)`: the ctypes object, the lock's methods,
    /// and the lock's `SemLock.handle` (or -1 when it is not a ferromp SemLock).
    fn _bind(
        &self,
        obj: Py<PyAny>,
        acquire: Py<PyAny>,
        release: Py<PyAny>,
        handle: i32,
    ) -> PyResult<()> {
        let cell = Cell {
            obj,
            acquire,
            release,
            fast: FastLock::attach(handle),
        };
        self.cell
            .set(cell)
            .map_err(|_| PyRuntimeError::new_err("synchronized wrapper already initialised"))
    }

    /// `obj.value` under the lock.
    fn _get(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.locked(py, |o| o.getattr(intern!(py, "value")).map(Bound::unbind))
    }

    /// `obj.value = value` under the lock.
    fn _set(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.locked(py, |o| o.setattr(intern!(py, "value"), value))
    }

    /// `obj[key]` under the lock.
    fn _getitem(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.locked(py, |o| o.get_item(key).map(Bound::unbind))
    }

    /// `obj[key] = value` under the lock.
    fn _setitem(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.locked(py, |o| o.set_item(key, value))
    }
}

/// The name as a C string; `ValueError` for an embedded NUL (as `os.open` does).
fn shm_name(path: &Bound<'_, PyString>) -> PyResult<CString> {
    CString::new(path.to_cow()?.into_owned())
        .map_err(|_| PyValueError::new_err("embedded null character"))
}

/// A core error of a call on `path`: an OS error carries the name, as `_posixshmem`'s.
fn named_err(e: Error, path: &Bound<'_, PyString>) -> PyErr {
    match e {
        Error::Os(errno) => PyOSError::new_err((
            errno as i32,
            errno.desc().to_string(),
            path.clone().unbind(),
        )),
        other => other.into(),
    }
}

/// `shm_open(path, flags, mode=0o777)`: opens the POSIX shared-memory object `path`
/// and returns the new fd (close-on-exec), as `_posixshmem.shm_open`.
#[pyfunction]
#[pyo3(signature = (path, flags, mode = 0o777))]
fn shm_open(path: &Bound<'_, PyString>, flags: i32, mode: u32) -> PyResult<i32> {
    let name = shm_name(path)?;
    let fd = crate::shm::shm_open(
        &name,
        OFlag::from_bits_retain(flags),
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| named_err(e, path))?;
    Ok(fd.into_raw_fd())
}

/// `shm_open_sized(path, flags, mode=0o600, size=0)`: `shm_open`, then `ftruncate` to
/// `size` unless it is 0, then `fstat`; returns `(fd, size)`. A failure after creating
/// the object with `O_CREAT | O_EXCL` unlinks it again.
#[pyfunction]
#[pyo3(signature = (path, flags, mode = 0o600, size = 0))]
fn shm_open_sized(
    path: &Bound<'_, PyString>,
    flags: i32,
    mode: u32,
    size: usize,
) -> PyResult<(i32, usize)> {
    let name = shm_name(path)?;
    let (fd, len) = crate::shm::open_sized(
        &name,
        OFlag::from_bits_retain(flags),
        Mode::from_bits_truncate(mode),
        size,
    )
    .map_err(|e| named_err(e, path))?;
    Ok((fd.into_raw_fd(), len))
}

/// `shm_unlink(path)`: removes the name of a POSIX shared-memory object, as
/// `_posixshmem.shm_unlink`.
#[pyfunction]
fn shm_unlink(path: &Bound<'_, PyString>) -> PyResult<()> {
    let name = shm_name(path)?;
    crate::shm::shm_unlink(&name).map_err(|e| named_err(e, path))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySegment>()?;
    m.add_class::<PySharedCell>()?;
    m.add_function(wrap_pyfunction!(shm_open, m)?)?;
    m.add_function(wrap_pyfunction!(shm_open_sized, m)?)?;
    m.add_function(wrap_pyfunction!(shm_unlink, m)?)
}
