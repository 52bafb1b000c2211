//! Bindings for `sync/`: the `SemLock` type behind `ferromp.synchronize`, and
//! `sem_unlink`, with the API of CPython's `_multiprocessing.SemLock`.
//!
//! The stdlib's semaphores are POSIX named semaphores; ours live in a memfd (see
//! `crate::sync`), so they have no name in any file system and nothing to leak. The
//! `name` / `unlink` constructor arguments are kept so that `ferromp._multiprocessing`
//! can stand in for the C module: a name given with `unlink=False` is recorded in a
//! per-process table, so a second semaphore with the same name fails with
//! `FileExistsError` and `sem_unlink` succeeds exactly once, as with `sem_open` /
//! `sem_unlink`. The table is per process: another process cannot unlink the name.
//!
//! The fd (`handle`) is what crosses to other processes; `_rebuild` maps it again.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use nix::errno::Errno;
use pyo3::exceptions::{PyAssertionError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyTuple, PyType};

use crate::py::deadline;
use crate::sync::{Recovery, SemKind, Semaphore, SyncError, SEM_VALUE_MAX};

/// Maps a core semaphore error to the exception the stdlib raises for it.
fn sync_err(e: SyncError) -> PyErr {
    match e {
        // Both messages are the stdlib's, word for word (see SyncError's Display).
        SyncError::NotOwner => PyAssertionError::new_err(e.to_string()),
        SyncError::OverRelease(_) => PyValueError::new_err(e.to_string()),
        // Neither escapes `acquire` (handled there); mapped like the errno they stand for.
        SyncError::WouldBlock => os_err(Errno::EAGAIN),
        SyncError::Interrupted => os_err(Errno::EINTR),
        SyncError::Os(errno) => os_err(errno),
    }
}

/// `OSError(errno, strerror)`: CPython picks the subclass (FileNotFoundError...).
fn os_err(errno: Errno) -> PyErr {
    PyOSError::new_err((errno as i32, strerror(errno)))
}

/// The C library's message for `errno`, which is what the stdlib shows (nix's own
/// descriptions differ for some codes, e.g. EBADF).
fn strerror(errno: Errno) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: `buf` is writable for `buf.len()` bytes; the XSI strerror_r (libc binds
    // glibc's __xpg_strerror_r) writes a NUL-terminated, possibly truncated message
    // into it and touches nothing else.
    let rc = unsafe { libc::strerror_r(errno as i32, buf.as_mut_ptr().cast(), buf.len()) };
    match std::ffi::CStr::from_bytes_until_nul(&buf) {
        Ok(msg) if rc == 0 => msg.to_string_lossy().into_owned(),
        _ => errno.desc().to_owned(),
    }
}

/// A flag argument taken as the stdlib's `bool(accept={int})` arguments are: a bool
/// or anything with `__index__` that fits a C int (so `acquire(0)` works like
/// `acquire(False)`), TypeError for anything else (`acquire(None)`, `acquire(0.5)`).
#[derive(Clone, Copy)]
struct IntFlag(bool);

impl<'a, 'py> FromPyObject<'a, 'py> for IntFlag {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(IntFlag(b.is_true()));
        }
        // A C int, as in the stdlib: OverflowError beyond that.
        obj.extract::<i32>().map(|v| IntFlag(v != 0))
    }
}

/// Names of semaphores created with `unlink=False` and not yet unlinked.
///
/// Only touched with the GIL held (every caller is a Python-facing function that does
/// not detach), so no fork can happen while the mutex is held: the child never inherits
/// it locked.
static NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn names() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    NAMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key `sem_open` would use for `name`: glibc ignores leading slashes and refuses
/// an empty name or one with a slash inside (`EINVAL`).
fn sem_key(name: &str) -> PyResult<String> {
    let key = name.trim_start_matches('/');
    if key.is_empty() || key.contains('/') || key.contains('\0') {
        return Err(os_err(Errno::EINVAL));
    }
    // glibc prefixes "sem." and the result must fit in NAME_MAX.
    if key.len() + 4 > 255 {
        return Err(os_err(Errno::ENAMETOOLONG));
    }
    Ok(key.to_owned())
}

/// A process-shared semaphore or recursive mutex (`_multiprocessing.SemLock`).
#[pyclass(name = "SemLock", module = "ferromp._core", subclass, frozen)]
pub(crate) struct PySemLock {
    sem: Semaphore,
    /// The name given at creation with `unlink=False`, or passed to `_rebuild`.
    name: Option<String>,
}

