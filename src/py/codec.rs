//! A compact encoding for the most common pool result: a list of plain numbers.
//!
//! `pack_list(obj)` encodes a `list` whose items are all exact `int`s that fit in 64
//! bits (kind `b'q'`) or all exact `float`s (kind `b'd'`): one kind byte, seven zero
//! bytes, then the values in native byte order (the other side is the same machine).
//! Anything else gives `None` and the caller pickles as usual. Decoding builds the list
//! directly, several times faster than unpickling the same list, which is what a
//! parent collecting `Pool.map` results spends most of its time on.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyFloat, PyInt, PyList};

const INTS: u8 = b'q';
const FLOATS: u8 = b'd';
const HEAD: usize = 8;

/// The packed form of `obj`, or None when it is not a list of plain numbers.
#[pyfunction]
pub(crate) fn pack_list<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let Ok(list) = obj.cast::<PyList>() else {
        return Ok(None);
    };
    if !obj.is_exact_instance_of::<PyList>() || list.is_empty() {
        return Ok(None);
    }
    let first = list.get_item(0)?;
    let kind = if first.is_exact_instance_of::<PyInt>() {
        INTS
    } else if first.is_exact_instance_of::<PyFloat>() {
        FLOATS
    } else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(HEAD + 8 * list.len());
    out.push(kind);
    out.extend_from_slice(&[0u8; HEAD - 1]);
    for item in list.iter() {
        if kind == INTS {
            if !item.is_exact_instance_of::<PyInt>() {
                return Ok(None);
            }
            let Ok(v) = item.extract::<i64>() else {
                return Ok(None);
            };
            out.extend_from_slice(&v.to_ne_bytes());
        } else {
            if !item.is_exact_instance_of::<PyFloat>() {
                return Ok(None);
            }
            let v = item.cast::<PyFloat>()?.value();
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
    Ok(Some(PyBytes::new(py, &out)))
}

/// The list `data` (from `pack_list`) stands for.
#[pyfunction]
pub(crate) fn unpack_list<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
) -> PyResult<Bound<'py, PyList>> {
    let bytes = data.as_bytes();
    let bad = || PyValueError::new_err("corrupt packed list");
    if bytes.len() < HEAD || (bytes.len() - HEAD) % 8 != 0 {
        return Err(bad());
    }
    let words = bytes[HEAD..].chunks_exact(8);
    match bytes[0] {
        INTS => PyList::new(py, words.map(|w| i64::from_ne_bytes(w.try_into().unwrap()))),
        FLOATS => PyList::new(py, words.map(|w| f64::from_ne_bytes(w.try_into().unwrap()))),
        _ => Err(bad()),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_list, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_list, m)?)?;
    Ok(())
}
