//! `PoolRing`: a ring carrying a process pool's tagged messages (tasks one way,
//! results the other; see `python/ferromp/pool.py`), and the core's worker loop
//! (`serve`).
//!
//! Every message carries a 64-bit tag, the task's number. Each pool ring holds the
//! pool's claim words (a shared segment, one word per worker slot): a worker's take
//! stores the tag into its word before the ring lets go of the message, and the put of
//! its result clears the word once the result is in the result ring, so the parent can
//! always tell which task a dead worker held.
//!
//! What travels without the pickler (formats in [`crate::message`]): a call
//! `func(arg)` of a plain scalar `arg` (`put_calls`), a plain scalar result, and a list
//! of plain numbers (packed, see `packed.rs`). Everything else is a pickle or an
//! envelope from Python.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::message::{self, Format};
use crate::py::packed::{self, Packed};
use crate::py::ring::{decode_native, encode_native, store_claim, Handle, Landing, Parts};
use crate::py::shm::PySegment;
use crate::ring::Msg;

/// A process's handle on one of a pool's two rings.
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct PoolRing {
    h: Handle,
    claims: Py<PySegment>,
    /// Worker slots of the pool: where each slot's words are in `claims`.
    nslots: usize,
}

/// The layout of a pool's claims segment, in words (`PySegment::word`), for `nslots`
/// worker slots: slot `s`'s claim at `s`, its progress at `nslots + s` (the call inside a
/// timed chunk, see `Counted`), the tag of its task whose call has begun at
/// `2 * nslots + s`, and its five counters from `3 * nslots + 5 * s` on.
pub(crate) const STARTED: usize = 2;
pub(crate) const COUNTERS: usize = 3;
/// A slot's counters (only its worker writes them): tasks answered, nanoseconds busy
/// (from taking a task to putting its result, by the coarse monotonic clock: each
/// reading is off by up to its tick, a sum over many tasks is not), bytes of
/// arguments and of results, and when it took its current task.
const TASKS: usize = 0;
const BUSY_NS: usize = 1;
const ARG_BYTES: usize = 2;
const RESULT_BYTES: usize = 3;
const TAKEN_AT: usize = 4;
const COUNTER_WORDS: usize = 5;

/// The coarse monotonic clock in nanoseconds: a few nanoseconds a reading.
fn coarse_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Adds `v` to a counter only one process writes.
fn bump(word: &AtomicU64, v: u64) {
    word.store(
        word.load(Ordering::Relaxed).wrapping_add(v),
        Ordering::Relaxed,
    );
}

/// One worker slot's counters (see [`COUNTERS`]), looked up once.
struct Counters<'a>([&'a AtomicU64; COUNTER_WORDS]);

impl Counters<'_> {
    /// The worker took a task of `bytes` bytes.
    fn took(&self, bytes: u64) {
        bump(self.0[ARG_BYTES], bytes);
        self.0[TAKEN_AT].store(coarse_ns(), Ordering::Relaxed);
    }

    /// The worker put the result of its task, `bytes` bytes.
    fn put(&self, bytes: u64) {
        bump(self.0[TASKS], 1);
        bump(self.0[RESULT_BYTES], bytes);
        let taken = self.0[TAKEN_AT].load(Ordering::Relaxed);
        bump(self.0[BUSY_NS], coarse_ns().saturating_sub(taken));
    }
}

/// Why [`PoolRing::serve`] came back to Python: named constants of the module (plain
/// ints, compared once per return of `serve`), as `SERVE_LIMIT` and so on.
#[derive(Clone, Copy)]
#[repr(u8)]
pub(crate) enum ServeEnd {
    /// It ran as many tasks as it was allowed: nothing to do.
    Limit = 0,
    /// A task for Python to run: `value` is `(fkey, args, kwds)`, or the exception
    /// that rebuilding it raised (`ok` false).
    Task = 1,
    /// The core ran the task, whose result `value` needs the pickler.
    Result = 2,
    /// The core ran the task, which raised the Exception `value`.
    Error = 3,
}