#[pymethods]
impl PySemLock {
    #[classattr]
    const SEM_VALUE_MAX: u32 = SEM_VALUE_MAX;

    /// `SemLock(kind, value, maxvalue, name, unlink, *, recover=False)`.
    ///
    /// `kind` is 0 (recursive mutex) or 1 (semaphore). `recover=True` lets waiters
    /// take over a lock (mutex mode: `maxvalue == 1`) whose holder process died;
    /// `ferromp.synchronize` turns it on for `Lock` and `RLock`. `_handle` is private:
    /// adopt that fd (an fd of another SemLock's `handle`) instead of creating a
    /// semaphore; `_rebuild` uses it.
    #[new]
    #[pyo3(signature = (kind, value, maxvalue, name, unlink, *, recover=false, _handle=None),
           text_signature = "(kind, value, maxvalue, name, unlink, *, recover=False)")]
    fn new(
        kind: i32,
        value: i32,
        maxvalue: i32,
        name: Option<String>,
        unlink: IntFlag,
        recover: bool,
        _handle: Option<i32>,
    ) -> PyResult<Self> {
        // Adopt first: from here on the fd is ours to close, whatever else fails.
        let adopted = _handle.map(adopt_fd).transpose()?;
        let kind = u32::try_from(kind)
            .ok()
            .and_then(SemKind::from_raw)
            .ok_or_else(|| PyValueError::new_err("unrecognized kind"))?;
        if let Some(fd) = adopted {
            return Self::attach(fd, kind, maxvalue, name);
        }
        let IntFlag(unlink) = unlink;
        let value = u32::try_from(value).map_err(|_| os_err(Errno::EINVAL))?;
        // A negative bound makes every release an over-release, as in the stdlib.
        let maxvalue = u32::try_from(maxvalue).unwrap_or(0);
        let recovery = if recover {
            Recovery::DeadOwner
        } else {
            Recovery::Never
        };
        // As sem_open(O_CREAT | O_EXCL) followed by sem_unlink when `unlink` is true:
        // the name must be valid and free either way, and is kept only without unlink.
        let key = name.as_deref().map(sem_key).transpose()?;
        let mut table = names();
        if let Some(k) = &key {
            if table.contains(k) {
                return Err(os_err(Errno::EEXIST));
            }
        }
        let sem = Semaphore::new(kind, value, maxvalue, recovery).map_err(sync_err)?;
        let name = match key {
            Some(k) if !unlink => {
                table.insert(k);
                name
            }
            _ => None,
        };
        Ok(PySemLock { sem, name })
    }

    /// `_rebuild(handle, kind, maxvalue, name)`: a SemLock on the semaphore in fd
    /// `handle`, which the new object owns from now on (it closes it when collected,
    /// also when this raises). `kind` and `maxvalue` must match the semaphore's.
    #[classmethod]
    #[pyo3(signature = (handle, kind, maxvalue, name, /))]
    fn _rebuild<'py>(
        cls: &Bound<'py, PyType>,
        handle: i32,
        kind: i32,
        maxvalue: i32,
        name: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        // Through the base type's __new__, so a subclass gets an instance of itself
        // without running its __init__ (as the C type's _rebuild does).
        let new = py.get_type::<PySemLock>().getattr("__new__")?;
        let args = PyTuple::new(
            py,
            [
                cls.clone().into_any(),
                kind.into_pyobject(py)?.into_any(),
                0i32.into_pyobject(py)?.into_any(),
                maxvalue.into_pyobject(py)?.into_any(),
                name.into_pyobject(py)?.into_any(),
                true.into_pyobject(py)?.to_owned().into_any(),
            ],
        )?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("_handle", handle)?;
        new.call(args, Some(&kwargs))
    }

    /// Acquire: returns True once acquired, False when `block` is false and it is not
    /// available, or when `timeout` seconds passed first. Ctrl-C interrupts the wait.
    #[pyo3(signature = (block=IntFlag(true), timeout=None),
           text_signature = "($self, /, block=True, timeout=None)")]
    fn acquire(&self, py: Python<'_>, block: IntFlag, timeout: Option<f64>) -> PyResult<bool> {
        // The uncontended path: one CAS, no GIL release.
        match self.sem.try_acquire() {
            Ok(()) => return Ok(true),
            Err(SyncError::WouldBlock) => {}
            Err(e) => return Err(sync_err(e)),
        }
        if !block.0 {
            return Ok(false);
        }
        self.wait(py, timeout)
    }

    /// Release; raises ValueError when that would exceed `maxvalue`, AssertionError for
    /// a recursive lock the calling thread does not own.
    fn release(&self) -> PyResult<()> {
        // No GIL release: at most one FUTEX_WAKE, which never blocks.
        self.sem.release().map_err(sync_err)
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        match self.sem.try_acquire() {
            Ok(()) => Ok(true),
            Err(SyncError::WouldBlock) => self.wait(py, None),
            Err(e) => Err(sync_err(e)),
        }
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.release()
    }

    /// Acquires minus releases through this object in this process.
    fn _count(&self) -> i32 {
        self.sem.count()
    }

    /// Whether the calling thread holds it (through this object).
    fn _is_mine(&self) -> bool {
        self.sem.is_mine()
    }

    fn _get_value(&self) -> u32 {
        self.sem.get_value()
    }

    fn _is_zero(&self) -> bool {
        self.sem.is_zero()
    }

    /// Forget what this process held: run in a child after fork.
    fn _after_fork(&self) {
        self.sem.after_fork();
    }

    /// The memfd holding the semaphore: the fd a child must receive.
    #[getter]
    fn handle(&self) -> i32 {
        self.sem.as_raw_fd()
    }

    #[getter]
    fn kind(&self) -> u32 {
        self.sem.kind() as u32
    }

    #[getter]
    fn maxvalue(&self) -> u32 {
        self.sem.maxvalue()
    }

    #[getter]
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether waiters take the lock over from a dead holder (ferromp-specific).
    #[getter]
    fn recover(&self) -> bool {
        self.sem.recovery() == Recovery::DeadOwner
    }

    fn __repr__(&self) -> String {
        format!(
            "<ferromp._core.SemLock kind={} value={} maxvalue={} handle={}>",
            self.sem.kind() as u32,
            self.sem.get_value(),
            self.sem.maxvalue(),
            self.sem.as_raw_fd()
        )
    }
}

