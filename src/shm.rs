//! Anonymous shared-memory segments: a `memfd` mapped `MAP_SHARED` with `memmap2`.
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

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use memmap2::{MmapMut, MmapOptions};
use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};

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

fn map_shared(fd: &OwnedFd, size: usize) -> Result<MmapMut> {
    // SAFETY: memmap2 asks that the file is not truncated or modified behind the mapping
    // in ways Rust cannot see. The file is a memfd whose size is fixed at creation (no
    // code of ours truncates it), and its bytes are shared memory by design: the
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