/// What [`PoolRing::serve`] returns: `(done, end, tag, ok, value)`, the tasks it ran
/// and answered, why it came back ([`ServeEnd`]), and the task `value` belongs to.
type Served<'py> = (u64, u8, u64, bool, Bound<'py, PyAny>);

/// A tagged message as Python sees it: `(tag, True, loads(message))`, or `(tag, False,
/// exception)` when `loads` raised an Exception. An error of `loads` that is not an
/// Exception (a KeyboardInterrupt raised while a result is unpickled) does not lose
/// the tag either: the message comes back failed with that error, which is also left
/// in `interrupted` for the caller to raise once the message is safe.
fn tagged<'py>(
    py: Python<'py>,
    landing: Landing,
    loads: &Bound<'py, PyAny>,
    interrupted: &mut Option<PyErr>,
) -> PyResult<(u64, bool, Bound<'py, PyAny>)> {
    match landing {
        Landing::Tagged(tag, env) => match env.load(py, loads) {
            Ok(obj) => Ok((tag, true, obj)),
            Err(e) if e.is_instance_of::<PyException>(py) => {
                Ok((tag, false, e.into_value(py).into_bound(py).into_any()))
            }
            Err(e) => {
                let value = e.value(py).clone().into_any();
                *interrupted = Some(e);
                Ok((tag, false, value))
            }
        },
        Landing::Packed(tag, kind, data) => {
            let obj = Bound::new(py, Packed::new(kind, data))?.into_any();
            Ok((tag, true, obj))
        }
        Landing::TaggedNative(tag, fmt, v) => Ok((tag, true, decode_native(py, fmt, &v)?)),
        Landing::Call(tag, fmt, klen, v) => {
            // The task as its pickled form reads: (fkey, (arg,), None).
            let fkey = PyBytes::new(py, &v[..klen]).into_any();
            let arg = decode_native(py, fmt, &v[klen..])?;
            let args = PyTuple::new(py, [arg])?.into_any();
            let task = PyTuple::new(py, [fkey, args, py.None().into_bound(py)])?;
            Ok((tag, true, task.into_any()))
        }
        _ => Err(PyValueError::new_err("an untagged message on a pool ring")),
    }
}

impl PoolRing {
    fn claim(&self, slot: Option<usize>) -> PyResult<Option<&AtomicU64>> {
        slot.map(|s| self.claims.get().word(s)).transpose()
    }

    /// Worker slot `slot`'s counters.
    fn counters(&self, slot: usize) -> PyResult<Counters<'_>> {
        let at = COUNTERS * self.nslots + COUNTER_WORDS * slot;
        let seg = self.claims.get();
        let w = |k| seg.word(at + k);
        Ok(Counters([w(0)?, w(1)?, w(2)?, w(3)?, w(4)?]))
    }

    /// Puts a natively encoded message of format `fmt` (header fields: kind, count,
    /// tag; see [`message::native_head`]) with body `body`, after `hold`'s
    /// `hold_spin` if given; then clears `claim` (the result is out).
    fn put_native(
        &self,
        py: Python<'_>,
        fmt: Format,
        head: (u32, u64, u64),
        body: &[u8],
        claim: Option<(&Counters<'_>, &AtomicU64)>,
        hold: Option<&PoolRing>,
    ) -> PyResult<()> {
        let h = message::native_head(head.0, head.1, head.2);
        if let Some(r) = hold {
            r.h.inner.hold_spin();
        }
        let parts = [&h[..], body];
        self.h.put_unbounded(
            py,
            Msg {
                parts: &parts,
                fmt: fmt as u16,
            },
        )?;
        if let Some((counters, claim)) = claim {
            counters.put((h.len() + body.len()) as u64);
            store_claim(Some(claim), 0);
        }
        Ok(())
    }
}

