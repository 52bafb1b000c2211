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
//! no Python frame.
//!
//! * When the lock is one of ferromp's `SemLock`s (whose hot methods are not
//!   overridden), the cell holds that `PySemLock` and takes it through the lock's own
//!   handle, bookkeeping included: `with v.get_lock(): v.value += 1` re-enters the
//!   held `RLock`. Otherwise it calls the lock's `acquire()` / `release()`, as the
//!   stdlib's wrappers do.
//! * The scalar of an integer or float `Value` is loaded and stored by the cell
//!   ([`crate::scalar`]); anything else goes through the ctypes object, so conversions and
//!   errors are ctypes' own.
//! * `Synchronized.value` is a raw getset descriptor ([`value_get`], [`value_set`]):
//!   the uncontended case is lock word, load or store, lock word
//!   ([`RawSemaphore::try_locked`](crate::sync::RawSemaphore::try_locked)), with no
//!   pyo3 trampoline; everything else goes through the ordinary pyo3 methods.
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
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use pyo3::exceptions::{PyAttributeError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use super::sync::{slow, PySemLock};
use crate::error::Error;
use crate::scalar::{Bits, Scalar};
use crate::shm::Segment;

/// A fixed-size anonymous shared-memory segment (a close-on-exec memfd).
#[pyclass(name = "Segment", module = "ferromp._core", frozen)]
pub(crate) struct PySegment {
    seg: Segment,
}

/// Bytes between the words [`PySegment::word`] hands out: one cache line each, so
/// processes storing to neighbouring words do not slow each other down.
pub(crate) const WORD_STRIDE: usize = 64;

impl PySegment {
    /// The `index`-th 64-bit word of the segment, [`WORD_STRIDE`] bytes apart.
    pub(crate) fn word(&self, index: usize) -> PyResult<&AtomicU64> {
        let at = index
            .checked_mul(WORD_STRIDE)
            .filter(|at| at + 8 <= self.seg.len())
            .ok_or_else(|| PyValueError::new_err("word index out of range"))?;
        // SAFETY: at + 8 is within the mapping, which lives as long as self; the mapping
        // is page aligned and `at` a multiple of 64, so the word is aligned; other
        // processes only ever access these words atomically too.
        Ok(unsafe { &*(self.seg.as_ptr().add(at) as *const AtomicU64) })
    }
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

    /// Reads the `index`-th word (see `store_word`).
    fn load_word(&self, index: usize) -> PyResult<u64> {
        Ok(self.word(index)?.load(Ordering::Acquire))
    }

    /// Sets the `index`-th word to `new` if it holds `expected`; whether it did.
    fn cas_word(&self, index: usize, expected: u64, new: u64) -> PyResult<bool> {
        Ok(self
            .word(index)?
            .compare_exchange(expected, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok())
    }

    /// Stores `value` into the `index`-th 64-bit word, the words being 64 bytes apart
    /// (the pool's per-worker claims).
    fn store_word(&self, index: usize, value: u64) -> PyResult<()> {
        self.word(index)?.store(value, Ordering::Release);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "<Segment fd={} size={}>",
            self.seg.as_raw_fd(),
            self.seg.len()
        )
    }
}

/// `value` converted as ctypes' setter of `scalar` would, when that needs no Python
/// code: an exact `int` for an integer type (masked to 64 bits), an exact `int` or
/// `float` for a float type. None when ctypes must do it (other types, `bool`, objects
/// with `__index__`, an int too large for a double...): then no exception is left set,
/// and ctypes raises whatever it raises.
///
/// # Safety
///
/// The GIL is held and `value` is a live object.
#[inline]
unsafe fn convert(scalar: &Scalar, value: *mut ffi::PyObject) -> Option<Bits> {
    // SAFETY: per the caller's contract, for every call below.
    unsafe {
        let exact_int = ffi::PyLong_CheckExact(value) != 0;
        if !scalar.is_float() {
            // Masking an exact int never fails.
            return exact_int.then(|| Bits::UInt(ffi::PyLong_AsUnsignedLongLongMask(value)));
        }
        if !exact_int && ffi::PyFloat_CheckExact(value) == 0 {
            return None;
        }
        let d = ffi::PyFloat_AsDouble(value);
        if d == -1.0 && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(Bits::Float(d))
    }
}

fn bits_into_py(py: Python<'_>, bits: Bits) -> PyResult<Py<PyAny>> {
    Ok(match bits {
        Bits::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Bits::UInt(u) => u.into_pyobject(py)?.into_any().unbind(),
        Bits::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
    })
}

struct Cell {
    obj: Py<PyAny>,
    lock: Py<PyAny>,
    acquire: Py<PyAny>,
    release: Py<PyAny>,
    /// The lock, when it is a ferromp SemLock whose methods are the native ones.
    sem: Option<Py<PySemLock>>,
    /// The scalar's bytes, when `obj` is a ctypes integer or float.
    scalar: Option<Scalar>,
}

impl Cell {
    /// Takes the lock (blocking, as `with lock:` does).
    fn lock(&self, py: Python<'_>) -> PyResult<()> {
        match &self.sem {
            Some(sem) => {
                let sem = sem.get();
                if sem.sem.try_acquire().is_err() {
                    sem.wait(py, None)?;
                }
            }
            None => {
                self.acquire.call0(py)?;
            }
        }
        Ok(())
    }

    fn unlock(&self, py: Python<'_>) -> PyResult<()> {
        match &self.sem {
            Some(sem) => Ok(sem.get().sem.release()?),
            None => self.release.call0(py).map(drop),
        }
    }

    /// The scalar loaded under the lock, if both are native and the lock is free or
    /// this thread's own `RLock` (no Python code runs, nothing is allocated, and the
    /// lock's bookkeeping is left alone: see `RawSemaphore::try_locked`).
    #[inline]
    fn fast_load(&self) -> Option<Bits> {
        let (sem, scalar) = (self.sem.as_ref()?, self.scalar.as_ref()?);
        // The GIL is held and the load runs no Python code: `try_locked`'s contract.
        // It cannot fail once taken (given back by this thread, right away).
        sem.get().sem.try_locked(|| scalar.load()).ok()
    }
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
        cell.lock(py)?;
        let r = f(cell.obj.bind(py));
        // As a `finally:` clause: an error from release() wins.
        cell.unlock(py)?;
        r
    }

    fn get_value(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let cell = self.bound()?;
        if let Some(bits) = cell.fast_load() {
            return bits_into_py(py, bits);
        }
        match &cell.scalar {
            Some(scalar) => self
                .locked(py, |_| Ok(scalar.load()))
                .and_then(|b| bits_into_py(py, b)),
            None => self.locked(py, |o| o.getattr(intern!(py, "value")).map(Bound::unbind)),
        }
    }

    fn set_value(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let cell = self.bound()?;
        if let Some(scalar) = &cell.scalar {
            // Converted before the lock is taken: no Python code runs for these types,
            // so that is indistinguishable from converting under it.
            // SAFETY: the GIL is held (`py`) and `value` is a live object.
            if let Some(bits) = unsafe { convert(scalar, value.as_ptr()) } {
                return self.locked(py, |_| {
                    scalar.store(bits);
                    Ok(())
                });
            }
        }
        self.locked(py, |o| o.setattr(intern!(py, "value"), value))
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

    /// `_bind(obj, lock, acquire, release, native, address, code, size)`: the ctypes
    /// object, its lock and the lock's methods; `native` says the lock is a ferromp
    /// SemLock whose hot methods are the native ones (then it is taken directly);
    /// `address`, `code` and `size` describe a ctypes integer or float scalar (`code`
    /// its `_type_`, empty for anything else) whose bytes are then accessed directly.
    #[allow(clippy::too_many_arguments)]
    fn _bind(
        &self,
        py: Python<'_>,
        obj: Py<PyAny>,
        lock: Py<PyAny>,
        acquire: Py<PyAny>,
        release: Py<PyAny>,
        native: bool,
        address: usize,
        code: &str,
        size: usize,
    ) -> PyResult<()> {
        let sem = if native {
            Some(lock.bind(py).cast::<PySemLock>()?.clone().unbind())
        } else {
            None
        };
        let cell = Cell {
            obj,
            lock,
            acquire,
            release,
            sem,
            // SAFETY: `address` is that of `obj`'s buffer (`ctypes.addressof`), which
            // `obj` keeps mapped for as long as the cell holds it: a ctypes object over
            // a shared block holds an export of the block's mmap. ctypes accesses it as
            // the same type.
            scalar: unsafe { Scalar::new(address, code, size) },
        };
        self.cell
            .set(cell)
            .map_err(|_| PyRuntimeError::new_err("synchronized wrapper already initialised"))
    }

    /// `_value_descriptor(cls)`: the `value` descriptor (as `SharedCell._value`) made
    /// for `cls`, so that its type check is exact for instances of `cls`.
    #[staticmethod]
    fn _value_descriptor<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
        value_descriptor(cls)
    }

    /// The lock every access takes.
    fn get_lock(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.bound()?.lock.clone_ref(py))
    }

    /// The wrapped ctypes object (no locking).
    fn get_obj(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.bound()?.obj.clone_ref(py))
    }

    /// `obj.value` under the lock (the raw `_value` descriptor's slow path).
    fn _get(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.get_value(py)
    }

    /// `obj.value = value` under the lock.
    fn _set(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_value(py, value)
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

// --- `SharedCell._value`: the raw `value` descriptor of `Synchronized` ---

/// The getset definition behind every `value` descriptor (its address; leaked once).
static VALUE_DEF: OnceLock<usize> = OnceLock::new();

/// A `value` getset descriptor for `cls`, a `SharedCell` subclass (or itself).
///
/// CPython checks `isinstance(obj, cls)` before calling the functions of a descriptor
/// made for `cls`; for an instance of exactly `cls` that is one pointer comparison,
/// where a descriptor made for the base would walk the MRO on every access.
fn value_descriptor<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    if !cls.is_subclass_of::<PySharedCell>()? {
        return Err(PyTypeError::new_err("expected a SharedCell subclass"));
    }
    let def = *VALUE_DEF.get_or_init(|| {
        // The definition must outlive every descriptor: leaked, once per process.
        Box::leak(Box::new(ffi::PyGetSetDef {
            name: c"value".as_ptr(),
            get: Some(value_get),
            set: Some(value_set),
            doc: c"The value, read and written under the lock.".as_ptr(),
            closure: std::ptr::null_mut(),
        })) as *mut ffi::PyGetSetDef as usize
    });
    // SAFETY: a live type object whose instances are SharedCells (checked above, which
    // is what `value_get` / `value_set` rely on) and a definition that lives forever;
    // the result is a new reference or NULL with an exception set (turned into Err).
    unsafe {
        Bound::from_owned_ptr_or_err(
            cls.py(),
            ffi::PyDescr_NewGetSet(cls.as_type_ptr(), def as *mut ffi::PyGetSetDef),
        )
    }
}

