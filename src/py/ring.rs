//! Bindings for `ring.rs`: the `Ring` type under `ferromp.queues`.
//!
//! Every operation first tries its fast path with the GIL held: a put that finds room
//! and a get that finds a whole message cost one call, two lock CASes and one copy,
//! without releasing the GIL. Only when it must wait does a call detach (through
//! [`blocking`]); a message taken then is copied straight into fresh Python objects,
//! allocated with the GIL taken back for just that moment.
//!
//! A message is either a `bytes` object (format 0: a pickle) or a tuple of `bytes`
//! (format 1: an *envelope*, made by `queues._dumps_for_ring`): a header, the in-band
//! pickle, then the out-of-band payloads of its large `bytes` / `bytearray` objects.
//! The header is `u32 header length, u32 count, u64 in-band length`, then per payload
//! `u64 kind (0 bytes, 1 bytearray), u64 length`, all little endian. The consumer
//! copies each payload straight into a new object of its kind and unpickles with
//! `loads(inband, buffers=payloads)`, so a large payload is copied once on each side.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMemoryView, PySlice, PyString,
    PyTuple, PyType,
};

use crate::error::{Error, Result};
use crate::py::packed::{self, Packed};
use crate::py::shm::PySegment;
use crate::py::{blocking, deadline, uninit_bytes};
use crate::ring::{self, Dest, Msg};
use crate::shm::Segment;

/// A process's handle on a shared-memory message ring.
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct Ring {
    inner: ring::Ring,
    /// A buffer that large plain messages are copied into before unpickling, kept
    /// between calls: a fresh multi-MiB allocation per message costs more in page
    /// faults than the copy itself. Taken out while in use, so threads never share it.
    scratch: Mutex<Option<Py<PyByteArray>>>,
}

/// How long `offer` waits for room before leaving the message to the caller's feeder.
const SHORT_WAIT: Duration = Duration::from_millis(2);
/// How long a blocking get spins with the GIL held before it lets go of it.
const GIL_SPIN: Duration = Duration::from_micros(3);
/// Plain messages from this size up are unpickled from the scratch buffer.
const BIG: usize = 1 << 16;
/// Scratch buffers up to this size are kept for the next message.
const SCRATCH_KEEP: usize = 1 << 26;
/// Most payloads an envelope may carry (its header then fits any first chunk).
const MAX_PAYLOADS: usize = 60;

/// Message formats besides pickles (0) and envelopes (1): exact scalars, encoded
/// natively, which costs a fraction of pickling and unpickling them. Only objects of
/// exactly these types qualify (a subclass, an int beyond 64 bits: pickled).
const FMT_INT: u16 = 2; // i64, little endian
const FMT_STR: u16 = 3; // UTF-8
const FMT_BYTES: u16 = 4; // the bytes themselves
const FMT_FLOAT: u16 = 5; // f64 bits, little endian
const FMT_CONST: u16 = 6; // one byte: 0 None, 1 False, 2 True

/// The native encoding of a scalar message.
enum Native<'a> {
    Inline([u8; 8], usize),
    Owned(String),
    Borrowed(&'a [u8]),
}

impl Native<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Native::Inline(b, n) => &b[..*n],
            Native::Owned(s) => s.as_bytes(),
            Native::Borrowed(b) => b,
        }
    }
}

/// `obj`'s native encoding, or None when it must be pickled.
fn encode_native<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Option<(u16, Native<'a>)>> {
    if obj.is_exact_instance_of::<PyInt>() {
        return Ok(obj
            .extract::<i64>()
            .ok()
            .map(|v| (FMT_INT, Native::Inline(v.to_le_bytes(), 8))));
    }
    if obj.is_exact_instance_of::<PyString>() {
        // A str with lone surrogates has no UTF-8 form: pickle takes it (as the
        // stdlib does, with "surrogatepass").
        return Ok(match obj.cast::<PyString>()?.to_cow() {
            Ok(s) => Some((FMT_STR, Native::Owned(s.into_owned()))),
            Err(_) => None,
        });
    }
    if obj.is_exact_instance_of::<PyBytes>() {
        let b = obj.cast::<PyBytes>()?;
        // SAFETY: `obj` holds the bytes object for 'a, and bytes are immutable.
        let sl = unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) };
        return Ok(Some((FMT_BYTES, Native::Borrowed(sl))));
    }
    if obj.is_exact_instance_of::<PyFloat>() {
        let v = obj.cast::<PyFloat>()?.value();
        return Ok(Some((
            FMT_FLOAT,
            Native::Inline(v.to_bits().to_le_bytes(), 8),
        )));
    }
    let c = if obj.is_none() {
        0
    } else if obj.is_exact_instance_of::<PyBool>() {
        1 + u8::from(obj.is_truthy()?)
    } else {
        return Ok(None);
    };
    Ok(Some((
        FMT_CONST,
        Native::Inline([c, 0, 0, 0, 0, 0, 0, 0], 1),
    )))
}

