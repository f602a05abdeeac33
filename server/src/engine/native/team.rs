//! A team of threads that splits one decoder step's matrix products (`--intra-op-threads`
//! above 1), each product a fork and a join.
//!
//! A step of flan-t5-base is 73 products; rayon's pool put its idle thread to sleep between
//! them, and waking it took tens of microseconds on our VMs: split across 2 threads a step was
//! only 1.05-1.13x faster than on one (`examples/kernels`), while two processes each read their
//! weights at full speed side by side. The team's helpers therefore spin on an epoch counter
//! for a while ([`SPIN`]) before they park, and the caller spins on the join: between the
//! products of a step the helpers are answered in well under a microsecond. That is
//! [`Waiting::Spin`], for teams whose threads have cores of their own; with more threads than
//! cores spinning starves the threads waited on, and [`Waiting::Block`] parks at once. Either
//! way each part goes to whichever thread claims it first, so the caller does the parts no
//! helper has started instead of waiting for it.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long an idle helper spins before it parks ([`Waiting::Spin`]): longer than the gaps
/// inside a step and between two steps (attention, norms, the next token's choice), far
/// shorter than the time between two requests.
const SPIN: Duration = Duration::from_micros(300);

/// How the team's threads wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Busy-wait ([`SPIN`], [`YIELD_AFTER`]): for threads that have cores of their own.
    Spin,
    /// Park at once and yield the core while waiting on a join: with more threads than cores
    /// (every worker with `--intra-op-threads 2` on a 2-core machine), spinning kept the
    /// threads waited on off the cores: 18-79 against rayon's 122-150 req/s at concurrency 8.
    Block,
}

/// Busy waits offer the core to other threads after this long ([`Waiting::Spin`]): should the
/// thread waited on be waiting for this core, spinning would keep it off for a time slice.
const YIELD_AFTER: Duration = Duration::from_micros(50);

/// One turn of a busy wait that began at `started`: a spin hint, and every 64th turn a look at
/// the clock, which past `yield_after` also yields the core; returns the time waited when it
/// looked.
fn wait_turn(turns: &mut u32, started: Instant, yield_after: Duration) -> Option<Duration> {
    *turns = turns.wrapping_add(1);
    if !turns.is_multiple_of(64) {
        std::hint::spin_loop();
        return None;
    }
    let waited = started.elapsed();
    if waited >= yield_after {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
    Some(waited)
}

/// One job: `f(part)` for each part, lifetime erased (see [`Team::run`]).
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync));

// SAFETY: the closure behind it is Sync, and is only called while `Team::run` waits for it.
unsafe impl Send for JobPtr {}

/// The low 32 bits of [`Shared::claim`]: the next part to take.
const PART_BITS: u32 = 32;
const PART_MASK: u64 = (1 << PART_BITS) - 1;

struct Shared {
    /// How long a helper spins before it parks, and a join spins before it yields.
    spin: Duration,
    yield_after: Duration,
    /// `epoch << 32 | next part`: a new epoch per job. Whoever moves it on by one (compare and
    /// swap, within the job's epoch) runs that part, so a part runs once, and the caller takes
    /// the parts no helper got to: a helper that is asleep or off its core delays nothing.
    claim: AtomicU64,
    /// Parts of every job: one per thread.
    parts: usize,
    /// Parts of the current job that helpers finished.
    finished: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    stop: AtomicBool,
    /// The current job and its epoch: a helper calls it only after claiming one of its parts,
    /// and [`Team::run`] does not return before every claimed part is finished.
    job: Mutex<Option<(u32, JobPtr)>>,
    /// A helper's panic, re-raised on the caller.
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Takes the next part of `epoch`'s job, if any is left.
    fn take_part(&self, epoch: u32) -> Option<usize> {
        let mut cur = self.claim.load(SeqCst);
        loop {
            let part = (cur & PART_MASK) as usize;
            if (cur >> PART_BITS) as u32 != epoch || part >= self.parts {
                return None;
            }
            match self.claim.compare_exchange(cur, cur + 1, SeqCst, SeqCst) {
                Ok(_) => return Some(part),
                Err(now) => cur = now,
            }
        }
    }
}

/// `threads - 1` helper threads plus the caller.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Held for a whole [`Team::run`]: callers on two threads take turns.
    running: Mutex<()>,
}

thread_local! {
    /// The team of [`Team::install`] on this thread, if any; handed out only by
    /// [`with_current`], for no longer than the installation.
    static CURRENT: Cell<Option<&'static Team>> = const { Cell::new(None) };
}

