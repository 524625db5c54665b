//! The metrics listener of `sharedloop serve --metrics-address`: a minimal
//! HTTP/1 server answering `GET /metrics` with the registry of
//! `sharedloop_core::metrics` (Prometheus' text format), 404 for any other
//! path. Requests are read with a bound on their size and time; a few
//! scrapes are answered at once, more are turned away (503).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest request head read.
const MAX_REQUEST: usize = 8192;
/// Scrapes answered at once.
const MAX_CONNECTIONS: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` on a thread of its own, for the life of the process.
pub fn spawn(listener: TcpListener) -> std::io::Result<()> {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                busy.fetch_sub(1, Ordering::SeqCst);
                let _ = conn.set_write_timeout(Some(TIMEOUT));
                let _ = reply(&mut conn, "503 Service Unavailable", "text/plain", b"too many scrapes at once\n");
                continue;
            }
            let busy = busy.clone();
            let spawned = std::thread::Builder::new().name("metrics-scrape".into()).spawn(move || {
                if let Err(e) = answer(&mut conn) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot answer a metrics request");
            }
        }
    })?;
    Ok(())
}

/// The path of a request head's `GET` line, if that is what it is.
fn get_path(head: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(target), Some(v)) if v.starts_with("HTTP/1.") => {
            Some(target.split_once('?').map_or(target, |(p, _)| p))
        }
        _ => None,
    }
}

fn answer(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return reply(conn, "431 Request Header Fields Too Large", "text/plain", b"request too large\n");
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match get_path(&head) {
        Some("/metrics") => {
            let body = sharedloop_core::metrics::encode();
            reply(conn, "200 OK", sharedloop_core::metrics::CONTENT_TYPE, body.as_bytes())
        }
        Some(_) => reply(conn, "404 Not Found", "text/plain", b"metrics are at /metrics\n"),
        None => reply(conn, "400 Bad Request", "text/plain", b"only GET is served\n"),
    }
}

fn reply(conn: &mut TcpStream, status: &str, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        spawn(l).unwrap();
        let ask = |req: &str| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let r = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("# TYPE sharedloop_layer_mounts gauge"), "{r}");
        assert!(ask("GET /metrics?x=1 HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ask("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
    }
}
