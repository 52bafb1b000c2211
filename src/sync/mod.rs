//! Process-shared semaphores on futex words: the core of `multiprocessing.SemLock`.
//!
//! One semaphore is a 64-byte `SemState` in shared memory (a memfd that every process
//! maps, see [`Semaphore`]) plus a per-process, per-object handle ([`RawSemaphore`]) that
//! holds the bookkeeping the stdlib keeps in its `SemLockObject` (`count`, `last_tid`).
//! Python's `Lock`, `RLock`, `Semaphore`, `BoundedSemaphore` are all one of two kinds,
//! exactly as in CPython's `Modules/_multiprocessing/semaphore.c`:
//!
//! * [`SemKind::Semaphore`]: a counting semaphore bounded by `maxvalue`. `Lock` is
//!   `(Semaphore, 1, 1)`. Any process may release it, also one that never acquired it.
//! * [`SemKind::RecursiveMutex`]: `RLock`. Owned by one thread of one process, which
//!   may acquire it again; only that thread may release it.
//!
//! # Shared layout (`SemState`, `#[repr(C, align(64))]`, 64 bytes)
//!
//! | offset | field        | written                  | meaning                               |
//! |--------|--------------|--------------------------|---------------------------------------|
//! | 0      | `magic`      | once, by `init`          | `"fmS1"`; `attach` refuses anything else |
//! | 4      | `kind`       | once                     | 0 `RecursiveMutex`, 1 `Semaphore`      |
//! | 8      | `maxvalue`   | once                     | bound checked by `release`             |
//! | 12     | `flags`      | once                     | bit 0 mutex mode, bit 1 dead-owner recovery |
//! | 16     | `word`       | atomically, by everyone  | the futex word (tables below)          |
//! | 20     | `waiters`    | atomically, by waiters   | threads in the sleeping phase          |
//! | 24     | `recoveries` | atomically, by recoverers | diagnostic counter                    |
//!
//! # The futex word
//!
//! The state that other processes must agree on is one `AtomicU32`, `word`, so every
//! transition is a single compare-and-swap and nothing is ever half-updated. It has two
//! encodings, fixed at creation:
//!
//! **Counting mode** (every semaphore not in mutex mode, e.g. `Semaphore(n)`,
//! `BoundedSemaphore(n)` for n != 1, `Condition`'s internal `Semaphore(0)`): `word` is
//! the value.
//!
//! | word        | value | acquire                   | release                                   |
//! |-------------|-------|---------------------------|-------------------------------------------|
//! | `0`         | 0     | sleep until it changes    | `0 -> 1`                                  |
//! | `v > 0`     | v     | `v -> v-1`                | `v -> v+1`; `OverRelease` if `v >= maxvalue` (or `SEM_VALUE_MAX`) |
//!
//! **Mutex mode** (`maxvalue == 1` and `value <= 1`: `Lock`, `BoundedSemaphore(1)`, and
//! always for `RLock`): `word` names the holder, so a waiter can tell whether it died.
//!
//! | word                  | value | meaning                                      |
//! |-----------------------|-------|----------------------------------------------|
//! | `0` (`FREE`)          | 1     | free                                         |
//! | `1 ..= 2^22-1`        | 0     | held; the pid of the process that acquired it |
//! | `u32::MAX` (`HELD_ANON`) | 0  | held, holder unknown (created with value 0)  |
//!
//! Transitions: acquire `FREE -> my pid`; release `any held -> FREE` (for an `RLock`
//! only by its owner, i.e. `my pid -> FREE`), `FREE` on release is `OverRelease(1)`;
//! recovery `dead pid -> my pid` (below). Linux pids are below `PID_MAX_LIMIT` = 2^22,
//! so a pid can never be confused with `HELD_ANON`.
//!
//! Next to the word, `waiters` counts the threads (of any process) that are in, or about
//! to enter, `FUTEX_WAIT` on it. A release issues `FUTEX_WAKE(1)` only when it is
//! non-zero, so an uncontended acquire and release are one CAS each and no syscall.
//! Lost wake-ups are excluded Dekker-style: a waiter increments `waiters` *then* reads
//! `word` and sleeps only while `word` still holds what it read (the kernel re-checks
//! that atomically); a releaser writes `word` *then* reads `waiters`. All four accesses
//! are `SeqCst`, so one of the two sides sees the other's write. A process killed while
//! asleep leaves `waiters` one too high forever: that only costs each later release a
//! useless `FUTEX_WAKE` syscall, never a missed wake-up.
//!
//! A contended acquire first spins for [`SPIN`] (re-reading the word with a pause
//! instruction, CAS only when it looks available), because waking a sleeping process
//! costs about as much; it skips the spin on one CPU and when others already sleep on
//! the word (then it queues up rather than barging past them).
//!
//! # Dead-owner recovery (mutex mode, [`Recovery::DeadOwner`])
//!
//! A waiter that has slept [`OWNER_CHECK_PERIOD`] in total, or that is about to report a
//! timeout after having slept at all, looks at the holder pid in `word`; if that process
//! no longer exists or is a zombie, it CASes `word` from that pid to its own pid and
//! returns as if it had acquired normally (the `recoveries` counter goes up). The CAS
//! makes this exact: if anyone released or re-acquired meanwhile, `word` no longer holds
//! the dead pid and the recovery simply does not happen. Waiters therefore sleep in
//! slices of at most `OWNER_CHECK_PERIOD` in this mode, even without a deadline.
//!
//! Recovery does **not** apply, and such a semaphore waits (or times out) like the
//! stdlib's, when:
//! * it is in counting mode: with value > 1 nobody knows who holds the units, and a
//!   `Semaphore` is routinely released by a process other than the acquirer;
//! * it was created with [`Recovery::Never`], or created held (`HELD_ANON`);
//! * the holder pid was reused by a new process before anyone looked (a live pid is
//!   never stolen from), or the holder is in another pid namespace;
//! * the caller only polls with `try_acquire` / a zero timeout: only a waiter that slept
//!   checks, so a non-blocking poll stays one CAS.
//!
//! A `Lock` may legally be released by another process than its acquirer ("acquire here,
//! let the peer release it later"). If the acquirer exits before the peer releases and
//! someone is waiting, recovery hands the lock to the waiter and the peer's later
//! release fails with `OverRelease`. That is why recovery is a creation option. The
//! intended use: on for `RLock` (only the owner may release, so a dead owner is always a
//! leak) and for `Lock`; off for `BoundedSemaphore(1)`, which `Queue(maxsize=1)` uses
//! exactly in that hand-off way (acquired by `put`, released by `get`). `Lock` and
//! `BoundedSemaphore(1)` reach `SemLock` with the same `(kind, value, maxvalue)`, so the
//! Python layer has to say which one it is building.
//!
//! # Per-process bookkeeping
//!
//! `count` (acquires minus releases through this handle, the stdlib's `_count()`) and
//! the last acquirer's (pid, thread) live in the handle, not in shared memory, as in
//! CPython. "Mine" means `count > 0` and the last acquirer is the calling thread of the
//! calling process; the pid half makes a forked child that never called
//! [`RawSemaphore::after_fork`] still see its parent's `RLock` as not its own.
//!
//! The bookkeeping is updated with plain loads and stores, not read-modify-write
//! atomics: a locked `xadd` costs as much as the compare-and-swap on the word itself,
//! and an uncontended acquire + release would pay two of them for a counter nobody
//! else reads. So updates to one handle's bookkeeping must not race: the threads that
//! share a handle must serialise the calls that change it (`try_acquire`, `acquire`,
//! `note_acquired`, `release`, `after_fork`). The Python bindings do: they hold the GIL
//! for all of them, and sleep through [`RawSemaphore::acquire_word`] (which touches no
//! bookkeeping) with the GIL released. An `RLock`'s count needs no such care: only its
//! owner thread changes it while it is positive. A race can only make `count` wrong
//! (memory safety never depends on it).

