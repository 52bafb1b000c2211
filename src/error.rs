//! The core's one error type. It has no pyo3 in it; `py/mod.rs` maps it to Python
//! exceptions in a single `From` conversion.

use std::fmt;

use nix::errno::Errno;

/// Everything a core operation can fail with.
#[derive(Debug)]
pub enum Error {
    /// An OS call failed; the errno is kept so Python gets the right OSError subclass.
    Os(Errno),
    /// The peer closed before a message started (EOFError in Python).
    Eof,
    /// The peer closed in the middle of a message.
    EofInMessage,
    /// A frame header announced a length that cannot be right.
    BadLength(i64),
    /// A wait was interrupted by a signal and the caller chose to stop (Python raised).
    Interrupted,
    /// A child could not be executed; the errno came back over the CLOEXEC pipe.
    Exec(Errno),
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Error::Os(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os(e) => write!(f, "{}", e.desc()),
            Error::Eof => f.write_str("end of file"),
            Error::EofInMessage => f.write_str("got end of file during message"),
            Error::BadLength(n) => write!(f, "bad message length: {n}"),
            Error::Interrupted => f.write_str("interrupted"),
            Error::Exec(e) => write!(f, "exec failed: {}", e.desc()),
        }
    }
}

impl std::error::Error for Error {}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;