#[pymethods]
impl PoolRing {
    /// A new ring of at least `capacity` data bytes; `claims` is the pool's segment of
    /// claim words.
    #[new]
    fn new(capacity: usize, claims: Py<PySegment>, nslots: usize) -> PyResult<Self> {
        Ok(PoolRing {
            h: Handle::new(capacity, 0)?,
            claims,
            nslots,
        })
    }

    /// Maps the ring of another handle from its three fds (`fds`), which this call
    /// owns from now on (pass duplicates).
    #[staticmethod]
    fn attach(
        fd: i32,
        bell_r: i32,
        bell_w: i32,
        claims: Py<PySegment>,
        nslots: usize,
    ) -> PyResult<Self> {
        Ok(PoolRing {
            h: Handle::attach(fd, bell_r, bell_w)?,
            claims,
            nslots,
        })
    }

    /// The segment's memfd and the bell pipe's (read, write) fds, for `attach`.
    #[getter]
    fn fds(&self) -> (i32, i32, i32) {
        self.h.fds()
    }

    /// Puts `data` (bytes, or an envelope tuple) tagged `tag`, waiting for room if
    /// needed, after `hold.hold_spin()` if `hold` is given; then, if `slot` is given,
    /// clears that worker's claim word (its result is out). With `plain`, `data` is
    /// the object itself, put without the pickler if it is a plain scalar (see
    /// `encode_native`) or a list whose items are all exact ints within 64 bits or all
    /// exact floats (packed, see `packed.rs`); for any other object nothing is done and
    /// the result is False (the caller pickles it).
    #[pyo3(signature = (tag, data, slot=None, hold=None, *, plain=false))]
    fn put(
        &self,
        py: Python<'_>,
        tag: u64,
        data: &Bound<'_, PyAny>,
        slot: Option<usize>,
        hold: Option<&Bound<'_, PoolRing>>,
        plain: bool,
    ) -> PyResult<bool> {
        let claim = match slot {
            Some(s) => Some((self.counters(s)?, self.claims.get().word(s)?)),
            None => None,
        };
        let hold = hold.map(|h| h.get());
        if !plain {
            let parts = Parts::of(data, Some(tag))?;
            if let Some(r) = hold {
                r.h.inner.hold_spin();
            }
            let bytes = parts.with_msg(|msg| {
                let n: usize = msg.parts.iter().map(|p| p.len()).sum();
                self.h.put_unbounded(py, msg).map(|_| n)
            })?;
            if let Some((counters, c)) = &claim {
                counters.put(bytes as u64);
                store_claim(Some(c), 0);
            }
        } else if let Ok(items) = data.cast_exact::<PyList>() {
            let Some((kind, body)) = packed::encode(items) else {
                return Ok(false);
            };
            let head = (kind, items.len() as u64, tag);
            let claim = claim.as_ref().map(|(n, c)| (n, *c));
            self.put_native(py, Format::Packed, head, &body, claim, hold)?;
        } else {
            let Some((fmt, enc)) = encode_native(data)? else {
                return Ok(false);
            };
            let body = enc.bytes();
            let head = (fmt as u32, body.len() as u64, tag);
            let claim = claim.as_ref().map(|(n, c)| (n, *c));
            self.put_native(py, Format::TaggedNative, head, body, claim, hold)?;
        }
        Ok(true)
    }