/// The object a natively encoded message stands for.
fn decode_native<'py>(py: Python<'py>, fmt: u16, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let bad = || pyo3::exceptions::PyValueError::new_err("corrupt queue message");
    Ok(match fmt {
        FMT_INT => i64::from_le_bytes(b.try_into().map_err(|_| bad())?)
            .into_pyobject(py)?
            .into_any(),
        FMT_STR => PyString::new(py, std::str::from_utf8(b).map_err(|_| bad())?).into_any(),
        FMT_BYTES => PyBytes::new(py, b).into_any(),
        FMT_FLOAT => PyFloat::new(
            py,
            f64::from_bits(u64::from_le_bytes(b.try_into().map_err(|_| bad())?)),
        )
        .into_any(),
        FMT_CONST => match b {
            [0] => py.None().into_bound(py),
            [1] => PyBool::new(py, false).to_owned().into_any(),
            [2] => PyBool::new(py, true).to_owned().into_any(),
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    })
}

/// Where a message was copied.
enum Landing {
    Bytes(Py<PyBytes>),
    Scratch(Py<PyByteArray>, usize),
    Envelope(Py<PyBytes>, Vec<Py<PyAny>>),
    /// A natively encoded `bytes` message: the object itself.
    Raw(Py<PyBytes>),
    /// Another natively encoded scalar (format, encoding).
    Native(u16, Vec<u8>),
    /// A tagged message: its tag, in-band pickle and out-of-band payloads.
    Tagged(u64, Py<PyBytes>, Vec<Py<PyAny>>),
    /// A tagged packed list of numbers: its tag, element kind and array.
    Packed(u64, u32, Py<PyBytes>),
    /// A tagged native scalar: its tag, format and encoding.
    TaggedNative(u64, u16, Vec<u8>),
    /// A tagged native call: its tag, the argument's format, the length of the
    /// function's key, and the key followed by the argument's encoding.
    Call(u64, u16, usize, Vec<u8>),
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

/// A new bytes object of `n` bytes for the ring to fill, and its buffer. A failed
/// allocation (MemoryError) is reported as ENOMEM through the core's error type.
fn new_bytes(py: Python<'_>, n: usize) -> Result<(Py<PyBytes>, *mut u8)> {
    uninit_bytes(py, n)
        .map(|(b, p)| (b.unbind(), p))
        .map_err(|_| Error::Os(Errno::ENOMEM))
}

/// A new, uninitialised bytearray of `n` bytes and its buffer.
fn new_bytearray(py: Python<'_>, n: usize) -> Result<(Py<PyByteArray>, *mut u8)> {
    // SAFETY: a NULL source asks for an uninitialised bytearray of n bytes, which the
    // ring fills before Python sees it.
    let raw = unsafe {
        pyo3::ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n as pyo3::ffi::Py_ssize_t)
    };
    if raw.is_null() {
        let _ = PyErr::take(py);
        return Err(Error::Os(Errno::ENOMEM));
    }
    // SAFETY: raw is a new, owned reference to a bytearray.
    let ba =
        unsafe { Bound::from_owned_ptr(py, raw).cast_into_unchecked::<PyByteArray>() }.unbind();
    // SAFETY: ba is a bytearray of n bytes that only this call holds; nothing resizes
    // it until it is handed to Python after the copy.
    let p = unsafe { pyo3::ffi::PyByteArray_AsString(ba.as_ptr()) } as *mut u8;
    Ok((ba, p))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or(Error::BadLength(at as i64))
}

/// The parts of a message given from Python: a bytes object, or a tuple of them (an
/// envelope, format 1).
enum Parts<'a> {
    One([&'a [u8]; 1]),
    Many(Vec<&'a [u8]>),
}

impl<'a> Parts<'a> {
    fn of(data: &'a Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(b) = data.cast::<PyBytes>() {
            return Ok(Parts::One([b.as_bytes()]));
        }
        let t = data.cast::<PyTuple>()?;
        let mut parts = Vec::with_capacity(t.len());
        for item in t.iter() {
            let b = item.cast_into::<PyBytes>()?;
            // SAFETY: the tuple holds a reference to each bytes object for as long as
            // `data` is borrowed, and bytes are immutable, so the slice stays valid.
            parts.push(unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) });
        }
        Ok(Parts::Many(parts))
    }

    fn msg(&self) -> Msg<'_> {
        match self {
            Parts::One(p) => Msg { parts: p, fmt: 0 },
            Parts::Many(v) => Msg {
                parts: v,
                fmt: ring::FMT_HEADED,
            },
        }
    }
}

/// Writes the fixed header of a natively encoded tagged message (formats
/// `FMT_PACKED`, `FMT_TAGGED_NATIVE`, `FMT_TAGGED_CALL`) into `dst[..TAGGED_HEAD]`:
/// `u32` header length, `u32` kind (element kind or scalar format), `u64` count or
/// length, `u64` tag.
fn native_head(dst: &mut [u8], kind: u32, count: u64, tag: u64) {
    dst[..4].copy_from_slice(&(TAGGED_HEAD as u32).to_le_bytes());
    dst[4..8].copy_from_slice(&kind.to_le_bytes());
    dst[8..16].copy_from_slice(&count.to_le_bytes());
    dst[16..24].copy_from_slice(&tag.to_le_bytes());
}

