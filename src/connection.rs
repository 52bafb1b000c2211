//! Framed messages over file descriptors, waiting with deadlines, and fd passing.
//!
//! The wire format is the stdlib's, so a ferromp Connection and a stdlib Connection on
//! one pipe understand each other: a 4-byte big-endian signed length, then the body;
//! bodies longer than `i32::MAX` are announced by a length of -1 followed by an 8-byte
//! big-endian unsigned length.
//!
//! Reads take exactly one frame and never more: a pipe may be shared by several reading
//! processes (a queue), and bytes read past the frame would be stolen from them.
//!
//! Every loop that can block calls `intr` when a syscall returns EINTR. The Python
//! binding runs the interpreter's signal handlers there; if one raises (Ctrl-C), `intr`
//! returns an error and the operation stops. Otherwise it resumes where it was, so a
//! handled signal never tears a frame.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::{Error, Result};
use crate::spin;

/// Called on EINTR; returning an error abandons the operation.
pub type Intr<'a> = &'a mut dyn FnMut() -> Result<()>;

/// Largest body announced with the short header.
const SHORT_MAX: usize = i32::MAX as usize;

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: callers pass fds they own for the duration of the call; a BorrowedFd is
    // only used for the syscalls below and never outlives the call.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The header bytes for a body of `n` bytes.
pub fn header(n: usize) -> ([u8; 12], usize) {
    let mut h = [0u8; 12];
    if n > SHORT_MAX {
        h[..4].copy_from_slice(&(-1i32).to_be_bytes());
        h[4..12].copy_from_slice(&(n as u64).to_be_bytes());
        (h, 12)
    } else {
        h[..4].copy_from_slice(&(n as i32).to_be_bytes());
        (h, 4)
    }
}

