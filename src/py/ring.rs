//! Bindings for `ring.rs`: what the two ring classes share ([`Handle`]: putting
//! Python data, taking a message into Python objects, the native scalar codec), and the
//! queue's class `Ring` (under `ferromp.queues` and the managers' local transport). The
//! pool's class, `PoolRing`, is in `pool.rs`. Message formats are those of
//! [`crate::message`].
//!
//! Every operation first tries its fast path with the GIL held: a put that finds room
//! and a get that finds a whole message cost one call, two lock CASes and one copy,
//! without releasing the GIL. Only when it must wait does a call detach (through
//! [`blocking`]); a message taken then is copied straight into fresh Python objects,
//! allocated with the GIL taken back for just that moment.
//!
//! Python gives a message as a `bytes` object (a pickle) or as an envelope tuple
//! `(inband, *payloads)` (made by `queues._dumps_for_ring`): the in-band pickle and the
//! out-of-band payloads of its large `bytes` / `bytearray` objects. The header is
//! written here ([`message::envelope_head`]); the consumer copies each payload straight
//! into a new object of its kind and unpickles with `loads(inband, buffers=payloads)`,
//! so a large payload is copied once on each side.

use std::borrow::Cow;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMemoryView, PySlice, PyString,
    PyTuple, PyType,
};

use crate::error::{Error, Result};
use crate::message::{self, Format, PAYLOAD_BYTEARRAY, PAYLOAD_BYTES, PAYLOAD_STR, PLAIN_MAX};
use crate::py::packed;
use crate::py::{blocking, deadline, uninit_bytes};
use crate::ring::{self, Dest, Msg};
use crate::shm::Segment;

/// How long `offer` waits for room before leaving the message to the caller's feeder.
const SHORT_WAIT: Duration = Duration::from_millis(2);
/// How long a blocking get spins with the GIL held before it lets go of it.
const GIL_SPIN: Duration = Duration::from_micros(3);
/// Plain messages from this size up are unpickled from the scratch buffer.
const BIG: usize = 1 << 16;
/// Scratch buffers up to this size are kept for the next message.
const SCRATCH_KEEP: usize = 1 << 26;

// ----- the native scalar codec ------------------------------------------------------------

/// The native encoding of a plain scalar.
pub(crate) enum Native<'a> {
    Inline([u8; 8], usize),
    Owned(String),
    Borrowed(&'a [u8]),
}

impl Native<'_> {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Native::Inline(b, n) => &b[..*n],
            Native::Owned(s) => s.as_bytes(),
            Native::Borrowed(b) => b,
        }
    }
}

/// Whether `obj` is plain: an int, float, bool or None, or a str or bytes of at most
/// [`PLAIN_MAX`] characters or bytes, of exactly that type (not a subclass). The one
/// definition: `_core.is_plain` (`reduction.is_plain`) is this function, and the
/// native encoder takes nothing else. A plain object is pickled by the plain pickler
/// (the same bytes as the stdlib's) and, where it has a native form, travels natively.
pub(crate) fn is_plain(obj: &Bound<'_, PyAny>) -> bool {
    if obj.is_exact_instance_of::<PyString>() || obj.is_exact_instance_of::<PyBytes>() {
        return obj.len().is_ok_and(|n| n <= PLAIN_MAX);
    }
    obj.is_exact_instance_of::<PyInt>()
        || obj.is_exact_instance_of::<PyFloat>()
        || obj.is_none()
        || obj.is_exact_instance_of::<PyBool>()
}

/// `_core.is_plain(obj)`, a raw `METH_O` function: it runs on every pickled put, and a
/// pyo3 function under `abi3-py39` would build an argument tuple per call.
unsafe extern "C" fn py_is_plain(
    _module: *mut pyo3::ffi::PyObject,
    obj: *mut pyo3::ffi::PyObject,
) -> *mut pyo3::ffi::PyObject {
    // SAFETY: CPython calls a METH_O function with the GIL held and a live argument.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above; borrowed for the call.
    let obj = unsafe { Borrowed::from_ptr(py, obj) };
    let plain = is_plain(&obj);
    // A new reference to True or False (immortal or not, the count must be bumped).
    PyBool::new(py, plain).to_owned().into_any().into_ptr()
}

