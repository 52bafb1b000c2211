//! The core's one error type. It has no pyo3 in it; `py/mod.rs` maps it to Python
//! exceptions in a single `From` conversion.

use std::fmt;

use nix::errno::Errno;

/// Everything a core operation can fail with. Which operation returns which variant is
/// listed on each function; timeouts are not errors (waits return `Ok(false)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// An OS call failed; the errno is kept so Python gets the right OSError subclass.
    Os(Errno),
    /// The peer closed before a message started (EOFError in Python).
    Eof,
    /// The peer closed in the middle of a message.
    EofInMessage,
    /// A frame header announced a length that cannot be right.
    BadLength(i64),
    /// A signal interrupted a wait. From a semaphore's `acquire`: a handler ran during
    /// the sleep (`EINTR`); the caller runs Python's handlers and, if they do not raise,
    /// waits again with the same deadline. From an `Intr` callback: a handler raised
    /// (Ctrl-C) and the operation stops.
    Interrupted,
    /// A child could not be executed; the errno came back over the CLOEXEC pipe.
    Exec(Errno),
    /// A semaphore's `try_acquire`: not available right now (the stdlib's `EAGAIN`).
    WouldBlock,
    /// `release` of a recursive mutex by a thread that does not own it (the stdlib
    /// raises `AssertionError`).
    NotOwner,
    /// `release` would raise a semaphore's value above the `maxvalue` carried here (the
    /// stdlib raises `ValueError`).
    OverRelease(u32),
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Error::Os(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Os(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os(e) => f.write_str(&strerror(*e)),
            Error::Eof => f.write_str("end of file"),
            Error::EofInMessage => f.write_str("got end of file during message"),
            Error::BadLength(n) => write!(f, "bad message length: {n}"),
            Error::Interrupted => f.write_str("interrupted by a signal"),
            Error::Exec(e) => write!(f, "exec failed: {}", strerror(*e)),
            Error::WouldBlock => f.write_str("semaphore not available"),
            // The stdlib's messages, word for word: the bindings raise them as they are.
            Error::NotOwner => f.write_str("attempt to release recursive lock not owned by thread"),
            Error::OverRelease(_) => f.write_str("semaphore or lock released too many times"),
        }
    }
}

impl std::error::Error for Error {}

/// The C library's message for `errno`, which is what the stdlib's OSErrors carry
/// (nix's own descriptions differ for some codes, e.g. EBADF, EAGAIN, ENOMEM).
pub fn strerror(errno: Errno) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: `buf` is writable for `buf.len()` bytes; the XSI strerror_r (libc binds
    // glibc's __xpg_strerror_r) writes a NUL-terminated, possibly truncated message
    // into it and touches nothing else.
    let rc = unsafe { libc::strerror_r(errno as i32, buf.as_mut_ptr().cast(), buf.len()) };
    match std::ffi::CStr::from_bytes_until_nul(&buf) {
        Ok(msg) if rc == 0 => msg.to_string_lossy().into_owned(),
        _ => errno.desc().to_owned(),
    }
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;
