//! Shared-memory segments mapped `MAP_SHARED` with `memmap2`: anonymous ones (a
//! `memfd`) and named ones (a POSIX shared-memory object, `shm_open`).
//!
//! # Anonymous segments
//!
//! A [`Segment`] is the memory behind the stdlib's unnamed shared objects (the `heap`
//! arenas under `sharedctypes.Value` / `Array`, `BufferWrapper`). It has no name in any
//! file system: other processes get it by fd (inherited over `fork`, passed with the
//! child under spawn and forkserver, or sent over a socket) and map it again with
//! [`Segment::from_fd`]. The kernel frees the pages when the last fd and the last
//! mapping are gone, so a SIGKILL of every process that uses it leaks nothing, and
//! nothing ever appears in `/dev/shm`.
//!
//! The size is fixed at creation. Nothing in ferromp truncates a segment's file later,
//! which is what makes handing out raw pointers into the mapping sound (a shrunk memfd
//! would turn accesses past its new end into SIGBUS).
//!
//! # Named segments
//!
//! `shared_memory.SharedMemory` needs segments that other programs can find by name: a
//! POSIX shared-memory object, which glibc keeps as a file in `/dev/shm` (tmpfs).
//! [`shm_open`], [`shm_unlink`] and [`open_sized`] are the calls CPython's
//! `_posixshmem` makes, plus the size handling `SharedMemory.__init__` does around
//! them, in one call. [`Segment::create_named`] and [`Segment::open_named`] map such an
//! object for Rust-side users. A named object outlives every process that maps it
//! until someone unlinks it; that is why Python's side registers it with the
//! resource tracker (`python/ferromp/resource_tracker.py`).
//!
//! Name rules are glibc's: one leading `/` (added by the caller), no other `/`, at most
//! `NAME_MAX` bytes; anything else fails with `EINVAL` / `ENAMETOOLONG` from `shm_open`
//! itself, exactly as for the stdlib.

use std::ffi::CStr;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use memmap2::{MmapMut, MmapOptions};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};

/// The name memfds of ours carry in `/proc/<pid>/fd` (`memfd:ferromp-segment`).
const NAME: &std::ffi::CStr = c"ferromp-segment";

/// A shared, fixed-size, zero-filled memory segment backed by a close-on-exec memfd.
///
/// Dropping it unmaps the memory and closes the fd; the pages live on while another
/// process (or another `Segment` from [`Segment::from_fd`]) still maps them.
pub struct Segment {
    map: MmapMut,
    fd: OwnedFd,
}

impl Segment {
    /// Creates a zero-filled segment of `size` bytes in a fresh memfd.
    ///
    /// Errors: `Os(EINVAL)` for a size of 0 or one that does not fit `off_t`; `Os` from
    /// `memfd_create`, `ftruncate` or `mmap` (ENOMEM, EMFILE...).
    pub fn new(size: usize) -> Result<Segment> {
        if size == 0 {
            return Err(Error::Os(Errno::EINVAL));
        }
        let len = libc::off_t::try_from(size).map_err(|_| Errno::EINVAL)?;
        let fd = memfd_create(NAME, MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, len)?;
        let map = map_shared(&fd, size)?;
        Ok(Segment { map, fd })
    }

    /// Maps the segment behind `fd` (from [`Segment::fd`] of this or another process).
    /// The size is the file's size.
    ///
    /// Errors: `Os(EINVAL)` for an empty file; `Os` from `fstat` / `mmap` (`EACCES` or
    /// `ENODEV` for an fd that cannot be mapped shared and writable).
    pub fn from_fd(fd: OwnedFd) -> Result<Segment> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        let size = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
        if size == 0 {
            return Err(Error::Os(Errno::EINVAL));
        }
        let map = map_shared(&fd, size)?;
        Ok(Segment { map, fd })
    }

    /// Creates the named segment `name` (`O_CREAT | O_EXCL`, mode `0o600`) of `size`
    /// zero-filled bytes and maps it. The object stays in `/dev/shm` until
    /// [`shm_unlink`]; it is unlinked again here if sizing or mapping it fails.
    ///
    /// Errors: `Os(EINVAL)` for a size of 0; `Os(EEXIST)` when the name is taken;
    /// `Os(EINVAL)` / `Os(ENAMETOOLONG)` for a bad name; `Os` from `ftruncate` / `mmap`.
    pub fn create_named(name: &CStr, size: usize) -> Result<Segment> {
        if size == 0 {
            return Err(Error::Os(Errno::EINVAL));
        }
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR;
        let (fd, size) = open_sized(name, flags, Mode::from_bits_truncate(0o600), size)?;
        match map_shared(&fd, size) {
            Ok(map) => Ok(Segment { map, fd }),
            Err(e) => {
                let _ = shm_unlink(name);
                Err(e)
            }
        }
    }

    /// Maps the existing named segment `name` read-write; the size is the object's.
    ///
    /// Errors: `Os(ENOENT)` when there is no such object; `Os(EINVAL)` when it is empty.
    pub fn open_named(name: &CStr) -> Result<Segment> {
        let (fd, size) = open_sized(name, OFlag::O_RDWR, Mode::empty(), 0)?;
        if size == 0 {
            return Err(Error::Os(Errno::EINVAL));
        }
        let map = map_shared(&fd, size)?;
        Ok(Segment { map, fd })
    }

    /// The start of the mapping in this process (page aligned).
    ///
    /// Other processes write these bytes concurrently: read and write them only through
    /// raw pointers or atomics, never through `&`/`&mut` references that assume
    /// exclusivity.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a segment has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The memfd, for passing to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `shm_open(3)`: opens (or creates, with `O_CREAT`) the POSIX shared-memory object