pub(crate) mod futex;
pub mod names;

use std::fmt;
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use nix::errno::Errno;

use crate::error::{Error, Result};
use futex::Wake;

/// The largest value a semaphore can hold (Linux `SEM_VALUE_MAX`, exposed by the
/// bindings as `SemLock.SEM_VALUE_MAX`).
pub const SEM_VALUE_MAX: u32 = i32::MAX as u32;

/// Bytes of shared memory one semaphore occupies (one cache line, so a neighbour's
/// writes never bounce it).
pub const STATE_SIZE: usize = std::mem::size_of::<SemState>();

/// Required alignment of the region handed to [`RawSemaphore::init`] / [`RawSemaphore::attach`].
pub const STATE_ALIGN: usize = std::mem::align_of::<SemState>();

/// How long a contended acquire spins (re-checking the word with a pause instruction)
/// before it sleeps: about the cost of waking a sleeping process on our VMs (25-45 µs).
/// Not spent on single-CPU machines, nor when others are already asleep on the word.
pub const SPIN: Duration = Duration::from_micros(30);

/// In mutex mode with [`Recovery::DeadOwner`], how often a sleeping waiter checks that
/// the holder is still alive.
pub const OWNER_CHECK_PERIOD: Duration = Duration::from_millis(100);

/// `"fmS1"`: marks an initialised state; bump the digit when the layout changes.
const MAGIC: u32 = u32::from_be_bytes(*b"fmS1");
const FLAG_MUTEX: u32 = 1;
const FLAG_ROBUST: u32 = 2;
/// Mutex mode: free.
const FREE: u32 = 0;
/// Mutex mode: held by nobody we know of.
const HELD_ANON: u32 = u32::MAX;
/// Linux `PID_MAX_LIMIT` on 64-bit: every pid is below it.
const PID_LIMIT: u32 = 1 << 22;

