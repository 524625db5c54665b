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

    /// With the feature, points of other operations pass.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn with_the_feature_other_operations_pass() {
        super::point("fault-unit-test-never-targeted", "a point");
    }
}
