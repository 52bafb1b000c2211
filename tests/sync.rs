//! Process-shared semaphores (`ferromp::sync`) exercised across real forked processes.
//!
//! Every test forks, so they all serialise on `FORK_MTX` (as nix's own test suite does):
//! the harness runs tests on several threads, and a fork taken while a sibling test is
//! half-way through its own setup would copy that state into the child. Children run
//! only the closure given to `spawn` and leave with `libc::_exit`, never returning into
//! the harness; a panic in a child becomes exit status 101.

mod common;

use common::{fork_lock, join, spawn};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferromp::error::Error;
use ferromp::sync::{
    RawSemaphore, Recovery, SemKind, Semaphore, OWNER_CHECK_PERIOD, SEM_VALUE_MAX, STATE_SIZE,
};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

fn deadline(d: Duration) -> Option<Instant> {
    Some(Instant::now() + d)
}

/// Polls `cond` every millisecond for up to 10 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// One page of `MAP_SHARED | MAP_ANONYMOUS` memory, shared with children across fork.
/// Layout used by the tests: a semaphore at 0, a plain counter at 64, a stage flag at 128.
struct SharedPage(NonNull<u8>);

impl SharedPage {
    const LEN: usize = 4096;

    fn new() -> SharedPage {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        SharedPage(NonNull::new(p.cast()).expect("mmap returned null"))
    }

    fn sem(&self, kind: SemKind, value: u32, maxvalue: u32, rec: Recovery) -> RawSemaphore {
        // SAFETY: the page is valid for LEN bytes while `self` lives, which outlives
        // every handle in these tests; the first 64 bytes are only used by the semaphore.
        unsafe { RawSemaphore::init(self.0.as_ptr(), STATE_SIZE, kind, value, maxvalue, rec) }
            .expect("init")
    }

    fn counter(&self) -> *mut u64 {
        self.0.as_ptr().wrapping_add(64).cast()
    }

    fn stage(&self) -> &AtomicU32 {
        // SAFETY: in bounds, 4-aligned, zero-initialised, only used as this atomic.
        unsafe { &*self.0.as_ptr().wrapping_add(128).cast::<AtomicU32>() }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.0.as_ptr().cast(), Self::LEN) };
    }
}

const LOCK: (SemKind, u32, u32) = (SemKind::Semaphore, 1, 1);
const RLOCK: (SemKind, u32, u32) = (SemKind::RecursiveMutex, 1, 1);

#[test]
fn mutual_exclusion_across_processes() {
    let _g = fork_lock();
    const PROCS: u64 = 4;
    const ITERS: u64 = 10_000;
    let cases = [
        ("Lock", LOCK, Recovery::DeadOwner),
        ("Lock without recovery", LOCK, Recovery::Never),
        ("RLock", RLOCK, Recovery::DeadOwner),
        (
            "Semaphore(1)",
            (SemKind::Semaphore, 1, SEM_VALUE_MAX),
            Recovery::Never,
        ),
    ];
    for (name, (kind, value, max), rec) in cases {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, rec);
        let counter = page.counter();
        let children: Vec<Pid> = (0..PROCS)
            .map(|_| {
                spawn(|| {
                    for _ in 0..ITERS {
                        assert_eq!(sem.acquire(None), Ok(true));
                        // A plain, non-atomic read-modify-write: only the lock makes it
                        // exact.
                        // SAFETY: in bounds of the shared page, aligned, and every access
                        // happens under the semaphore.
                        unsafe { counter.write_volatile(counter.read_volatile() + 1) };
                        sem.release().expect("release");
                    }
                    0
                })
            })
            .collect();
        for c in children {
            assert_eq!(join(c), 0, "{name}: child failed");
        }
        // SAFETY: all children are gone; nobody else touches the counter.
        let total = unsafe { counter.read_volatile() };
        assert_eq!(total, PROCS * ITERS, "{name}: lost updates");
        assert_eq!(sem.get_value(), 1, "{name}");
        assert_eq!(sem.waiters(), 0, "{name}");
        assert_eq!(sem.recoveries(), 0, "{name}");
    }
}