    /// `put(tag, data)` for each `(tag, data)` of `items`, in order, waking the
    /// consumers once for the lot when they all fit right away.
    fn put_many(&self, py: Python<'_>, items: &Bound<'_, PyList>) -> PyResult<()> {
        let pairs = items
            .iter()
            .map(|item| item.extract::<(u64, Bound<'_, PyAny>)>())
            .collect::<PyResult<Vec<_>>>()?;
        let parts = pairs
            .iter()
            .map(|(tag, data)| Parts::of(data, Some(*tag)))
            .collect::<PyResult<Vec<_>>>()?;
        let slices: Vec<Vec<&[u8]>> = parts.iter().map(Parts::slices).collect();
        let msgs: Vec<Msg<'_>> = parts
            .iter()
            .zip(&slices)
            .map(|(p, s)| Msg {
                parts: s,
                fmt: p.fmt(),
            })
            .collect();
        self.h.put_all(py, &msgs)
    }

    /// Writes tasks `func(item)` for `items[start:stop]` (a list, tuple or range),
    /// tagged `tag0`, `tag0 + 1`, ..., in native form (`TaggedCall`: `fkey`, the
    /// function's cached pickle, then the item's native encoding), in batches with one
    /// wake-up each. Stops before the first item that is not a plain scalar; returns
    /// how many it wrote.
    fn put_calls(
        &self,
        py: Python<'_>,
        tag0: u64,
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
            let tag = tag0 + spans.len() as u64;
            buf.extend_from_slice(&message::native_head(fmt as u32, fkey.len() as u64, tag));
            buf.extend_from_slice(fkey);
            buf.extend_from_slice(enc.bytes());
            spans.push((at, buf.len()));
        }
        let parts: Vec<[&[u8]; 1]> = spans.iter().map(|&(a, b)| [&buf[a..b]]).collect();
        let msgs: Vec<Msg<'_>> = parts
            .iter()
            .map(|p| Msg {
                parts: p,
                fmt: Format::TaggedCall as u16,
            })
            .collect();
        self.h.put_all(py, &msgs)?;
        Ok(msgs.len())
    }

    /// Takes up to `limit` messages and passes each to `append` (a deque's, say) as
    /// `(tag, True, loads(message))`, or `(tag, False, exception)` when `loads` raised
    /// an Exception, as soon as it is taken; returns how many. The first waits up to
    /// `timeout` if `block`; the others are taken only if they are there now. A
    /// message is handed over before any Python code runs after it, so an interruption
    /// loses nothing: a KeyboardInterrupt raised while one message is unpickled makes
    /// that message a failure carrying it, handed over like the others, and is raised
    /// after.
    #[pyo3(signature = (loads, limit, append, block=false, timeout=None))]
    fn take_into<'py>(
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
            let wait = block && first;
            let Some(landing) = self.h.take(py, wait, timeout.filter(|_| first), None)? else {
                break;
            };
            let r = tagged(py, landing, loads, &mut failure)?;
            append.call1((r,))?;
            n += 1;
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(n)
    }

