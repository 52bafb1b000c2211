//! The Linux seam of `sync`: futex wait/wake on process-shared words, the caller's
//! identity (cached pid, thread id), holder liveness, and the memfd that backs a
//! semaphore. Everything OS-specific the semaphore needs is here, so `mod.rs` is pure
//! state machine.
//!
//! The futex calls deliberately omit `FUTEX_PRIVATE_FLAG`: the word lives in a
//! `MAP_SHARED` mapping of a memfd that several processes map, possibly at different
//! addresses. A shared futex is keyed by (inode, offset) rather than by (mm, address),
//! which is what lets a `FUTEX_WAKE` in one process reach a sleeper in another.

use std::ffi::CStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};

/// How a [`wait`] ended. None of these says the semaphore is available: the caller
/// re-reads the word in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Woken by a `FUTEX_WAKE` (or spuriously).
    Woken,
    /// The word no longer held `expected` when the kernel looked (`EAGAIN`).
    Changed,
    /// The timeout elapsed.
    TimedOut,
    /// A signal handler ran in this thread (`EINTR`).
    Interrupted,
}

/// Sleeps while `*word == expected`, at most `timeout` (forever if `None`).
pub(crate) fn wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> Result<Wake, Errno> {
    let ts = timeout.map(|d| libc::timespec {
        // A timeout beyond ~68 years is as good as forever; clamp rather than wrap.
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word.as_ptr()` points to a live, 4-byte aligned u32 for the duration of
    // the call (the borrow keeps it alive); `ts_ptr` is null or points to `ts`, which
    // outlives the call. FUTEX_WAIT ignores the last two arguments. The kernel only
    // reads the word, it never writes it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            0u32,
        )
    };
    if r == 0 {
        return Ok(Wake::Woken);
    }
    match Errno::last() {
        Errno::EAGAIN => Ok(Wake::Changed),
        Errno::ETIMEDOUT => Ok(Wake::TimedOut),
        Errno::EINTR => Ok(Wake::Interrupted),
        e => Err(e),
    }
}

/// Wakes at most `n` sleepers on `word`, in any process; returns how many woke.
pub(crate) fn wake(word: &AtomicU32, n: u32) -> Result<usize, Errno> {
    let n = n.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: `word.as_ptr()` is a live aligned u32 (see `wait`); FUTEX_WAKE reads no
    // memory through the pointer, it only uses the address as a key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            ptr::null::<libc::timespec>(),
            ptr::null::<u32>(),
            0u32,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

// ---------------------------------------------------------------------------------------
// Caller identity.
//
// The uncontended lock path stores the caller's pid in the lock word, so it must not
// cost a syscall; glibc stopped caching getpid() in 2.25. We cache it ourselves and
// refresh the cache in a pthread_atfork child handler, which runs in every child made
// by fork(2) through libc (os.fork(), nix::unistd::fork, multiprocessing's fork start
// method), before any Python or Rust code of the child runs. The handler is never
// unregistered; that is fine because CPython never unloads extension modules.

/// 0: atfork handler not registered; 1: being registered; 2: registered.
static ATFORK: AtomicU8 = AtomicU8::new(0);
/// The cached pid, or 0 when not cached yet.
static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn refresh_pid_in_child() {
    // getpid is async-signal-safe, which is all an atfork child handler may rely on.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    PID.store(pid, Ordering::Relaxed);
}

/// The caller's pid, without a syscall once cached.
#[inline]
pub(crate) fn current_pid() -> u32 {
    let pid = PID.load(Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    current_pid_slow()
}

#[cold]
fn current_pid_slow() -> u32 {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    match ATFORK.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            // SAFETY: registering a handler that only calls getpid and an atomic store.
            // Registration can only fail with ENOMEM; then we never cache (ATFORK is
            // left at 1), which is slower but still correct.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(refresh_pid_in_child)) };
            if rc == 0 {
                ATFORK.store(2, Ordering::Release);
            }
        }
        // Someone else is registering: caching now could race with a fork that happens
        // before the handler exists, so answer uncached this once.
        Err(1) => return pid,
        Err(_) => {}
    }
    if ATFORK.load(Ordering::Acquire) == 2 {
        PID.store(pid, Ordering::Relaxed);
    }
    pid
}

/// The caller's thread identity within its process: `pthread_self()`, the same value
/// Python's `threading.get_ident()` returns.
#[inline]
pub(crate) fn current_thread() -> u64 {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() as u64 }
}

/// Whether process `pid` is certainly gone: it does not exist, or it is a zombie (dead
/// but not yet reaped by its parent, so `kill(pid, 0)` still succeeds). Any doubt
/// (EPERM, no /proc) answers `false`: recovery must never steal from a live holder.
///
/// This costs a syscall and a small /proc read, so callers only ask after sleeping.
pub(crate) fn process_is_gone(pid: u32) -> bool {
    // SAFETY: signal 0 performs only the existence and permission checks.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return Errno::last() == Errno::ESRCH;
    }
    // "/proc/<pid>/stat" is "pid (comm) S ...": the state letter follows the last ')'.
    // comm is at most 15 bytes, so the first 64 bytes hold it; later fields are numbers.
    let mut path = [0u8; 32];
    let path = {
        use std::io::Write;
        let mut cur = std::io::Cursor::new(&mut path[..]);
        if write!(cur, "/proc/{pid}/stat").is_err() {
            return false;
        }
        let n = cur.position() as usize;
        &path[..n]
    };
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
    let mut buf = [0u8; 64];
    let n = match std::fs::File::open(path).and_then(|mut f| f.read(&mut buf)) {
        Ok(n) => n,
        // Reaped between kill() and open(): gone.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return true,
        Err(_) => return false,
    };
    let stat = &buf[..n];
    match stat.iter().rposition(|&b| b == b')') {
        Some(i) => matches!(stat.get(i + 2), Some(b'Z' | b'X' | b'x')),
        None => false,
    }
}

/// An anonymous shared-memory file of `len` zero bytes, close-on-exec. It is freed by
/// the kernel when the last fd and mapping go away, so a SIGKILL leaks nothing.
pub(crate) fn memfd(name: &CStr, len: usize) -> Result<OwnedFd, Errno> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)?;
    let len = libc::off_t::try_from(len).map_err(|_| Errno::EINVAL)?;
    nix::unistd::ftruncate(&fd, len)?;
    Ok(fd)
}