#[test]
fn threads_and_processes_share_one_lock() {
    let _g = fork_lock();
    let page = SharedPage::new();
    let sem = page.sem(SemKind::RecursiveMutex, 1, 1, Recovery::DeadOwner);
    let counter = page.counter() as usize;
    let work = |sem: &RawSemaphore| {
        for _ in 0..5_000 {
            assert_eq!(sem.acquire(None), Ok(true));
            // Re-entry must not block.
            assert_eq!(sem.acquire(None), Ok(true));
            assert_eq!(sem.count(), 2);
            let c = counter as *mut u64;
            // SAFETY: in bounds, aligned, accessed only under the lock.
            unsafe { c.write_volatile(c.read_volatile() + 1) };
            sem.release().expect("inner release");
            sem.release().expect("outer release");
        }
    };
    let child = spawn(|| {
        thread::scope(|s| {
            s.spawn(|| work(&sem));
            work(&sem);
        });
        0
    });
    thread::scope(|s| {
        s.spawn(|| work(&sem));
        work(&sem);
    });
    assert_eq!(join(child), 0);
    // SAFETY: as above; everyone is done.
    assert_eq!(unsafe { (counter as *mut u64).read_volatile() }, 4 * 5_000);
}

/// Runs `f` while a live child holds `sem`.
fn with_live_holder(page: &SharedPage, sem: &RawSemaphore, f: impl FnOnce()) {
    let stage = page.stage();
    stage.store(0, Ordering::SeqCst);
    let child = spawn(|| {
        assert_eq!(sem.acquire(None), Ok(true));
        stage.store(1, Ordering::SeqCst);
        while stage.load(Ordering::SeqCst) != 2 {
            thread::sleep(Duration::from_millis(1));
        }
        sem.release().expect("release");
        0
    });
    wait_for("the child to acquire", || stage.load(Ordering::SeqCst) == 1);
    f();
    stage.store(2, Ordering::SeqCst);
    assert_eq!(join(child), 0);
}

#[test]
fn acquire_times_out_on_time() {
    let _g = fork_lock();
    let cases = [
        ("Lock", LOCK, Recovery::DeadOwner),
        ("RLock", RLOCK, Recovery::DeadOwner),
        ("Lock without recovery", LOCK, Recovery::Never),
        (
            "Semaphore(1)",
            (SemKind::Semaphore, 1, SEM_VALUE_MAX),
            Recovery::Never,
        ),
    ];
    for (name, (kind, value, max), rec) in cases {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, rec);
        with_live_holder(&page, &sem, || {
            // Spans several owner-check periods: a live holder must not be "recovered".
            let wait = OWNER_CHECK_PERIOD * 3 + Duration::from_millis(50);
            let t0 = Instant::now();
            assert_eq!(sem.acquire(Some(t0 + wait)), Ok(false), "{name}");
            let took = t0.elapsed();
            assert!(took >= wait, "{name}: returned early after {took:?}");
            assert!(
                took < wait + Duration::from_millis(150),
                "{name}: late by {took:?}"
            );

            // A deadline already past is a single try.
            let t0 = Instant::now();
            assert_eq!(sem.acquire(Some(t0)), Ok(false), "{name}");
            assert!(t0.elapsed() < Duration::from_millis(20), "{name}");
            assert_eq!(sem.try_acquire(), Err(Error::WouldBlock), "{name}");
            assert_eq!(sem.recoveries(), 0, "{name}");
        });
        assert_eq!(
            sem.acquire(deadline(Duration::from_secs(5))),
            Ok(true),
            "{name}"
        );
        assert_eq!(sem.waiters(), 0, "{name}");
    }
}

#[test]
fn release_wakes_a_sleeper_in_another_process() {
    let _g = fork_lock();
    // (kind, value, maxvalue): the parent takes one unit first, so the child must sleep.
    let cases = [
        ("Lock", LOCK, Recovery::DeadOwner),
        ("Lock without recovery", LOCK, Recovery::Never),
        (
            "Semaphore",
            (SemKind::Semaphore, 1, SEM_VALUE_MAX),
            Recovery::Never,
        ),
    ];
    for (name, (kind, value, max), rec) in cases {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, rec);
        assert_eq!(sem.try_acquire(), Ok(()), "{name}");
        let child = spawn(|| {
            let t0 = Instant::now();
            let got = sem.acquire(deadline(Duration::from_secs(10)));
            // Woken by the release, not by the deadline.
            if got == Ok(true) && t0.elapsed() < Duration::from_secs(5) {
                0
            } else {
                1
            }
        });
        wait_for("the child to sleep", || sem.waiters() == 1);
        // Let it actually enter FUTEX_WAIT.
        thread::sleep(Duration::from_millis(50));
        sem.release().expect("release");
        assert_eq!(join(child), 0, "{name}: child was not woken");
        assert_eq!(sem.waiters(), 0, "{name}");
        // The child exited holding it (nobody recovers a counting semaphore).
        assert_eq!(sem.get_value(), 0, "{name}");
    }
}

