//! Fault injection for crash tests: `SHAREDLOOP_FAULT=OP:N` makes the
//! process abort (as a kill -9 would stop it: no destructors, no cleanup) at
//! the N-th fault point that operation OP passes. Points sit between the
//! steps of each operation whose order matters for crash safety.
//!
//! Only a build with the `fault-injection` cargo feature (of this crate, or
//! of the `sharedloop` binary, which forwards it) reads the variable; the
//! tests build with it (`scripts/test`). Without it — release builds,
//! `cargo build --release -p sharedloop` — a point is an empty inline
//! function and `SHAREDLOOP_FAULT` is ignored, so it can never abort a
//! production daemon. With it and without the variable, a point costs one
//! load of an initialised `OnceLock`.
//!
//! `SHAREDLOOP_FAULT_PAUSE=OP:MATCH:FILE` (same feature; MATCH without a
//! colon, e.g. a layer's hex digest) holds every thread passing [`pause`]
//! of operation OP with a `what` containing MATCH until FILE exists; on
//! arrival it creates `FILE.reached`, so a test knows the thread is held.
//! Tests use it to hold one step while they show what other threads can
//! do meanwhile. The pause points: `layer-mount` (a layer's first mount on
//! this host, before its image is opened and checked; MATCH: the chain
//! id) and `layer-build` (a layer's image about to be built for
//! publishing; MATCH: the chain id).
//!
//! [`wait`] (same feature): a test may shorten, for the requests its own
//! thread makes, a bounded wait that would otherwise take a minute (a
//! removal waiting for a reader's lease), with `shorten_wait`. Per
//! thread, so tests running side by side in one process keep the normal
//! waits of each other's requests.

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Mutex, OnceLock};

    static TARGET: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static COUNTS: OnceLock<Mutex<HashMap<&'static str, AtomicU32>>> = OnceLock::new();

    fn target() -> &'static Option<(String, u32)> {
        TARGET.get_or_init(|| {
            let v = std::env::var("SHAREDLOOP_FAULT").ok()?;
            let (op, n) = v.split_once(':')?;
            Some((op.to_owned(), n.parse().ok()?))
        })
    }

    pub fn point(op: &'static str, what: &str) {
        let Some((t_op, t_n)) = target() else { return };
        if t_op != op {
            return;
        }
        let counts = COUNTS.get_or_init(|| Mutex::new(HashMap::new()));
        let n = {
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            c.entry(op).or_insert_with(|| AtomicU32::new(0)).fetch_add(1, Ordering::SeqCst) + 1
        };
        if n == *t_n {
            eprintln!("sharedloop: fault injection: aborting in {op} at step {n} ({what})");
            std::process::abort();
        }
    }

    thread_local! {
        static WAITS: std::cell::RefCell<HashMap<&'static str, std::time::Duration>> =
            std::cell::RefCell::new(HashMap::new());
    }

    pub fn wait(op: &'static str, normal: std::time::Duration) -> std::time::Duration {
        WAITS.with(|w| w.borrow().get(op).copied()).unwrap_or(normal)
    }

    pub fn shorten_wait(op: &'static str, to: Option<std::time::Duration>) {
        WAITS.with(|w| match to {
            Some(d) => w.borrow_mut().insert(op, d),
            None => w.borrow_mut().remove(op),
        });
    }

    thread_local! {
        static FAILS: std::cell::RefCell<std::collections::HashSet<&'static str>> =
            std::cell::RefCell::new(std::collections::HashSet::new());
    }

    pub fn fail_next(op: &'static str) {
        FAILS.with(|f| f.borrow_mut().insert(op));
    }

    pub fn fails(op: &'static str) -> bool {
        FAILS.with(|f| f.borrow_mut().remove(op))
    }

    pub fn fail_pending(op: &'static str) -> bool {
        FAILS.with(|f| f.borrow().contains(op))
    }

    /// Read at each pause point (they are rare: a layer's first mount), so
    /// a test may set the variable after the process started.
    pub fn pause(op: &'static str, what: &str) {
        let Ok(v) = std::env::var("SHAREDLOOP_FAULT_PAUSE") else { return };
        let mut parts = v.splitn(3, ':');
        let (Some(p_op), Some(p_match), Some(file)) = (parts.next(), parts.next(), parts.next()) else { return };
        if p_op != op || !what.contains(p_match) {
            return;
        }
        let reached = format!("{file}.reached");
        eprintln!("sharedloop: fault injection: pausing in {op} ({what}) until {file} exists");
        if let Err(e) = std::fs::write(&reached, what) {
            eprintln!("sharedloop: fault injection: cannot create {reached}: {e}");
        }
        while !std::path::Path::new(file).exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// A place where a test may hold operation `op` (`SHAREDLOOP_FAULT_PAUSE`);
/// `what` names what is being worked on.
#[inline(always)]
pub fn pause(op: &'static str, what: &str) {
    #[cfg(feature = "fault-injection")]
    enabled::pause(op, what);
    #[cfg(not(feature = "fault-injection"))]
    let _ = (op, what);
}

/// How long a bounded wait of operation `op` lasts: `normal`, unless a
/// test shortened it for the calling thread (`shorten_wait`, with the
/// `fault-injection` feature).
#[inline(always)]
pub fn wait(op: &'static str, normal: std::time::Duration) -> std::time::Duration {
    #[cfg(feature = "fault-injection")]
    let normal = enabled::wait(op, normal);
    #[cfg(not(feature = "fault-injection"))]
    let _ = op;
    normal
}

/// Makes the bounded waits of operation `op` ([`wait`]) in requests of the
/// calling thread last `to`; `None` restores the normal wait. The waits
/// that exist: `remove` (a removal waiting for the requests and readers
/// of its layer, 60 s).
#[cfg(feature = "fault-injection")]
pub fn shorten_wait(op: &'static str, to: Option<std::time::Duration>) {
    enabled::shorten_wait(op, to);
}

/// Whether step `op` fails this time: once after the calling thread
/// asked for it with `fail_next` (`fault-injection` feature), never
/// otherwise. The steps that can: `one-pass-build` (mke2fs reading the
/// tar fails as a tool that cannot build would).
#[inline(always)]
pub fn fails(op: &'static str) -> bool {
    #[cfg(feature = "fault-injection")]
    return enabled::fails(op);
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = op;
        false
    }
}

