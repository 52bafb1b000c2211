//! Bindings for `sync/`: the `SemLock` type behind `ferromp.synchronize`, and
//! `sem_unlink`, with the API of CPython's `_multiprocessing.SemLock`.
//!
//! The stdlib's semaphores are POSIX named semaphores; ours live in a memfd (see
//! `crate::sync`), so they have no name in any file system and nothing to leak. The
//! `name` / `unlink` constructor arguments are kept so that `ferromp._multiprocessing`
//! can stand in for the C module: names are recorded as `sem_open` / `sem_unlink`
//! would keep them, per process (`crate::sync::names`).
//!
//! The fd (`handle`) is what crosses to other processes; `_rebuild` maps it again.
//!
//! # The hot methods are raw C functions
//!
//! `acquire`, `release`, `__enter__` and `__exit__` are what every `with lock:` and
//! `lock.acquire()` runs, and the stdlib's are C methods costing a few ns of call
//! overhead. pyo3's generated methods cost more: under `abi3-py39` a method with
//! arguments is `METH_VARARGS | METH_KEYWORDS` (a tuple per call), and its trampoline
//! does per-call bookkeeping. So these four are plain `extern "C"` functions in the
//! `METH_FASTCALL` / `METH_NOARGS` conventions, installed on the type by [`register`]
//! (see [`FastMethod`]). They do only the uncontended case themselves (a
//! compare-and-swap on the semaphore word, with the GIL held, no allocation); anything
//! else (keywords, a timeout, a wait, an error) goes through [`Python::attach`] to the
//! ordinary pyo3 code (pyo3's own `acquire` included), so argument errors, the GIL release while
//! blocking and Ctrl-C handling are the same as before.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyTuple, PyType};

use crate::error::Error;
use crate::py::{blocking_sliced, deadline};
use crate::sync::{names, Recovery, SemKind, Semaphore, SEM_VALUE_MAX};

/// The longest a blocked acquire sleeps before it runs Python's signal handlers (see
/// [`PySemLock::wait`]): the worst-case Ctrl-C latency when the signal misses the
/// futex call. The same period as the dead-owner check, whose wake-ups it shares.
const SIGNAL_SLICE: Duration = crate::sync::OWNER_CHECK_PERIOD;

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

/// A process-shared semaphore or recursive mutex (`_multiprocessing.SemLock`).
#[pyclass(name = "SemLock", module = "ferromp._core", subclass, frozen)]
pub(crate) struct PySemLock {
    pub(crate) sem: Semaphore,
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
        let value = u32::try_from(value).map_err(|_| Error::Os(Errno::EINVAL))?;
        // A negative bound makes every release an over-release, as in the stdlib.
        let maxvalue = u32::try_from(maxvalue).unwrap_or(0);
        let recovery = if recover {
            Recovery::DeadOwner
        } else {
            Recovery::Never
        };
        // As sem_open(O_CREAT | O_EXCL) followed by sem_unlink when `unlink` is true:
        // the name must be valid and free either way, and is kept only without unlink.
        let key = name.as_deref().map(names::check_free).transpose()?;
        let sem = Semaphore::new(kind, value, maxvalue, recovery)?;
        let name = match key {
            Some(k) if !unlink => {
                names::take(k);
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

    /// The checked path of `acquire`: the same arguments, parsed by pyo3. `register`
    /// keeps this method in [`CHECKED_ACQUIRE`] and installs the raw one in its place.
    #[pyo3(signature = (block=IntFlag(true), timeout=None),
           text_signature = "($self, /, block=True, timeout=None)")]
    fn acquire(&self, py: Python<'_>, block: IntFlag, timeout: Option<f64>) -> PyResult<bool> {
        // The uncontended path: one CAS, no GIL release.
        match self.sem.try_acquire() {
            Ok(()) => return Ok(true),
            Err(Error::WouldBlock) => {}
            Err(e) => return Err(e.into()),
        }
        if !block.0 {
            return Ok(false);
        }
        self.wait(py, timeout)
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
    ///
    /// The sleep is cut into slices of at most [`SIGNAL_SLICE`], and Python's signal
    /// handlers run between two slices too (see [`blocking_sliced`]): a signal that
    /// misses the futex call (lands while spinning, or while a robust waiter checks its
    /// holder every 100 ms) would leave the stdlib's semaphore sleeping on, deaf to
    /// Ctrl-C; here it is seen at the end of the slice at the latest.
    pub(crate) fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        // The stdlib treats a negative timeout as zero.
        let deadline = deadline(timeout.map(|t| if t < 0.0 { 0.0 } else { t }))?;
        let sem = &self.sem;
        let got = blocking_sliced(py, deadline, SIGNAL_SLICE, |until| {
            sem.acquire_word(Some(until))
        })?;
        // The bookkeeping is updated here, with the GIL: see `crate::sync`.
        if got {
            self.sem.note_acquired();
        }
        Ok(got)
    }

