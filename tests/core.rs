//! The process and connection core across real processes, without an interpreter:
//! fork / exec / waitpid / kill, stdlib framing, deadlines, fd passing.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferromp::connection as conn;
use ferromp::error::Error;
use ferromp::process;

/// Tests run one at a time: a child forked by one test inherits every fd the other
/// tests have open at that moment, and a pipe end held by a stray child never sees EOF.
static FORK_MTX: Mutex<()> = Mutex::new(());

fn no_intr() -> impl FnMut() -> ferromp::error::Result<()> {
    || Ok(())
}

fn pipe() -> (RawFd, RawFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (r.into_raw_fd(), w.into_raw_fd())
}

fn close(fd: RawFd) {
    // SAFETY: the test owns fd and never uses it again.
    unsafe { libc::close(fd) };
}

/// Forks; the child runs `f` and exits with its return value (101 on panic).
fn fork_run(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f`, which uses no locks held by other threads
    // (fork tests are serialised by FORK_MTX), and leaves through _exit.
    let pid = unsafe { process::fork() }.unwrap();
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: leaving the child without running the test harness's teardown.
        unsafe { libc::_exit(code) };
    }
    pid
}

fn recv_frame(fd: RawFd) -> ferromp::error::Result<Vec<u8>> {
    let mut intr = no_intr();
    let n = conn::recv_header(fd, &mut intr)?;
    let mut body = vec![0u8; n];
    conn::read_exact(fd, &mut body, false, &mut intr)?;
    Ok(body)
}

#[test]
fn exit_codes_and_signals() {
    let _g = FORK_MTX.lock().unwrap();
    let pid = fork_run(|| 7);
    assert_eq!(
        process::waitpid(pid, true, &mut no_intr()).unwrap(),
        Some(7)
    );

    let pid = fork_run(|| {
        std::thread::sleep(Duration::from_secs(30));
        0
    });
    assert_eq!(process::waitpid(pid, false, &mut no_intr()).unwrap(), None);
    assert!(process::exists(pid));
    process::kill(pid, libc::SIGTERM).unwrap();
    assert_eq!(
        process::waitpid(pid, true, &mut no_intr()).unwrap(),
        Some(-libc::SIGTERM)
    );
    assert!(matches!(
        process::waitpid(pid, false, &mut no_intr()),
        Err(Error::Os(nix::errno::Errno::ECHILD))
    ));
}

#[test]
fn frames_cross_processes_in_both_header_forms() {
    let _g = FORK_MTX.lock().unwrap();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let sizes = [0usize, 1, 4, 255, 65535, 65536, 65537, 1 << 20, 8 << 20];
    let pid = fork_run(move || {
        // The child got copies of the parent's ends too; EOF needs them closed.
        close(w1);
        close(r2);
        // Echo every frame back, then exit at EOF.
        loop {
            match recv_frame(r1) {
                Ok(b) => conn::send_frame(w2, &b, &mut no_intr()).unwrap(),
                Err(Error::Eof) => return 0,
                Err(_) => return 3,
            }
        }
    });
    close(r1);
    close(w2);
    for &n in &sizes {
        let body: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        conn::send_frame(w1, &body, &mut no_intr()).unwrap();
        assert_eq!(recv_frame(r2).unwrap(), body, "size {n}");
    }
    // The long form (-1, then an 8-byte length) that the stdlib uses past 2 GiB is
    // accepted for any length.
    let mut long = Vec::new();
    long.extend_from_slice(&(-1i32).to_be_bytes());
    long.extend_from_slice(&5u64.to_be_bytes());
    long.extend_from_slice(b"hello");
    conn::write_all(w1, &[&long], &mut no_intr()).unwrap();
    assert_eq!(recv_frame(r2).unwrap(), b"hello");
    close(w1);
    assert_eq!(
        process::waitpid(pid, true, &mut no_intr()).unwrap(),
        Some(0)
    );
    assert!(matches!(recv_frame(r2), Err(Error::Eof)));
    close(r2);
}

#[test]
fn truncated_and_garbage_frames_are_errors() {
    let _g = FORK_MTX.lock().unwrap();
    let (r, w) = pipe();
    let mut h = Vec::new();
    h.extend_from_slice(&100i32.to_be_bytes());
    h.extend_from_slice(&[1u8; 10]);
    conn::write_all(w, &[&h], &mut no_intr()).unwrap();
    close(w);
    assert!(matches!(recv_frame(r), Err(Error::EofInMessage)));
    close(r);

    let (r, w) = pipe();
    conn::write_all(w, &[&(-7i32).to_be_bytes()], &mut no_intr()).unwrap();
    assert!(matches!(recv_frame(r), Err(Error::BadLength(-7))));
    // A torn header is a torn message, not a clean end of stream.
    let (r2, w2) = pipe();
    conn::write_all(w2, &[&[0u8, 0]], &mut no_intr()).unwrap();
    close(w2);
    assert!(matches!(recv_frame(r2), Err(Error::EofInMessage)));
    close(r);
    close(w);
    close(r2);
}

#[test]
fn waits_honour_deadlines() {
    let _g = FORK_MTX.lock().unwrap();
    let (r, w) = pipe();
    let t = Instant::now();
    let ready = conn::poll_readable(r, Some(t + Duration::from_millis(120)), &mut no_intr());
    assert!(!ready.unwrap());
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(120), "{waited:?}");
    assert!(waited < Duration::from_millis(600), "{waited:?}");

    let (r2, w2) = pipe();
    conn::send_frame(w2, b"x", &mut no_intr()).unwrap();
    let got = conn::wait_any(&[r, r2], Some(Instant::now()), &mut no_intr()).unwrap();
    assert_eq!(got, vec![1]);
    close(w);
    // EOF counts as ready.
    let got = conn::wait_any(&[r, r2], None, &mut no_intr()).unwrap();
    assert_eq!(got, vec![0, 1]);
    for fd in [r, r2, w2] {
        close(fd);
    }
}

#[test]
fn spawn_keeps_exactly_the_fds_asked_for() {
    let _g = FORK_MTX.lock().unwrap();
    let (r, w) = pipe();
    let (_r_other, w_other) = pipe();
    // The child writes the list of its open fds into the kept pipe.
    let script = format!("ls /proc/self/fd >&{w}");
    let args: Vec<Vec<u8>> = ["/bin/sh", "-c", &script]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let pid = process::spawn(b"/bin/sh", &args, &[w]).unwrap();
    close(w);
    assert_eq!(
        process::waitpid(pid, true, &mut no_intr()).unwrap(),
        Some(0)
    );
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = nix::unistd::read(unsafe_borrow(r), &mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let fds: Vec<i32> = String::from_utf8(out)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(fds.contains(&w), "{fds:?}");
    assert!(!fds.contains(&w_other), "{fds:?}");
    close(r);
    close(w_other);

    let err = process::spawn(b"/nonexistent/prog", &[b"x".to_vec()], &[]).unwrap_err();
    assert!(
        matches!(err, Error::Exec(nix::errno::Errno::ENOENT)),
        "{err:?}"
    );
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the fd stays open for the duration of each call in these tests.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

#[test]
fn fds_travel_over_unix_sockets() {
    let _g = FORK_MTX.lock().unwrap();
    let (a, b) = conn::socketpair().unwrap();
    let (r, w) = pipe();
    conn::send_fds(a, b"\x01", &[w], &mut no_intr()).unwrap();
    let (data, fds) = conn::recv_fds(b, 1, 4, &mut no_intr()).unwrap();
    assert_eq!(data, b"\x01");
    assert_eq!(fds.len(), 1);
    // The received fd is the same pipe: a frame written through it arrives at r.
    conn::send_frame(fds[0], b"via scm_rights", &mut no_intr()).unwrap();
    assert_eq!(recv_frame(r).unwrap(), b"via scm_rights");
    let flags = nix::fcntl::fcntl(unsafe_borrow(fds[0]), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(
        flags & libc::FD_CLOEXEC != 0,
        "received fds are close-on-exec"
    );
    for fd in [a, b, r, w, fds[0]] {
        close(fd);
    }
    let owned: OwnedFd = nix::unistd::dup(unsafe_borrow(0)).unwrap();
    assert!(owned.as_raw_fd() > 2);
}
