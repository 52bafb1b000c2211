//! A multi-producer, multi-consumer queue of byte messages in one shared segment: the
//! transport under `queues.Queue`, `SimpleQueue` and `JoinableQueue`.
//!
//! # Layout
//!
//! One memfd [`Segment`]: a header of cache lines, then `capacity` bytes of data used as
//! a circular byte stream (`capacity` is a power of two).
//!
//! | line | contents                                                        |
//! |------|-----------------------------------------------------------------|
//! | 0    | magic, capacity, maxsize (immutable)                            |
//! | 1    | write lock (a [`RawSemaphore`] mutex with dead-owner recovery)  |
//! | 2    | read lock (same)                                                |
//! | 3    | bell lock (same; see "The bell")                                |
//! | 4    | `head` (bytes published), `open` (a chunked message is open), slots reserved |
//! | 5    | `tail` (bytes consumed), `open` (bytes of a message still to skip), slots freed |
//! | 6    | `data_seq`, `data_waiters`: the futex consumers sleep on        |
//! | 7    | `space_seq`, `space_waiters`: the futex producers sleep on      |
//! | 8    | bell state                                                      |
//!
//! # Records
//!
//! The stream holds records, each an 8-byte header (`u32` length, `u16` kind, `u16`
//! format) and its payload padded to 8 bytes, so a header never straddles the end of
//! the buffer (a payload may: it is copied in two pieces). The format is the message's,
//! given by the producer and handed to the consumer's allocator ([`Msg`], [`Alloc`]);
//! the ring itself only reads it to find a message header at the start (see
//! [`crate::message::Format::is_headed`]).
//!
//! * `WHOLE`: a complete message.
//! * `FIRST` + `MORE`...: a message too large to sit in the buffer at once. The first
//!   payload starts with the message's total length (`u64`); the producer streams the
//!   rest as space frees up, while one consumer copies it out.
//! * `ABORT`: the open chunked message will not be finished (its producer was
//!   interrupted or died); the consumer drops what it copied.
//!
//! # Concurrency
//!
//! Producers serialise on the write lock and consumers on the read lock, so between
//! the two lock holders this is a single-producer single-consumer ring: the producer
//! copies, then publishes with a release store of `head`; the consumer reads `head`
//! with acquire, copies out, then frees the space with a release store of `tail`. An
//! uncontended put or get is therefore two lock CASes, two stores and no syscall.
//!
//! A side that must wait (no data, no space, `maxsize` reached) spins for the adaptive
//! budget of [`crate::spin`], then sleeps on a futex word. The other side bumps that
//! word and calls `FUTEX_WAKE` only when the waiter count says somebody sleeps; as in
//! the semaphores, the waiter increments the count *then* re-checks, the waker
//! publishes *then* reads the count, all `SeqCst`, so a wake-up is never lost.
//!
//! # Processes that die
//!
//! * A producer killed before it publishes leaves nothing: `head` did not move, and the
//!   next producer takes the write lock over from the dead holder.
//! * A consumer killed before it moves `tail` leaves its message in place for the next
//!   consumer, which takes the read lock over: nothing is lost or duplicated.
//! * A producer killed in the middle of a chunked message leaves it open; whoever takes
//!   the write lock next (a producer, or the consumer that waits for the next chunk and
//!   finds the writer dead) writes `ABORT`, and the consumer drops the partial message.
//! * A consumer killed (or interrupted) in the middle of a chunked message leaves
//!   `read_open` set; the next consumer skips the rest of that message.
//!
//! The item count (`qsize`, `maxsize`) is kept by the put that reserves a slot and the
//! get that completes a message; a producer killed between the two leaves one slot
//! reserved forever, as a semaphore acquired by a dying process does in the stdlib.
//!
//! # The bell
//!
//! `concurrent.futures` waits on `SimpleQueue._reader` with `select()`, which needs a
//! real file descriptor that is readable exactly when a message is waiting. Once anyone
//! asks for that fd ([`Ring::arm_bell`]), the ring keeps a pipe holding one byte while
//! it is not empty: after every put and get, under the bell lock, the byte is written
//! or drained to match the current state. The last such step after any change sees the
//! final state, so the pipe never says "readable" for an empty ring for longer than a
//! put/get takes. Until the bell is armed this costs one relaxed load per operation.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::connection::Intr;
use crate::error::{Error, Result};
use crate::message::Format;
use crate::shm::Segment;
use crate::spin;
use crate::sync::futex::{self, Wake};
use crate::sync::{RawSemaphore, Recovery, SemKind, OWNER_CHECK_PERIOD, STATE_SIZE};

const MAGIC: u32 = u32::from_be_bytes(*b"fmR1");
const REC_HDR: u64 = 8;
const WHOLE: u16 = 1;
const FIRST: u16 = 2;
const MORE: u16 = 3;
const ABORT: u16 = 4;
/// Smallest data area; smaller requests are rounded up.
pub const MIN_CAPACITY: usize = 4096;
/// Largest data area (a record length is a `u32`).
pub const MAX_CAPACITY: usize = 1 << 30;

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Meta {
    magic: u32,
    _pad: u32,
    capacity: u64,
    maxsize: u64,
}

#[repr(C)]
struct Pos {
    /// Producer side: bytes published (`head`); consumer side: bytes freed (`tail`).
    pos: AtomicU64,
    /// Producer side: non-zero while a chunked message is open. Consumer side: bytes of
    /// a chunked message that an interrupted or dead consumer left unread.
    open: AtomicU64,
    /// Producer side: message slots reserved; consumer side: slots given back (a
    /// message taken, aborted or unreserved). Their difference is the item count;
    /// keeping the two halves on their own side's line means a put and a get never
    /// write the same cache line.
    slots: AtomicU64,
    /// The CPU (plus one; 0: unknown) this side last ran on when it put or took a
    /// record: a waiter on the other side does not spin while that is its own CPU.
    cpu: AtomicU32,
}