/// The cell behind `slf`.
///
/// # Safety
///
/// The GIL is held and `slf` is a live `SharedCell` (or subclass) instance: CPython's
/// getset descriptors check that before calling their functions.
unsafe fn cell_of<'a>(slf: *mut ffi::PyObject) -> &'a PySharedCell {
    // SAFETY: the GIL is held (all `assume_attached` asks)...
    let py = unsafe { Python::assume_attached() };
    // SAFETY: ...and `slf` is a live SharedCell borrowed for the call.
    unsafe {
        Borrowed::from_ptr(py, slf)
            .cast_unchecked::<PySharedCell>()
            .get()
    }
}

/// `value` getter: lock, load, unlock, box. Installed as a raw getset (no pyo3
/// trampoline) because it is the whole cost of `v.value`.
unsafe extern "C" fn value_get(
    slf: *mut ffi::PyObject,
    _closure: *mut std::ffi::c_void,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython's getset descriptor on a SharedCell (see `cell_of`).
    let this = unsafe { cell_of(slf) };
    if let Some(bits) = this.cell.get().and_then(Cell::fast_load) {
        // SAFETY: the GIL is held; each returns a new reference, or NULL with an
        // exception (MemoryError) set, which is what a getter returns too.
        return unsafe {
            match bits {
                Bits::Int(i) => ffi::PyLong_FromLongLong(i),
                Bits::UInt(u) => ffi::PyLong_FromUnsignedLongLong(u),
                Bits::Float(f) => ffi::PyFloat_FromDouble(f),
            }
        };
    }
    slow(|py| this.get_value(py))
}

