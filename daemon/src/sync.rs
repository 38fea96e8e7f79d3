//! Shared state between a daemon's threads.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also when a thread panicked holding it. The daemons guard only values that
/// are consistent between statements (counters, reports, map handles), so the data behind a
/// poisoned lock is sound, and a panic in one thread must not take the others down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