/// The fields of a natively encoded tagged message's header (see [`native_head`]).
fn read_native_head(head: &[u8]) -> Result<(u32, u64, u64)> {
    if head.len() != TAGGED_HEAD {
        return Err(Error::BadLength(head.len() as i64));
    }
    let kind = u32::from_le_bytes(head[4..8].try_into().unwrap());
    Ok((kind, u64_at(head, 8)?, u64_at(head, 16)?))
}

/// A pool result's native encoding (see `encode_native`), or None when it must be
/// pickled: also a str or bytes longer than `TAGGED_NATIVE_MAX`, so that its buffer can
/// take the spill path (a str that long is turned down before it is copied).
fn encode_result<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Option<(u16, Native<'a>)>> {
    if obj.is_exact_instance_of::<PyString>() && obj.len()? > TAGGED_NATIVE_MAX {
        return Ok(None);
    }
    Ok(encode_native(obj)?.filter(|(_, enc)| enc.bytes().len() <= TAGGED_NATIVE_MAX))
}

/// What `Ring.serve` returns with (see there).
const SERVE_LIMIT: u8 = 0;
const SERVE_TASK: u8 = 1;
const SERVE_RESULT: u8 = 2;
const SERVE_ERROR: u8 = 3;

/// Longest scalar encoding `put_tagged_plain` sends natively.
const TAGGED_NATIVE_MAX: usize = 1 << 16;

/// Bytes of a tagged message's fixed header: `u32` header length, `u32` payload
/// count, `u64` in-band length, `u64` tag (little endian), then the payload table.
const TAGGED_HEAD: usize = 24;

/// Writes the fixed header of a tagged message into `dst[..TAGGED_HEAD]`.
fn tagged_head(dst: &mut [u8], table_len: usize, count: u32, inband: u64, tag: u64) {
    dst[..4].copy_from_slice(&((TAGGED_HEAD + table_len) as u32).to_le_bytes());
    dst[4..8].copy_from_slice(&count.to_le_bytes());
    dst[8..16].copy_from_slice(&inband.to_le_bytes());
    dst[16..24].copy_from_slice(&tag.to_le_bytes());
}

/// A tagged message in the making: its header (with the tag) and the borrowed bytes
/// of its body (a pickle, or an envelope's in-band pickle and payloads).
struct Tagged<'a> {
    head: Vec<u8>,
    body: Vec<&'a [u8]>,
}

impl<'a> Tagged<'a> {
    fn of(tag: u64, data: &'a Bound<'_, PyAny>) -> PyResult<Self> {
        let mut head = Vec::with_capacity(TAGGED_HEAD);
        let mut body: Vec<&'a [u8]> = Vec::with_capacity(2);
        let mut header = |n: u32, inband: u64, table: &[u8]| {
            head.resize(TAGGED_HEAD, 0);
            tagged_head(&mut head, table.len(), n, inband, tag);
            head.extend_from_slice(table);
        };
        if let Ok(b) = data.cast::<PyBytes>() {
            // SAFETY: `data` keeps the bytes object alive for 'a; bytes are immutable.
            let sl = unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) };
            header(0, sl.len() as u64, &[]);
            body.push(sl);
        } else {
            let t = data.cast::<PyTuple>()?;
            let mut items = Vec::with_capacity(t.len());
            for item in t.iter() {
                let b = item.cast_into::<PyBytes>()?;
                // SAFETY: the tuple keeps each bytes object alive while `data` is
                // borrowed, and bytes are immutable.
                items.push(unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) });
            }
            let env = items.first().copied().unwrap_or(&[]);
            if env.len() < 16 || items.len() < 2 {
                return Err(pyo3::exceptions::PyValueError::new_err("bad envelope"));
            }
            let n = u32::from_le_bytes(env[4..8].try_into().unwrap());
            let inband = u64::from_le_bytes(env[8..16].try_into().unwrap());
            header(n, inband, &env[16..]);
            body.extend_from_slice(&items[1..]);
        }
        Ok(Tagged { head, body })
    }

    fn parts(&self) -> Vec<&[u8]> {
        let mut parts = Vec::with_capacity(1 + self.body.len());
        parts.push(self.head.as_slice());
        parts.extend_from_slice(&self.body);
        parts
    }
}