    /// Maps the semaphore in `fd`, checking it is of the expected kind and bound.
    fn attach(fd: OwnedFd, kind: SemKind, maxvalue: i32, name: Option<String>) -> PyResult<Self> {
        let sem = Semaphore::from_fd(fd)?;
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
        return Err(Error::Os(Errno::EBADF).into());
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
    Ok(names::unlink(name)?)
}

// --- The raw hot methods (see the module docs) ---

/// `METH_FASTCALL` (0x0080): the vectorcall convention, which CPython has used for its
/// own builtins since 3.7 and which is stable since 3.8 (PEP 590). pyo3-ffi hides the
/// constant under `abi3-py39` only because the limited API listed it from 3.10 on.
const METH_FASTCALL: std::ffi::c_int = 0x0080;

/// pyo3's own `acquire` method descriptor, which the raw one replaces on the type and
/// calls for anything beyond its fast path (so pyo3 parses and rejects arguments).
static CHECKED_ACQUIRE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The `METH_FASTCALL | METH_KEYWORDS` signature.
type FastCallKw = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// The `METH_FASTCALL` signature.
type FastCall = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
) -> *mut ffi::PyObject;

/// The `METH_NOARGS` signature (the second argument is always NULL).
type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

/// The `SemLock` behind `slf`.
///
/// # Safety
///
/// The GIL is held and `slf` is a live instance of `SemLock` or of a subclass: CPython
/// checks that before it calls a method descriptor's function, so this holds for `slf`
/// in every function installed by [`register`].
unsafe fn this<'a>(slf: *mut ffi::PyObject) -> &'a PySemLock {
    // SAFETY: the caller holds the GIL (which is all `assume_attached` asks)...
    let py = unsafe { Python::assume_attached() };
    // SAFETY: ...and `slf` is a live SemLock, borrowed for the call, so a reference to
    // its (frozen, Sync) contents is valid for as long as the caller's borrow.
    unsafe {
        Borrowed::from_ptr(py, slf)
            .cast_unchecked::<PySemLock>()
            .get()
    }
}

/// A new reference to `obj` (`Py_True`, `Py_False`, `Py_None`), as a return value.
///
/// # Safety
///
/// The GIL is held and `obj` is a live object.
unsafe fn new_ref(obj: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: as the caller promises.
    unsafe { ffi::Py_IncRef(obj) };
    obj
}

/// Runs the non-fast part of a raw method in the ordinary pyo3 world: an error (or a
/// panic) becomes the raised exception and NULL is returned, as CPython expects.
pub(crate) fn slow(f: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>) -> *mut ffi::PyObject {
    // Python::attach with the GIL already held (it always is here) only bumps pyo3's
    // own counters; it makes pyo3's reference handling exact for what `f` does.
    Python::attach(|py| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(py)))
            .unwrap_or_else(|_| Err(PanicException::new_err("panic in ferromp._core")));
        match r {
            Ok(obj) => obj.into_ptr(),
            Err(e) => {
                e.restore(py);
                std::ptr::null_mut()
            }
        }
    })
}

