//! Line-JSON framing shared by rkfilter's protocol frontends: smbl/1 and
//! nfsl/1 both carry one JSON object per `\n`-terminated line over TCP,
//! with a 4 MiB line limit after which the server answers once and closes.
//!
//! The rules a slow or hostile peer meets are written here once, for both
//! frontends:
//!
//! - **A stalled reader hurts only itself.** Every connection has an
//!   [`Outbound`] queue drained by a writer thread of its own; queuing a line
//!   never blocks. A connection whose queue would exceed
//!   [`MAX_QUEUED_BYTES`] is dropped (shut down both ways, which ends its
//!   reader and so tears its state down as for a lost connection) — nothing
//!   is ever dropped from a queue that stays open, and the caller learns
//!   that the line did not go.
//!   A write that makes no progress for [`WRITE_STALL_LIMIT`] drops the
//!   connection the same way, so a peer that never reads cannot keep a
//!   writer thread either.
//! - **Connections are capped**, in all and per peer address.
//!   [`accept_forever`] serves at most `max_connections` at once (two
//!   threads each: reader and writer), and at most
//!   `max_connections_per_peer` from one IP address, so one host's flood
//!   fills its own share first; one more is answered with a single refusal
//!   line and closed.
//! - **Lines are capped** at [`MAX_LINE`].
//!
//! [`client`] is the other end: the connection core of the smbl/1 and
//! nfsl/1 client libraries.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod datasync;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

/// Longest request line (both specs: 4 MiB).
pub const MAX_LINE: usize = 4 << 20;

/// Most bytes of replies and notifications queued for one connection
/// before it is dropped as not reading. Four of the largest replies (a
/// 4 MiB READ is about 5.6 MiB of base64) fit.
pub const MAX_QUEUED_BYTES: usize = 24 << 20;

/// Default cap on concurrent connections per frontend.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default cap on concurrent connections from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Stack of a connection's writer thread (it only copies bytes).
const WRITER_STACK: usize = 64 << 10;

/// How long a write to a peer may make no progress before the connection
/// is dropped: a peer that reads nothing for this long while replies wait
/// (below [`MAX_QUEUED_BYTES`], or after it stopped sending) does not keep
/// a writer thread forever.
pub const WRITE_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A connection's outbound queue, shared with whoever pushes notifications.
pub type Writer = Arc<Outbound>;

/// Why a line was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is gone (closed, or dropped earlier).
    Gone,
    /// The peer is not reading: queuing the line would exceed
    /// [`MAX_QUEUED_BYTES`]; the connection has been dropped.
    Overflow,
}

/// A connection's bounded, non-blocking outbound queue: lines are queued
/// here and written by the connection's writer thread.
pub struct Outbound {
    conn: u64,
    tx: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    queued: Arc<AtomicUsize>,
    dropped: AtomicBool,
    stream: TcpStream,
}

