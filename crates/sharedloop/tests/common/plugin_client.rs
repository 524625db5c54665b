//! A client of the graphdriver plugin protocol that sends exactly what
//! dockerd's `pkg/plugins` client sends: POST, JSON bodies, and ApplyDiff
//! as a chunked raw tar with `?id=&parent=`. Used where dockerd itself
//! cannot go (its layer store stops at 125 layers) and for error cases.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub struct PluginClient {
    socket: PathBuf,
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The plugin died before answering.
    pub fn aborted(&self) -> bool {
        self.status == 0
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    /// The `Err` field, if the call failed.
    pub fn err(&self) -> Option<String> {
        let v = self.json();
        v.get("Err").and_then(|e| e.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
    }
}

impl PluginClient {
    pub fn new(socket: &Path) -> PluginClient {
        PluginClient { socket: socket.to_owned() }
    }

    fn request(&self, path: &str, body: Body<'_>) -> Reply {
        let mut s =
            UnixStream::connect(&self.socket).unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        let mut head = format!(
            "POST /{path} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nConnection: close\r\n"
        );
        match body {
            Body::Json(data) => {
                // Headers and body in one write, as Go's client does.
                head.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
                let mut msg = head.into_bytes();
                msg.extend_from_slice(data);
                s.write_all(&msg).unwrap_or_else(|e| panic!("{path}: sending the request: {e}"));
            }
            Body::Chunked(tar) => {
                head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                s.write_all(head.as_bytes()).unwrap_or_else(|e| panic!("{path}: sending the request: {e}"));
                for chunk in tar.chunks(32 * 1024) {
                    // A plugin that already answered (a bad tar) may close early.
                    if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
                        || s.write_all(chunk).is_err()
                        || s.write_all(b"\r\n").is_err()
                    {
                        break;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n");
            }
        }
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        let _ = r.read_line(&mut status_line);
        if status_line.is_empty() {
            // The plugin went away without answering (a crash).
            return Reply { status: 0, body: Vec::new() };
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut is_chunked = false;
        let mut length = None;
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "transfer-encoding" if v.trim().eq_ignore_ascii_case("chunked") => is_chunked = true,
                "content-length" => length = v.trim().parse::<usize>().ok(),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if is_chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).unwrap();
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            r.read_exact(&mut body).unwrap();
        } else {
            r.read_to_end(&mut body).unwrap();
        }
        Reply { status, body }
    }

    /// A JSON call, as `Client.Call` makes it.
    pub fn call(&self, method: &str, args: serde_json::Value) -> Reply {
        let data = serde_json::to_vec(&args).unwrap();
        self.request(method, Body::Json(&data))
    }

    /// A JSON call that must succeed.
    pub fn ok(&self, method: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.call(method, args.clone());
        assert!(
            r.status == 200 && r.err().is_none(),
            "{method} {args}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    /// `GraphDriver.ApplyDiff?id=&parent=` with a chunked raw tar body.
    pub fn apply_diff(&self, id: &str, parent: &str, tar: &[u8]) -> Reply {
        self.request(&format!("GraphDriver.ApplyDiff?id={id}&parent={parent}"), Body::Chunked(tar))
    }
}

enum Body<'a> {
    Json(&'a [u8]),
    Chunked(&'a [u8]),
}