/// `obj`'s native encoding, or None when it must be pickled: a plain object (see
/// [`is_plain`]) that has one. An int beyond 64 bits, a str with lone surrogates or
/// whose UTF-8 form is longer than [`PLAIN_MAX`] has none.
pub(crate) fn encode_native<'a>(
    obj: &'a Bound<'_, PyAny>,
) -> PyResult<Option<(Format, Native<'a>)>> {
    if obj.is_exact_instance_of::<PyInt>() {
        return Ok(obj
            .extract::<i64>()
            .ok()
            .map(|v| (Format::Int, Native::Inline(v.to_le_bytes(), 8))));
    }
    if obj.is_exact_instance_of::<PyString>() {
        // Checked before encoding: a long str is turned down before it is copied. (Its
        // UTF-8 form may be up to 4x its length: checked again below.)
        if obj.len()? > PLAIN_MAX {
            return Ok(None);
        }
        // A str with lone surrogates has no UTF-8 form: pickle takes it (as the
        // stdlib does, with "surrogatepass").
        return Ok(match obj.cast::<PyString>()?.to_cow() {
            Ok(s) if s.len() <= PLAIN_MAX => Some((Format::Str, Native::Owned(s.into_owned()))),
            _ => None,
        });
    }
    if obj.is_exact_instance_of::<PyBytes>() {
        let b = obj.cast::<PyBytes>()?;
        if b.len()? > PLAIN_MAX {
            return Ok(None);
        }
        // SAFETY: `obj` holds the bytes object for 'a, and bytes are immutable.
        let sl = unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) };
        return Ok(Some((Format::Bytes, Native::Borrowed(sl))));
    }
    if obj.is_exact_instance_of::<PyFloat>() {
        let v = obj.cast::<PyFloat>()?.value();
        return Ok(Some((
            Format::Float,
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
        Format::Const,
        Native::Inline([c, 0, 0, 0, 0, 0, 0, 0], 1),
    )))
}

/// The object a natively encoded scalar stands for.
pub(crate) fn decode_native<'py>(
    py: Python<'py>,
    fmt: Format,
    b: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let bad = || PyValueError::new_err("corrupt ring message");
    Ok(match fmt {
        Format::Int => i64::from_le_bytes(b.try_into().map_err(|_| bad())?)
            .into_pyobject(py)?
            .into_any(),
        Format::Str => PyString::new(py, std::str::from_utf8(b).map_err(|_| bad())?).into_any(),
        Format::Bytes => PyBytes::new(py, b).into_any(),
        Format::Float => PyFloat::new(
            py,
            f64::from_bits(u64::from_le_bytes(b.try_into().map_err(|_| bad())?)),
        )
        .into_any(),
        Format::Const => match b {
            [0] => py.None().into_bound(py),
            [1] => PyBool::new(py, false).to_owned().into_any(),
            [2] => PyBool::new(py, true).to_owned().into_any(),
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    })
}

// ----- messages from Python ----------------------------------------------------------------

/// A message given from Python, ready to put: a pickle in one piece, or a header
/// written here and a body of borrowed (or, for a `bytearray`, copied) pieces.
pub(crate) enum Parts<'a> {
    One([&'a [u8]; 1]),
    Headed {
        head: Vec<u8>,
        body: Vec<Cow<'a, [u8]>>,
        fmt: Format,
    },
}

/// The bytes of a `bytes` object, borrowed for as long as the object is.
fn bytes_of<'a>(b: &'a Bound<'_, PyBytes>) -> PyResult<&'a [u8]> {
    // SAFETY: the caller's reference keeps the bytes object alive for 'a, and bytes
    // are immutable, so the slice stays valid.
    Ok(unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) })
}

