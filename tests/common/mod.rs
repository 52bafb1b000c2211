//! Helpers shared by the integration tests that fork: a process-wide fork lock, a
//! `spawn` that runs a closure in a child, and `join`.
//!
//! Every test that forks takes `fork_lock()` first: the harness runs tests on several
//! threads, and a fork taken while a sibling test is half-way through its own setup
//! would copy that state (and its fds) into the child. Children run only the closure
//! given to `spawn` and leave with `libc::_exit`, never returning into the harness; a
//! panic in a child becomes exit status 101.

#![allow(dead_code)] // each test file uses its own subset

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

static FORK_MTX: Mutex<()> = Mutex::new(());

/// Serialises the tests that fork. A failed test poisons the mutex; the others still
/// run.
pub fn fork_lock() -> MutexGuard<'static, ()> {
    FORK_MTX.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forks a child that runs `f` and exits with its return value (101 if it panics).
pub fn spawn(f: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the child only runs `f` (shared memory, futexes, the allocator: fork-safe
    // with glibc) and then `_exit`s without unwinding into the harness or running
    // atexit handlers.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: _exit is async-signal-safe and ends the child here.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    }
}

/// Waits for `pid`: its exit code, or 128 + signal number.
pub fn join(pid: Pid) -> i32 {
    match waitpid(pid, None).expect("waitpid") {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        other => panic!("unexpected wait status {other:?}"),
    }
}