impl Outbound {
    /// Starts the writer thread (`{name}-out`) of `stream`.
    fn start(conn: u64, name: &str, stream: &TcpStream) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut out = stream.try_clone()?;
        out.set_write_timeout(Some(WRITE_STALL_LIMIT))?;
        let q = queued.clone();
        std::thread::Builder::new()
            .name(format!("{name}-out"))
            .stack_size(WRITER_STACK)
            .spawn(move || {
                for line in rx {
                    q.fetch_sub(line.len(), Ordering::AcqRel);
                    match out.write_all(&line) {
                        Ok(()) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            eprintln!(
                                "connection {conn}: dropped, its peer read nothing for {} s",
                                WRITE_STALL_LIMIT.as_secs()
                            );
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Every queued line went out (or the peer is gone): close.
                let _ = out.shutdown(Shutdown::Both);
            })?;
        Ok(Arc::new(Outbound {
            conn,
            tx: Mutex::new(Some(tx)),
            queued,
            dropped: AtomicBool::new(false),
            stream: stream.try_clone()?,
        }))
    }

    /// Queues one JSON line without blocking. On overflow the connection is
    /// dropped (see [`SendError::Overflow`]).
    pub fn send(&self, v: &Value) -> Result<(), SendError> {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        let len = line.len();
        {
            let Ok(tx) = self.tx.lock() else {
                return Err(SendError::Gone);
            };
            let Some(tx) = tx.as_ref() else {
                return Err(SendError::Gone);
            };
            let before = self.queued.fetch_add(len, Ordering::AcqRel);
            if before.saturating_add(len) <= MAX_QUEUED_BYTES {
                return tx.send(line).map_err(|_| {
                    self.queued.fetch_sub(len, Ordering::AcqRel);
                    SendError::Gone
                });
            }
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
        self.drop_connection();
        Err(SendError::Overflow)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether the connection was dropped for not reading.
    pub fn was_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Drops the connection at once: nothing more is queued, the writer
    /// stops, and the reader sees the end of the stream.
    fn drop_connection(&self) {
        if !self.dropped.swap(true, Ordering::AcqRel) {
            eprintln!(
                "connection {}: dropped, its peer is not reading (over {} MiB queued)",
                self.conn,
                MAX_QUEUED_BYTES >> 20
            );
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Binds `listen` and prints `listening on HOST:PORT` (the real port) as
/// the first line on stdout, as spec/cli.md asks.
pub fn announce(listen: &str) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(listen)?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on {}", l.local_addr()?)?;
    out.flush()?;
    Ok(l)
}

/// How a frontend's listener treats its connections.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Thread name prefix (`{prefix}-conn-N`).
    pub prefix: &'static str,
    /// The request id field (`mid`, `xid`).
    pub id_field: &'static str,
    /// The status of the refusal sent to a connection over the cap.
    pub busy_status: &'static str,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Most connections served at once from one IP address.
    pub max_connections_per_peer: usize,
}

/// Accepts connections forever, serving each on a thread of its own
/// (`{prefix}-conn-N`, N numbering the connections from 1), at most
/// `max_connections` at once and `max_connections_per_peer` from one IP
/// address: one more gets a single line
/// `{id_field: null, "status": busy_status, "error": ...}` naming the cap,
/// and is closed.
pub fn accept_forever(
    listener: TcpListener,
    cfg: Listen,
    serve: impl Fn(u64, TcpStream) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    let live = Arc::new(Mutex::new(Live::default()));
    let mut next = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        next += 1;
        let peer = stream.peer_addr().map(|a| a.ip()).ok();
        if let Err(why) = admit(&live, peer, &cfg) {
            refuse(stream, &cfg, &why);
            continue;
        }
        let (conn, serve, gone) = (next, serve.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}-conn-{conn}", cfg.prefix))
            .spawn(move || {
                serve(conn, stream);
                release(&gone, peer);
            });
        if spawned.is_err() {
            release(&live, peer);
        }
    }
}

/// Connections being served: in all and per peer address.
#[derive(Default)]
struct Live {
    total: usize,
    per_peer: HashMap<std::net::IpAddr, usize>,
}

/// Counts a new connection in, or says which cap it would pass.
fn admit(live: &Mutex<Live>, peer: Option<std::net::IpAddr>, cfg: &Listen) -> Result<(), String> {
    let Ok(mut l) = live.lock() else {
        return Err("the connection table is unusable".into());
    };
    if l.total >= cfg.max_connections {
        return Err(format!(
            "too many connections (--max-connections {})",
            cfg.max_connections
        ));
    }
    if let Some(ip) = peer {
        let n = l.per_peer.entry(ip).or_default();
        if *n >= cfg.max_connections_per_peer {
            return Err(format!(
                "too many connections from {ip} (--max-connections-per-peer {})",
                cfg.max_connections_per_peer
            ));
        }
        *n += 1;
    }
    l.total += 1;
    Ok(())
}

fn release(live: &Mutex<Live>, peer: Option<std::net::IpAddr>) {
    if let Ok(mut l) = live.lock() {
        l.total = l.total.saturating_sub(1);
        if let Some(ip) = peer {
            if let Some(n) = l.per_peer.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    l.per_peer.remove(&ip);
                }
            }
        }
    }
}

/// Answers a connection over a cap and closes it, never blocking.
fn refuse(mut stream: TcpStream, cfg: &Listen, why: &str) {
    let line = json!({cfg.id_field: null, "status": cfg.busy_status, "error": why});
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(format!("{line}\n").as_bytes());
    let _ = stream.shutdown(Shutdown::Both);
}

/// The writers of live connections by number, for pushing notifications
/// (LEASE_BREAK, CB_RECALL) to the connection a client last used.
#[derive(Default)]
pub struct Writers(Mutex<HashMap<u64, Writer>>);

impl Writers {
    /// The writer of connection `conn`, while it lives.
    pub fn get(&self, conn: u64) -> Option<Writer> {
        self.0.lock().ok().and_then(|w| w.get(&conn).cloned())
    }