#[repr(C)]
struct Wait {
    seq: AtomicU32,
    waiters: AtomicU32,
    /// Non-zero while one waiter spins for the condition: the system-wide monotonic
    /// time (ns) by which its spin ends at the latest. Only one waiter spins at a time,
    /// and a producer that sees a live spinner skips waking the sleepers (the spinner
    /// takes the message and passes the turn on; see [`Ring::get`]). A spinner that
    /// died leaves a stamp that expires by itself.
    spin_until: AtomicU64,
}

#[repr(C)]
struct Counts {
    bell_armed: AtomicU32,
    bell_rung: AtomicU32,
}

#[repr(C)]
struct Header {
    meta: Line<Meta>,
    wlock: Line<[u8; STATE_SIZE]>,
    rlock: Line<[u8; STATE_SIZE]>,
    bell_lock: Line<[u8; STATE_SIZE]>,
    prod: Line<Pos>,
    cons: Line<Pos>,
    data: Line<Wait>,
    space: Line<Wait>,
    counts: Line<Counts>,
}

const HEADER: usize = std::mem::size_of::<Header>();
const _: () = assert!(STATE_SIZE <= 64 && HEADER % 64 == 0);

/// A message to put: the concatenation of `parts`, tagged with a format number that
/// the consumer's allocator gets (see [`crate::message::Format`]). The ring only asks
/// whether the format is headed.
#[derive(Clone, Copy, Debug)]
pub struct Msg<'a> {
    pub parts: &'a [&'a [u8]],
    pub fmt: u16,
}

impl<'a> Msg<'a> {
    /// A plain message in one piece.
    pub fn plain(parts: &'a [&'a [u8]]) -> Msg<'a> {
        Msg { parts, fmt: 0 }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The buffers a consumer's allocator gives for a message, filled in order.
pub enum Dest {
    /// One buffer (the common case, without a heap allocation).
    One((*mut u8, usize)),
    /// Several.
    Many(Vec<(*mut u8, usize)>),
}

impl Dest {
    fn segs(&self) -> &[(*mut u8, usize)] {
        match self {
            Dest::One(pair) => std::slice::from_ref(pair),
            Dest::Many(v) => v,
        }
    }
}

/// The consumer's allocator: `(format, length after the header, header)` to the value
/// to return and the buffers to fill, in order; see [`Ring::get`].
pub type Alloc<'a, B> = &'a mut dyn FnMut(u16, usize, &[u8]) -> Result<(B, Dest)>;

/// Walks a sequence of byte slices as one stream.
struct Cursor<'a> {
    parts: &'a [&'a [u8]],
    i: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        Cursor {
            parts,
            i: 0,
            off: 0,
        }
    }

    /// Appends to `out` the slices covering the next `n` bytes.
    fn take(&mut self, mut n: usize, out: &mut Vec<&'a [u8]>) {
        while n > 0 && self.i < self.parts.len() {
            let p = self.parts[self.i];
            let k = (p.len() - self.off).min(n);
            if k > 0 {
                out.push(&p[self.off..self.off + k]);
            }
            self.off += k;
            n -= k;
            if self.off == p.len() {
                self.i += 1;
                self.off = 0;
            }
        }
    }
}

/// Where a consumer is within the message it copies out.
struct MsgReader {
    /// Stream position of the next byte.
    pos: u64,
    /// Bytes of the current record not yet copied.
    in_rec: usize,
    /// The current record's payload length.
    rec_len: u32,
    /// The message's length.
    total: usize,
}

/// How a [`Ring::offer`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// A slot was reserved and the message is in the ring.
    Written,
    /// A slot was reserved but the message is not written (no room right now, or the
    /// caller asked not to write); the caller must [`Ring::write`] it later.
    Reserved,
    /// `maxsize` messages are queued and none left before the deadline.
    Full,
}

/// One process's handle on a ring.
pub struct Ring {
    seg: Segment,
    hdr: NonNull<Header>,
    data: *mut u8,
    cap: u64,
    maxsize: u64,
    wlock: RawSemaphore,
    rlock: RawSemaphore,
    bell_lock: RawSemaphore,
    bell_r: OwnedFd,
    bell_w: OwnedFd,
    /// Set when this process gave up reading (`Queue._reader.close()`): nobody may
    /// ever drain the ring again, so writes waiting for room stop with EPIPE, as a
    /// write to a pipe without readers does.
    abandoned: AtomicBool,
    /// The spin stamp this handle set with [`hold_spin`](Self::hold_spin), if any.
    held_stamp: AtomicU64,
}

// SAFETY: the shared header is only touched through atomics and the semaphores (which
// are Send + Sync); the data area only through raw-pointer copies made while holding
// the lock that owns that part of the stream (see the module docs). The mapping lives
// as long as the handle.
unsafe impl Send for Ring {}
// SAFETY: as for Send; every method takes `&self` and synchronises through the locks.
unsafe impl Sync for Ring {}

fn pad8(n: u64) -> u64 {
    (n + 7) & !7
}

