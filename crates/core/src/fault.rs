//! Fault injection for crash tests: `SHAREDLOOP_FAULT=OP:N` makes the
//! process abort (as a kill -9 would stop it: no destructors, no cleanup) at
//! the N-th fault point that operation OP passes. Points sit between the
//! steps of each operation whose order matters for crash safety. Without
//! the variable a point costs one load of an initialised `OnceLock`.

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

/// A point between two steps of operation `op`.
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
