//! A team of threads that splits one decoder step's matrix products (`--intra-op-threads`
//! above 1), each product a fork and a join.
//!
//! A step of flan-t5-base is 73 products; rayon's pool put its idle thread to sleep between
//! them, and waking it took tens of microseconds on our VMs: split across 2 threads a step was
//! only 1.05-1.13x faster than on one (`examples/kernels`), while two processes each read their
//! weights at full speed side by side. The team's helpers therefore spin on an epoch counter
//! for a while ([`SPIN`]) before they park, and the caller spins on the join: between the
//! products of a step the helpers are answered in well under a microsecond.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long an idle helper spins before it parks: longer than the gaps inside a step and
/// between two steps (attention, norms, the next token's choice), far shorter than the time
/// between two requests.
const SPIN: Duration = Duration::from_micros(300);

/// One job: `f(part)` for each part, part 0 on the caller.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; a helper runs a job when it sees a new value.
    epoch: AtomicUsize,
    /// Helpers done with the current job.
    done: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    stop: AtomicBool,
    /// The current job, lifetime erased: [`Team::run`] does not return before every helper has
    /// finished with it.
    job: Mutex<Option<Job<'static>>>,
    /// A helper's panic, re-raised on the caller.
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
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
    pub fn new(threads: usize, name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            job: Mutex::new(None),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (1..threads.max(1))
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("{name}-{part}")).spawn(move || helper(&shared, part))
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
    /// the helpers; returns when all are done. Not reentrant: `f` must not call `run`.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            return f(0);
        }
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.shared;
        // SAFETY: the helpers use the job only between the epoch bump below and their `done`
        // increment, and this function waits for every `done` before it returns.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        s.done.store(0, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            // Taking the lock orders this after a parking helper's last look at the epoch.
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Waits for the helpers even when part 0 panics: they may still read what `f` borrows.
        struct Join<'t>(&'t Shared, usize);
        impl Drop for Join<'_> {
            fn drop(&mut self) {
                while self.0.done.load(SeqCst) < self.1 {
                    std::hint::spin_loop();
                }
                *self.0.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let join = Join(s, self.helpers.len());
        f(0);
        drop(join);
        if s.panicked.swap(false, SeqCst) {
            panic!("a decoder team thread panicked");
        }
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

fn helper(s: &Shared, part: usize) {
    let mut seen = 0;
    loop {
        let spun = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            let epoch = s.epoch.load(SeqCst);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || spun.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_add(1, SeqCst);
            let guard = s
                .wake
                .wait_while(guard, |_| s.epoch.load(SeqCst) == seen && !s.stop.load(SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_sub(1, SeqCst);
            drop(guard);
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(part))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.done.fetch_add(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        for threads in [1, 2, 3] {
            let team = Team::new(threads, "test").unwrap();
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
        let team = Team::new(2, "test").unwrap();
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
        let team = Team::new(2, "test").unwrap();
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
        let team = Team::new(2, "test").unwrap();
        team.install(|| assert_eq!(threads(), Some(2)));
        assert_eq!(threads(), None);
    }

    #[test]
    fn a_helper_panic_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2, "test").unwrap();
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
