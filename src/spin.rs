//! Spin-then-block waiting.
//!
//! Waking a process that sleeps in the kernel costs 25-45 µs on the VMs we run on, more
//! than a whole message exchange between two busy processes. So a reader first polls
//! its fd without blocking for a short budget, then sleeps. The budget adapts: a spin
//! that ends with data makes the next one a little longer, a spin that ends in sleep
//! anyway halves it. Spinning is skipped when more than twice as many processes are
//! runnable as there are CPUs, because then the spinner only steals the CPU its peer
//! needs to answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest spin, in ns.
pub const MAX_BUDGET_NS: u64 = 80_000;
const MIN_BUDGET_NS: u64 = 2_000;
const START_BUDGET_NS: u64 = 40_000;
/// How long a reading of /proc/loadavg stays valid.
const LOAD_SAMPLE_NS: u64 = 20_000_000;

static BUDGET_NS: AtomicU64 = AtomicU64::new(START_BUDGET_NS);
/// Bit 63: "oversubscribed" verdict; low bits: the monotonic time (ns) it was taken.
static LOAD_SAMPLE: AtomicU64 = AtomicU64::new(0);
const OVER_BIT: u64 = 1 << 63;

fn now_ns() -> u64 {
    // A process-relative monotonic clock is enough: only differences are used.
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn ncpus() -> u64 {
    use std::sync::OnceLock;
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1)
    })
}

/// Whether more than twice as many tasks are runnable as there are CPUs (cached for a
/// few ms). One more runnable task than CPUs is common and harmless (a peer starting
/// up, a pool's idle worker, a daemon): a spinner yields every couple of µs and only
/// one waiter of a ring spins at a time, and refusing to spin then sends every
/// exchange through a 25-45 µs futex wake-up (measured: a pool round trip went from
/// 8 to 25 µs).
fn oversubscribed() -> bool {
    let now = now_ns();
    let sample = LOAD_SAMPLE.load(Ordering::Relaxed);
    let taken = sample & !OVER_BIT;
    if sample != 0 && now.saturating_sub(taken) < LOAD_SAMPLE_NS {
        return sample & OVER_BIT != 0;
    }
    let over = match std::fs::read_to_string("/proc/loadavg") {
        // Fourth field is "running/total"; the reader itself counts as running.
        Ok(s) => s
            .split_whitespace()
            .nth(3)
            .and_then(|f| f.split('/').next())
            .and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|running| running > 2 * ncpus()),
        Err(_) => false,
    };
    let stamp = now.max(1) & !OVER_BIT;
    LOAD_SAMPLE.store(stamp | if over { OVER_BIT } else { 0 }, Ordering::Relaxed);
    over
}

/// Spins calling `ready` until it returns true or the adaptive budget (capped by
/// `deadline`) runs out. Returns whether `ready` said yes; after a no the caller blocks
/// and then reports how long the whole wait took with [`note_blocked`].
pub fn spin_until(deadline: Option<Instant>, mut ready: impl FnMut() -> bool) -> bool {
    if ncpus() < 2 || oversubscribed() {
        return false;
    }
    let budget = Duration::from_nanos(BUDGET_NS.load(Ordering::Relaxed));
    let start = Instant::now();
    let mut end = start + budget;
    if let Some(d) = deadline {
        end = end.min(d);
    }
    spin_loop(end, &mut ready)
}

/// Calls `ready` until it says yes or `end` passes, with pause instructions in
/// between and a `sched_yield` every few microseconds: the peer we wait for may share
/// our CPU (the scheduler put both there), and then only yielding lets it run. On a
/// CPU of its own the yield returns at once and costs a fraction of a microsecond.
fn spin_loop(end: Instant, ready: &mut impl FnMut() -> bool) -> bool {
    let mut rounds = 0u32;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
        rounds += 1;
        if rounds % YIELD_EVERY == 0 {
            std::thread::yield_now();
        }
    }
}

/// Spin rounds (32 pause instructions each, about 1-2 µs per 16) between yields.
const YIELD_EVERY: u32 = 16;

/// Spins calling `ready` for at most `budget` (a short, fixed spin for callers that
/// hold a resource others may want, such as the GIL). Same conditions as
/// [`spin_until`]: never on one CPU or an oversubscribed machine.
pub fn spin_briefly(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if ncpus() < 2 || oversubscribed() {
        return false;
    }
    let end = Instant::now() + budget;
    spin_loop(end, &mut ready)
}

/// Feedback after a spin that ended in sleep: `waited` is the whole wait, spin included.
/// A wait a little past the budget means a longer spin would have caught it, so the
/// budget grows to cover it; a much longer wait means spinning was wasted, so it shrinks.
pub fn note_blocked(waited: Duration) {
    let w = waited.as_nanos().min(u64::MAX as u128) as u64;
    let b = BUDGET_NS.load(Ordering::Relaxed);
    let nb = if w <= MAX_BUDGET_NS {
        (w + w / 4).clamp(MIN_BUDGET_NS, MAX_BUDGET_NS).max(b)
    } else {
        (b / 2).max(MIN_BUDGET_NS)
    };
    BUDGET_NS.store(nb, Ordering::Relaxed);
}