/// `value` setter.
unsafe extern "C" fn value_set(
    slf: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    _closure: *mut std::ffi::c_void,
) -> std::ffi::c_int {
    // SAFETY: called by CPython's getset descriptor on a SharedCell (see `cell_of`).
    let this = unsafe { cell_of(slf) };
    // The fast path: an exact int or float, a native lock that is free (or this
    // thread's RLock), a scalar stored directly. No Python object is made.
    if let Some(cell) = this.cell.get().filter(|_| !value.is_null()) {
        if let (Some(sem), Some(scalar)) = (&cell.sem, &cell.scalar) {
            // SAFETY: the GIL is held and `value` is a live, non-null object.
            if let Some(bits) = unsafe { convert(scalar, value) } {
                // GIL held, the store runs no Python code: `try_locked`'s contract.
                if sem.get().sem.try_locked(|| scalar.store(bits)).is_ok() {
                    return 0;
                }
            }
        }
    }
    let r = slow(|py| {
        if value.is_null() {
            // SAFETY: `slf` is live.
            let slf = unsafe { Borrowed::from_ptr(py, slf) };
            return Err(PyAttributeError::new_err(format!(
                "property 'value' of '{}' object has no deleter",
                slf.get_type().name()?
            )));
        }
        // SAFETY: a live object, borrowed for the call.
        let value = unsafe { Borrowed::from_ptr(py, value) };
        this.set_value(py, &value)?;
        Ok(py.None())
    });
    if r.is_null() {
        return -1;
    }
    // SAFETY: `slow` returned a new reference (None); the GIL is held.
    unsafe { ffi::Py_DecRef(r) };
    0
}