impl<'a> Parts<'a> {
    /// `data` (a pickle, or an envelope tuple `(inband, *payloads)`), tagged with `tag`
    /// if given (a pool message; then always headed).
    pub(crate) fn of(data: &'a Bound<'_, PyAny>, tag: Option<u64>) -> PyResult<Self> {
        if let Ok(b) = data.cast::<PyBytes>() {
            let b = bytes_of(b)?;
            return Ok(match tag {
                None => Parts::One([b]),
                Some(_) => Parts::Headed {
                    head: message::envelope_head(tag, b.len(), &[]),
                    body: vec![Cow::Borrowed(b)],
                    fmt: Format::Tagged,
                },
            });
        }
        let py = data.py();
        let bad =
            || PyValueError::new_err("bad envelope: (bytes, *payloads of bytes, bytearray or str)");
        let t = data.cast::<PyTuple>().map_err(|_| bad())?;
        if t.len() < 2 || t.len() > 1 + message::MAX_PAYLOADS {
            return Err(bad());
        }
        let mut body = Vec::with_capacity(t.len());
        let mut table = Vec::with_capacity(t.len() - 1);
        for (i, item) in t.iter().enumerate() {
            let (kind, piece) = if let Ok(b) = item.cast::<PyBytes>() {
                // SAFETY: the tuple, borrowed for 'a, keeps each item alive.
                let sl = unsafe { std::slice::from_raw_parts(b.as_bytes().as_ptr(), b.len()?) };
                (PAYLOAD_BYTES, Cow::Borrowed(sl))
            } else if i == 0 {
                return Err(bad());
            } else if let Ok(b) = item.cast::<PyByteArray>() {
                // Copied: a bytearray may change once the GIL is let go.
                (PAYLOAD_BYTEARRAY, Cow::Owned(b.to_vec()))
            } else if item.is_exact_instance_of::<PyString>() {
                // As pickle writes a str: UTF-8, lone surrogates passed through.
                let utf8 = item.call_method1(intern!(py, "encode"), SURROGATEPASS)?;
                let utf8 = utf8.cast::<PyBytes>().map_err(|_| bad())?;
                (PAYLOAD_STR, Cow::Owned(utf8.as_bytes().to_vec()))
            } else {
                return Err(bad());
            };
            if i > 0 {
                table.push((kind, piece.len()));
            }
            body.push(piece);
        }
        let head = message::envelope_head(tag, body[0].len(), &table);
        let fmt = if tag.is_some() {
            Format::Tagged
        } else {
            Format::Envelope
        };
        Ok(Parts::Headed { head, body, fmt })
    }

    /// Its pieces in order, for a [`Msg`].
    pub(crate) fn slices(&self) -> Vec<&[u8]> {
        match self {
            Parts::One(p) => p.to_vec(),
            Parts::Headed { head, body, .. } => {
                let mut v = Vec::with_capacity(1 + body.len());
                v.push(head.as_slice());
                v.extend(body.iter().map(|c| c.as_ref()));
                v
            }
        }
    }

    pub(crate) fn fmt(&self) -> u16 {
        match self {
            Parts::One(_) => Format::Pickle as u16,
            Parts::Headed { fmt, .. } => *fmt as u16,
        }
    }