fn py_bool(py: Python<'_>, b: bool) -> Py<PyAny> {
    PyBool::new(py, b).to_owned().into_any().unbind()
}

/// `acquire(block=True, timeout=None)`: returns True once acquired, False when `block`
/// is false and it is not available, or when `timeout` seconds passed first. Ctrl-C
/// interrupts the wait.
unsafe extern "C" fn semlock_acquire(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython as a method of SemLock (see `this`).
    let lock = unsafe { this(slf) };
    if kwnames.is_null() && nargs <= 1 {
        // SAFETY: with the GIL held, the singletons are live, and `args` holds `nargs`
        // borrowed references.
        let (t, f) = unsafe { (ffi::Py_True(), ffi::Py_False()) };
        let block = match nargs {
            0 => Some(true),
            // SAFETY: nargs == 1, so args[0] exists.
            _ => match unsafe { *args } {
                a if a == t => Some(true),
                a if a == f => Some(false),
                _ => None,
            },
        };
        if let Some(block) = block {
            match lock.sem.try_acquire() {
                // SAFETY: the GIL is held and the singletons are live.
                Ok(()) => return unsafe { new_ref(t) },
                // SAFETY: as above.
                Err(_) if !block => return unsafe { new_ref(f) },
                Err(_) => return slow(|py| lock.wait(py, None).map(|b| py_bool(py, b))),
            }
        }
    }
    // Other arguments: parsed (and rejected) by pyo3, in the checked `acquire`.
    slow(|py| {
        // SAFETY: `args` holds `nargs` positional and then len(kwnames) keyword values,
        // all borrowed for this call; `slf` is live.
        let (slf, all) = unsafe {
            let n = usize::try_from(nargs).unwrap_or(0);
            let kw = if kwnames.is_null() {
                0
            } else {
                ffi::PyTuple_Size(kwnames) as usize
            };
            (
                Borrowed::from_ptr(py, slf),
                std::slice::from_raw_parts(args, n + kw),
            )
        };
        let n = usize::try_from(nargs).unwrap_or(0);
        let mut pos = vec![slf.to_owned()];
        // SAFETY: each element is a live object borrowed for this call.
        pos.extend(
            all[..n]
                .iter()
                .map(|&a| unsafe { Borrowed::from_ptr(py, a) }.to_owned()),
        );
        let kwargs = PyDict::new(py);
        if !kwnames.is_null() {
            // SAFETY: kwnames is a live tuple of str, borrowed for this call.
            let names = unsafe { Borrowed::from_ptr(py, kwnames) };
            for (name, &value) in names.try_iter()?.zip(&all[n..]) {
                // SAFETY: a live object borrowed for this call.
                kwargs.set_item(name?, unsafe { Borrowed::from_ptr(py, value) })?;
            }
        }
        let method = CHECKED_ACQUIRE
            .get(py)
            .expect("set by register before the raw acquire is installed")
            .bind(py);
        Ok(method.call(PyTuple::new(py, pos)?, Some(&kwargs))?.unbind())
    })
}

/// `release()`: raises ValueError when that would exceed `maxvalue`, AssertionError for
/// a recursive lock the calling thread does not own.
unsafe extern "C" fn semlock_release(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython as a method of SemLock (see `this`).
    let lock = unsafe { this(slf) };
    // No GIL release: at most one FUTEX_WAKE, which never blocks.
    match lock.sem.release() {
        // SAFETY: the GIL is held and None is live.
        Ok(()) => unsafe { new_ref(ffi::Py_None()) },
        Err(e) => slow(|_| Err(e.into())),
    }
}

/// `__enter__()`: `acquire()`, blocking without a timeout; returns True.
unsafe extern "C" fn semlock_enter(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython as a method of SemLock (see `this`).
    let lock = unsafe { this(slf) };
    match lock.sem.try_acquire() {
        // SAFETY: the GIL is held and True is live.
        Ok(()) => unsafe { new_ref(ffi::Py_True()) },
        Err(_) => slow(|py| lock.wait(py, None).map(|b| py_bool(py, b))),
    }
}