impl Team {
    /// A team of `threads` (the caller counts as one); `name` names the helper threads.
    pub fn new(threads: usize, name: &str, waiting: Waiting) -> std::io::Result<Self> {
        let (spin, yield_after) = match waiting {
            Waiting::Spin => (SPIN, YIELD_AFTER),
            Waiting::Block => (Duration::ZERO, Duration::ZERO),
        };
        let shared = Arc::new(Shared {
            spin,
            yield_after,
            claim: AtomicU64::new(0),
            parts: threads.max(1),
            finished: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (1..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || helper(&shared))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { shared, helpers, running: Mutex::new(()) })
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f` with this team as the current one on this thread ([`with_current`]).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        // SAFETY: the reference is removed again before `self` can go (the guard below runs
        // on return and on unwinding), so no one reads it past this call.
        let this: &'static Team = unsafe { std::mem::transmute::<&Team, &'static Team>(self) };
        struct Restore(Option<&'static Team>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(this))));
        f()
    }

    /// `f(part)` for every part in `0..self.threads()`, part 0 on this thread, the others on
    /// whichever thread takes them first (a helper, or this one when it is done with its own);
    /// returns when all are done. Not reentrant: `f` must not call `run`.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            return f(0);
        }
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.shared;
        let parts = s.parts;
        // Only this function moves the epoch on, under `running`.
        let epoch = ((s.claim.load(SeqCst) >> PART_BITS) as u32).wrapping_add(1);
        // SAFETY (lifetime): the helpers call the job only for parts they claimed in this epoch,
        // and `Join` below waits for every claimed part before this function returns.
        let job = JobPtr(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(f)
        });
        s.finished.store(0, SeqCst);
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some((epoch, job));
        // Part 0 is the caller's.
        s.claim.store(u64::from(epoch) << PART_BITS | 1, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            // Taking the lock orders this after a parking helper's last look at the epoch.
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Closes the job and waits for the parts helpers took, also when a part on this thread
        // panics: they may still read what `f` borrows.
        struct Join<'t> {
            shared: &'t Shared,
            epoch: u32,
            parts: usize,
            mine: usize,
        }
        impl Drop for Join<'_> {
            fn drop(&mut self) {
                let s = self.shared;
                let closed = s.claim.swap(u64::from(self.epoch) << PART_BITS | PART_MASK, SeqCst);
                let taken = ((closed & PART_MASK) as usize).min(self.parts);
                let (started, mut turns) = (Instant::now(), 0);
                while s.finished.load(SeqCst) < taken - self.mine {
                    wait_turn(&mut turns, started, s.yield_after);
                }
                *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let mut join = Join { shared: s, epoch, parts, mine: 1 };
        f(0);
        while let Some(part) = s.take_part(epoch) {
            join.mine += 1;
            f(part);
        }
        drop(join);
        if s.panicked.swap(false, SeqCst) {
            panic!("a decoder team thread panicked");
        }
    }

    /// `f(i, &mut parts[i])` for every part (at most one per thread), each on whichever thread
    /// claims it first ([`Team::run`]): what a split product hands each thread.
    pub fn run_parts<T: Send>(&self, parts: Vec<T>, f: impl Fn(usize, &mut T) + Sync) {
        assert!(parts.len() <= self.threads(), "more parts than threads");
        let parts: Vec<Mutex<T>> = parts.into_iter().map(Mutex::new).collect();
        self.run(&|i| {
            if let Some(part) = parts.get(i) {
                f(i, &mut part.lock().unwrap_or_else(|e| e.into_inner()));
            }
        });
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Calls `f` with the team [`Team::install`]ed on this thread, if any: a reference that cannot
/// leave `f`, since the installation ends with the `install` call around it.
pub fn with_current<R>(f: impl FnOnce(Option<&Team>) -> R) -> R {
    f(CURRENT.with(Cell::get))
}

fn helper(s: &Shared) {
    let mut seen = 0u32;
    loop {
        let (spun, mut turns) = (Instant::now(), 0);
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            let epoch = (s.claim.load(SeqCst) >> PART_BITS) as u32;
            if epoch != seen {
                seen = epoch;
                break;
            }
            if wait_turn(&mut turns, spun, s.yield_after).is_none_or(|waited| waited < s.spin) {
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_add(1, SeqCst);
            let guard = s
                .wake
                .wait_while(guard, |_| (s.claim.load(SeqCst) >> PART_BITS) as u32 == seen && !s.stop.load(SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_sub(1, SeqCst);
            drop(guard);
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        let Some((epoch, job)) = job.filter(|(epoch, _)| *epoch == seen) else {
            continue; // that job is over already
        };
        while let Some(part) = s.take_part(epoch) {
            // SAFETY: this part of `epoch` is claimed, so `Team::run` is still waiting for it
            // and the closure is alive.
            let f = unsafe { &*job.0 };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(part))).is_err() {
                s.panicked.store(true, SeqCst);
            }
            s.finished.fetch_add(1, SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        for (threads, waiting) in [(1, Waiting::Spin), (2, Waiting::Spin), (3, Waiting::Spin), (2, Waiting::Block)] {
            let team = Team::new(threads, "test", waiting).unwrap();
            assert_eq!(team.threads(), threads);
            let counts: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..2000 {
                team.run(&|part| {
                    counts[part].fetch_add(1, SeqCst);
                });
            }
            assert!(counts.iter().all(|c| c.load(SeqCst) == 2000), "{counts:?}");
        }
    }

    #[test]
    fn parked_helpers_wake_for_the_next_job() {
        let team = Team::new(2, "test", Waiting::Spin).unwrap();
        let hits = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4); // long enough for the helper to park
            team.run(&|part| {
                hits.fetch_add(part + 1, SeqCst);
            });
        }
        assert_eq!(hits.load(SeqCst), 3 * (1 + 2));
    }

    #[test]
    fn callers_on_two_threads_take_turns() {
        let team = Team::new(2, "test", Waiting::Spin).unwrap();
        let hits = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        team.run(&|_| {
                            hits.fetch_add(1, SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(hits.load(SeqCst), 2 * 500 * 2);
    }

    #[test]
    fn install_sets_the_current_team_and_restores_it() {
        let threads = || with_current(|t| t.map(Team::threads));
        assert_eq!(threads(), None);
        let team = Team::new(2, "test", Waiting::Spin).unwrap();
        team.install(|| assert_eq!(threads(), Some(2)));
        assert_eq!(threads(), None);
    }

    #[test]
    fn a_helper_panic_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2, "test", Waiting::Spin).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|part| assert_eq!(part, 0, "a part failed"));
        }));
        assert!(caught.is_err());
        let hits = AtomicUsize::new(0);
        team.run(&|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 2);
    }
}