#[test]
fn over_release_is_an_error() {
    let _g = fork_lock();
    // BoundedSemaphore(2).
    let sem = Semaphore::new(SemKind::Semaphore, 2, 2, Recovery::Never).unwrap();
    assert_eq!(sem.release(), Err(Error::OverRelease(2)));
    let child = spawn(|| {
        assert_eq!(sem.try_acquire(), Ok(()));
        assert_eq!(sem.try_acquire(), Ok(()));
        0
    });
    assert_eq!(join(child), 0);
    assert_eq!(sem.get_value(), 0);
    // Releasing what another process acquired is legal for a semaphore.
    sem.release().unwrap();
    sem.release().unwrap();
    assert_eq!(sem.release(), Err(Error::OverRelease(2)));
    assert_eq!(sem.get_value(), 2);

    // Lock: acquired by a child, released by the parent, then once too often.
    let lock = Semaphore::new(SemKind::Semaphore, 1, 1, Recovery::DeadOwner).unwrap();
    assert_eq!(lock.release(), Err(Error::OverRelease(1)));
    let child = spawn(|| i32::from(lock.try_acquire().is_err()));
    assert_eq!(join(child), 0);
    assert_eq!(lock.holder(), Some(child.as_raw() as u32));
    assert_eq!(lock.release(), Ok(()));
    assert_eq!(lock.release(), Err(Error::OverRelease(1)));

    // An unbounded Semaphore still stops at SEM_VALUE_MAX.
    let big = Semaphore::new(
        SemKind::Semaphore,
        SEM_VALUE_MAX,
        SEM_VALUE_MAX,
        Recovery::Never,
    );
    assert_eq!(
        big.unwrap().release(),
        Err(Error::OverRelease(SEM_VALUE_MAX))
    );
    // BoundedSemaphore(0) can never be released.
    let zero = Semaphore::new(SemKind::Semaphore, 0, 0, Recovery::Never).unwrap();
    assert_eq!(zero.release(), Err(Error::OverRelease(0)));
}

#[test]
fn recursive_mutex_ownership() {
    let _g = fork_lock();
    let rlock = Semaphore::new(SemKind::RecursiveMutex, 1, 1, Recovery::DeadOwner).unwrap();
    assert!(!rlock.is_mine());
    assert_eq!(rlock.release(), Err(Error::NotOwner));
    for n in 1..=3 {
        assert_eq!(rlock.acquire(None), Ok(true));
        assert_eq!(rlock.count(), n);
    }
    assert!(rlock.is_mine());
    assert_eq!(rlock.get_value(), 0);
    assert_eq!(rlock.holder(), Some(std::process::id()));

    // Another thread of the same process does not own it.
    thread::scope(|s| {
        s.spawn(|| {
            assert!(!rlock.is_mine());
            assert_eq!(rlock.release(), Err(Error::NotOwner));
            assert_eq!(rlock.try_acquire(), Err(Error::WouldBlock));
            assert_eq!(
                rlock.acquire(deadline(Duration::from_millis(20))),
                Ok(false)
            );
        });
    });

    // Nor does a forked child, even before it resets its copy of the bookkeeping.
    let child = spawn(|| {
        assert!(!rlock.is_mine(), "a child must not own its parent's RLock");
        assert_eq!(
            rlock.count(),
            3,
            "count is per-process bookkeeping, copied by fork"
        );
        rlock.after_fork();
        assert_eq!(rlock.count(), 0);
        assert_eq!(rlock.release(), Err(Error::NotOwner));
        assert_eq!(rlock.try_acquire(), Err(Error::WouldBlock));
        0
    });
    assert_eq!(join(child), 0);

    assert!(
        rlock.is_mine(),
        "the child's attempts must not disturb the owner"
    );
    for n in (0..3).rev() {
        assert_eq!(rlock.release(), Ok(()));
        assert_eq!(rlock.count(), n);
    }
    assert!(!rlock.is_mine());
    assert_eq!(rlock.release(), Err(Error::NotOwner));
    assert_eq!(rlock.get_value(), 1);

    // Now a child can take it, re-enter, and give it back.
    let child = spawn(|| {
        rlock.after_fork();
        assert_eq!(rlock.try_acquire(), Ok(()));
        assert_eq!(rlock.try_acquire(), Ok(()));
        assert!(rlock.is_mine());
        assert_eq!(rlock.holder(), Some(std::process::id()));
        rlock.release().unwrap();
        rlock.release().unwrap();
        i32::from(rlock.get_value() != 1)
    });
    assert_eq!(join(child), 0);
    assert_eq!(rlock.get_value(), 1);
}