impl Ring {
    /// Creates a ring with a data area of at least `capacity` bytes (rounded up to a
    /// power of two within [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]) that holds at most
    /// `maxsize` messages (0: unbounded), and its bell pipe.
    pub fn new(capacity: usize, maxsize: u64) -> Result<Ring> {
        let cap = capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_power_of_two();
        let seg = Segment::new(HEADER + cap)?;
        let hdr = seg.as_ptr().cast::<Header>();
        // SAFETY: the segment is fresh, page aligned and HEADER + cap long; nobody else
        // maps it yet. Writing the immutable fields before sharing is ordered before any
        // other process's access by the fd passing (a syscall) that shares it.
        unsafe {
            (*hdr).meta.0.magic = MAGIC;
            (*hdr).meta.0.capacity = cap as u64;
            (*hdr).meta.0.maxsize = maxsize;
            for slot in [
                &raw mut (*hdr).wlock.0,
                &raw mut (*hdr).rlock.0,
                &raw mut (*hdr).bell_lock.0,
            ] {
                RawSemaphore::init(
                    slot.cast::<u8>(),
                    STATE_SIZE,
                    SemKind::Semaphore,
                    1,
                    1,
                    Recovery::DeadOwner,
                )?;
            }
        }
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        Self::attach(seg, r, w)
    }

    /// A handle on the ring in `seg` (a segment of [`Ring::fd`], inherited or passed),
    /// with its bell pipe's two ends.
    ///
    /// Errors: `Os(EINVAL)` when the segment holds no ring.
    pub fn attach(seg: Segment, bell_r: OwnedFd, bell_w: OwnedFd) -> Result<Ring> {
        if seg.len() < HEADER + MIN_CAPACITY {
            return Err(Error::Os(Errno::EINVAL));
        }
        let base = seg.as_ptr();
        let hdr = NonNull::new(base.cast::<Header>()).ok_or(Error::Os(Errno::EINVAL))?;
        // SAFETY: the mapping is at least HEADER bytes and page aligned; the immutable
        // fields were written before the segment was shared.
        let meta = unsafe { &(*hdr.as_ptr()).meta.0 };
        let cap = meta.capacity;
        if meta.magic != MAGIC || !cap.is_power_of_two() || HEADER as u64 + cap > seg.len() as u64 {
            return Err(Error::Os(Errno::EINVAL));
        }
        let maxsize = meta.maxsize;
        // SAFETY: the three lock slots are 64-byte aligned, STATE_SIZE long, inside the
        // mapping that this handle keeps alive, and were initialised by `new`.
        let (wlock, rlock, bell_lock) = unsafe {
            let h = hdr.as_ptr();
            (
                RawSemaphore::attach((&raw mut (*h).wlock.0).cast(), STATE_SIZE),
                RawSemaphore::attach((&raw mut (*h).rlock.0).cast(), STATE_SIZE),
                RawSemaphore::attach((&raw mut (*h).bell_lock.0).cast(), STATE_SIZE),
            )
        };
        let (wlock, rlock, bell_lock) = (wlock?, rlock?, bell_lock?);
        // SAFETY: HEADER is within the mapping (checked above).
        let data = unsafe { base.add(HEADER) };
        Ok(Ring {
            seg,
            hdr,
            data,
            cap,
            maxsize,
            wlock,
            rlock,
            bell_lock,
            bell_r,
            bell_w,
            abandoned: AtomicBool::new(false),
            held_stamp: AtomicU64::new(0),
        })
    }

    fn h(&self) -> &Header {
        // SAFETY: the mapping outlives `self`; shared fields are atomics or immutable.
        unsafe { self.hdr.as_ref() }
    }

    /// The segment's memfd, to pass to another process.
    pub fn fd(&self) -> RawFd {
        self.seg.as_raw_fd()
    }

    /// The bell pipe's read and write ends.
    pub fn bell_fds(&self) -> (RawFd, RawFd) {
        (self.bell_r.as_raw_fd(), self.bell_w.as_raw_fd())
    }

    /// The data area's size in bytes.
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// The message limit given at creation (0: unbounded).
    pub fn maxsize(&self) -> u64 {
        self.maxsize
    }

    /// Messages put (slots reserved) and not yet taken.
    pub fn items(&self) -> u64 {
        let h = self.h();
        // Read the freed count first: it never passes the reserved count.
        let freed = h.cons.0.slots.load(Ordering::SeqCst);
        h.prod.0.slots.load(Ordering::SeqCst).saturating_sub(freed)
    }

    /// Whether no published byte is waiting to be read.
    pub fn is_empty(&self) -> bool {
        let h = self.h();
        h.prod.0.pos.load(Ordering::SeqCst) == h.cons.0.pos.load(Ordering::SeqCst)
    }

    /// Whether `maxsize` messages are queued.
    pub fn is_full(&self) -> bool {
        self.maxsize != 0 && self.items() >= self.maxsize
    }

    // ----- waiting -------------------------------------------------------------------