/// `name` and returns a close-on-exec fd. Retried on `EINTR` (opening a tmpfs file
/// does not block, so there is nothing to interrupt for).
pub fn shm_open(name: &CStr, flags: OFlag, mode: Mode) -> Result<OwnedFd> {
    loop {
        match nix::sys::mman::shm_open(name, flags, mode) {
            Err(Errno::EINTR) => continue,
            r => return Ok(r?),
        }
    }
}

/// `shm_unlink(3)`: removes the name; mappings and open fds stay valid.
pub fn shm_unlink(name: &CStr) -> Result<()> {
    Ok(nix::sys::mman::shm_unlink(name)?)
}

/// Opens `name` with `flags` and `mode`; when `size` is not 0, sets the object's size
/// to it (`ftruncate`); returns the fd and the object's size (`fstat`). This is the
/// part of `SharedMemory.__init__` before `mmap`, in one call.
///
/// When opening created the object (`O_CREAT | O_EXCL` in `flags`) and a later step
/// fails, the object is unlinked again, so a failed create leaves nothing behind. An
/// object opened without `O_EXCL` may be someone else's and is left alone.
pub fn open_sized(name: &CStr, flags: OFlag, mode: Mode, size: usize) -> Result<(OwnedFd, usize)> {
    let fd = shm_open(name, flags, mode)?;
    let sized = (|| -> Result<usize> {
        if size != 0 {
            let len = libc::off_t::try_from(size).map_err(|_| Errno::EFBIG)?;
            nix::unistd::ftruncate(&fd, len)?;
        }
        let st = nix::sys::stat::fstat(&fd)?;
        Ok(usize::try_from(st.st_size).map_err(|_| Errno::EOVERFLOW)?)
    })();
    match sized {
        Ok(len) => Ok((fd, len)),
        Err(e) => {
            if flags.contains(OFlag::O_CREAT | OFlag::O_EXCL) {
                let _ = shm_unlink(name);
            }
            Err(e)
        }
    }
}

fn map_shared(fd: &OwnedFd, size: usize) -> Result<MmapMut> {
    // SAFETY: memmap2 asks that the file is not truncated or modified behind the mapping
    // in ways Rust cannot see. The file is a memfd or a named segment whose size is
    // fixed at creation (no code of ours truncates it later; another program that
    // shrinks a named object under its users breaks them in any language), and its bytes are shared memory by design: the
    // mapping is only exposed as a raw pointer (`as_ptr`), never as a Rust slice that
    // would claim exclusivity, so concurrent writes by other processes are sound.
    let map = unsafe { MmapOptions::new().len(size).map_mut(fd) }
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(map)
}

impl AsFd for Segment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Segment {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("fd", &self.fd.as_raw_fd())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_filled_and_sized() {
        let s = Segment::new(10_000).unwrap();
        assert_eq!(s.len(), 10_000);
        assert!(!s.is_empty());
        assert_eq!(s.as_ptr() as usize % 4096, 0);
        // SAFETY: in bounds of the live mapping; no other process has it.
        let b = unsafe { s.as_ptr().add(9_999).read_volatile() };
        assert_eq!(b, 0);
    }

    #[test]
    fn rejects_empty() {
        assert!(matches!(Segment::new(0), Err(Error::Os(Errno::EINVAL))));
    }

    #[test]
    fn reattached_mapping_shares_bytes() {
        let a = Segment::new(64).unwrap();
        let b = Segment::from_fd(a.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(b.len(), 64);
        // SAFETY: both pointers are in bounds of live mappings of the same 64 bytes.
        unsafe {
            a.as_ptr().add(7).write_volatile(42);
            assert_eq!(b.as_ptr().add(7).read_volatile(), 42);
        }
    }
}
