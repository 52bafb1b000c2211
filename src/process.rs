//! Process lifecycle: fork, fork+exec with a chosen set of inherited fds, reaping,
//! signalling, and the parent-death watch of daemonic children.
//!
//! fork+exec follows std's `Command::spawn`: everything the child needs (paths, argv,
//! the fd plan) is built before fork, because after fork in a multi-threaded parent the
//! child may only call async-signal-safe functions until exec. An exec failure travels
//! back to the parent as an errno over a close-on-exec pipe, so `spawn` either returns a
//! pid that is running the new program or an error; never a half-started child.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill as nix_kill, Signal};
use nix::sys::wait::{waitpid as nix_waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::connection::Intr;
use crate::error::{Error, Result};

/// Forks the calling process. Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The caller must make the child safe: in a multi-threaded process the child may only
/// run async-signal-safe code until it has re-initialised whatever locks it needs (the
/// Python binding brackets this with `PyOS_BeforeFork` / `PyOS_AfterFork_*`).
pub unsafe fn fork() -> Result<i32> {
    // SAFETY: forwarded to the caller (see the function's contract).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Os(Errno::last()));
    }
    Ok(pid)
}

/// Converts a wait status into the stdlib's exitcode: the exit status, or minus the
/// number of the signal that killed the process.
fn exitcode(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(-(sig as i32)),
        _ => None,
    }
}