    /// The core's worker loop. Runs tasks from this ring (a pool's task ring) without
    /// going back to Python between them, while they are native calls (`put_calls`) of
    /// a function found in `funcs` (function key -> function) whose results are plain
    /// scalars: each result goes natively into `results`, then the worker's claim word
    /// `slot` is cleared, as `put` does. The slot's started word gets each task's tag as
    /// its call begins (the parent times calls from then on: see `task_timeout` in
    /// `pool.py`), and its counters count what it takes and puts. Stops after `limit`
    /// tasks, or at the first task it cannot finish alone, and says why (see
    /// [`ServeEnd`]).
    ///
    /// Before each result it puts (but the one that reaches `limit`) the worker
    /// announces its next wait on this ring (`hold_spin`).
    fn serve<'py>(
        &self,
        py: Python<'py>,
        results: &Bound<'py, PoolRing>,
        funcs: &Bound<'py, PyDict>,
        loads: &Bound<'py, PyAny>,
        slot: usize,
        limit: u64,
    ) -> PyResult<Served<'py>> {
        let claim = self.claim(Some(slot))?;
        let started = self.claims.get().word(STARTED * self.nslots + slot)?;
        let counters = self.counters(slot)?;
        let results = results.get();
        let mut done = 0u64;
        // The last function looked up, by its key: a map calls one function.
        let mut last: Option<(Vec<u8>, Bound<'py, PyAny>)> = None;
        while done < limit {
            let Some(landing) = self.h.take(py, true, None, claim)? else {
                continue;
            };
            counters.took(self.h.last_taken.load(Ordering::Relaxed));
            let (tag, fmt, klen, v) = match landing {
                Landing::Call(tag, fmt, klen, v) if tag != 0 => (tag, fmt, klen, v),
                other => {
                    let mut interrupted = None;
                    let (tag, ok, obj) = tagged(py, other, loads, &mut interrupted)?;
                    if let Some(e) = interrupted {
                        return Err(e);
                    }
                    return Ok((done, ServeEnd::Task as u8, tag, ok, obj));
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
                        let (tag, ok, obj) = tagged(py, landing, loads, &mut None)?;
                        return Ok((done, ServeEnd::Task as u8, tag, ok, obj));
                    }
                },
            };
            let arg = decode_native(py, fmt, &v[klen..])?;
            started.store(tag, Ordering::Relaxed);
            let value = match func.call1((arg,)) {
                Ok(value) => value,
                Err(e) if e.is_instance_of::<PyException>(py) => {
                    let exc = e.into_value(py).into_bound(py).into_any();
                    return Ok((done, ServeEnd::Error as u8, tag, false, exc));
                }
                Err(e) => return Err(e),
            };
            let Some((rfmt, enc)) = encode_native(&value)? else {
                return Ok((done, ServeEnd::Result as u8, tag, true, value));
            };
            let body = enc.bytes();
            let head = (rfmt as u32, body.len() as u64, tag);
            let hold = (done + 1 < limit).then_some(self);
            let claim = claim.map(|c| (&counters, c));
            results.put_native(py, Format::TaggedNative, head, body, claim, hold)?;
            done += 1;
        }
        Ok((
            done,
            ServeEnd::Limit as u8,
            0,
            true,
            py.None().into_bound(py),
        ))
    }

    /// Whether a message (or part of one) waits to be read.
    fn has_data(&self) -> bool {
        self.h.inner.has_data()
    }

    /// This process stops reading: a write waiting for room gives up with EPIPE and
    /// later gets raise OSError, as with a closed pipe end.
    fn abandon(&self) {
        self.h.inner.abandon();
    }
}

/// `Counted(items, claims, word)`: an iterator over `items` that stores the index of
/// each item it hands out into word `word` of the segment `claims`, so that the parent
/// can tell which call of a map chunk a worker is in (and for how long it has been in
/// it: see `task_timeout` in `pool.py`). It costs a relaxed store per item.
#[pyclass(module = "ferromp._core", frozen)]
pub(crate) struct Counted {
    inner: Py<PyAny>,
    claims: Py<PySegment>,
    word: usize,
    next: AtomicU64,
}

#[pymethods]
impl Counted {
    #[new]
    fn new(items: &Bound<'_, PyAny>, claims: Py<PySegment>, word: usize) -> PyResult<Self> {
        claims.get().word(word)?;
        Ok(Counted {
            inner: items.try_iter()?.into_any().unbind(),
            claims,
            word,
            next: AtomicU64::new(0),
        })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.claims
            .get()
            .word(self.word)?
            .store(i, Ordering::Relaxed);
        // SAFETY: `inner` is an iterator (made by `try_iter`) and the GIL is held; the
        // result is a new reference, or NULL at the end or on an error (then set).
        let item = unsafe { pyo3::ffi::PyIter_Next(self.inner.as_ptr()) };
        if item.is_null() {
            return PyErr::take(py).map_or(Ok(None), Err);
        }
        // SAFETY: a new reference, owned from here on.
        Ok(Some(unsafe { Bound::from_owned_ptr(py, item) }.unbind()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PoolRing>()?;
    m.add_class::<Counted>()?;
    m.add("SERVE_LIMIT", ServeEnd::Limit as u8)?;
    m.add("SERVE_TASK", ServeEnd::Task as u8)?;
    m.add("SERVE_RESULT", ServeEnd::Result as u8)?;
    m.add("SERVE_ERROR", ServeEnd::Error as u8)
}
