//! Packed number lists: how a process pool's `map` chunk whose result is a list of
//! plain ints (or of plain floats) crosses the result ring without pickle.
//!
//! The worker writes the numbers as a little-endian array (`i32` when they all fit,
//! else `i64`; `f64` for floats). The parent gets a [`Packed`] object and stores the
//! numbers straight into the slots of the map's result list, so no chunk list is built
//! and unpickled only to be copied and freed: for a map of tiny tasks that list, and the
//! fresh pages it needs, were a third of the parent's work.
//!
//! Only exact `int` and `float` objects qualify (a `bool`, an int subclass or an int
//! beyond 64 bits sends the whole chunk through pickle), so the parent rebuilds objects
//! equal to and of the same type as the worker's.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// Element kinds (the `u32` after a packed message's header length).
pub(crate) const KIND_I32: u32 = 1;
pub(crate) const KIND_I64: u32 = 2;
pub(crate) const KIND_F64: u32 = 3;

/// Bytes per element of `kind`, or None for an unknown kind.
pub(crate) fn width(kind: u32) -> Option<usize> {
    match kind {
        KIND_I32 => Some(4),
        KIND_I64 | KIND_F64 => Some(8),
        _ => None,
    }
}

/// `items` as a packed array `(kind, bytes)`, or None when an item is not an exact
/// int within 64 bits or an exact float (or the items mix the two, or there are none).
pub(crate) fn encode(items: &Bound<'_, PyList>) -> Option<(u32, Vec<u8>)> {
    let n = items.len();
    if n == 0 {
        return None;
    }
    let ptr = items.as_ptr();
    let item = |i: usize| {
        // SAFETY: `items` is a list we hold with the GIL, the index is below its
        // length, and nothing in the loops below runs Python code that could change the
        // list (the checks and conversions of exact ints and floats do not).
        unsafe { ffi::PyList_GetItem(ptr, i as ffi::Py_ssize_t) }
    };
    // SAFETY: item(0) is a live object (see above).
    if unsafe { ffi::PyFloat_CheckExact(item(0)) } != 0 {
        let mut out = Vec::with_capacity(n * 8);
        for i in 0..n {
            let o = item(i);
            // SAFETY: o is a live object.
            if unsafe { ffi::PyFloat_CheckExact(o) } == 0 {
                return None;
            }
            // SAFETY: o is an exact float (checked just above), so this cannot fail.
            let v = unsafe { ffi::PyFloat_AsDouble(o) };
            out.extend_from_slice(&v.to_le_bytes());
        }
        return Some((KIND_F64, out));
    }
    let mut vals: Vec<i64> = Vec::with_capacity(n);
    let (mut lo, mut hi) = (0i64, 0i64);
    for i in 0..n {
        let o = item(i);
        // SAFETY: o is a live object.
        if unsafe { ffi::PyLong_CheckExact(o) } == 0 {
            return None;
        }
        let mut overflow = 0;
        // SAFETY: o is an exact int; with an overflow flag the call only fails for a
        // non-int, which o is not.
        let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(o, &mut overflow) };
        if overflow != 0 {
            return None;
        }
        lo = lo.min(v);
        hi = hi.max(v);
        vals.push(v);
    }
    if lo >= i32::MIN as i64 && hi <= i32::MAX as i64 {
        let mut out = Vec::with_capacity(n * 4);
        for v in vals {
            out.extend_from_slice(&(v as i32).to_le_bytes());
        }
        Some((KIND_I32, out))
    } else {
        let mut out = Vec::with_capacity(n * 8);
        for v in vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Some((KIND_I64, out))
    }
}

/// A packed list of numbers as the result ring delivered it (see the module docs).
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct Packed {
    kind: u32,
    data: Py<PyBytes>,
}

impl Packed {
    /// A packed list of `kind` over `data` (its length a multiple of the width,
    /// checked by the ring's landing).
    pub(crate) fn new(kind: u32, data: Py<PyBytes>) -> Packed {
        Packed { kind, data }
    }

    /// The new object for element `i` of `b`, or NULL with an exception set.
    fn object(&self, b: &[u8], i: usize) -> *mut ffi::PyObject {
        let at = |w: usize| &b[i * w..(i + 1) * w];
        match self.kind {
            KIND_I32 => {
                let v = i32::from_le_bytes(at(4).try_into().unwrap());
                // SAFETY: a plain constructor; the caller holds the GIL.
                unsafe { ffi::PyLong_FromLong(v as _) }
            }
            KIND_I64 => {
                let v = i64::from_le_bytes(at(8).try_into().unwrap());
                // SAFETY: a plain constructor; the caller holds the GIL.
                unsafe { ffi::PyLong_FromLongLong(v) }
            }
            _ => {
                let v = f64::from_le_bytes(at(8).try_into().unwrap());
                // SAFETY: a plain constructor; the caller holds the GIL.
                unsafe { ffi::PyFloat_FromDouble(v) }
            }
        }
    }
}

#[pymethods]
impl Packed {
    fn __len__(&self, py: Python<'_>) -> usize {
        self.data.bind(py).as_bytes().len() / width(self.kind).unwrap_or(8)
    }

    /// Stores the numbers into `target[start:start + len(self)]`, in place: the list
    /// keeps its length and the items it had there are released.
    fn store(&self, py: Python<'_>, target: &Bound<'_, PyList>, start: usize) -> PyResult<()> {
        let n = self.__len__(py);
        if start.checked_add(n).is_none_or(|end| end > target.len()) {
            return Err(pyo3::exceptions::PyIndexError::new_err(
                "packed results do not fit the list",
            ));
        }
        let data = self.data.bind(py);
        let b = data.as_bytes();
        let list = target.as_ptr();
        for i in 0..n {
            let o = self.object(b, i);
            if o.is_null() {
                return Err(PyErr::fetch(py));
            }
            // SAFETY: list is a list we hold with the GIL and start + i is below its
            // length (checked above; nothing here can shrink it). PyList_SetItem takes
            // over the new reference o and releases the item it replaces.
            if unsafe { ffi::PyList_SetItem(list, (start + i) as ffi::Py_ssize_t, o) } != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(())
    }

    /// The numbers as a new list.
    fn tolist<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let n = self.__len__(py);
        let out = PyList::new(py, (0..n).map(|_| py.None()))?;
        self.store(py, &out, 0)?;
        Ok(out)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Packed>()
}