/// The two kinds of `multiprocessing.synchronize.SemLock` (same numbers as the stdlib's
/// `RECURSIVE_MUTEX, SEMAPHORE = list(range(2))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SemKind {
    /// `RLock`: owned by a thread, re-entrant, released only by its owner.
    RecursiveMutex = 0,
    /// `Lock`, `Semaphore`, `BoundedSemaphore`: counting, released by anyone.
    Semaphore = 1,
}

impl SemKind {
    /// The kind with the stdlib's number, or `None` ("unrecognized kind").
    pub fn from_raw(raw: u32) -> Option<SemKind> {
        match raw {
            0 => Some(SemKind::RecursiveMutex),
            1 => Some(SemKind::Semaphore),
            _ => None,
        }
    }
}

/// Whether waiters may take over a mutex-mode semaphore whose holder process died.
/// Ignored (always `Never`) in counting mode; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recovery {
    /// Wait for a release, however long, as the stdlib does.
    Never,
    /// A waiter takes over the lock when its holder process is gone.
    DeadOwner,
}

/// The shared part of a semaphore. Only `word`, `waiters` and `recoveries` change after
/// `init`; the other fields are written once before the region is shared.
#[repr(C, align(64))]
struct SemState {
    magic: u32,
    kind: u32,
    maxvalue: u32,
    flags: u32,
    /// The futex word; see the state tables in the module docs.
    word: AtomicU32,
    /// Threads (of any process) in the sleeping phase of `acquire` on `word`.
    waiters: AtomicU32,
    /// How many times a waiter took the lock over from a dead holder.
    recoveries: AtomicU32,
}

/// Decrements `waiters` however the sleeping phase ends.
struct Sleeper<'a>(&'a AtomicU32);

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn is_pid(word: u32) -> bool {
    word != FREE && word < PID_LIMIT
}

/// Whether spinning can help at all: with one CPU the holder cannot run while we spin.
fn multi_cpu() -> bool {
    // A tri-state atomic rather than a OnceLock: a fork while another thread is inside
    // OnceLock's initialiser would leave the child blocked on it forever.
    static MULTI: AtomicU8 = AtomicU8::new(0);
    match MULTI.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let multi = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
            MULTI.store(if multi { 2 } else { 1 }, Ordering::Relaxed);
            multi
        }
    }
}

/// A semaphore in caller-provided shared memory, plus this handle's per-process
/// bookkeeping. Create the state once with [`init`](Self::init), then
/// [`attach`](Self::attach) to it from other processes (or other objects). Most users
/// want the owning [`Semaphore`] instead.
pub struct RawSemaphore {
    state: NonNull<SemState>,
    kind: SemKind,
    maxvalue: u32,
    mutex: bool,
    robust: bool,
    /// Acquires minus releases through this handle (the stdlib's `count`).
    count: AtomicI32,
    /// Thread and process that last acquired through this handle.
    last_tid: AtomicU64,
    last_pid: AtomicU32,
}

// SAFETY: the only shared data is the `SemState`, which is touched exclusively through
// atomics (its plain fields are immutable after `init`), and the constructors' contracts
// keep it mapped for the handle's lifetime. The bookkeeping fields are atomics too.
unsafe impl Send for RawSemaphore {}
// SAFETY: as for `Send`: every method takes `&self` and uses only atomic operations.
unsafe impl Sync for RawSemaphore {}