/// Makes the next [`fails`] of step `op` on the calling thread say yes.
#[cfg(feature = "fault-injection")]
pub fn fail_next(op: &'static str) {
    enabled::fail_next(op);
}

/// Whether a failure asked for with [`fail_next`] is still to come (the
/// step was not reached).
#[cfg(feature = "fault-injection")]
pub fn fail_pending(op: &'static str) -> bool {
    enabled::fail_pending(op)
}

/// A point between two steps of operation `op`.
#[inline(always)]
pub fn point(op: &'static str, what: &str) {
    #[cfg(feature = "fault-injection")]
    enabled::point(op, what);
    #[cfg(not(feature = "fault-injection"))]
    let _ = (op, what);
}

#[cfg(test)]
mod tests {
    /// A build without the feature ignores the variable: a point the
    /// variable names passes. (With the feature this would abort the test
    /// process, so it only exists without it; `scripts/test` runs it so.)
    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn without_the_feature_the_variable_is_ignored() {
        std::env::set_var("SHAREDLOOP_FAULT", "fault-unit-test:1");
        super::point("fault-unit-test", "first point");
        super::point("fault-unit-test", "second point");
        std::env::remove_var("SHAREDLOOP_FAULT");
    }

    /// With the feature, a wait shortened on one thread is shortened there
    /// only, until restored.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn a_shortened_wait_is_the_calling_threads_own() {
        use std::time::Duration;
        let normal = Duration::from_secs(60);
        super::shorten_wait("fault-unit-test-wait", Some(Duration::from_millis(5)));
        assert_eq!(super::wait("fault-unit-test-wait", normal), Duration::from_millis(5));
        assert_eq!(super::wait("fault-unit-test-other", normal), normal);
        let elsewhere = std::thread::spawn(move || super::wait("fault-unit-test-wait", normal)).join().unwrap();
        assert_eq!(elsewhere, normal, "another thread's wait was shortened too");
        super::shorten_wait("fault-unit-test-wait", None);
        assert_eq!(super::wait("fault-unit-test-wait", normal), normal);
    }

    /// With the feature, points of other operations pass.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn with_the_feature_other_operations_pass() {
        super::point("fault-unit-test-never-targeted", "a point");
    }
}