/// Reaps `pid` if it has exited. `block` waits for it, calling `intr` whenever a signal
/// interrupts the wait (and giving up with its error, see [`Intr`]). Returns the stdlib
/// exitcode, or None if it is still running. ECHILD (reaped elsewhere) is an error for
/// the caller.
pub fn waitpid(pid: i32, block: bool, intr: Intr) -> Result<Option<i32>> {
    let flags = if block {
        None
    } else {
        Some(WaitPidFlag::WNOHANG)
    };
    loop {
        match nix_waitpid(Pid::from_raw(pid), flags) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(st) => {
                if let Some(c) = exitcode(st) {
                    return Ok(Some(c));
                }
                if !block {
                    return Ok(None);
                }
            }
            Err(Errno::EINTR) if block => intr()?,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends signal `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) -> Result<()> {
    let s = if sig == 0 {
        None
    } else {
        Some(Signal::try_from(sig).map_err(Error::Os)?)
    };
    nix_kill(Pid::from_raw(pid), s).map_err(Error::Os)
}

/// Whether a process with this pid exists (it may be a zombie).
pub fn exists(pid: i32) -> bool {
    !matches!(nix_kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn cstr(b: &[u8]) -> Result<CString> {
    CString::new(b).map_err(|_| Error::Os(Errno::EINVAL))
}

/// Forks and execs `path` with `args`, keeping open only stdin/stdout/stderr and
/// `keep_fds` (which lose their close-on-exec flag in the child). Returns the pid.
pub fn spawn(path: &[u8], args: &[Vec<u8>], keep_fds: &[RawFd]) -> Result<i32> {
    let cpath = cstr(path)?;
    let cargs: Vec<CString> = args.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut keep: Vec<RawFd> = keep_fds.iter().copied().filter(|&f| f > 2).collect();
    keep.sort_unstable();
    keep.dedup();

    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    use std::os::fd::IntoRawFd;
    let err_w = err_w.into_raw_fd();
    // The close plan: every fd above 2 except the kept ones and the error pipe, which
    // closes itself at exec. Computed now, as ranges, so the child only loops.
    let mut spared = keep.clone();
    spared.push(err_w);
    spared.sort_unstable();
    let mut ranges: Vec<(u32, u32)> = Vec::with_capacity(spared.len() + 1);
    let mut lo: u32 = 3;
    for &f in &spared {
        let f = f as u32;
        if f > lo {
            ranges.push((lo, f - 1));
        }
        lo = lo.max(f + 1);
    }
    ranges.push((lo, u32::MAX));

    // The child shares our memory until it execs (CLONE_VM | CLONE_VFORK, as
    // posix_spawn does): no page tables are copied, so starting a child costs the
    // same from a 10 GiB parent as from a small one. It runs on its own stack and
    // only reads the data prepared above. All signals stay blocked until it has reset
    // every handler to the default, so no handler of ours can run in it.
    let mut stack = vec![0u8; 64 * 1024];
    let all = nix::sys::signal::SigSet::all();
    let mut old = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&all),
        Some(&mut old),
    )?;
    let args = ChildArgs {
        path: cpath.as_ptr(),
        argv: argv.as_ptr(),
        keep: &keep,
        ranges: &ranges,
        err_w,
        oldmask: old.as_ref(),
    };
    // SAFETY: the stack is a live, exclusively owned buffer; its top is 16-aligned;
    // child_main only performs async-signal-safe calls on `args`, which outlives the
    // call because CLONE_VFORK suspends us until the child has exec'd or exited.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = (top as usize & !15usize) as *mut libc::c_void;
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_err = Errno::last();
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    drop(stack);
    // SAFETY: err_w is the parent's copy of the write end; the child has its own.
    unsafe { libc::close(err_w) };
    if pid < 0 {
        return Err(Error::Os(clone_err));
    }
    let mut buf = [0u8; 4];
    let mut got = 0;
    loop {
        match nix::unistd::read(&err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == 4 {
                    break;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 4 {
        let _ = nix_waitpid(Pid::from_raw(pid), None);
        return Err(Error::Exec(Errno::from_raw(i32::from_ne_bytes(buf))));
    }
    Ok(pid)
}

/// What the cloned child of [`spawn`] needs, all prepared before the clone.
struct ChildArgs<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    keep: &'a [RawFd],
    ranges: &'a [(u32, u32)],
    err_w: RawFd,
    oldmask: &'a libc::sigset_t,
}

/// The cloned child of [`spawn`]: reset signal handlers, make the kept fds
/// inheritable, close the rest, restore the signal mask, exec.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg points at the ChildArgs on the suspended parent's stack; the calls
    // are async-signal-safe and touch only that data and this child's own fd table
    // and signal dispositions (no CLONE_FILES, no CLONE_SIGHAND).
    unsafe {
        let a = &*(arg as *const ChildArgs);
        for sig in 1..65 {
            let mut sa: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut sa) != 0 {
                continue;
            }
            // Handlers point into the parent's code and memory; ignored signals stay
            // ignored across exec, except SIGPIPE, which CPython ignores for itself
            // and a new program must find at its default.
            let custom = sa.sa_sigaction != libc::SIG_DFL && sa.sa_sigaction != libc::SIG_IGN;
            if custom || (sig == libc::SIGPIPE && sa.sa_sigaction == libc::SIG_IGN) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        for &fd in a.keep {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
        }
        for &(lo, hi) in a.ranges {
            if libc::syscall(libc::SYS_close_range, lo, hi, 0) != 0 {
                let top = hi.min(65535);
                let mut fd = lo;
                while fd <= top {
                    libc::close(fd as i32);
                    fd += 1;
                }
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, a.oldmask, std::ptr::null_mut());
        libc::execv(a.path, a.argv);
        let e = *libc::__errno_location();
        let b = e.to_ne_bytes();
        libc::write(a.err_w, b.as_ptr().cast(), 4);
        libc::_exit(127);
    }
}

/// Starts a thread that ends this process when its parent dies: when `sentinel`
/// (a pipe end whose peer only the parent holds) reports EOF, or when this process
/// is re-parented (`getppid()` changes). It sends SIGTERM, then SIGKILL a second later
/// if the process is still there. Used by daemonic children, which the stdlib only
/// cleans up when the parent exits normally.
pub fn watch_parent(sentinel: Option<RawFd>, parent_pid: i32) -> Result<()> {
    let spawn = std::thread::Builder::new().name("ferromp-parent-watch".into());
    // Signals must go to Python's threads, never to this one.
    let mut all = nix::sys::signal::SigSet::all();
    let mut old = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&all),
        Some(&mut old),
    )?;
    let r = spawn.spawn(move || loop {
        let gone = match sentinel {
            Some(fd) => {
                let mut pf = [libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: pf is a valid array of one pollfd for the call's duration.
                let n = unsafe { libc::poll(pf.as_mut_ptr(), 1, 250) };
                n > 0 && pf[0].revents & (libc::POLLHUP | libc::POLLIN | libc::POLLERR) != 0
            }
            None => {
                std::thread::sleep(Duration::from_millis(250));
                false
            }
        };
        // SAFETY: getppid cannot fail.
        let ppid = unsafe { libc::getppid() };
        if gone || ppid != parent_pid {
            // SAFETY: plain syscalls on our own pid.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: as above.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    });
    all = old;
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&all), None)?;
    r.map(|_| ()).map_err(|_| Error::Os(Errno::EAGAIN))
}
