//! Bindings for `process.rs`: fork with the interpreter's fork hooks, fork+exec,
//! reaping, signals, the parent-death watch.

use pyo3::prelude::*;

use crate::process;
use crate::py::blocking;

/// Forks the interpreter as `os.fork()` does: the at-fork hooks registered with
/// `os.register_at_fork` run before and after, and the child re-initialises the
/// interpreter's locks and threads state. Returns 0 in the child, the pid in the parent.
#[pyfunction]
fn fork(_py: Python<'_>) -> PyResult<i32> {
    // SAFETY: we hold the GIL, as PyOS_BeforeFork requires.
    unsafe { pyo3::ffi::PyOS_BeforeFork() };
    // SAFETY: the child calls PyOS_AfterFork_Child first thing, which makes the
    // interpreter usable again in the single-threaded child, exactly as os.fork().
    let r = unsafe { process::fork() };
    match r {
        Ok(0) => {
            // SAFETY: in the child right after fork, with the GIL state inherited.
            unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
            Ok(0)
        }
        Ok(pid) => {
            // SAFETY: in the parent right after fork, GIL held.
            unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
            Ok(pid)
        }
        Err(e) => {
            // SAFETY: the fork failed; the parent hooks undo PyOS_BeforeFork.
            unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
            Err(e.into())
        }
    }
}

/// fork+exec `path` with `args`, keeping only fds 0-2 and `passfds` open in the child.
#[pyfunction]
fn spawnv_passfds(
    py: Python<'_>,
    path: Vec<u8>,
    args: Vec<Vec<u8>>,
    passfds: Vec<i32>,
) -> PyResult<i32> {
    // Never abandoned for a signal: once the child exists, `spawn` must wait for its
    // exec (a moment, CLONE_VFORK) to return its pid or the exec error.
    blocking(py, |_intr| process::spawn(&path, &args, &passfds))
}

/// Reaps `pid`; returns its exitcode (negative signal number) or None if it runs.
/// With `block`, waits without the GIL and wakes for Python's signal handlers.
#[pyfunction]
#[pyo3(signature = (pid, block=false))]
fn waitpid(py: Python<'_>, pid: i32, block: bool) -> PyResult<Option<i32>> {
    if !block {
        // WNOHANG: returns at once, so keep the GIL (and retry an EINTR in the core).
        return Ok(process::waitpid(pid, false, &mut || Ok(()))?);
    }
    blocking(py, |intr| process::waitpid(pid, true, intr))
}

/// Sends signal `sig` to `pid`.
#[pyfunction]
fn kill(pid: i32, sig: i32) -> PyResult<()> {
    Ok(process::kill(pid, sig)?)
}

/// Whether a process with this pid exists.
#[pyfunction]
fn pid_exists(pid: i32) -> bool {
    process::exists(pid)
}

/// Ends this process (SIGTERM, then SIGKILL) when its parent dies.
#[pyfunction]
#[pyo3(signature = (sentinel, parent_pid))]
fn watch_parent(sentinel: Option<i32>, parent_pid: i32) -> PyResult<()> {
    Ok(process::watch_parent(sentinel, parent_pid)?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fork, m)?)?;
    m.add_function(wrap_pyfunction!(spawnv_passfds, m)?)?;
    m.add_function(wrap_pyfunction!(waitpid, m)?)?;
    m.add_function(wrap_pyfunction!(kill, m)?)?;
    m.add_function(wrap_pyfunction!(pid_exists, m)?)?;
    m.add_function(wrap_pyfunction!(watch_parent, m)?)?;
    Ok(())
}