    /// Serves `stream` as connection `conn` ([`serve_lines`]) with its
    /// writer registered meanwhile. `handle` answers a line now (`Some`)
    /// or takes it on to answer through the writer later (`None`).
    pub fn serve(
        &self,
        conn: u64,
        stream: TcpStream,
        id_field: &str,
        status: &str,
        handle: impl FnMut(&[u8], &Writer) -> Option<Value>,
    ) {
        let name = std::thread::current()
            .name()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("conn-{conn}"));
        let Ok(writer) = Outbound::start(conn, &name, &stream) else {
            return;
        };
        if let Ok(mut w) = self.0.lock() {
            w.insert(conn, writer.clone());
        }
        serve_lines(BufReader::new(stream), &writer, id_field, status, handle);
        if let Ok(mut w) = self.0.lock() {
            w.remove(&conn);
        }
        // The writer thread sends what is queued and closes once the last
        // holder of the queue (this one, a worker still answering requests
        // read before the end of input) lets go of it.
    }
}

/// Sends one JSON line through a connection's queue, never blocking; false
/// when it did not go (the connection is gone or was just dropped).
pub fn send(w: &Outbound, v: &Value) -> bool {
    w.send(v).is_ok()
}

/// One line read.
enum Line {
    Data,
    Eof,
    TooLong,
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Line {
    buf.clear();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    match r.by_ref().take(limit).read_until(b'\n', buf) {
        Ok(0) | Err(_) => Line::Eof,
        Ok(_) if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE => Line::TooLong,
        Ok(_) => Line::Data,
    }
}

/// Serves a connection: hands every line to `handle`, in order, until the
/// peer goes away or the connection is dropped, queuing the replies it
/// returns. An over-long line is answered with an error (`id_field` null,
/// `status`) and ends the connection.
pub fn serve_lines(
    mut reader: BufReader<TcpStream>,
    writer: &Writer,
    id_field: &str,
    status: &str,
    mut handle: impl FnMut(&[u8], &Writer) -> Option<Value>,
) {
    let mut buf = Vec::new();
    loop {
        match read_line(&mut reader, &mut buf) {
            Line::Data => {}
            Line::Eof => return,
            Line::TooLong => {
                send(
                    writer,
                    &json!({id_field: null, "status": status, "error": "line longer than 4 MiB"}),
                );
                return;
            }
        }
        if let Some(reply) = handle(&buf, writer) {
            if !send(writer, &reply) {
                return;
            }
        }
    }
}

/// Decodes a request line: its object and its numeric id (`id_field`), or
/// the reply for a malformed one (`status`, the id echoed when readable).
pub fn parse_request(
    line: &[u8],
    id_field: &str,
    status: &str,
) -> Result<(Map<String, Value>, u64), Value> {
    let v: Value = serde_json::from_slice(line).map_err(
        |e| json!({id_field: null, "status": status, "error": format!("not JSON: {e}")}),
    )?;
    let Value::Object(obj) = v else {
        return Err(json!({id_field: null, "status": status, "error": "not a JSON object"}));
    };
    let Some(id) = obj.get(id_field).and_then(Value::as_u64) else {
        return Err(
            json!({id_field: null, "status": status, "error": format!("{id_field} must be a u64")}),
        );
    };
    Ok((obj, id))
}

/// A required field.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    obj.get(name).ok_or_else(|| format!("missing field {name}"))
}

/// A required u64 field.
pub fn u64_field(obj: &Map<String, Value>, name: &str) -> Result<u64, String> {
    field(obj, name)?
        .as_u64()
        .ok_or_else(|| format!("{name} must be a u64"))
}

/// A required string field.
pub fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    field(obj, name)?
        .as_str()
        .ok_or_else(|| format!("{name} must be a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_get_the_status_and_a_null_id() {
        for line in [&b"{x"[..], b"[1]", b"{\"mid\": \"7\"}"] {
            let r = parse_request(line, "mid", "BAD").unwrap_err();
            assert_eq!(r["status"], "BAD", "{r}");
            assert!(r["mid"].is_null());
            assert!(r["error"].is_string());
        }
        let (obj, id) = parse_request(b"{\"xid\": 9, \"op\": \"X\"}", "xid", "BAD").unwrap();
        assert_eq!((id, obj["op"].as_str()), (9, Some("X")));
    }

    #[test]
    fn lines_are_limited() {
        let mut long = vec![b'a'; MAX_LINE + 2];
        long.push(b'\n');
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut &long[..], &mut buf), Line::TooLong));
        let ok = b"{}\n";
        assert!(matches!(read_line(&mut &ok[..], &mut buf), Line::Data));
        assert!(matches!(read_line(&mut &b""[..], &mut buf), Line::Eof));
    }
}
