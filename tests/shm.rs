//! Anonymous segments (`ferromp::shm`) shared with real forked processes.
//!
//! Every test forks, so they serialise on `FORK_MTX` (as `tests/sync.rs` and nix's own
//! suite do). Children run only the given closure and leave with `libc::_exit`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use ferromp::shm::Segment;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

static FORK_MTX: Mutex<()> = Mutex::new(());

fn fork_lock() -> MutexGuard<'static, ()> {
    FORK_MTX.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forks a child that runs `f` and exits with its return value (101 if it panics).
fn spawn(f: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the child only runs `f` (shared memory, mmap, the allocator: fork-safe
    // with glibc) and then `_exit`s without unwinding into the harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: _exit is async-signal-safe and ends the child here.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    }
}

fn join(pid: Pid) -> i32 {
    match waitpid(pid, None).expect("waitpid") {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        other => panic!("unexpected wait status {other:?}"),
    }
}

/// The `i`-th 8-byte word of `seg` as an atomic.
fn word(seg: &Segment, i: usize) -> &AtomicU64 {
    assert!((i + 1) * 8 <= seg.len());
    // SAFETY: in bounds (checked), 8-byte aligned (the mapping is page aligned), and the
    // bytes are only ever accessed atomically while `seg` lives.
    unsafe { &*seg.as_ptr().add(i * 8).cast::<AtomicU64>() }
}

#[test]
fn child_writes_are_seen_by_parent() {
    let _g = fork_lock();
    let seg = Segment::new(1 << 16).unwrap();
    let pid = spawn(|| {
        word(&seg, 0).store(0xfeed, Ordering::SeqCst);
        word(&seg, 8191).store(7, Ordering::SeqCst);
        0
    });
    assert_eq!(join(pid), 0);
    assert_eq!(word(&seg, 0).load(Ordering::SeqCst), 0xfeed);
    assert_eq!(word(&seg, 8191).load(Ordering::SeqCst), 7);
}

#[test]
fn child_maps_again_from_inherited_fd() {
    let _g = fork_lock();
    let seg = Segment::new(4096).unwrap();
    word(&seg, 1).store(5, Ordering::SeqCst);
    let fd = seg.as_raw_fd();
    let pid = spawn(move || {
        // What a spawned child does with a passed fd: map it afresh.
        // SAFETY: the fd was inherited and is open; the child owns its copy.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let again = Segment::from_fd(owned).unwrap();
        if again.len() != 4096 || word(&again, 1).load(Ordering::SeqCst) != 5 {
            return 1;
        }
        word(&again, 1).fetch_add(10, Ordering::SeqCst);
        0
    });
    assert_eq!(join(pid), 0);
    assert_eq!(word(&seg, 1).load(Ordering::SeqCst), 15);
}

#[test]
fn memory_outlives_the_creator_handle() {
    let _g = fork_lock();
    let seg = Segment::new(4096).unwrap();
    let other = Segment::from_fd(seg.fd().try_clone_to_owned().unwrap()).unwrap();
    drop(seg);
    let pid = spawn(|| {
        word(&other, 3).store(99, Ordering::SeqCst);
        0
    });
    assert_eq!(join(pid), 0);
    assert_eq!(word(&other, 3).load(Ordering::SeqCst), 99);
}

#[test]
fn concurrent_increments_from_many_children() {
    let _g = fork_lock();
    let seg = Segment::new(4096).unwrap();
    let pids: Vec<Pid> = (0..4)
        .map(|_| {
            spawn(|| {
                for _ in 0..10_000 {
                    word(&seg, 0).fetch_add(1, Ordering::SeqCst);
                }
                0
            })
        })
        .collect();
    for pid in pids {
        assert_eq!(join(pid), 0);
    }
    assert_eq!(word(&seg, 0).load(Ordering::SeqCst), 40_000);
}
