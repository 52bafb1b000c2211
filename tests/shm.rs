//! Segments (`ferromp::shm`), anonymous and named, shared with real forked processes.
//!
//! Most tests fork, so they serialise on `FORK_MTX` (as `tests/sync.rs` and nix's own
//! suite do). Children run only the given closure and leave with `libc::_exit`.

mod common;

use common::{fork_lock, join, spawn};

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use ferromp::error::Error;
use ferromp::shm::{open_sized, shm_open, shm_unlink, Segment};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::Pid;

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

/// A segment name no other test (or concurrent run) uses: `/ferromp_t<pid>_<n>`.
fn unique_name() -> CString {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    CString::new(format!("/ferromp_t{}_{n}", std::process::id())).unwrap()
}

fn in_dev_shm(name: &CString) -> bool {
    let path = format!("/dev/shm/{}", &name.to_str().unwrap()[1..]);
    std::path::Path::new(&path).exists()
}

fn errno_of<T: std::fmt::Debug>(r: ferromp::error::Result<T>) -> Errno {
    match r {
        Err(Error::Os(e)) => e,
        other => panic!("expected an OS error, got {other:?}"),
    }
}

#[test]
fn named_segment_is_found_by_name_in_a_child() {
    let _g = fork_lock();
    let name = unique_name();
    let seg = Segment::create_named(&name, 10_000).unwrap();
    assert_eq!(seg.len(), 10_000);
    assert!(in_dev_shm(&name));
    word(&seg, 2).store(11, Ordering::SeqCst);
    let child_name = name.clone();
    let pid = spawn(move || {
        // A fresh open by name, as an unrelated process would do.
        let again = Segment::open_named(&child_name).unwrap();
        if again.len() != 10_000 || word(&again, 2).load(Ordering::SeqCst) != 11 {
            return 1;
        }
        word(&again, 2).store(12, Ordering::SeqCst);
        0
    });
    assert_eq!(join(pid), 0);
    assert_eq!(word(&seg, 2).load(Ordering::SeqCst), 12);
    shm_unlink(&name).unwrap();
    assert!(!in_dev_shm(&name));
    // The mapping outlives the name.
    assert_eq!(word(&seg, 2).load(Ordering::SeqCst), 12);
}

#[test]
fn named_errors_match_shm_open() {
    let name = unique_name();
    assert_eq!(errno_of(Segment::open_named(&name)), Errno::ENOENT);
    assert_eq!(errno_of(shm_unlink(&name)), Errno::ENOENT);
    assert_eq!(errno_of(Segment::create_named(&name, 0)), Errno::EINVAL);
    let seg = Segment::create_named(&name, 100).unwrap();
    assert_eq!(errno_of(Segment::create_named(&name, 100)), Errno::EEXIST);
    shm_unlink(&name).unwrap();
    assert_eq!(errno_of(shm_unlink(&name)), Errno::ENOENT);
    drop(seg);
    for bad in ["/a/b", "/", ""] {
        let bad = CString::new(bad).unwrap();
        let e = errno_of(shm_open(
            &bad,
            OFlag::O_RDWR | OFlag::O_CREAT,
            Mode::empty(),
        ));
        assert_eq!(e, Errno::EINVAL, "{bad:?}");
    }
    let long = CString::new(format!("/{}", "x".repeat(300))).unwrap();
    let e = errno_of(shm_open(&long, OFlag::O_RDWR, Mode::empty()));
    assert!(matches!(e, Errno::ENAMETOOLONG | Errno::EINVAL), "{e:?}");
}

#[test]
fn open_sized_creates_with_mode_and_attaches_without_resizing() {
    let name = unique_name();
    let crex = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR;
    let (fd, size) = open_sized(&name, crex, Mode::from_bits_truncate(0o600), 5000).unwrap();
    assert_eq!(size, 5000);
    let st = nix::sys::stat::fstat(&fd).unwrap();
    assert_eq!(st.st_mode & 0o777, 0o600);
    // Attaching reports the object's size and leaves it alone (size 0 = do not resize).
    let (fd2, size2) = open_sized(&name, OFlag::O_RDWR, Mode::empty(), 0).unwrap();
    assert_eq!(size2, 5000);
    // Open-or-create without O_EXCL attaches to the existing object.
    let (_fd3, size3) =
        open_sized(&name, OFlag::O_CREAT | OFlag::O_RDWR, Mode::empty(), 0).unwrap();
    assert_eq!(size3, 5000);
    drop((fd, fd2));
    shm_unlink(&name).unwrap();
}

#[test]
fn failed_create_leaves_no_name_behind() {
    let name = unique_name();
    let crex = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR;
    // A size past off_t's range: shm_open succeeds, the resize cannot.
    let e = errno_of(open_sized(
        &name,
        crex,
        Mode::from_bits_truncate(0o600),
        usize::MAX,
    ));
    assert_eq!(e, Errno::EFBIG);
    assert!(!in_dev_shm(&name));
    assert_eq!(errno_of(shm_unlink(&name)), Errno::ENOENT);
}

#[test]
fn fd_is_close_on_exec() {
    let name = unique_name();
    let seg = Segment::create_named(&name, 64).unwrap();
    let flags = nix::fcntl::fcntl(seg.fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
    shm_unlink(&name).unwrap();
}