impl RawSemaphore {
    /// Writes a fresh semaphore state into `region` and returns a handle to it.
    ///
    /// Errors: `Os(EINVAL)` if the region is null, misaligned (see [`STATE_ALIGN`]) or
    /// shorter than [`STATE_SIZE`], if `value > SEM_VALUE_MAX` (as `sem_open` does), or
    /// if a recursive mutex is given a value other than 0 or 1.
    ///
    /// # Safety
    ///
    /// `region` must be valid for reads and writes of `len` bytes for as long as this
    /// handle, or any handle later attached to the same memory, is used; no other thread
    /// or process may access those bytes during this call. Afterwards the bytes may only
    /// be accessed through this module's handles. To be useful across processes the
    /// memory must be a `MAP_SHARED` mapping.
    pub unsafe fn init(
        region: *mut u8,
        len: usize,
        kind: SemKind,
        value: u32,
        maxvalue: u32,
        recovery: Recovery,
    ) -> Result<RawSemaphore> {
        let state = check_region(region, len)?;
        if value > SEM_VALUE_MAX || (kind == SemKind::RecursiveMutex && value > 1) {
            return Err(Error::Os(Errno::EINVAL));
        }
        let mutex = kind == SemKind::RecursiveMutex || (maxvalue == 1 && value <= 1);
        let (word, mut flags) = match (mutex, value) {
            (true, 1) => (FREE, FLAG_MUTEX),
            (true, _) => (HELD_ANON, FLAG_MUTEX),
            (false, v) => (v, 0),
        };
        if mutex && recovery == Recovery::DeadOwner {
            flags |= FLAG_ROBUST;
        }
        let fresh = SemState {
            magic: MAGIC,
            kind: kind as u32,
            maxvalue,
            flags,
            word: AtomicU32::new(word),
            waiters: AtomicU32::new(0),
            recoveries: AtomicU32::new(0),
        };
        // SAFETY: `state` is non-null, aligned and in bounds (checked above), and the
        // caller guarantees exclusive access during this call, so a plain write is sound.
        // Other processes see it only after a later syscall (fork, fd passing), which
        // orders it before their first access.
        unsafe { state.as_ptr().write(fresh) };
        // SAFETY: just initialised; the caller's contract covers the rest.
        unsafe { Self::attach(region, len) }
    }

    /// A new handle on a semaphore that [`init`](Self::init) wrote into `region`, in
    /// this or another process. Its bookkeeping starts empty (count 0).
    ///
    /// Errors: `Os(EINVAL)` if the region is null, misaligned, too short or does not hold
    /// an initialised semaphore state.
    ///
    /// # Safety
    ///
    /// `region` must be valid for reads and writes of `len` bytes for as long as the
    /// returned handle is used, and must not be written other than through this module's
    /// handles. If it holds a semaphore state, that state must be fully written (the
    /// `init` happened before this call).
    pub unsafe fn attach(region: *mut u8, len: usize) -> Result<RawSemaphore> {
        let state = check_region(region, len)?;
        // SAFETY: aligned, in bounds and valid per the caller's contract; every bit
        // pattern is a valid `SemState` (integers and atomics only).
        let st = unsafe { state.as_ref() };
        let kind = SemKind::from_raw(st.kind);
        let known_flags = FLAG_MUTEX | FLAG_ROBUST;
        let (Some(kind), MAGIC, 0) = (kind, st.magic, st.flags & !known_flags) else {
            return Err(Error::Os(Errno::EINVAL));
        };
        Ok(RawSemaphore {
            state,
            kind,
            maxvalue: st.maxvalue,
            mutex: st.flags & FLAG_MUTEX != 0,
            robust: st.flags & FLAG_ROBUST != 0,
            count: AtomicI32::new(0),
            last_tid: AtomicU64::new(0),
            last_pid: AtomicU32::new(0),
        })
    }

    #[inline]
    fn state(&self) -> &SemState {
        // SAFETY: the constructors' contracts keep the region valid while `self` lives.
        unsafe { self.state.as_ref() }
    }

    /// The kind given at creation.
    pub fn kind(&self) -> SemKind {
        self.kind
    }

    /// The `maxvalue` given at creation.
    pub fn maxvalue(&self) -> u32 {
        self.maxvalue
    }

    /// Whether dead-owner recovery is on (only ever in mutex mode).
    pub fn recovery(&self) -> Recovery {
        if self.robust {
            Recovery::DeadOwner
        } else {
            Recovery::Never
        }
    }

    /// Takes the semaphore if that needs no waiting.
    ///
    /// Errors: `WouldBlock` when it is not available.
    #[inline]
    pub fn try_acquire(&self) -> Result<()> {
        if self.kind == SemKind::RecursiveMutex && self.is_mine() {
            self.add_count(1);
            return Ok(());
        }
        match self.try_take() {
            Ok(()) => {
                self.note_acquired();
                Ok(())
            }
            Err(_) => Err(Error::WouldBlock),
        }
    }