/// The name as a C string; `ValueError` for an embedded NUL (as `os.open` does).
fn shm_name(path: &Bound<'_, PyString>) -> PyResult<CString> {
    CString::new(path.to_cow()?.into_owned())
        .map_err(|_| PyValueError::new_err("embedded null character"))
}

/// A core error of a call on `path`: an OS error carries the name, as `_posixshmem`'s.
/// Setting `filename` after construction leaves the same exception as
/// `OSError(errno, strerror, path)` would be: CPython keeps only the first two in
/// `args` either way, and `str()` / pickling read the attribute.
fn named_err(e: Error, path: &Bound<'_, PyString>) -> PyErr {
    let is_os = matches!(e, Error::Os(_));
    let err = PyErr::from(e);
    if is_os {
        // OSError's `filename` is a plain writable member: this cannot fail.
        let _ = err
            .value(path.py())
            .setattr(intern!(path.py(), "filename"), path);
    }
    err
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
    // `SharedCell._value`: a getset descriptor named `value`, which
    // `sharedctypes.Synchronized` takes as its `value` attribute. Not `value` on the
    // base itself: arrays and structures must not grow a `value` attribute.
    let ty = m.py().get_type::<PySharedCell>();
    ty.setattr("_value", value_descriptor(&ty)?)?;
    m.add_function(wrap_pyfunction!(shm_open, m)?)?;
    m.add_function(wrap_pyfunction!(shm_open_sized, m)?)?;
    m.add_function(wrap_pyfunction!(shm_unlink, m)?)
}