/// Forks a child that acquires `sem` and then waits to be killed; SIGKILLs it once it
/// holds the lock but does *not* reap it, so the holder is a zombie (for which
/// `kill(pid, 0)` still succeeds). Returns the child to reap.
fn kill_while_holding(page: &SharedPage, sem: &RawSemaphore) -> Pid {
    let stage = page.stage();
    stage.store(0, Ordering::SeqCst);
    let child = spawn(|| {
        assert_eq!(sem.acquire(None), Ok(true));
        stage.store(1, Ordering::SeqCst);
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    });
    wait_for("the child to acquire", || stage.load(Ordering::SeqCst) == 1);
    signal::kill(child, Signal::SIGKILL).expect("kill");
    child
}

fn assert_killed(child: Pid) {
    assert_eq!(join(child), 128 + Signal::SIGKILL as i32);
}

#[test]
fn dead_holder_is_recovered() {
    let _g = fork_lock();
    let me = std::process::id();
    for (name, (kind, value, max)) in [("Lock", LOCK), ("RLock", RLOCK)] {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, Recovery::DeadOwner);
        let child = kill_while_holding(&page, &sem);
        assert_eq!(sem.holder(), Some(child.as_raw() as u32), "{name}");

        let t0 = Instant::now();
        assert_eq!(
            sem.acquire(deadline(Duration::from_secs(10))),
            Ok(true),
            "{name}"
        );
        let took = t0.elapsed();
        assert!(
            took < OWNER_CHECK_PERIOD * 5,
            "{name}: recovery took {took:?}"
        );
        assert_eq!(sem.recoveries(), 1, "{name}");
        assert_eq!(sem.holder(), Some(me), "{name}");
        assert!(sem.is_mine(), "{name}");
        assert_eq!(sem.count(), 1, "{name}");
        sem.release().expect("release after recovery");
        assert_eq!(sem.get_value(), 1, "{name}");
        assert_killed(child);
    }

    // A caller polling with timeouts shorter than the check period also recovers: a
    // waiter that slept checks the holder before reporting a timeout.
    let page = SharedPage::new();
    let sem = page.sem(SemKind::Semaphore, 1, 1, Recovery::DeadOwner);
    let child = kill_while_holding(&page, &sem);
    assert_killed(child); // Reaped this time: kill(pid, 0) now says ESRCH.
    let got = (0..3).any(|_| sem.acquire(deadline(Duration::from_millis(20))) == Ok(true));
    assert!(got, "short-timeout polling never recovered the lock");
    assert_eq!(sem.recoveries(), 1);

    // Waiting forever recovers too (it sleeps in OWNER_CHECK_PERIOD slices).
    sem.release().unwrap();
    let child = kill_while_holding(&page, &sem);
    let t0 = Instant::now();
    assert_eq!(sem.acquire(None), Ok(true));
    assert!(t0.elapsed() < OWNER_CHECK_PERIOD * 5);
    assert_eq!(sem.recoveries(), 2);
    assert_killed(child);
}

#[test]
fn dead_holder_without_recovery_times_out() {
    let _g = fork_lock();
    let cases = [
        ("Lock without recovery", LOCK, Recovery::Never),
        // Counting mode: holders are unknown, so there is nothing to recover from.
        (
            "BoundedSemaphore(1) of 2",
            (SemKind::Semaphore, 1, 2),
            Recovery::DeadOwner,
        ),
    ];
    for (name, (kind, value, max), rec) in cases {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, rec);
        let child = kill_while_holding(&page, &sem);
        assert_killed(child);
        let wait = OWNER_CHECK_PERIOD * 2 + Duration::from_millis(50);
        let t0 = Instant::now();
        assert_eq!(sem.acquire(Some(t0 + wait)), Ok(false), "{name}");
        assert!(t0.elapsed() >= wait, "{name}");
        assert_eq!(sem.recoveries(), 0, "{name}");
        assert_eq!(sem.get_value(), 0, "{name}");
    }
}