    /// Takes the semaphore, waiting until `deadline` (forever if `None`). Returns
    /// `Ok(true)` once acquired, `Ok(false)` when the deadline passed first (a deadline
    /// already past makes this a single try).
    ///
    /// Errors: `Interrupted` when a signal handler ran during the sleep (retry with the
    /// same deadline after running Python's handlers); `Os` if the futex call fails.
    #[inline]
    pub fn acquire(&self, deadline: Option<Instant>) -> Result<bool> {
        match self.try_acquire() {
            Ok(()) => Ok(true),
            Err(_) => {
                let got = self.acquire_word(deadline)?;
                if got {
                    self.note_acquired();
                }
                Ok(got)
            }
        }
    }

    /// The waiting half of [`acquire`](Self::acquire) without the bookkeeping: spin,
    /// then sleep until the shared word is taken (`Ok(true)`) or `deadline` passes
    /// (`Ok(false)`). On `Ok(true)` the caller must call
    /// [`note_acquired`](Self::note_acquired), serialised with the other bookkeeping
    /// updates of this handle (see the module docs); call it after a failed
    /// [`try_acquire`](Self::try_acquire), which handles an `RLock`'s re-entry.
    ///
    /// Errors: as `acquire`.
    pub fn acquire_word(&self, deadline: Option<Instant>) -> Result<bool> {
        self.acquire_slow(deadline)
    }

    /// Gives the semaphore back and wakes one sleeper if there is any.
    ///
    /// Errors: `NotOwner` for a recursive mutex the calling thread does not hold;
    /// `OverRelease(maxvalue)` when the value is already `maxvalue` (or `SEM_VALUE_MAX`);
    /// `Os` if the futex wake fails (the release itself has happened then).
    #[inline]
    pub fn release(&self) -> Result<()> {
        if self.kind == SemKind::RecursiveMutex {
            if !self.is_mine() {
                return Err(Error::NotOwner);
            }
            // Only the owner thread changes `count` while it is positive: no race here.
            if self.add_count(-1) > 0 {
                return Ok(());
            }
            return self.give();
        }
        self.give()?;
        self.add_count(-1);
        Ok(())
    }