impl PySemLock {
    /// The blocking part of acquire: without the GIL, running signal handlers on EINTR
    /// and resuming with the same deadline unless one of them raised.
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        // The stdlib treats a negative timeout as zero.
        let deadline = deadline(timeout.map(|t| if t < 0.0 { 0.0 } else { t }))?;
        loop {
            match py.detach(|| self.sem.acquire(deadline)) {
                Ok(got) => return Ok(got),
                Err(SyncError::Interrupted) => py.check_signals()?,
                Err(e) => return Err(sync_err(e)),
            }
        }
    }

    /// Maps the semaphore in `fd`, checking it is of the expected kind and bound.
    fn attach(fd: OwnedFd, kind: SemKind, maxvalue: i32, name: Option<String>) -> PyResult<Self> {
        let sem = Semaphore::from_fd(fd).map_err(sync_err)?;
        if sem.kind() != kind || i64::from(sem.maxvalue()) != i64::from(maxvalue.max(0)) {
            return Err(PyValueError::new_err(
                "the handle holds a semaphore of another kind or maxvalue",
            ));
        }
        Ok(PySemLock { sem, name })
    }
}

/// Takes ownership of the fd `_rebuild` was handed.
fn adopt_fd(fd: i32) -> PyResult<OwnedFd> {
    // An fd that is not open must never become an OwnedFd (closing it again is an
    // IO-safety violation, which aborts the interpreter in debug builds).
    // SAFETY: F_GETFD only reads the descriptor flags; any int is a valid argument.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(os_err(Errno::EBADF));
    }
    // SAFETY: the caller hands the fd over (the documented contract of `_rebuild`: a
    // detached DupFd); from here on the returned OwnedFd is its only owner, so it is
    // closed exactly once, when that OwnedFd (or the Semaphore holding it) drops.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sem_unlink(name)`: forget a name recorded by `SemLock(..., name, unlink=False)`.
/// Raises FileNotFoundError for a name that is not recorded in this process.
#[pyfunction]
fn sem_unlink(name: &str) -> PyResult<()> {
    let key = sem_key(name)?;
    if names().remove(&key) {
        Ok(())
    } else {
        Err(os_err(Errno::ENOENT))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySemLock>()?;
    m.add_function(wrap_pyfunction!(sem_unlink, m)?)?;
    Ok(())
}