    /// Waits on `w` until `ready()`; false when `deadline` passed first. `check` runs
    /// about every [`OWNER_CHECK_PERIOD`] while asleep (for dead-peer detection).
    fn wait_on(
        &self,
        w: &Wait,
        deadline: Option<Instant>,
        intr: Intr,
        ready: &mut dyn FnMut() -> bool,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<bool> {
        if ready() {
            return Ok(true);
        }
        let start = Instant::now();
        if deadline.is_some_and(|d| start >= d) {
            return Ok(false);
        }
        if self.spin_solo(w, deadline, &mut *ready) {
            return Ok(true);
        }
        w.waiters.fetch_add(1, Ordering::SeqCst);
        let r = (|| loop {
            let seq = w.seq.load(Ordering::SeqCst);
            if ready() {
                return Ok(true);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(false);
            }
            let mut timeout = OWNER_CHECK_PERIOD;
            if let Some(d) = deadline {
                timeout = timeout.min(d - now);
            }
            match futex_wait(&w.seq, seq, timeout) {
                Ok(true) => {}
                Ok(false) => check()?,
                Err(Errno::EINTR) => intr()?,
                Err(e) => return Err(Error::Os(e)),
            }
        })();
        w.waiters.fetch_sub(1, Ordering::SeqCst);
        spin::note_blocked(start.elapsed());
        r
    }

    /// Spins for `ready` if no other waiter of `w` spins now (one spinner is enough: it
    /// takes what comes, and more spinners would only take CPUs from the processes
    /// that produce it).
    fn spin_solo(
        &self,
        w: &Wait,
        deadline: Option<Instant>,
        ready: &mut dyn FnMut() -> bool,
    ) -> bool {
        let now = mono_ns();
        let cur = w.spin_until.load(Ordering::SeqCst);
        let mine = self.held_stamp.swap(0, Ordering::Relaxed);
        // The peer we wait for last ran on this very CPU: spinning (and yielding) would
        // only share the CPU with it, while another may sit idle. Sleeping instead lets
        // the scheduler wake us on an idle CPU, and the two run apart from then on
        // (measured: round trips of 40 us for the first 25 ms of a pool, until the
        // load balancer moved one of them).
        let h = self.h();
        let peer = if std::ptr::eq(w, &h.data.0) {
            &h.prod.0.cpu
        } else {
            &h.cons.0.cpu
        };
        let p = peer.load(Ordering::Relaxed);
        if p != 0 && p == cpu_tag() {
            if mine != 0 {
                let _ = w
                    .spin_until
                    .compare_exchange(mine, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
            return false;
        }
        if cur != 0 && cur > now && cur != mine {
            return false;
        }
        let stamp = now + spin::MAX_BUDGET_NS + 1;
        if w.spin_until
            .compare_exchange(cur, stamp, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        let got = spin::spin_until(deadline, ready);
        w.spin_until.store(0, Ordering::SeqCst);
        got
    }

    /// Announces that this handle is about to wait for a message (say, once it has
    /// answered the one it holds): from now on, for at most the longest spin, it counts
    /// as the consumer that spins, so producers do not wake a sleeping one for the next
    /// message. The next `get` takes over the stamp, and any `get` that returns ends it.
    pub fn hold_spin(&self) {
        let w = &self.h().data.0;
        let now = mono_ns();
        let cur = w.spin_until.load(Ordering::SeqCst);
        if cur != 0 && cur > now {
            return;
        }
        let stamp = now + spin::MAX_BUDGET_NS + 1;
        if w.spin_until
            .compare_exchange(cur, stamp, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.held_stamp.store(stamp, Ordering::Relaxed);
        }
    }

    /// Ends a [`hold_spin`](Self::hold_spin) that no spin took over.
    fn drop_hold(&self) {
        let mine = self.held_stamp.swap(0, Ordering::Relaxed);
        if mine != 0 {
            let w = &self.h().data.0;
            let _ = w
                .spin_until
                .compare_exchange(mine, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Wakes the sleepers of `w` after a `SeqCst` store that changed their condition,
    /// unless a waiter spins for it right now (that one will see the change).
    fn wake_unless_spinning(w: &Wait) {
        if w.waiters.load(Ordering::SeqCst) != 0 {
            let s = w.spin_until.load(Ordering::SeqCst);
            if s != 0 && mono_ns() < s {
                return;
            }
            w.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&w.seq);
        }
    }

    /// Wakes the sleepers of `w` after a `SeqCst` store that changed their condition.
    /// With nobody asleep this is one load: a waiter counts itself in *before* its
    /// last check of the condition, so if the load misses it, that check sees the
    /// change (see the module docs).
    fn wake(w: &Wait) {
        if w.waiters.load(Ordering::SeqCst) != 0 {
            w.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&w.seq);
        }
    }

    fn lock(&self, lock: &RawSemaphore, deadline: Option<Instant>, intr: Intr) -> Result<bool> {
        loop {
            match lock.acquire(deadline) {
                Ok(got) => return Ok(got),
                Err(Error::Interrupted) => intr()?,
                Err(e) => return Err(e),
            }
        }
    }

    // ----- producing -----------------------------------------------------------------

    /// Reserves a message slot (waiting while `maxsize` are queued) and, if `write`,
    /// writes `msg` when that needs no waiting for space.
    pub fn offer(
        &self,
        msg: Msg<'_>,
        deadline: Option<Instant>,
        write: bool,
        intr: Intr,
    ) -> Result<Offer> {
        if !self.reserve(deadline, intr)? {
            return Ok(Offer::Full);
        }
        if write && self.try_write(msg) {
            Ok(Offer::Written)
        } else {
            Ok(Offer::Reserved)
        }
    }

    /// Takes a message slot: always at once when unbounded.
    pub fn reserve(&self, deadline: Option<Instant>, intr: Intr) -> Result<bool> {
        let h = self.h();
        let reserved = &h.prod.0.slots;
        if self.maxsize == 0 {
            reserved.fetch_add(1, Ordering::SeqCst);
            return Ok(true);
        }
        let max = self.maxsize;
        let mut take = || {
            let mut n = reserved.load(Ordering::SeqCst);
            while n.saturating_sub(h.cons.0.slots.load(Ordering::SeqCst)) < max {
                match reserved.compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return true,
                    Err(seen) => n = seen,
                }
            }
            false
        };
        self.wait_on(&self.h().space.0, deadline, intr, &mut take, &mut || Ok(()))
    }

    /// Gives back a slot taken by [`reserve`](Self::reserve) for a message that will
    /// not be written.
    pub fn unreserve(&self) {
        self.release_slot();
    }

    fn release_slot(&self) {
        let h = self.h();
        h.cons.0.slots.fetch_add(1, Ordering::SeqCst);
        if self.maxsize != 0 {
            Self::wake(&h.space.0);
        }
    }

    fn free_space(&self) -> u64 {
        let h = self.h();
        // Only the write-lock holder moves head; tail only grows.
        self.cap - (h.prod.0.pos.load(Ordering::Relaxed) - h.cons.0.pos.load(Ordering::Acquire))
    }

    fn whole_fits(&self, len: usize) -> bool {
        REC_HDR + pad8(len as u64) <= self.cap / 2
    }

    /// Writes `msg` (a slot already reserved) if the write lock is free and there is
    /// room right now; never waits.
    pub fn try_write(&self, msg: Msg<'_>) -> bool {
        let len = msg.len();
        if !self.whole_fits(len) || self.wlock.try_acquire().is_err() {
            return false;
        }
        let done = self.h().prod.0.open.load(Ordering::Relaxed) == 0
            && self.free_space() >= REC_HDR + pad8(len as u64);
        if done {
            self.put_record(WHOLE, msg.fmt, msg.parts);
        }
        let _ = self.wlock.release();
        if done {
            self.after_put();
        }
        done
    }

    /// Writes the leading messages of `msgs` that fit right now, on an unbounded ring,
    /// under one hold of the write lock, and wakes the consumers once at the end; never
    /// waits. Returns how many were written (the caller writes the rest one by one).
    /// One wake-up for a batch matters: waking a sleeping consumer can preempt the
    /// producer on the spot, in the middle of its batch.
    pub fn try_write_batch(&self, msgs: &[Msg<'_>]) -> usize {
        if self.maxsize != 0 || self.wlock.try_acquire().is_err() {
            return 0;
        }
        let h = self.h();
        let mut n = 0;
        if h.prod.0.open.load(Ordering::Relaxed) == 0 {
            for msg in msgs {
                let len = msg.len();
                if !self.whole_fits(len) || self.free_space() < REC_HDR + pad8(len as u64) {
                    break;
                }
                h.prod.0.slots.fetch_add(1, Ordering::SeqCst);
                self.put_record_quiet(WHOLE, msg.fmt, msg.parts);
                n += 1;
            }
        }
        let _ = self.wlock.release();
        if n > 0 {
            Self::wake_unless_spinning(&h.data.0);
            self.after_put();
        }
        n
    }

    /// Writes `msg` (a slot already reserved) as one record if that can be done by
    /// `deadline`; false (nothing written, the slot still reserved) otherwise, and
    /// always for a message that needs chunks.
    pub fn write_until(&self, msg: Msg<'_>, deadline: Instant, intr: Intr) -> Result<bool> {
        let len = msg.len();
        if !self.whole_fits(len) {
            return Ok(false);
        }
        if !self.lock(&self.wlock, Some(deadline), intr)? {
            return Ok(false);
        }
        let need = REC_HDR + pad8(len as u64);
        let h = self.h();
        let mut ready = || self.free_space() >= need;
        let r = if h.prod.0.open.load(Ordering::Relaxed) != 0 {
            Ok(false)
        } else {
            self.wait_on(&h.space.0, Some(deadline), intr, &mut ready, &mut || Ok(()))
        };
        if let Ok(true) = r {
            self.put_record(WHOLE, msg.fmt, msg.parts);
        }
        let _ = self.wlock.release();
        if let Ok(true) = r {
            self.after_put();
        }
        r
    }

    /// Writes `msg` (a slot already reserved), waiting for the write lock and for room.
    /// A message larger than half the buffer is streamed in chunks while a consumer
    /// copies it out. If `intr` stops it in the middle, the message is aborted.
    pub fn write(&self, msg: Msg<'_>, intr: Intr) -> Result<()> {
        self.lock(&self.wlock, None, intr)?;
        let r = self.write_locked(msg, intr);
        let _ = self.wlock.release();
        self.after_put();
        r
    }

    fn write_locked(&self, msg: Msg<'_>, intr: Intr) -> Result<()> {
        let h = self.h();
        if h.prod.0.open.load(Ordering::Relaxed) != 0 {
            // A previous writer left a chunked message open: close it first.
            self.wait_space(REC_HDR, intr)
                .inspect_err(|_| self.release_slot())?;
            self.abort_open();
        }
        let len = msg.len();
        if self.whole_fits(len) {
            // Interrupted before anything is published: the slot goes back.
            self.wait_space(REC_HDR + pad8(len as u64), intr)
                .inspect_err(|_| self.release_slot())?;
            self.put_record(WHOLE, msg.fmt, msg.parts);
            return Ok(());
        }
        // Chunked: chunks of at least an eighth of the buffer, so the consumer copies
        // big pieces, and at most half, so both sides work at once.
        let total = (len as u64).to_le_bytes();
        let chunk_max = (self.cap / 2 - REC_HDR) as usize;
        let mut src = Cursor::new(msg.parts);
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(4);
        let mut off = len.min(chunk_max - 8);
        self.wait_space(REC_HDR + 8 + pad8(off as u64), intr)
            .inspect_err(|_| self.release_slot())?;
        h.prod.0.open.store(1, Ordering::Relaxed);
        pieces.push(&total);
        src.take(off, &mut pieces);
        self.put_record(FIRST, msg.fmt, &pieces);
        let min_chunk = (self.cap / 8) as usize;
        while off < len {
            let left = len - off;
            let want = left.min(min_chunk);
            if let Err(e) = self.wait_space(REC_HDR + pad8(want as u64), intr) {
                // Interrupted: abort now if there is room, else leave the message open
                // for the next writer (or the waiting consumer) to abort; whoever
                // aborts it gives its slot back.
                if self.free_space() >= REC_HDR {
                    self.abort_open();
                }
                return Err(e);
            }
            let room = (self.free_space() - REC_HDR) as usize & !7;
            let n = left.min(room).min(chunk_max);
            pieces.clear();
            src.take(n, &mut pieces);
            self.put_record(MORE, msg.fmt, &pieces);
            off += n;
        }
        h.prod.0.open.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Writes an ABORT record for the open chunked message (the write lock is held and
    /// there are at least REC_HDR free bytes) and gives its slot back.
    fn abort_open(&self) {
        self.put_record(ABORT, 0, &[]);
        self.h().prod.0.open.store(0, Ordering::Relaxed);
        self.release_slot();
    }

    fn wait_space(&self, need: u64, intr: Intr) -> Result<()> {
        let mut ready = || self.free_space() >= need;
        let mut check = || self.check_abandoned();
        self.wait_on(&self.h().space.0, None, intr, &mut ready, &mut check)?;
        Ok(())
    }

    fn check_abandoned(&self) -> Result<()> {
        if self.abandoned.load(Ordering::Relaxed) {
            Err(Error::Os(Errno::EPIPE))
        } else {
            Ok(())
        }
    }

    /// This process will not read any more and expects nobody else to: writes of this
    /// handle that wait for room give up with EPIPE (within [`OWNER_CHECK_PERIOD`]).
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Whether [`abandon`](Self::abandon) was called on this handle.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Copies one record (header + the concatenation of `parts`) at `head` and
    /// publishes it. The write lock is held and the space was checked.
    fn put_record(&self, kind: u16, fmt: u16, parts: &[&[u8]]) {
        self.put_record_quiet(kind, fmt, parts);
        Self::wake_unless_spinning(&self.h().data.0);
    }

    /// [`put_record`](Self::put_record) without the wake-up.
    fn put_record_quiet(&self, kind: u16, fmt: u16, parts: &[&[u8]]) {
        let h = self.h();
        h.prod.0.cpu.store(cpu_tag(), Ordering::Relaxed);
        let head = h.prod.0.pos.load(Ordering::Relaxed);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4..6].copy_from_slice(&kind.to_le_bytes());
        hdr[6..].copy_from_slice(&fmt.to_le_bytes());
        self.copy_in(head, &hdr);
        let mut at = head + REC_HDR;
        for p in parts {
            self.copy_in(at, p);
            at += p.len() as u64;
        }
        // SeqCst: the wake-up check must not be ordered before the publication.
        h.prod
            .0
            .pos
            .store(head + REC_HDR + pad8(len as u64), Ordering::SeqCst);
    }

    fn after_put(&self) {
        let h = self.h();
        if h.counts.0.bell_armed.load(Ordering::Relaxed) != 0 {
            self.bell_step();
        }
    }

    fn copy_in(&self, at: u64, src: &[u8]) {
        let off = (at & (self.cap - 1)) as usize;
        let first = src.len().min(self.cap as usize - off);
        // SAFETY: off + first <= cap and src.len() - first <= cap - first (a record never
        // exceeds the free space, which is at most cap), so both copies stay inside the
        // data area; these bytes are free space owned by the write-lock holder until
        // head is published, so no other process reads or writes them meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data, src.len() - first);
        }
    }

    fn copy_out(&self, at: u64, dst: *mut u8, n: usize) {
        let off = (at & (self.cap - 1)) as usize;
        let first = n.min(self.cap as usize - off);
        // SAFETY: as in copy_in, both ranges are inside the data area; they hold
        // published bytes that only the read-lock holder consumes, and `dst` is valid
        // for `n` bytes (the caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(self.data.add(off), dst, first);
            std::ptr::copy_nonoverlapping(self.data, dst.add(first), n - first);
        }
    }

    // ----- consuming -----------------------------------------------------------------

    /// The record header at `tail`: (payload length, kind, format).
    fn record_at(&self, tail: u64) -> (u32, u16, u16) {
        let mut hdr = [0u8; 8];
        self.copy_out(tail, hdr.as_mut_ptr(), 8);
        let len = u32::from_le_bytes(hdr[..4].try_into().unwrap());
        let kind = u16::from_le_bytes(hdr[4..6].try_into().unwrap());
        let fmt = u16::from_le_bytes(hdr[6..].try_into().unwrap());
        (len, kind, fmt)
    }

    /// Whether a published byte waits to be read (a message, or part of one).
    pub fn has_data(&self) -> bool {
        let h = self.h();
        h.prod.0.pos.load(Ordering::Acquire) != h.cons.0.pos.load(Ordering::Relaxed)
    }

    fn advance(&self, by: u64) {
        let h = self.h();
        h.cons.0.cpu.store(cpu_tag(), Ordering::Relaxed);
        let tail = h.cons.0.pos.load(Ordering::Relaxed);
        h.cons.0.pos.store(tail + by, Ordering::SeqCst);
        Self::wake(&h.space.0);
    }

    /// Takes the next message without waiting if the read lock is free and a whole
    /// message is there (see [`get`](Self::get) for `alloc`). `None`: nothing ready
    /// right now (or the read lock is busy, or the next message comes in chunks).
    pub fn try_get<B>(&self, alloc: Alloc<'_, B>) -> Result<Option<B>> {
        if !self.has_data() || self.rlock.try_acquire().is_err() {
            return Ok(None);
        }
        let h = self.h();
        let mut out = Ok(None);
        if h.cons.0.open.load(Ordering::Relaxed) == 0 && self.has_data() {
            let tail = h.cons.0.pos.load(Ordering::Relaxed);
            let (len, kind, fmt) = self.record_at(tail);
            if kind == WHOLE {
                out = self.read_message(tail, len, kind, fmt, alloc, None);
            }
        }
        let _ = self.rlock.release();
        if matches!(out, Ok(Some(_))) {
            self.after_get();
            self.pass_turn();
        }
        out
    }

    /// Takes the next message, waiting until `deadline` (forever if `None`); `None` when
    /// the deadline passed with nothing to take.
    ///
    /// `alloc(fmt, len, head)` gives the destination of a message of format `fmt`
    /// (as given to the put): buffers whose lengths add up to `len`, plus the value to
    /// return. A message of a headed format starts with a header whose first
    /// 4 bytes (little endian) give its length; `head` is that header, and `len`
    /// counts what follows it (for other formats `head` is empty). The buffers must stay valid until the value is returned.
    /// The deadline covers waiting for a message to start; once a chunked message has
    /// started, the call waits for its end (or its abort).
    ///
    /// Consumers wait for a message before they take the read lock, not holding it, so
    /// idle consumers neither queue on the lock nor wake each other on every message.
    /// One of them spins and the others sleep; whoever takes a message and sees more
    /// behind it wakes the sleepers (producers skip that while someone spins).
    pub fn get<B>(
        &self,
        deadline: Option<Instant>,
        alloc: Alloc<'_, B>,
        intr: Intr,
    ) -> Result<Option<B>> {
        let h = self.h();
        let r = loop {
            let pending = || self.has_data() || h.cons.0.open.load(Ordering::Relaxed) != 0;
            if !pending() {
                match self.wait_data(deadline, intr) {
                    Ok(true) => {}
                    other => break other.map(|_| None),
                }
            }
            match self.lock(&self.rlock, deadline, intr) {
                Ok(true) => {}
                other => break other.map(|_| None),
            }
            if !pending() {
                // Another consumer was quicker.
                let _ = self.rlock.release();
                continue;
            }
            let r = self.get_locked(deadline, alloc, intr);
            let _ = self.rlock.release();
            if matches!(r, Ok(Some(_))) {
                self.after_get();
            }
            break r;
        };
        self.pass_turn();
        r
    }

    /// After a get: ends this handle's spin hold, and wakes the sleepers if a message
    /// is left behind and no consumer spins for it (it must not wait for a sleeper's
    /// timeout).
    fn pass_turn(&self) {
        self.drop_hold();
        if self.has_data() {
            Self::wake_unless_spinning(&self.h().data.0);
        }
    }

    fn after_get(&self) {
        self.release_slot();
        if self.h().counts.0.bell_armed.load(Ordering::Relaxed) != 0 {
            self.bell_step();
        }
    }

    fn get_locked<B>(
        &self,
        deadline: Option<Instant>,
        alloc: Alloc<'_, B>,
        intr: Intr,
    ) -> Result<Option<B>> {
        let h = self.h();
        if h.cons.0.open.load(Ordering::Relaxed) != 0 {
            self.skip_open(intr)?;
        }
        loop {
            if !self.wait_data(deadline, intr)? {
                return Ok(None);
            }
            let tail = h.cons.0.pos.load(Ordering::Relaxed);
            let (len, kind, fmt) = self.record_at(tail);
            if kind == WHOLE || kind == FIRST {
                if let Some(b) = self.read_message(tail, len, kind, fmt, alloc, Some(intr))? {
                    return Ok(Some(b));
                }
                // Aborted by its producer: wait for the next message.
            } else {
                // ABORT of a message we never started, or a stray MORE: drop it.
                self.advance(REC_HDR + pad8(len as u64));
            }
        }
    }

    /// Copies the message whose first record (WHOLE or FIRST) is at `tail` into the
    /// buffers `alloc` gives, and moves past it. `Ok(None)` if it was aborted. Chunks
    /// are only waited for with an `intr`; `try_get` passes none and only WHOLE.
    fn read_message<B>(
        &self,
        tail: u64,
        len: u32,
        kind: u16,
        fmt: u16,
        alloc: Alloc<'_, B>,
        intr: Option<Intr>,
    ) -> Result<Option<B>> {
        let h = self.h();
        let mut rd = if kind == WHOLE {
            MsgReader {
                pos: tail + REC_HDR,
                in_rec: len as usize,
                rec_len: len,
                total: len as usize,
            }
        } else {
            let mut total = [0u8; 8];
            self.copy_out(tail + REC_HDR, total.as_mut_ptr(), 8);
            let total = u64::from_le_bytes(total) as usize;
            if (len as usize) < 8 || total < len as usize - 8 {
                return Err(Error::BadLength(total as i64));
            }
            MsgReader {
                pos: tail + REC_HDR + 8,
                in_rec: len as usize - 8,
                rec_len: len,
                total,
            }
        };
        let mut head = Vec::new();
        if Format::from_u16(fmt).is_ok_and(Format::is_headed) {
            // The envelope header sits in the first record (its writer makes sure).
            let mut n = [0u8; 4];
            if rd.in_rec < 4 {
                return Err(Error::BadLength(rd.in_rec as i64));
            }
            self.copy_out(rd.pos, n.as_mut_ptr(), 4);
            let hlen = u32::from_le_bytes(n) as usize;
            if !(4..=rd.in_rec).contains(&hlen) {
                return Err(Error::BadLength(hlen as i64));
            }
            head.resize(hlen, 0);
            self.copy_out(rd.pos, head.as_mut_ptr(), hlen);
            rd.pos += hlen as u64;
            rd.in_rec -= hlen;
        }
        let body = rd.total - head.len();
        let (b, dest) = alloc(fmt, body, &head)?;
        let segs = dest.segs();
        if segs.iter().map(|s| s.1).sum::<usize>() != body {
            return Err(Error::BadLength(body as i64));
        }
        if kind == FIRST {
            h.cons.0.open.store(
                (rd.total - (rd.rec_len as usize - 8)) as u64,
                Ordering::Relaxed,
            );
        }
        let mut intr = intr;
        for &(ptr, n) in segs {
            let mut at = 0;
            while at < n {
                if rd.in_rec == 0 {
                    let Some(intr) = intr.as_deref_mut() else {
                        return Err(Error::BadLength(body as i64));
                    };
                    if !self.next_chunk(&mut rd, intr)? {
                        return Ok(None);
                    }
                }
                let k = rd.in_rec.min(n - at);
                // SAFETY: at + k <= n, the length of this destination buffer.
                self.copy_out(rd.pos, unsafe { ptr.add(at) }, k);
                rd.pos += k as u64;
                rd.in_rec -= k;
                at += k;
            }
        }
        self.advance(REC_HDR + pad8(rd.rec_len as u64));
        if kind == FIRST {
            h.cons.0.open.store(0, Ordering::Relaxed);
        }
        Ok(Some(b))
    }

    /// Moves past the current record of a chunked message and waits for the next one.
    /// False if the message was aborted (the ABORT record is consumed).
    fn next_chunk(&self, rd: &mut MsgReader, intr: Intr) -> Result<bool> {
        let h = self.h();
        self.advance(REC_HDR + pad8(rd.rec_len as u64));
        self.wait_chunk(intr)?;
        let tail = h.cons.0.pos.load(Ordering::Relaxed);
        let (len, kind, _) = self.record_at(tail);
        if kind != MORE {
            h.cons.0.open.store(0, Ordering::Relaxed);
            if kind == ABORT {
                self.advance(REC_HDR);
            }
            return Ok(false);
        }
        let open = h.cons.0.open.load(Ordering::Relaxed);
        h.cons
            .0
            .open
            .store(open.saturating_sub(len as u64), Ordering::Relaxed);
        rd.pos = tail + REC_HDR;
        rd.in_rec = len as usize;
        rd.rec_len = len;
        Ok(true)
    }

    /// Drops the rest of a chunked message that a previous consumer left half read.
    fn skip_open(&self, intr: Intr) -> Result<()> {
        let h = self.h();
        loop {
            let left = h.cons.0.open.load(Ordering::Relaxed);
            if left == 0 {
                return Ok(());
            }
            self.wait_chunk(intr)?;
            let tail = h.cons.0.pos.load(Ordering::Relaxed);
            let (len, kind, _) = self.record_at(tail);
            match kind {
                MORE => {
                    self.advance(REC_HDR + pad8(len as u64));
                    let left = left.saturating_sub(len as u64);
                    h.cons.0.open.store(left, Ordering::Relaxed);
                    if left == 0 {
                        // The message is complete and dropped: its slot is free.
                        self.release_slot();
                    }
                }
                ABORT => {
                    self.advance(REC_HDR);
                    h.cons.0.open.store(0, Ordering::Relaxed);
                }
                _ => {
                    h.cons.0.open.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    fn wait_data(&self, deadline: Option<Instant>, intr: Intr) -> Result<bool> {
        let mut ready = || self.has_data();
        self.wait_on(&self.h().data.0, deadline, intr, &mut ready, &mut || Ok(()))
    }

    /// Waits for the next chunk of an open message. If its writer died (or gave up and
    /// nobody aborted), abort the message on its behalf so this never waits forever.
    fn wait_chunk(&self, intr: Intr) -> Result<()> {
        let mut ready = || self.has_data();
        let mut check = || {
            self.rescue_open_message();
            Ok(())
        };
        self.wait_on(&self.h().data.0, None, intr, &mut ready, &mut check)?;
        Ok(())
    }

    /// If the write lock is free or its holder is dead while a chunked message is open,
    /// take the lock and abort the message.
    fn rescue_open_message(&self) {
        let h = self.h();
        if h.prod.0.open.load(Ordering::SeqCst) == 0 {
            return;
        }
        let took = match self.wlock.holder() {
            None => self.wlock.try_acquire().is_ok(),
            Some(pid) => self.wlock.take_over_dead(pid),
        };
        if !took {
            return;
        }
        if h.prod.0.open.load(Ordering::Relaxed) != 0 && self.free_space() >= REC_HDR {
            self.abort_open();
        }
        let _ = self.wlock.release();
        Self::wake(&h.data.0);
    }

    // ----- the bell ------------------------------------------------------------------

    /// Makes the bell pipe's read end readable exactly while the ring holds a message,
    /// from now on and for every process using this ring.
    pub fn arm_bell(&self) {
        self.h().counts.0.bell_armed.store(1, Ordering::SeqCst);
        self.bell_step();
    }

    fn bell_step(&self) {
        let c = &self.h().counts.0;
        let mut noop = || Ok(());
        if !matches!(self.lock(&self.bell_lock, None, &mut noop), Ok(true)) {
            return;
        }
        let want = !self.is_empty();
        let rung = c.bell_rung.load(Ordering::Relaxed) != 0;
        if want && !rung {
            if nix::unistd::write(&self.bell_w, b"!").is_ok() {
                c.bell_rung.store(1, Ordering::Relaxed);
            }
        } else if !want && rung {
            let mut b = [0u8; 16];
            let _ = nix::unistd::read(&self.bell_r, &mut b);
            c.bell_rung.store(0, Ordering::Relaxed);
        }
        let _ = self.bell_lock.release();
    }
}

/// The CPU the calling thread runs on, plus one (0 if unknown).
fn cpu_tag() -> u32 {
    // SAFETY: sched_getcpu has no preconditions; it returns -1 on failure.
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 {
        0
    } else {
        c as u32 + 1
    }
}

/// The system-wide monotonic clock in ns (comparable between processes).
fn mono_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        Err(_) => 0,
    }
}

fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Duration,
) -> std::result::Result<bool, Errno> {
    // A shared (non-private) futex, because other processes wake it.
    match futex::wait(word, expected, Some(timeout))? {
        Wake::Woken | Wake::Changed => Ok(true),
        Wake::TimedOut => Ok(false),
        Wake::Interrupted => Err(Errno::EINTR),
    }
}

fn futex_wake(word: &AtomicU32) {
    // Only fails for a bad address, which a live mapping never is.
    let _ = futex::wake(word, u32::MAX);
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.cap)
            .field("maxsize", &self.maxsize)
            .field("items", &self.items())
            .finish_non_exhaustive()
    }
}