    /// Runs `f` on the message, without a heap allocation for a one-piece pickle.
    pub(crate) fn with_msg<R>(&self, f: impl FnOnce(Msg<'_>) -> R) -> R {
        match self {
            Parts::One(p) => f(Msg {
                parts: p,
                fmt: Format::Pickle as u16,
            }),
            Parts::Headed { .. } => {
                let v = self.slices();
                f(Msg {
                    parts: &v,
                    fmt: self.fmt(),
                })
            }
        }
    }
}

// ----- messages to Python ------------------------------------------------------------------

/// Where a message was copied.
pub(crate) enum Landing {
    /// A pickle, in a new bytes object.
    Bytes(Py<PyBytes>),
    /// A large pickle, in the reused scratch buffer (its first `n` bytes).
    Scratch(Py<PyByteArray>, usize),
    /// An envelope.
    Envelope(Envelope),
    /// A natively encoded `bytes` message: the object itself.
    Raw(Py<PyBytes>),
    /// Another natively encoded scalar (format, encoding).
    Native(Format, Vec<u8>),
    /// A tagged envelope and its tag.
    Tagged(u64, Envelope),
    /// A tagged packed list of numbers: its tag, element kind and array.
    Packed(u64, u32, Py<PyBytes>),
    /// A tagged native scalar: its tag, format and encoding.
    TaggedNative(u64, Format, Vec<u8>),
    /// A tagged native call: its tag, the argument's format, the length of the
    /// function's key, and the key followed by the argument's encoding.
    Call(u64, Format, usize, Vec<u8>),
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

/// The arguments of `str.encode` and `bytes.decode` for a `str` payload.
const SURROGATEPASS: (&str, &str) = ("utf-8", "surrogatepass");

/// An envelope taken from a ring: its in-band pickle, its payload objects, and which
/// of those are `str` payloads still in their UTF-8 form (a bit each).
pub(crate) struct Envelope {
    inband: Py<PyBytes>,
    objs: Vec<Py<PyAny>>,
    strs: u64,
}

impl Envelope {
    /// The envelope's object: `loads(inband, buffers=payloads)`, or the one payload
    /// itself when the in-band pickle is empty.
    pub(crate) fn load<'py>(
        self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut objs = Vec::with_capacity(self.objs.len());
        for (i, o) in self.objs.into_iter().enumerate() {
            let o = o.into_bound(py);
            objs.push(if self.strs >> i & 1 == 1 {
                o.call_method1(intern!(py, "decode"), SURROGATEPASS)?
            } else {
                o
            });
        }
        if self.inband.bind(py).as_bytes().is_empty() && objs.len() == 1 {
            return Ok(objs.pop().unwrap());
        }
        if objs.is_empty() {
            return loads.call1((self.inband,));
        }
        let kw = PyDict::new(py);
        kw.set_item("buffers", PyList::new(py, objs)?)?;
        loads.call((self.inband,), Some(&kw))
    }
}

/// The envelope a message with header `head` and a body of `n` bytes lands in, its
/// tag, and where to copy the body.
fn envelope_buffers(
    py: Python<'_>,
    tagged: bool,
    head: &[u8],
    n: usize,
) -> Result<(u64, Envelope, Dest)> {
    let h = message::read_envelope_head(tagged, head, n)?;
    let (inband, p) = new_bytes(py, h.inband)?;
    let mut segs = Vec::with_capacity(1 + h.payloads.len());
    segs.push((p, h.inband));
    let mut objs = Vec::with_capacity(h.payloads.len());
    let mut strs = 0u64;
    for (i, &(kind, len)) in h.payloads.iter().enumerate() {
        let (obj, p) = if kind == PAYLOAD_BYTEARRAY {
            let (b, p) = new_bytearray(py, len)?;
            (b.into_any(), p)
        } else {
            // A str payload lands in bytes and is decoded by `Envelope::load`.
            strs |= u64::from(kind == PAYLOAD_STR) << i;
            let (b, p) = new_bytes(py, len)?;
            (b.into_any(), p)
        };
        objs.push(obj);
        segs.push((p, len));
    }
    Ok((h.tag, Envelope { inband, objs, strs }, Dest::Many(segs)))
}

/// Stores a tagged message's tag into the taker's claim word, if any, before the ring
/// moves past the message: a consumer that dies after this leaves the tag behind, one
/// that dies before leaves the message to the next consumer (see the ring's read lock
/// recovery). A pool worker stores 0 once its result is in the result ring.
pub(crate) fn store_claim(claim: Option<&AtomicU64>, tag: u64) {
    if let Some(c) = claim {
        c.store(tag, Ordering::Release);
    }
}

// ----- the handle both ring classes hold -----------------------------------------------------

/// A process's handle on a ring, as both ring classes use it.
pub(crate) struct Handle {
    pub(crate) inner: ring::Ring,
    /// A buffer that large pickles are copied into before unpickling, kept between
    /// calls: a fresh multi-MiB allocation per message costs more in page faults than
    /// the copy itself. Taken out while in use, so threads never share it.
    scratch: Mutex<Option<Py<PyByteArray>>>,
    /// Bytes (header and body) of the message this handle took last: a pool worker's
    /// argument bytes (`Pool.stats()`).
    pub(crate) last_taken: AtomicU64,
}

impl Handle {
    pub(crate) fn new(capacity: usize, maxsize: u64) -> PyResult<Self> {
        Ok(Handle {
            inner: ring::Ring::new(capacity, maxsize)?,
            scratch: Mutex::new(None),
            last_taken: AtomicU64::new(0),
        })
    }