impl Ring {
    /// Puts `msg` on an unbounded ring, waiting for room if needed.
    fn put_unbounded(&self, py: Python<'_>, msg: Msg<'_>) -> PyResult<()> {
        let r = &self.inner;
        if !r.reserve(Some(Instant::now()), &mut || Ok(()))? {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "put() without a timeout needs an unbounded ring",
            ));
        }
        if !r.try_write(msg) {
            blocking(py, |intr| r.write(msg, intr))?;
        }
        Ok(())
    }

    /// Puts `msgs` on an unbounded ring in order: those that fit right away in one
    /// batch with one wake-up, the rest one by one, waiting for room.
    fn put_all(&self, py: Python<'_>, msgs: &[Msg<'_>]) -> PyResult<()> {
        let done = self.inner.try_write_batch(msgs);
        for msg in &msgs[done..] {
            self.put_unbounded(py, *msg)?;
        }
        Ok(())
    }

    /// The body of `offer` for an encoded message and a deadline.
    fn offer_msg(
        &self,
        py: Python<'_>,
        msg: Msg<'_>,
        dl: Option<Instant>,
        write: bool,
    ) -> PyResult<u8> {
        let r = &self.inner;
        // Fast path: a slot and room right now.
        let first = r.offer(msg, Some(Instant::now()), write, &mut || Ok(()))?;
        let outcome = match first {
            ring::Offer::Full if dl.is_none_or(|d| d > Instant::now()) => {
                blocking(py, |intr| r.offer(msg, dl, write, intr))?
            }
            o => o,
        };
        let outcome = match outcome {
            // No room right now: rather than hand the message to a feeder thread at
            // once, wait briefly (GIL released) for the consumer to make room.
            ring::Offer::Reserved if write => {
                let until = Instant::now() + SHORT_WAIT;
                if blocking(py, |intr| r.write_until(msg, until, intr))? {
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
}

/// The buffers of an envelope whose header (`head`, its payload table starting at
/// `table`) announces its in-band pickle and out-of-band payloads, `n` bytes in all.
type Envelope = (Py<PyBytes>, Vec<Py<PyAny>>, Vec<(*mut u8, usize)>);

fn envelope(py: Python<'_>, head: &[u8], table: usize, n: usize) -> Result<Envelope> {
    let count = head
        .get(4..8)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()) as usize)
        .ok_or(Error::BadLength(head.len() as i64))?;
    if count > MAX_PAYLOADS || head.len() != table + 16 * count {
        return Err(Error::BadLength(head.len() as i64));
    }
    let inband_len = u64_at(head, 8)? as usize;
    let (inband, p) = new_bytes(py, inband_len)?;
    let mut segs = vec![(p, inband_len)];
    let mut objs = Vec::with_capacity(count);
    for i in 0..count {
        let kind = u64_at(head, table + 16 * i)?;
        let len = u64_at(head, table + 8 + 16 * i)? as usize;
        let (obj, p) = if kind == 0 {
            let (b, p) = new_bytes(py, len)?;
            (b.into_any(), p)
        } else {
            let (b, p) = new_bytearray(py, len)?;
            (b.into_any(), p)
        };
        objs.push(obj);
        segs.push((p, len));
    }
    if segs.iter().map(|s| s.1).sum::<usize>() != n {
        return Err(Error::BadLength(n as i64));
    }
    Ok((inband, objs, segs))
}

/// Stores a tagged message's tag into the taker's claim word, if any, before the ring
/// moves past the message: a consumer that dies after this leaves the tag behind, one
/// that dies before leaves the message to the next consumer (see the ring's read lock
/// recovery). A worker stores 0 once its result is in the result ring.
fn store_claim(claim: Option<&AtomicU64>, tag: u64) {
    if let Some(c) = claim {
        c.store(tag, Ordering::Release);
    }
}

/// What `get_tagged` returns for a message: `(tag, True, object)`, or `(tag, False,
/// exception)` when `loads` raised an Exception.
fn tagged_result<'py>(
    py: Python<'py>,
    landing: Landing,
    loads: &Bound<'py, PyAny>,
) -> PyResult<(u64, bool, Bound<'py, PyAny>)> {
    let mut interrupted = None;
    let r = tagged_result_kept(py, landing, loads, &mut interrupted)?;
    match interrupted {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

/// [`tagged_result`], except that an error of `loads` that is not an `Exception` (a
/// KeyboardInterrupt raised while a result is unpickled) does not lose the message's
/// tag: the result comes back as failed with that error, which is also left in
/// `interrupted` for the caller to raise once the result is safe.
fn tagged_result_kept<'py>(
    py: Python<'py>,
    landing: Landing,
    loads: &Bound<'py, PyAny>,
    interrupted: &mut Option<PyErr>,
) -> PyResult<(u64, bool, Bound<'py, PyAny>)> {
    match landing {
        Landing::Tagged(tag, inband, objs) => {
            let r = if objs.is_empty() {
                loads.call1((inband,))
            } else {
                let kw = PyDict::new(py);
                kw.set_item("buffers", PyList::new(py, objs)?)?;
                loads.call((inband,), Some(&kw))
            };
            match r {
                Ok(obj) => Ok((tag, true, obj)),
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(py) => {
                    Ok((tag, false, e.into_value(py).into_bound(py).into_any()))
                }
                Err(e) => {
                    let value = e.value(py).clone().into_any();
                    *interrupted = Some(e);
                    Ok((tag, false, value))
                }
            }
        }
        Landing::Packed(tag, kind, data) => {
            let obj = Bound::new(py, Packed::new(kind, data))?.into_any();
            Ok((tag, true, obj))
        }
        Landing::TaggedNative(tag, fmt, v) => Ok((tag, true, decode_native(py, fmt, &v)?)),
        Landing::Call(tag, fmt, klen, v) => {
            // The task as its pickled form reads: (fkey, (item,), None).
            let fkey = PyBytes::new(py, &v[..klen]).into_any();
            let item = decode_native(py, fmt, &v[klen..])?;
            let args = PyTuple::new(py, [item])?.into_any();
            let task = PyTuple::new(py, [fkey, args, py.None().into_bound(py)])?;
            Ok((tag, true, task.into_any()))
        }
        _ => Err(pyo3::exceptions::PyValueError::new_err(
            "an untagged message on a tagged ring",
        )),
    }
}

impl Ring {
    /// Puts a natively encoded tagged message of format `fmt` (header fields `head`:
    /// kind, count, tag; see [`native_head`]) with body `body`, after `hold`'s
    /// `hold_spin` if given; then clears `claim` (the result is out).
    fn put_native(
        &self,
        py: Python<'_>,
        fmt: u16,
        head: (u32, u64, u64),
        body: &[u8],
        claim: Option<&AtomicU64>,
        hold: Option<&ring::Ring>,
    ) -> PyResult<()> {
        let mut h = [0u8; TAGGED_HEAD];
        native_head(&mut h, head.0, head.1, head.2);
        if let Some(r) = hold {
            r.hold_spin();
        }
        let parts = [&h[..], body];
        self.put_unbounded(py, Msg { parts: &parts, fmt })?;
        store_claim(claim, 0);
        Ok(())
    }

    /// The destination of a message: see [`ring::Ring::get`].
    fn landing(
        &self,
        py: Python<'_>,
        fmt: u16,
        n: usize,
        head: &[u8],
        claim: Option<&AtomicU64>,
    ) -> Result<(Landing, Dest)> {
        match fmt {
            0 if n < BIG => {
                let (b, p) = new_bytes(py, n)?;
                Ok((Landing::Bytes(b), Dest::One((p, n))))
            }
            0 => {
                let kept = self
                    .scratch
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let (ba, p) = match kept {
                    Some(ba) if ba.bind(py).len() >= n => {
                        // SAFETY: as in new_bytearray: taken out of the slot, so ours.
                        let p = unsafe { pyo3::ffi::PyByteArray_AsString(ba.as_ptr()) };
                        (ba, p as *mut u8)
                    }
                    _ => new_bytearray(py, n)?,
                };
                Ok((Landing::Scratch(ba, n), Dest::One((p, n))))
            }
            ring::FMT_HEADED => {
                let (inband, objs, segs) = envelope(py, head, 16, n)?;
                Ok((Landing::Envelope(inband, objs), Dest::Many(segs)))
            }
            ring::FMT_TAGGED => {
                let tag = u64_at(head, 16)?;
                let (inband, objs, segs) = envelope(py, head, TAGGED_HEAD, n)?;
                store_claim(claim, tag);
                Ok((Landing::Tagged(tag, inband, objs), Dest::Many(segs)))
            }
            ring::FMT_PACKED => {
                let (kind, count, tag) = read_native_head(head)?;
                if packed::width(kind).and_then(|w| w.checked_mul(count as usize)) != Some(n) {
                    return Err(Error::BadLength(n as i64));
                }
                let (b, p) = new_bytes(py, n)?;
                store_claim(claim, tag);
                Ok((Landing::Packed(tag, kind, b), Dest::One((p, n))))
            }
            ring::FMT_TAGGED_NATIVE | ring::FMT_TAGGED_CALL => {
                // A scalar (FMT_TAGGED_NATIVE: the count is its length), or a call
                // (FMT_TAGGED_CALL: the count is the length of the function's key,
                // which comes before the argument).
                let (kind, count, tag) = read_native_head(head)?;
                let scalar = (FMT_INT as u32..=FMT_CONST as u32).contains(&kind);
                let fits = if fmt == ring::FMT_TAGGED_NATIVE {
                    count == n as u64
                } else {
                    count <= n as u64
                };
                if !scalar || !fits {
                    return Err(Error::BadLength(n as i64));
                }
                let mut v = vec![0u8; n];
                let p = v.as_mut_ptr();
                store_claim(claim, tag);
                let landing = if fmt == ring::FMT_TAGGED_NATIVE {
                    Landing::TaggedNative(tag, kind as u16, v)
                } else {
                    Landing::Call(tag, kind as u16, count as usize, v)
                };
                Ok((landing, Dest::One((p, n))))
            }
            FMT_BYTES => {
                let (b, p) = new_bytes(py, n)?;
                Ok((Landing::Raw(b), Dest::One((p, n))))
            }
            FMT_INT..=FMT_CONST => {
                let mut v = vec![0u8; n];
                let p = v.as_mut_ptr();
                Ok((Landing::Native(fmt, v), Dest::One((p, n))))
            }
            _ => Err(Error::BadLength(fmt as i64)),
        }
    }

    /// Takes a message into a landing, waiting as `get_obj` describes.
    fn take(
        &self,
        py: Python<'_>,
        block: bool,
        timeout: Option<f64>,
        claim: Option<&AtomicU64>,
    ) -> PyResult<Option<Landing>> {
        let r = &self.inner;
        if r.is_abandoned() {
            return Err(pyo3::exceptions::PyOSError::new_err("handle is closed"));
        }
        let fast = r.try_get(&mut |f, n, h| self.landing(py, f, n, h, claim))?;
        if fast.is_some() {
            return Ok(fast);
        }
        // A message is often a fraction of a microsecond away: wait that long with the
        // GIL held, since giving it up and taking it back costs more.
        if block && crate::spin::spin_briefly(GIL_SPIN, || r.has_data()) {
            let fast = r.try_get(&mut |f, n, h| self.landing(py, f, n, h, claim))?;
            if fast.is_some() {
                return Ok(fast);
            }
        }
        let dl = if block {
            deadline(timeout)?
        } else {
            Some(Instant::now())
        };
        blocking(py, |intr| {
            r.get(
                dl,
                &mut |f, n, h| Python::attach(|py| self.landing(py, f, n, h, claim)),
                intr,
            )
        })
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

    /// Puts `data` (bytes, or an envelope tuple) on an unbounded ring, waiting for
    /// room if needed.
    fn put(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let parts = Parts::of(data)?;
        self.put_unbounded(py, parts.msg())
    }

    /// Puts `obj` on an unbounded ring if it is a scalar that travels natively (see
    /// the FMT_ constants); returns False, doing nothing, for anything else (the caller
    /// pickles it and uses `put`).
    fn put_obj(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Some((fmt, enc)) = encode_native(obj)? else {
            return Ok(false);
        };
        let part = [enc.bytes()];
        self.put_unbounded(py, Msg { parts: &part, fmt })?;
        Ok(true)
    }

    /// Puts `data` (bytes, or an envelope tuple) on an unbounded ring as a message
    /// tagged with `tag`, waiting for room if needed; then, if `claims` is given, clears
    /// its word `slot` (a pool worker's "running task" word: the result is out).
    #[pyo3(signature = (tag, data, claims=None, slot=0))]
    fn put_tagged(
        &self,
        py: Python<'_>,
        tag: u64,
        data: &Bound<'_, PyAny>,
        claims: Option<&Bound<'_, PySegment>>,
        slot: usize,
    ) -> PyResult<()> {
        let claim = claims.map(|c| c.get().word(slot)).transpose()?;
        let t = Tagged::of(tag, data)?;
        let parts = t.parts();
        self.put_unbounded(py, Msg::tagged(&parts))?;
        store_claim(claim, 0);
        Ok(())
    }

    /// Puts `obj` as a message tagged `tag` without the pickler, if it is a scalar
    /// that travels natively (see the FMT_ constants; str and bytes up to 64 KiB) or a
    /// list whose items are all exact ints within 64 bits or all exact floats (packed,
    /// see `packed.rs`), after `hold.hold_spin()` if `hold` is given; then clears word
    /// `slot` of `claims` as `put_tagged` does. Returns False, doing nothing, for any
    /// other object (the caller pickles it).
    #[pyo3(signature = (tag, obj, claims=None, slot=0, hold=None))]
    fn put_tagged_plain(
        &self,
        py: Python<'_>,
        tag: u64,
        obj: &Bound<'_, PyAny>,
        claims: Option<&Bound<'_, PySegment>>,
        slot: usize,
        hold: Option<&Bound<'_, Ring>>,
    ) -> PyResult<bool> {
        let claim = claims.map(|c| c.get().word(slot)).transpose()?;
        let hold = hold.map(|h| &h.get().inner);
        if let Ok(items) = obj.cast_exact::<PyList>() {
            let Some((kind, body)) = packed::encode(items) else {
                return Ok(false);
            };
            let head = (kind, items.len() as u64, tag);
            self.put_native(py, ring::FMT_PACKED, head, &body, claim, hold)?;
            return Ok(true);
        }
        let Some((fmt, enc)) = encode_result(obj)? else {
            return Ok(false);
        };
        let body = enc.bytes();
        let head = (fmt as u32, body.len() as u64, tag);
        self.put_native(py, ring::FMT_TAGGED_NATIVE, head, body, claim, hold)?;
        Ok(true)
    }

    /// `put_tagged(tag, data)` for each `(tag, data)` of `items`, in order, waking the
    /// consumers once for the lot when they all fit right away.
    fn put_tagged_many(&self, py: Python<'_>, items: &Bound<'_, PyList>) -> PyResult<()> {
        let pairs = items
            .iter()
            .map(|item| item.extract::<(u64, Bound<'_, PyAny>)>())
            .collect::<PyResult<Vec<_>>>()?;
        let tagged = pairs
            .iter()
            .map(|(tag, data)| Tagged::of(*tag, data))
            .collect::<PyResult<Vec<_>>>()?;
        let parts: Vec<Vec<&[u8]>> = tagged.iter().map(|t| t.parts()).collect();
        let msgs: Vec<Msg<'_>> = parts.iter().map(|p| Msg::tagged(p)).collect();
        self.put_all(py, &msgs)
    }

    /// Writes pool tasks `func(item)` for `items[start:stop]` (a list, tuple or range),
    /// tagged `seq0`, `seq0 + 1`, ..., in native form (`FMT_TAGGED_CALL`: `fkey`, the
    /// function's cached pickle, then the item's native encoding), in batches with one
    /// wake-up each. Stops before the first item that is not a plain scalar (see
    /// `encode_native`); returns how many it wrote. A worker reads them as
    /// `(fkey, (item,), None)` (`get_tagged`) or runs them in `serve`.
    fn put_call_tasks(
        &self,
        py: Python<'_>,
        seq0: u64,
        fkey: &Bound<'_, PyBytes>,
        items: &Bound<'_, PyAny>,
        start: usize,
        stop: usize,
    ) -> PyResult<usize> {
        let fkey = fkey.as_bytes();
        let mut buf: Vec<u8> = Vec::with_capacity((stop.saturating_sub(start)) * 64);
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for i in start..stop {
            let item = items.get_item(i)?;
            let Some((fmt, enc)) = encode_native(&item)? else {
                break;
            };
            let at = buf.len();
            let tag = seq0 + spans.len() as u64;
            buf.resize(at + TAGGED_HEAD, 0);
            native_head(&mut buf[at..], fmt as u32, fkey.len() as u64, tag);
            buf.extend_from_slice(fkey);
            buf.extend_from_slice(enc.bytes());
            spans.push((at, buf.len()));
        }
        let parts: Vec<[&[u8]; 1]> = spans.iter().map(|&(a, b)| [&buf[a..b]]).collect();
        let msgs: Vec<Msg<'_>> = parts
            .iter()
            .map(|p| Msg {
                parts: p,
                fmt: ring::FMT_TAGGED_CALL,
            })
            .collect();
        self.put_all(py, &msgs)?;
        Ok(msgs.len())
    }

    /// Takes the next message, which must be tagged, and returns `(tag, True,
    /// loads(message))`, or `(tag, False, exception)` when `loads` raised an Exception.
    /// Waits as `get_obj` does. If `claims` is given, the tag is stored into its word
    /// `slot` before the ring lets go of the message, so a consumer that dies
    /// afterwards leaves behind which message it held.
    #[pyo3(signature = (loads, block=true, timeout=None, claims=None, slot=0))]
    fn get_tagged<'py>(
        &self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
        block: bool,
        timeout: Option<f64>,
        claims: Option<&Bound<'py, PySegment>>,
        slot: usize,
    ) -> PyResult<(u64, bool, Bound<'py, PyAny>)> {
        let claim = claims.map(|c| c.get().word(slot)).transpose()?;
        match self.take(py, block, timeout, claim)? {
            None => Err(empty_exc(py)?),
            Some(landing) => tagged_result(py, landing, loads),
        }
    }

    /// Runs pool tasks from this ring (a pool's task ring) in a worker, without going
    /// back to Python between them, while they are native calls (`put_call_tasks`) of
    /// a function found in `funcs` (function key -> function) whose results are plain
    /// scalars: each result goes natively into `results`, then this worker's claim
    /// word (`claims`, `slot`) is cleared, as `put_tagged_plain` does. Stops after
    /// `limit` tasks, or at the first task it cannot finish alone, and returns
    /// `(done, what, tag, ok, obj)`: `done` tasks finished here, then `what` says what
    /// the worker's Python loop must do:
    /// - `SERVE_LIMIT`: nothing (the limit is reached);
    /// - `SERVE_TASK`: run the task `(tag, ok, obj)` as `get_tagged` returns it;
    /// - `SERVE_RESULT`: send `obj`, the result of task `tag`, the general way;
    /// - `SERVE_ERROR`: send `obj`, the Exception that task `tag` raised.
    ///
    /// Before each result it puts (but the one that reaches `limit`) the worker
    /// announces its next wait on this ring (`hold_spin`).
    #[allow(clippy::too_many_arguments)]
    fn serve<'py>(
        &self,
        py: Python<'py>,
        results: &Bound<'py, Ring>,
        funcs: &Bound<'py, PyDict>,
        loads: &Bound<'py, PyAny>,
        claims: &Bound<'py, PySegment>,
        slot: usize,
        limit: u64,
    ) -> PyResult<(u64, u8, u64, bool, Bound<'py, PyAny>)> {
        let seg = claims.get();
        let claim = seg.word(slot)?;
        let results = results.get();
        let mut done = 0u64;
        // The last function looked up, by its key: a map calls one function.
        let mut last: Option<(Vec<u8>, Bound<'py, PyAny>)> = None;
        while done < limit {
            let Some(landing) = self.take(py, true, None, Some(claim))? else {
                continue;
            };
            let (tag, fmt, klen, v) = match landing {
                Landing::Call(tag, fmt, klen, v) if tag != 0 => (tag, fmt, klen, v),
                other => {
                    let (tag, ok, obj) = tagged_result(py, other, loads)?;
                    return Ok((done, SERVE_TASK, tag, ok, obj));
                }
            };
            let key = &v[..klen];
            let func = match &last {
                Some((k, f)) if k.as_slice() == key => f.clone(),
                _ => match funcs.get_item(PyBytes::new(py, key))? {
                    Some(f) => {
                        last = Some((key.to_vec(), f.clone()));
                        f
                    }
                    None => {
                        // Not looked up in this process yet: the Python loop does it.
                        let landing = Landing::Call(tag, fmt, klen, v);
                        let (tag, ok, obj) = tagged_result(py, landing, loads)?;
                        return Ok((done, SERVE_TASK, tag, ok, obj));
                    }
                },
            };
            let item = decode_native(py, fmt, &v[klen..])?;
            let value = match func.call1((item,)) {
                Ok(value) => value,
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(py) => {
                    let exc = e.into_value(py).into_bound(py).into_any();
                    return Ok((done, SERVE_ERROR, tag, false, exc));
                }
                Err(e) => return Err(e),
            };
            let Some((rfmt, enc)) = encode_result(&value)? else {
                return Ok((done, SERVE_RESULT, tag, true, value));
            };
            let body = enc.bytes();
            let head = (rfmt as u32, body.len() as u64, tag);
            let hold = (done + 1 < limit).then_some(&self.inner);
            results.put_native(py, ring::FMT_TAGGED_NATIVE, head, body, Some(claim), hold)?;
            done += 1;
        }
        Ok((done, SERVE_LIMIT, 0, true, py.None().into_bound(py)))
    }

    /// Takes up to `limit` results, as `get_tagged` gives them, and passes each to
    /// `append` (a deque's, say) as soon as it is taken; returns how many. The first
    /// waits up to `timeout` if `block`; the others are taken only if they are there
    /// now. A result is handed over before any Python code runs after it, so an
    /// interruption loses nothing: a KeyboardInterrupt raised while one result is
    /// unpickled makes that result a failure carrying it, handed over like the
    /// others, and is raised after.
    #[pyo3(signature = (loads, limit, append, block=false, timeout=None))]
    fn get_tagged_into<'py>(
        &self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
        limit: usize,
        append: &Bound<'py, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let mut n = 0;
        let mut failure = None;
        while n < limit {
            let first = n == 0;
            let Some(landing) = self.take(py, block && first, timeout.filter(|_| first), None)?
            else {
                break;
            };
            let r = tagged_result_kept(py, landing, loads, &mut failure)?;
            append.call1((r,))?;
            n += 1;
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(n)
    }

    /// Tells producers that this handle will wait for the next message soon (see
    /// the core's `Ring::hold_spin`): a pool worker says so before it posts a result.
    fn hold_spin(&self) {
        self.inner.hold_spin();
    }

    /// Whether a message (or part of one) waits to be read.
    fn has_data(&self) -> bool {
        self.inner.has_data()
    }

    /// `offer(obj, block=True, timeout=None, write=True)` for a scalar that travels
    /// natively; 3, doing nothing, for anything else (the caller pickles it).
    fn offer_obj(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<u8> {
        let Some((fmt, enc)) = encode_native(obj)? else {
            return Ok(3);
        };
        let part = [enc.bytes()];
        self.offer_msg(py, Msg { parts: &part, fmt }, None, true)
    }

    /// Reserves a slot (waiting up to `timeout` while `maxsize` messages are queued)
    /// and, if `write`, writes `data` when there is room right now (or within 2 ms).
    /// Returns 0 when the ring stayed full, 1 when `data` is in the ring, 2 when a slot
    /// is reserved but `data` still has to be written with `write()`.
    #[pyo3(signature = (data, block=true, timeout=None, write=true))]
    fn offer(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
        write: bool,
    ) -> PyResult<u8> {
        let parts = Parts::of(data)?;
        let dl = if block {
            deadline(timeout)?
        } else {
            Some(Instant::now())
        };
        self.offer_msg(py, parts.msg(), dl, write)
    }

    /// Writes `data` into a slot reserved by `offer()`, waiting for room.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let parts = Parts::of(data)?;
        let msg = parts.msg();
        let r = &self.inner;
        if r.try_write(msg) {
            return Ok(());
        }
        blocking(py, |intr| r.write(msg, intr))
    }

    /// Writes the messages of `batch` (slots already reserved) in order, waiting for
    /// room, in one GIL-free call: the feeder thread's path. Returns how many were
    /// written: all of them, or those before the first that failed (its error is
    /// raised only when it is the first of the batch, so the caller learns exactly
    /// which message failed).
    fn write_many(&self, py: Python<'_>, batch: &Bound<'_, PyList>) -> PyResult<usize> {
        let items: Vec<Bound<'_, PyAny>> = batch.iter().collect();
        let parts = items.iter().map(Parts::of).collect::<PyResult<Vec<_>>>()?;
        let r = &self.inner;
        let mut done = 0usize;
        let res = blocking(py, |intr| {
            for p in &parts {
                r.write(p.msg(), intr)?;
                done += 1;
            }
            Ok(())
        });
        match res {
            Err(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }

    /// Writes `data` into a reserved slot if there is room right now; never waits.
    fn try_write(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        let parts = Parts::of(data)?;
        Ok(self.inner.try_write(parts.msg()))
    }

    /// Gives back a slot reserved by `offer()` whose message will not be written.
    fn unreserve(&self) {
        self.inner.unreserve();
    }

    /// Takes the next message and returns `loads(message)`: waits up to `timeout`
    /// (forever if None) when `block`, else only takes what is there; raises
    /// queue.Empty when nothing came.
    #[pyo3(signature = (loads, block=true, timeout=None))]
    fn get_obj<'py>(
        &self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.take(py, block, timeout, None)? {
            None => Err(empty_exc(py)?),
            Some(
                Landing::Tagged(..)
                | Landing::Packed(..)
                | Landing::TaggedNative(..)
                | Landing::Call(..),
            ) => Err(pyo3::exceptions::PyValueError::new_err(
                "a tagged message on a queue ring",
            )),
            Some(Landing::Bytes(b)) => loads.call1((b,)),
            Some(Landing::Raw(b)) => Ok(b.into_bound(py).into_any()),
            Some(Landing::Native(fmt, v)) => decode_native(py, fmt, &v),
            Some(Landing::Envelope(inband, objs)) => {
                let kw = PyDict::new(py);
                kw.set_item("buffers", PyList::new(py, objs)?)?;
                loads.call((inband,), Some(&kw))
            }
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