#[test]
fn value_and_is_zero() {
    let _g = fork_lock();
    let sem = Semaphore::new(SemKind::Semaphore, 3, SEM_VALUE_MAX, Recovery::Never).unwrap();
    assert_eq!((sem.get_value(), sem.is_zero()), (3, false));
    let child = spawn(|| {
        assert_eq!(sem.try_acquire(), Ok(()));
        assert_eq!(sem.try_acquire(), Ok(()));
        0
    });
    assert_eq!(join(child), 0);
    assert_eq!((sem.get_value(), sem.is_zero()), (1, false));
    assert_eq!(sem.try_acquire(), Ok(()));
    assert_eq!((sem.get_value(), sem.is_zero()), (0, true));
    assert_eq!(sem.holder(), None, "counting semaphores have no holder");
    sem.release().unwrap();
    assert_eq!(sem.get_value(), 1);

    let lock = Semaphore::new(SemKind::Semaphore, 1, 1, Recovery::DeadOwner).unwrap();
    assert_eq!((lock.get_value(), lock.is_zero()), (1, false));
    lock.try_acquire().unwrap();
    assert_eq!((lock.get_value(), lock.is_zero()), (0, true));

    // Created held: value 0, holder unknown, and it never "recovers".
    let held = Semaphore::new(SemKind::Semaphore, 0, 1, Recovery::DeadOwner).unwrap();
    assert_eq!((held.get_value(), held.holder()), (0, None));
    assert_eq!(held.try_acquire(), Err(Error::WouldBlock));
    assert_eq!(held.acquire(deadline(Duration::from_millis(30))), Ok(false));
    held.release().unwrap();
    assert_eq!(held.get_value(), 1);
}

#[test]
fn memfd_is_cloexec_and_reattaches_from_fd() {
    let _g = fork_lock();
    let sem = Semaphore::new(SemKind::Semaphore, 2, 2, Recovery::Never).unwrap();
    // SAFETY: F_GETFD on a valid fd only reads its flags.
    let flags = unsafe { libc::fcntl(sem.as_raw_fd(), libc::F_GETFD) };
    assert!(
        flags >= 0 && flags & libc::FD_CLOEXEC != 0,
        "memfd must be CLOEXEC"
    );

    let child = spawn(|| {
        // As a rebuilt SemLock would: a new object on the inherited fd.
        let fd: OwnedFd = sem.fd().try_clone_to_owned().unwrap();
        let other = Semaphore::from_fd(fd).unwrap();
        assert_eq!((other.kind(), other.maxvalue()), (SemKind::Semaphore, 2));
        assert_eq!(other.count(), 0);
        assert_eq!(other.try_acquire(), Ok(()));
        0
    });
    assert_eq!(join(child), 0);
    assert_eq!(
        sem.get_value(),
        1,
        "the child's acquire is visible through the parent's map"
    );

    // Two mappings of one memfd in the same process are the same semaphore too.
    let again = Semaphore::from_fd(sem.as_fd().try_clone_to_owned().unwrap()).unwrap();
    again.try_acquire().unwrap();
    assert_eq!(sem.get_value(), 0);
    sem.release().unwrap();
    assert_eq!(again.get_value(), 1);

    // An fd that holds no semaphore is refused, not trusted.
    let bad = Semaphore::new(SemKind::Semaphore, 0, 0, Recovery::Never).unwrap();
    let fd = bad.fd().try_clone_to_owned().unwrap();
    drop(bad);
    let zeros = [0u8; STATE_SIZE];
    // SAFETY: writes STATE_SIZE bytes from a live buffer of that size into the memfd,
    // which nothing maps any more.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), zeros.as_ptr().cast(), zeros.len(), 0) };
    assert_eq!(n, STATE_SIZE as isize);
    let err = Semaphore::from_fd(fd).unwrap_err();
    assert_eq!(err, Error::Os(nix::errno::Errno::EINVAL));
}

extern "C" fn ignore_signal(_: libc::c_int) {}

#[test]
fn a_signal_interrupts_the_wait() {
    let _g = fork_lock();
    for (name, (kind, value, max), rec) in [
        (
            "Semaphore(0)",
            (SemKind::Semaphore, 0, SEM_VALUE_MAX),
            Recovery::Never,
        ),
        ("Lock", LOCK, Recovery::DeadOwner),
    ] {
        let page = SharedPage::new();
        let sem = page.sem(kind, value, max, rec);
        if value == 1 {
            sem.try_acquire().unwrap();
        }
        let child = spawn(|| {
            // Like CPython's handlers: no SA_RESTART, so the sleep ends with EINTR.
            let act = SigAction::new(
                SigHandler::Handler(ignore_signal),
                SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: the handler does nothing, so it is trivially async-signal-safe.
            unsafe { signal::sigaction(Signal::SIGUSR1, &act) }.unwrap();
            match sem.acquire(None) {
                Err(Error::Interrupted) => 0,
                _ => 1,
            }
        });
        wait_for("the child to sleep", || sem.waiters() == 1);
        thread::sleep(Duration::from_millis(50));
        signal::kill(child, Signal::SIGUSR1).unwrap();
        assert_eq!(join(child), 0, "{name}: acquire did not report Interrupted");
        assert_eq!(sem.waiters(), 0, "{name}");
    }
}
