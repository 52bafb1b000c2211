//! Semaphore names, as `sem_open` / `sem_unlink` keep them, for the `name` and `unlink`
//! arguments of `_multiprocessing.SemLock`.
//!
//! Our semaphores live in a memfd and have no name in any file system, so a name is
//! only recorded: one given with `unlink=False` is taken until [`unlink`] frees it,
//! and taking it again fails with `EEXIST`, as `sem_open(O_CREAT | O_EXCL)` does. The
//! table is per process: another process cannot unlink the name.
//!
//! The bindings call these with the GIL held and never detach in between, so no fork
//! happens while the mutex is held: a child never inherits it locked.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;

use crate::error::{Error, Result};

/// Names taken and not yet unlinked.
static NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn table() -> MutexGuard<'static, BTreeSet<String>> {
    NAMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key `sem_open` would use for `name`: glibc ignores leading slashes and refuses
/// an empty name or one with a slash or NUL inside (`EINVAL`), or one too long for
/// `NAME_MAX` once prefixed with "sem." (`ENAMETOOLONG`).
fn key(name: &str) -> Result<String> {
    let key = name.trim_start_matches('/');
    if key.is_empty() || key.contains('/') || key.contains('\0') {
        return Err(Error::Os(Errno::EINVAL));
    }
    if key.len() + 4 > 255 {
        return Err(Error::Os(Errno::ENAMETOOLONG));
    }
    Ok(key.to_owned())
}

/// Checks that `name` is valid and free, as `sem_open(O_CREAT | O_EXCL)` would; returns
/// its key, for [`take`] once the semaphore exists.
pub fn check_free(name: &str) -> Result<String> {
    let key = key(name)?;
    if table().contains(&key) {
        return Err(Error::Os(Errno::EEXIST));
    }
    Ok(key)
}

/// Records the name whose key `check_free` returned as taken.
pub fn take(key: String) {
    table().insert(key);
}

/// `sem_unlink(name)`: frees a taken name; `ENOENT` if it is not taken.
pub fn unlink(name: &str) -> Result<()> {
    if table().remove(&key(name)?) {
        Ok(())
    } else {
        Err(Error::Os(Errno::ENOENT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_taken_until_unlinked() {
        let k = check_free("/ferromp-names-test").unwrap();
        take(k);
        assert_eq!(
            check_free("ferromp-names-test"),
            Err(Error::Os(Errno::EEXIST))
        );
        unlink("//ferromp-names-test").unwrap();
        assert_eq!(unlink("/ferromp-names-test"), Err(Error::Os(Errno::ENOENT)));
        assert_eq!(check_free("/a/b"), Err(Error::Os(Errno::EINVAL)));
        assert_eq!(check_free("/"), Err(Error::Os(Errno::EINVAL)));
        let long = "x".repeat(252);
        assert_eq!(check_free(&long), Err(Error::Os(Errno::ENAMETOOLONG)));
    }
}