/// Writes all of `bufs` to `fd`, resuming after partial writes and handled signals.
pub fn write_all(fd: RawFd, bufs: &[&[u8]], intr: Intr) -> Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Rebuild the slice list from the current offset; it is short (two entries).
        let mut skip = done;
        let mut iov: Vec<IoSlice> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            iov.push(IoSlice::new(&b[skip..]));
            skip = 0;
        }
        match nix::sys::uio::writev(borrow(fd), &iov) {
            Ok(n) => {
                done += n;
                // A signal that arrives after some bytes went out cuts the write
                // short instead of failing it with EINTR: look for one before
                // blocking again, or Ctrl-C would wait for a reader that never comes.
                if done < total {
                    intr()?;
                }
            }
            Err(Errno::EINTR) => intr()?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends one frame holding `body`.
pub fn send_frame(fd: RawFd, body: &[u8], intr: Intr) -> Result<()> {
    let (h, hl) = header(body.len());
    write_all(fd, &[&h[..hl], body], intr)
}

/// Reads exactly `buf.len()` bytes. `at_start` says whether EOF before the first byte
/// is a clean end of stream (`Eof`) or a torn message (`EofInMessage`).
pub fn read_exact(fd: RawFd, buf: &mut [u8], at_start: bool, intr: Intr) -> Result<()> {
    let mut got = 0usize;
    while got < buf.len() {
        match nix::unistd::read(borrow(fd), &mut buf[got..]) {
            Ok(0) => {
                return Err(if at_start && got == 0 {
                    Error::Eof
                } else {
                    Error::EofInMessage
                })
            }
            Ok(n) => got += n,
            Err(Errno::EINTR) => intr()?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads a frame header and returns the announced body length.
pub fn recv_header(fd: RawFd, intr: Intr) -> Result<usize> {
    wait_readable_spin(fd, intr)?;
    let mut h = [0u8; 4];
    read_exact(fd, &mut h, true, intr)?;
    let n = i32::from_be_bytes(h);
    if n >= 0 {
        return Ok(n as usize);
    }
    if n != -1 {
        return Err(Error::BadLength(n as i64));
    }
    let mut l = [0u8; 8];
    read_exact(fd, &mut l, false, intr)?;
    let n = u64::from_be_bytes(l);
    if n > isize::MAX as u64 {
        return Err(Error::BadLength(n as i64));
    }
    Ok(n as usize)
}

/// Spins briefly for `fd` to turn readable, then lets the caller block in read().
fn wait_readable_spin(fd: RawFd, intr: Intr) -> Result<()> {
    if poll_once(fd, PollTimeout::ZERO)? {
        return Ok(());
    }
    let start = Instant::now();
    if spin::spin_until(None, || poll_once(fd, PollTimeout::ZERO).unwrap_or(true)) {
        return Ok(());
    }
    // Block in poll rather than read so the wait length can feed the spin budget.
    loop {
        match poll_once(fd, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Error::Os(Errno::EINTR)) => intr()?,
            Err(e) => return Err(e),
        }
    }
    spin::note_blocked(start.elapsed());
    Ok(())
}

/// One poll() of a single fd for input; EOF and errors count as readable (the read
/// that follows reports them).
fn poll_once(fd: RawFd, timeout: PollTimeout) -> Result<bool> {
    let mut fds = [PollFd::new(borrow(fd), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(0) => Ok(false),
        Ok(_) => {
            let r = fds[0].revents().unwrap_or(PollFlags::empty());
            if r.contains(PollFlags::POLLNVAL) {
                return Err(Error::Os(Errno::EBADF));
            }
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

fn timeout_until(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            // Round up so a wait never ends a hair before its deadline.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Waits until any of `fds` is readable (or at EOF / in error) or the deadline passes.
/// Returns the indices of the ready ones (empty on timeout).
pub fn wait_any(fds: &[RawFd], deadline: Option<Instant>, intr: Intr) -> Result<Vec<usize>> {
    let mut pfds: Vec<PollFd> = fds
        .iter()
        .map(|&fd| PollFd::new(borrow(fd), PollFlags::POLLIN))
        .collect();
    let ready_of = |p: &[PollFd]| -> Vec<usize> {
        p.iter()
            .enumerate()
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect()
    };
    // A non-blocking look first, then a short spin, then sleep.
    let start = Instant::now();
    let mut spun = false;
    loop {
        let t = if spun {
            timeout_until(deadline)
        } else {
            PollTimeout::ZERO
        };
        match poll(&mut pfds, t) {
            Ok(0) => {
                if !spun {
                    spun = true;
                    if deadline.is_none_or(|d| d > Instant::now()) {
                        let mut probe: Vec<PollFd> = fds
                            .iter()
                            .map(|&fd| PollFd::new(borrow(fd), PollFlags::POLLIN))
                            .collect();
                        if spin::spin_until(
                            deadline,
                            || matches!(poll(&mut probe, PollTimeout::ZERO), Ok(n) if n > 0),
                        ) {
                            continue;
                        }
                    }
                    continue;
                }
                if deadline.is_none_or(|d| Instant::now() >= d) {
                    return Ok(Vec::new());
                }
            }
            Ok(_) => {
                if spun {
                    spin::note_blocked(start.elapsed());
                }
                return Ok(ready_of(&pfds));
            }
            Err(Errno::EINTR) => intr()?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `fd` is readable or the deadline passes.
pub fn poll_readable(fd: RawFd, deadline: Option<Instant>, intr: Intr) -> Result<bool> {
    Ok(!wait_any(&[fd], deadline, intr)?.is_empty())
}

/// Sends `data` and the descriptors `fds` over a unix socket in one message.
pub fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd], intr: Intr) -> Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock, &iov, cm, MsgFlags::empty(), None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Error::Os(Errno::EMSGSIZE)),
            Err(Errno::EINTR) => intr()?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message of at most `maxdata` bytes and up to `maxfds` descriptors.
/// The received fds are close-on-exec.
pub fn recv_fds(
    sock: RawFd,
    maxdata: usize,
    maxfds: usize,
    intr: Intr,
) -> Result<(Vec<u8>, Vec<RawFd>)> {
    let mut data = vec![0u8; maxdata.max(1)];
    let mut cbuf = nix::cmsg_space!([RawFd; 253]);
    let _ = maxfds;
    loop {
        let mut iov = [IoSliceMut::new(&mut data)];
        match recvmsg::<()>(sock, &mut iov, Some(&mut cbuf), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(Error::Os)? {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.extend(v);
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    for fd in &fds {
                        let _ = nix::unistd::close(*fd);
                    }
                    return Err(Error::Os(Errno::EMSGSIZE));
                }
                let n = msg.bytes;
                data.truncate(n);
                if n == 0 && fds.is_empty() {
                    return Err(Error::Eof);
                }
                return Ok((data, fds));
            }
            Err(Errno::EINTR) => intr()?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A connected pair of close-on-exec unix stream sockets.
pub fn socketpair() -> Result<(RawFd, RawFd)> {
    use nix::sys::socket::{socketpair as sp, AddressFamily, SockFlag, SockType};
    use std::os::fd::IntoRawFd;
    let (a, b) = sp(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a.into_raw_fd(), b.into_raw_fd()))
}