    /// Maps the ring of another handle from its three fds, which this call owns from
    /// now on.
    pub(crate) fn attach(fd: i32, bell_r: i32, bell_w: i32) -> PyResult<Self> {
        // SAFETY: the caller hands over three open fds it no longer uses.
        let (seg, r, w) = unsafe {
            (
                OwnedFd::from_raw_fd(fd),
                OwnedFd::from_raw_fd(bell_r),
                OwnedFd::from_raw_fd(bell_w),
            )
        };
        let seg = Segment::from_fd(seg)?;
        Ok(Handle {
            inner: ring::Ring::attach(seg, r, w)?,
            scratch: Mutex::new(None),
            last_taken: AtomicU64::new(0),
        })
    }

    /// The segment's memfd and the bell pipe's (read, write) fds.
    pub(crate) fn fds(&self) -> (i32, i32, i32) {
        let (r, w) = self.inner.bell_fds();
        (self.inner.fd(), r, w)
    }

    /// Puts `msg` on an unbounded ring, waiting for room if needed.
    pub(crate) fn put_unbounded(&self, py: Python<'_>, msg: Msg<'_>) -> PyResult<()> {
        let r = &self.inner;
        if !r.reserve(Some(Instant::now()), &mut || Ok(()))? {
            return Err(PyValueError::new_err(
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
    pub(crate) fn put_all(&self, py: Python<'_>, msgs: &[Msg<'_>]) -> PyResult<()> {
        let done = self.inner.try_write_batch(msgs);
        for msg in &msgs[done..] {
            self.put_unbounded(py, *msg)?;
        }
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
        let fmt = Format::from_u16(fmt)?;
        self.last_taken
            .store((n + head.len()) as u64, Ordering::Relaxed);
        match fmt {
            Format::Pickle if n < BIG => {
                let (b, p) = new_bytes(py, n)?;
                Ok((Landing::Bytes(b), Dest::One((p, n))))
            }
            Format::Pickle => {
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
            Format::Envelope => {
                let (_, env, dest) = envelope_buffers(py, false, head, n)?;
                Ok((Landing::Envelope(env), dest))
            }
            Format::Tagged => {
                let (tag, env, dest) = envelope_buffers(py, true, head, n)?;
                store_claim(claim, tag);
                Ok((Landing::Tagged(tag, env), dest))
            }
            Format::Packed => {
                let (kind, count, tag) = message::read_native_head(head)?;
                if packed::width(kind).and_then(|w| w.checked_mul(count as usize)) != Some(n) {
                    return Err(Error::BadLength(n as i64));
                }
                let (b, p) = new_bytes(py, n)?;
                store_claim(claim, tag);
                Ok((Landing::Packed(tag, kind, b), Dest::One((p, n))))
            }
            Format::TaggedNative | Format::TaggedCall => {
                let (scalar, klen, tag) = message::read_scalar_head(fmt, head, n)?;
                let mut v = vec![0u8; n];
                let p = v.as_mut_ptr();
                store_claim(claim, tag);
                let landing = if fmt == Format::TaggedNative {
                    Landing::TaggedNative(tag, scalar, v)
                } else {
                    Landing::Call(tag, scalar, klen, v)
                };
                Ok((landing, Dest::One((p, n))))
            }
            Format::Bytes => {
                let (b, p) = new_bytes(py, n)?;
                Ok((Landing::Raw(b), Dest::One((p, n))))
            }
            Format::Int | Format::Str | Format::Float | Format::Const => {
                let mut v = vec![0u8; n];
                let p = v.as_mut_ptr();
                Ok((Landing::Native(fmt, v), Dest::One((p, n))))
            }
        }
    }

    /// Takes the next message into a landing: waits up to `timeout` (forever if None)
    /// when `block`, else only takes what is there; None when nothing came. If `claim`
    /// is given, a tagged message's tag is stored into it before the ring lets go of
    /// the message.
    pub(crate) fn take(
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

    /// Unpickles a large pickle from the scratch buffer, and keeps the buffer for the
    /// next one if nothing kept a view of it.
    fn loads_scratch<'py>(
        &self,
        py: Python<'py>,
        loads: &Bound<'py, PyAny>,
        ba: Py<PyByteArray>,
        n: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ba = ba.into_bound(py);
        let whole = PyMemoryView::from(&ba)?;
        let view = whole.get_item(PySlice::new(py, 0, n as isize, 1))?;
        let out = loads.call1((&view,));
        let free = view.call_method0("release").is_ok() && whole.call_method0("release").is_ok();
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

// ----- the queue's ring -----------------------------------------------------------------------

/// What `Ring.offer` and `Ring.offer_obj` did (exported under these names): plain ints,
/// compared on every `Queue.put`.
const OFFER_FULL: u8 = 0;
/// The message is in the ring.
const OFFER_WRITTEN: u8 = 1;
/// A slot is reserved, and the message is still to be written (`write_many`,
/// `try_write`).
const OFFER_RESERVED: u8 = 2;
/// `offer_obj` only: not a plain scalar, nothing done (the caller pickles it).
const OFFER_NOT_PLAIN: u8 = 3;

/// A process's handle on a queue's shared-memory ring: untagged messages, pickles or
/// native scalars, with the stdlib queue's bounded-size semantics.
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct Ring {
    h: Handle,
}

impl Ring {
    /// The body of `offer` for an encoded message and a deadline.
    fn offer_msg(
        &self,
        py: Python<'_>,
        msg: Msg<'_>,
        dl: Option<Instant>,
        write: bool,
    ) -> PyResult<u8> {
        let r = &self.h.inner;
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
            ring::Offer::Full => OFFER_FULL,
            ring::Offer::Written => OFFER_WRITTEN,
            ring::Offer::Reserved => OFFER_RESERVED,
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
            h: Handle::new(capacity, maxsize)?,
        })
    }

    /// Maps the ring of another handle from its three fds, which this call owns from
    /// now on (pass duplicates).
    #[staticmethod]
    fn attach(fd: i32, bell_r: i32, bell_w: i32) -> PyResult<Self> {
        Ok(Ring {
            h: Handle::attach(fd, bell_r, bell_w)?,
        })
    }

    /// The segment's memfd and the bell pipe's (read, write) fds, for `attach`.
    #[getter]
    fn fds(&self) -> (i32, i32, i32) {
        self.h.fds()
    }

    /// Data bytes of the ring.
    #[getter]
    fn capacity(&self) -> usize {
        self.h.inner.capacity()
    }

    /// Puts `data` (bytes, or an envelope tuple) on an unbounded ring, waiting for
    /// room if needed.
    fn put(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        Parts::of(data, None)?.with_msg(|msg| self.h.put_unbounded(py, msg))
    }

    /// Puts `obj` on an unbounded ring if it is a plain scalar (see `encode_native`);
    /// returns False, doing nothing, for anything else (the caller pickles it and uses
    /// `put`).
    fn put_obj(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Some((fmt, enc)) = encode_native(obj)? else {
            return Ok(false);
        };
        let part = [enc.bytes()];
        self.h.put_unbounded(
            py,
            Msg {
                parts: &part,
                fmt: fmt as u16,
            },
        )?;
        Ok(true)
    }

    /// `offer(obj, block=True, timeout=None, write=True)` for a plain scalar;
    /// `OFFER_NOT_PLAIN`, doing nothing, for anything else (the caller pickles it).
    fn offer_obj(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<u8> {
        let Some((fmt, enc)) = encode_native(obj)? else {
            return Ok(OFFER_NOT_PLAIN);
        };
        let part = [enc.bytes()];
        let msg = Msg {
            parts: &part,
            fmt: fmt as u16,
        };
        self.offer_msg(py, msg, None, true)
    }

    /// Reserves a slot (waiting up to `timeout` while `maxsize` messages are queued)
    /// and, if `write`, writes `data` when there is room right now (or within 2 ms).
    /// Returns `OFFER_FULL`, `OFFER_WRITTEN` or `OFFER_RESERVED`.
    #[pyo3(signature = (data, block=true, timeout=None, write=true))]
    fn offer(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
        write: bool,
    ) -> PyResult<u8> {
        let parts = Parts::of(data, None)?;
        let dl = if block {
            deadline(timeout)?
        } else {
            Some(Instant::now())
        };
        parts.with_msg(|msg| self.offer_msg(py, msg, dl, write))
    }

    /// Writes the messages of `batch` (slots already reserved) in order, waiting for
    /// room, in one GIL-free call: the feeder thread's path. Returns how many were
    /// written: all of them, or those before the first that failed (its error is
    /// raised only when it is the first of the batch, so the caller learns exactly
    /// which message failed).
    fn write_many(&self, py: Python<'_>, batch: &Bound<'_, PyList>) -> PyResult<usize> {
        let items: Vec<Bound<'_, PyAny>> = batch.iter().collect();
        let parts = items
            .iter()
            .map(|d| Parts::of(d, None))
            .collect::<PyResult<Vec<_>>>()?;
        let slices: Vec<Vec<&[u8]>> = parts.iter().map(Parts::slices).collect();
        let r = &self.h.inner;
        let mut done = 0usize;
        let res = blocking(py, |intr| {
            for (p, s) in parts.iter().zip(&slices) {
                r.write(
                    Msg {
                        parts: s,
                        fmt: p.fmt(),
                    },
                    intr,
                )?;
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
        Ok(Parts::of(data, None)?.with_msg(|msg| self.h.inner.try_write(msg)))
    }

    /// Gives back a slot reserved by `offer()` whose message will not be written.
    fn unreserve(&self) {
        self.h.inner.unreserve();
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
        match self.h.take(py, block, timeout, None)? {
            None => Err(empty_exc(py)?),
            Some(Landing::Bytes(b)) => loads.call1((b,)),
            Some(Landing::Raw(b)) => Ok(b.into_bound(py).into_any()),
            Some(Landing::Native(fmt, v)) => decode_native(py, fmt, &v),
            Some(Landing::Envelope(env)) => env.load(py, loads),
            Some(Landing::Scratch(ba, n)) => self.h.loads_scratch(py, loads, ba, n),
            Some(_) => Err(PyValueError::new_err("a pool message on a queue ring")),
        }
    }

    /// This process stops reading: a write waiting for room gives up with EPIPE and
    /// later gets raise OSError, as with a closed pipe end.
    fn abandon(&self) {
        self.h.inner.abandon();
    }

    /// Messages put and not yet taken.
    fn qsize(&self) -> u64 {
        self.h.inner.items()
    }

    /// Whether no message is waiting.
    fn empty(&self) -> bool {
        self.h.inner.is_empty()
    }

    /// Whether `maxsize` messages are queued.
    fn full(&self) -> bool {
        self.h.inner.is_full()
    }

    /// From now on, keep the bell pipe readable exactly while a message waits; returns
    /// the pipe's read end.
    fn arm_bell(&self) -> i32 {
        self.h.inner.arm_bell();
        self.h.inner.bell_fds().0
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Ring>()?;
    // The definition must outlive the function: leaked once per process (module init).
    let def = Box::leak(Box::new(pyo3::ffi::PyMethodDef {
        ml_name: c"is_plain".as_ptr(),
        ml_meth: pyo3::ffi::PyMethodDefPointer {
            PyCFunction: py_is_plain,
        },
        ml_flags: pyo3::ffi::METH_O,
        ml_doc: c"is_plain(obj): whether obj is a plain scalar (see PLAIN_MAX).".as_ptr(),
    }));
    // SAFETY: `def` lives forever; the result is a new reference or NULL with an
    // exception set (turned into Err).
    let f = unsafe {
        Bound::from_owned_ptr_or_err(
            m.py(),
            pyo3::ffi::PyCFunction_NewEx(def, std::ptr::null_mut(), std::ptr::null_mut()),
        )?
    };
    m.add("is_plain", f)?;
    m.add("PLAIN_MAX", PLAIN_MAX)?;
    m.add("OFFER_FULL", OFFER_FULL)?;
    m.add("OFFER_WRITTEN", OFFER_WRITTEN)?;
    m.add("OFFER_RESERVED", OFFER_RESERVED)?;
    m.add("OFFER_NOT_PLAIN", OFFER_NOT_PLAIN)
}