    /// Runs `f` with the semaphore held, if taking it needs no waiting (`WouldBlock`
    /// otherwise, and `f` does not run): a whole critical section in one call, for the
    /// bindings' `Value.value`. A recursive mutex that the calling thread already holds
    /// is simply re-entered.
    ///
    /// The bookkeeping (`count`, last acquirer) is not touched: it would be changed and
    /// changed back, and the caller promises that nothing can look at it meanwhile
    /// (`f` does not use this handle, and no other thread uses its bookkeeping during
    /// the call: the bindings hold the GIL and `f` runs no Python code). So only the
    /// word is taken and given back: two compare-and-swaps, or none when re-entering.
    ///
    /// Errors: `WouldBlock`; from giving it back, as `release` (then `f` has run).
    #[inline]
    pub fn try_locked<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        if self.kind == SemKind::RecursiveMutex && self.is_mine() {
            return Ok(f());
        }
        self.try_take().map_err(|_| Error::WouldBlock)?;
        let r = f();
        self.give()?;
        Ok(r)
    }

    /// The current value (0 or 1 in mutex mode); the stdlib's `_get_value()`.
    pub fn get_value(&self) -> u32 {
        let word = self.state().word.load(Ordering::SeqCst);
        if self.mutex {
            u32::from(word == FREE)
        } else {
            word
        }
    }

    /// Whether the value is 0; the stdlib's `_is_zero()`.
    pub fn is_zero(&self) -> bool {
        self.get_value() == 0
    }

    /// Acquires minus releases through this handle since creation or the last
    /// [`after_fork`](Self::after_fork); the stdlib's `_count()`.
    pub fn count(&self) -> i32 {
        self.count.load(Ordering::Acquire)
    }

    /// Whether the calling thread of the calling process holds it through this handle;
    /// the stdlib's `_is_mine()` (meaningful for locks).
    pub fn is_mine(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
            && self.last_tid.load(Ordering::Relaxed) == futex::current_thread()
            && self.last_pid.load(Ordering::Relaxed) == futex::current_pid()
    }

    /// Resets this handle's bookkeeping in a freshly forked child (the stdlib's
    /// `_after_fork()`): the child holds nothing through it, whatever its parent held.
    pub fn after_fork(&self) {
        self.count.store(0, Ordering::Release);
    }

    /// In mutex mode, the pid of the process that holds it, if known.
    pub fn holder(&self) -> Option<u32> {
        let word = self.state().word.load(Ordering::SeqCst);
        (self.mutex && is_pid(word)).then_some(word)
    }

    /// Takes the lock over from `pid` if that process is gone and still holds it (mutex
    /// mode with recovery only); true when this process holds it now. For callers that
    /// wait on something else than the lock itself and must not wait for a dead holder.
    pub fn take_over_dead(&self, pid: u32) -> bool {
        if !(self.robust && is_pid(pid) && futex::process_is_gone(pid)) {
            return false;
        }
        let took = self.recover(pid);
        if took {
            self.note_acquired();
        }
        took
    }

    /// Threads of any process currently in (or entering) the sleeping phase of
    /// `acquire`; diagnostic. Overcounts by one per process killed while asleep.
    pub fn waiters(&self) -> u32 {
        self.state().waiters.load(Ordering::SeqCst)
    }

    /// How many times a waiter took this lock over from a dead holder; diagnostic.
    pub fn recoveries(&self) -> u32 {
        self.state().recoveries.load(Ordering::Relaxed)
    }

    /// Records an acquire made through [`acquire_word`](Self::acquire_word) in this
    /// handle's bookkeeping (the calling thread becomes the last acquirer).
    #[inline]
    pub fn note_acquired(&self) {
        self.last_tid
            .store(futex::current_thread(), Ordering::Relaxed);
        self.last_pid.store(futex::current_pid(), Ordering::Relaxed);
        self.add_count(1);
    }

    /// `count += delta`, returning the new count. A load and a store, not an atomic
    /// read-modify-write: see "Per-process bookkeeping" in the module docs for why, and
    /// why that is enough.
    #[inline]
    fn add_count(&self, delta: i32) -> i32 {
        let new = self.count.load(Ordering::Relaxed).wrapping_add(delta);
        // Release: a thread that sees the new count also sees who it belongs to.
        self.count.store(new, Ordering::Release);
        new
    }

    /// One attempt at the shared transition; on failure, the word that was seen (the
    /// value to sleep on).
    #[inline]
    fn try_take(&self) -> std::result::Result<(), u32> {
        let word = &self.state().word;
        if self.mutex {
            word.compare_exchange(
                FREE,
                futex::current_pid(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .map(drop)
        } else {
            let mut v = word.load(Ordering::SeqCst);
            while v > 0 {
                match word.compare_exchange_weak(v, v - 1, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return Ok(()),
                    Err(seen) => v = seen,
                }
            }
            Err(v)
        }
    }

    fn looks_available(&self, word: u32) -> bool {
        if self.mutex {
            word == FREE
        } else {
            word > 0
        }
    }

    /// The shared half of `release`: the word transition, then the wake-up.
    fn give(&self) -> Result<()> {
        let st = self.state();
        if self.mutex {
            // Usually the releaser is the acquirer: try that first, one CAS.
            let me = futex::current_pid();
            if let Err(mut seen) =
                st.word
                    .compare_exchange(me, FREE, Ordering::SeqCst, Ordering::SeqCst)
            {
                loop {
                    if seen == FREE {
                        return Err(Error::OverRelease(self.maxvalue));
                    }
                    if self.kind == SemKind::RecursiveMutex {
                        // Our bookkeeping says we own it, the shared word disagrees:
                        // only possible if the memory was tampered with. Refuse.
                        return Err(Error::NotOwner);
                    }
                    match st
                        .word
                        .compare_exchange(seen, FREE, Ordering::SeqCst, Ordering::SeqCst)
                    {
                        Ok(_) => break,
                        Err(now) => seen = now,
                    }
                }
            }
        } else {
            let limit = self.maxvalue.min(SEM_VALUE_MAX);
            let mut v = st.word.load(Ordering::SeqCst);
            loop {
                if v >= limit {
                    return Err(Error::OverRelease(self.maxvalue));
                }
                match st
                    .word
                    .compare_exchange_weak(v, v + 1, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => break,
                    Err(seen) => v = seen,
                }
            }
        }
        if st.waiters.load(Ordering::SeqCst) != 0 {
            futex::wake(&st.word, 1)?;
        }
        Ok(())
    }

    /// Spins for up to [`SPIN`] (capped by `deadline`) while nobody sleeps on the word.
    fn spin(&self, deadline: Option<Instant>) -> bool {
        if SPIN.is_zero() || !multi_cpu() {
            return false;
        }
        let mut end = Instant::now() + SPIN;
        if let Some(d) = deadline {
            end = end.min(d);
        }
        let st = self.state();
        loop {
            // Others already asleep means real contention: queue up rather than barge.
            if st.waiters.load(Ordering::Relaxed) != 0 {
                return false;
            }
            // Test before test-and-set, so spinners do not bounce the cache line.
            if self.looks_available(st.word.load(Ordering::Relaxed)) && self.try_take().is_ok() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }

    /// Spin, then sleep on the futex; see the module docs for the protocol.
    #[cold]
    fn acquire_slow(&self, deadline: Option<Instant>) -> Result<bool> {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(self.try_take().is_ok());
        }
        if self.spin(deadline) {
            return Ok(true);
        }
        let st = self.state();
        st.waiters.fetch_add(1, Ordering::SeqCst);
        let _sleeper = Sleeper(&st.waiters);
        let mut slept = false;
        let mut last_check = Instant::now();
        loop {
            let seen = match self.try_take() {
                Ok(()) => return Ok(true),
                Err(seen) => seen,
            };
            let now = Instant::now();
            let expired = deadline.is_some_and(|d| now >= d);
            let watch = self.robust && is_pid(seen);
            if watch && ((expired && slept) || now - last_check >= OWNER_CHECK_PERIOD) {
                last_check = now;
                if futex::process_is_gone(seen) {
                    if self.recover(seen) {
                        return Ok(true);
                    }
                    // The word moved on meanwhile: look again.
                    continue;
                }
            }
            if expired {
                return Ok(false);
            }
            let mut timeout = deadline.map(|d| d - now);
            if watch {
                let to_check = OWNER_CHECK_PERIOD.saturating_sub(now - last_check);
                timeout = Some(timeout.map_or(to_check, |t| t.min(to_check)));
            }
            match futex::wait(&st.word, seen, timeout)? {
                Wake::Woken | Wake::TimedOut => slept = true,
                Wake::Changed => {}
                Wake::Interrupted => {
                    // A wake-up may have raced with the signal: take what is there.
                    return match self.try_take() {
                        Ok(()) => Ok(true),
                        Err(_) => Err(Error::Interrupted),
                    };
                }
            }
        }
    }

    /// Takes the lock over from `dead`, which `process_is_gone` said is gone.
    #[cold]
    fn recover(&self, dead: u32) -> bool {
        let st = self.state();
        let me = futex::current_pid();
        if st
            .word
            .compare_exchange(dead, me, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            st.recoveries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

impl fmt::Debug for RawSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSemaphore")
            .field("kind", &self.kind)
            .field("value", &self.get_value())
            .field("maxvalue", &self.maxvalue)
            .field("holder", &self.holder())
            .field("count", &self.count())
            .finish()
    }
}

fn check_region(region: *mut u8, len: usize) -> Result<NonNull<SemState>> {
    let state = NonNull::new(region.cast::<SemState>()).ok_or(Error::Os(Errno::EINVAL))?;
    if len < STATE_SIZE || (region as usize) % STATE_ALIGN != 0 {
        return Err(Error::Os(Errno::EINVAL));
    }
    Ok(state)
}

/// A semaphore in its own memfd: the type the bindings wrap. The fd (close-on-exec) is
/// what travels to other processes (inherited over fork, or passed over a socket) and
/// comes back through [`Semaphore::from_fd`]. The memory is freed by the kernel when the
/// last fd and mapping are gone. Derefs to [`RawSemaphore`] for the operations.
pub struct Semaphore {
    /// Points into `_map`, which lives exactly as long (the mapping never moves).
    raw: RawSemaphore,
    _map: MmapMut,
    fd: OwnedFd,
}

impl Semaphore {
    /// Creates a semaphore in a fresh memfd.
    ///
    /// Errors: as [`RawSemaphore::init`], plus `Os` from `memfd_create`, `ftruncate`,
    /// `mmap`.
    pub fn new(kind: SemKind, value: u32, maxvalue: u32, recovery: Recovery) -> Result<Semaphore> {
        let fd = futex::memfd(c"ferromp-semaphore", STATE_SIZE)?;
        let mut map = map_state(&fd)?;
        // SAFETY: the mapping is page aligned, STATE_SIZE long, MAP_SHARED, and lives in
        // the returned struct next to the handle; nobody else has the fd yet.
        let raw = unsafe {
            RawSemaphore::init(map.as_mut_ptr(), map.len(), kind, value, maxvalue, recovery)?
        };
        Ok(Semaphore { raw, _map: map, fd })
    }

    /// Maps the semaphore in `fd` (an fd of [`Semaphore::fd`], inherited or received).
    /// The new handle's bookkeeping starts empty, as the stdlib's `_rebuild` does.
    ///
    /// Errors: `Os(EINVAL)` if the file is too small or holds no semaphore, `Os` from
    /// `fstat` / `mmap`.
    pub fn from_fd(fd: OwnedFd) -> Result<Semaphore> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if !usize::try_from(size).is_ok_and(|s| s >= STATE_SIZE) {
            return Err(Error::Os(Errno::EINVAL));
        }
        let mut map = map_state(&fd)?;
        // SAFETY: a MAP_SHARED mapping of STATE_SIZE bytes within the file, kept alive in
        // the returned struct; if the file holds a semaphore, its creator finished
        // `init` before handing out the fd, and `attach` checks the magic otherwise.
        let raw = unsafe { RawSemaphore::attach(map.as_mut_ptr(), map.len())? };
        Ok(Semaphore { raw, _map: map, fd })
    }

    /// The memfd, for passing to a child.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn map_state(fd: &OwnedFd) -> Result<MmapMut> {
    // SAFETY: memmap2 asks us to ensure nobody truncates or modifies the file behind the
    // mapping in ways Rust cannot see. The file is a memfd only this module sizes, and
    // its bytes are only ever accessed through atomics (`SemState`), so concurrent
    // modification by other processes is exactly the intended, sound use.
    let map = unsafe { MmapOptions::new().len(STATE_SIZE).map_mut(fd)? };
    Ok(map)
}

impl Deref for Semaphore {
    type Target = RawSemaphore;

    fn deref(&self) -> &RawSemaphore {
        &self.raw
    }
}

impl AsFd for Semaphore {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Semaphore {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("fd", &self.fd.as_raw_fd())
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_one_cache_line() {
        assert_eq!(STATE_SIZE, 64);
        assert_eq!(STATE_ALIGN, 64);
    }

    #[test]
    fn mutex_mode_only_for_binary() {
        let s = Semaphore::new(SemKind::Semaphore, 1, 1, Recovery::DeadOwner).unwrap();
        assert!(s.mutex && s.robust);
        let s = Semaphore::new(SemKind::Semaphore, 1, 2, Recovery::DeadOwner).unwrap();
        assert!(!s.mutex && !s.robust);
        assert_eq!(s.recovery(), Recovery::Never);
        let s = Semaphore::new(SemKind::RecursiveMutex, 1, 1, Recovery::Never).unwrap();
        assert!(s.mutex && !s.robust);
    }

    #[test]
    fn split_acquire_and_one_call_critical_sections_keep_the_bookkeeping() {
        let r = Semaphore::new(SemKind::RecursiveMutex, 1, 1, Recovery::Never).unwrap();
        // The bindings' blocking path: the word, then the bookkeeping.
        r.try_acquire().unwrap();
        r.release().unwrap();
        assert!(r.acquire_word(None).unwrap());
        assert_eq!(r.count(), 0);
        r.note_acquired();
        assert!(r.is_mine() && r.count() == 1);
        // Re-entered for one call: nothing changes.
        assert_eq!(r.try_locked(|| (r.count(), r.get_value())), Ok((1, 0)));
        assert!(r.is_mine() && r.count() == 1 && r.get_value() == 0);
        r.release().unwrap();
        assert_eq!((r.count(), r.get_value()), (0, 1));
        // Free: held during `f` (by the word only), free again after.
        assert_eq!(r.try_locked(|| (r.count(), r.get_value())), Ok((0, 0)));
        assert_eq!((r.count(), r.get_value()), (0, 1));
        let l = Semaphore::new(SemKind::Semaphore, 1, 1, Recovery::DeadOwner).unwrap();
        l.try_acquire().unwrap();
        // A Lock held, even by the caller, is not re-entered.
        assert_eq!(l.try_locked(|| ()), Err(Error::WouldBlock));
        l.release().unwrap();
        assert_eq!(l.try_locked(|| l.get_value()), Ok(0));
        assert_eq!((l.count(), l.get_value()), (0, 1));
    }

    #[test]
    fn rejects_bad_arguments() {
        let bad = Err(Error::Os(Errno::EINVAL));
        let r = Semaphore::new(
            SemKind::Semaphore,
            SEM_VALUE_MAX + 1,
            SEM_VALUE_MAX,
            Recovery::Never,
        );
        assert_eq!(r.map(drop), bad);
        let r = Semaphore::new(SemKind::RecursiveMutex, 2, 1, Recovery::Never);
        assert_eq!(r.map(drop), bad);
        let mut buf = vec![0u8; 256];
        let odd = buf.as_mut_ptr().wrapping_add(1);
        // SAFETY: in bounds of `buf` for 64 bytes; rejected before any access anyway.
        let r = unsafe { RawSemaphore::attach(odd, 64) };
        assert_eq!(r.map(drop), bad);
    }
}