/// `__exit__(*args)`: `release()`.
unsafe extern "C" fn semlock_exit(
    slf: *mut ffi::PyObject,
    _args: *const *mut ffi::PyObject,
    _nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: the same call contract as `release`, whose second argument is unused.
    unsafe { semlock_release(slf, std::ptr::null_mut()) }
}

/// One of the raw methods, as CPython wants it described.
enum FastMethod {
    NoArgs(NoArgs),
    FastCall(FastCall),
    FastCallKw(FastCallKw),
}

/// Installs `func` as method `name` of `ty`, with `doc` (whose first line may be a
/// `name($self, ...)\n--\n\n` text signature, as for C methods).
fn install(
    ty: &Bound<'_, PyType>,
    name: &'static std::ffi::CStr,
    func: FastMethod,
    doc: &'static std::ffi::CStr,
) -> PyResult<()> {
    let (meth, flags) = match func {
        FastMethod::NoArgs(f) => (ffi::PyMethodDefPointer { PyCFunction: f }, ffi::METH_NOARGS),
        FastMethod::FastCall(f) => {
            // SAFETY: CPython calls `ml_meth` with the signature that `ml_flags` names
            // (METH_FASTCALL), so storing it under the union's generic member is how C
            // extensions do it too (a cast to PyCFunction).
            let f = unsafe { std::mem::transmute::<FastCall, NoArgs>(f) };
            (ffi::PyMethodDefPointer { PyCFunction: f }, METH_FASTCALL)
        }
        FastMethod::FastCallKw(f) => (
            ffi::PyMethodDefPointer {
                PyCFunctionWithKeywords: unsafe_fastcall_kw(f),
            },
            METH_FASTCALL | ffi::METH_KEYWORDS,
        ),
    };
    // The definition must outlive the type: leaked once per process (module init).
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: meth,
        ml_flags: flags,
        ml_doc: doc.as_ptr(),
    }));
    let py = ty.py();
    // SAFETY: `ty` is a live type object and `def` lives forever; the result is a new
    // reference (or NULL with an exception set, turned into Err).
    let descr =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(ty.as_type_ptr(), def))? };
    ty.setattr(name.to_str().expect("ASCII name"), descr)
}

/// A `METH_FASTCALL | METH_KEYWORDS` function stored as the `PyCFunctionWithKeywords`
/// member of the union.
fn unsafe_fastcall_kw(f: FastCallKw) -> ffi::PyCFunctionWithKeywords {
    // SAFETY: as for `FastCall` in `install`: CPython calls it with the signature its
    // flags name, whatever member of the union it was stored under.
    unsafe { std::mem::transmute::<FastCallKw, ffi::PyCFunctionWithKeywords>(f) }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySemLock>()?;
    let ty = m.py().get_type::<PySemLock>();
    let checked = ty.getattr("acquire")?.unbind();
    // A second module init in one process (never done by CPython) keeps the first.
    let _ = CHECKED_ACQUIRE.set(m.py(), checked);
    install(
        &ty,
        c"acquire",
        FastMethod::FastCallKw(semlock_acquire),
        c"acquire($self, /, block=True, timeout=None)\n--\n\nAcquire the semaphore/lock.",
    )?;
    install(
        &ty,
        c"release",
        FastMethod::NoArgs(semlock_release),
        c"release($self, /)\n--\n\nRelease the semaphore/lock.",
    )?;
    install(
        &ty,
        c"__enter__",
        FastMethod::NoArgs(semlock_enter),
        c"__enter__($self, /)\n--\n\nEnter the semaphore/lock.",
    )?;
    install(
        &ty,
        c"__exit__",
        FastMethod::FastCall(semlock_exit),
        c"__exit__($self, /, *args)\n--\n\nExit the semaphore/lock.",
    )?;
    m.add_function(wrap_pyfunction!(sem_unlink, m)?)?;
    Ok(())
}
