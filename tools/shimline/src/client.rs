//! The client side of a line-JSON connection, shared by the smbl/1 and
//! nfsl/1 client libraries (`tools/smbl`, `tools/nfsl`): framing, request
//! id assignment (`mid` / `xid`, [`LineClient::connect`]'s `id_field`), and
//! the reader thread that routes every line the server sends.
//!
//! Routing, by what the line carries:
//! - a u64 id: the reply to the request with that id, handed to the caller
//!   waiting in [`LineClient::call`] (dropped if that caller timed out);
//! - a null id, or a `status` and no id: the reply to a line the server
//!   could not read an id from, handed to the oldest waiting
//!   [`LineClient::send_raw`]; with none waiting it goes to the pushed
//!   channel, so nothing the server says is lost silently;
//! - no id and no `status` (LEASE_BREAK, CB_RECALL): pushed by the server.
//!
//! The pushed channel is bounded ([`PUSHED_QUEUE`]); when the application
//! does not keep up the oldest entry is dropped and counted
//! ([`LineClient::dropped_pushed`]), so an unread channel never stalls reply
//! routing and no drop goes unseen.
//!
//! A waiter registers before its line is written, under the writer lock, so
//! the queue of `send_raw` waiters is in the order the server sees the
//! lines. When the connection ends, every waiter gets the reason at once;
//! no call waits out its timeout on a dead connection.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::Value;

/// How long a request waits for its reply unless
/// [`LineClient::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line accepted from the server (a READ of the server's 4 MiB line
/// limit is ~5.6 MiB of base64); a longer one closes the connection as
/// [`CallError::BadLine`].
pub const MAX_REPLY_LINE: usize = 16 << 20;
/// Pushed lines kept for the application (oldest dropped and counted).
pub const PUSHED_QUEUE: usize = 1024;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Connecting to the server failed.
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    /// Writing the request failed.
    #[error("sending a request")]
    Send(#[source] std::io::Error),
    /// The connection is gone; every pending and later request fails so.
    #[error("connection lost: {reason}")]
    Lost {
        /// What ended it.
        reason: String,
    },
    /// The server sent a line that cannot be routed; the connection is
    /// closed (later replies could not be trusted either).
    #[error("bad line from the server: {reason}")]
    BadLine {
        /// What was wrong with it.
        reason: String,
    },
    /// No reply within the timeout; the connection stays usable.
    #[error("no reply to {id:?} within {after:?}")]
    Timeout {
        /// The request's id (`None` for [`LineClient::send_raw`]).
        id: Option<u64>,
        /// The timeout that passed.
        after: Duration,
    },
    /// The request is not a JSON object.
    #[error("a request must be a JSON object")]
    NotAnObject,
    /// [`LineClient::call_keeping_id`] was given an id another request is
    /// still waiting on.
    #[error("id {0} is already waiting for a reply")]
    IdInUse(u64),
}

/// Why the connection ended, handed to every waiter.
#[derive(Debug, Clone)]
enum Closed {
    Lost(String),
    BadLine(String),
}

impl From<Closed> for CallError {
    fn from(c: Closed) -> CallError {
        match c {
            Closed::Lost(reason) => CallError::Lost { reason },
            Closed::BadLine(reason) => CallError::BadLine { reason },
        }
    }
}

type Waiter = Sender<Result<Value, Closed>>;

/// Who is waiting for which reply.
#[derive(Default)]
struct Routes {
    by_id: HashMap<u64, Waiter>,
    id_null: VecDeque<Waiter>,
    closed: Option<Closed>,
}

/// Which reply a waiter waits for.
#[derive(Clone, Copy)]
enum Route {
    Id(u64),
    IdNull,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single insert/remove/take; a panic
    // in one cannot leave the routes half-updated, so a poisoned lock is
    // still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One line-JSON connection, shareable by threads (`&self` everywhere).
pub struct LineClient {
    id_field: &'static str,
    writer: Mutex<TcpStream>,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    timeout_ms: AtomicU64,
    pushed: Receiver<Value>,
    dropped: Arc<AtomicU64>,
    peer: SocketAddr,
    reader: Option<JoinHandle<()>>,
}

impl LineClient {
    /// Connects (trying each address in turn) and starts the reader thread
    /// (`{name}-reader-PEER`); requests carry their id in `id_field`.
    pub fn connect(
        addr: impl ToSocketAddrs,
        id_field: &'static str,
        name: &str,
    ) -> Result<LineClient, CallError> {
        let stream = TcpStream::connect(addr).map_err(CallError::Connect)?;
        // A request is one small write; Nagle must not hold it back behind
        // an unacknowledged earlier one.
        stream.set_nodelay(true).map_err(CallError::Connect)?;
        let peer = stream.peer_addr().map_err(CallError::Connect)?;
        let read_half = stream.try_clone().map_err(CallError::Connect)?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (ptx, prx) = bounded(PUSHED_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reader = {
            let pushed = PushedQueue {
                tx: ptx,
                rx: prx.clone(),
                dropped: dropped.clone(),
            };
            let routes = routes.clone();
            std::thread::Builder::new()
                .name(format!("{name}-reader-{peer}"))
                .spawn(move || read_loop(read_half, id_field, &routes, &pushed))
                .map_err(CallError::Connect)?
        };
        Ok(LineClient {
            id_field,
            writer: Mutex::new(stream),
            routes,
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(millis(DEFAULT_TIMEOUT)),
            pushed: prx,
            dropped,
            peer,
            reader: Some(reader),
        })
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Sets how long each later request waits for its reply.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }

    /// How long a request waits for its reply.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Lines the server pushed, and any id-null reply no
    /// [`LineClient::send_raw`] was waiting for. The channel disconnects
    /// once the connection has ended and it is drained.
    pub fn pushed(&self) -> &Receiver<Value> {
        &self.pushed
    }

    /// Pushed lines dropped because the channel was full.
    pub fn dropped_pushed(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The id the next [`LineClient::call`] will use.
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its reply. `req` must be a JSON object;
    /// its id is set to a fresh one (any id it had is replaced).
    pub fn call(&self, mut req: Value) -> Result<Value, CallError> {
        let obj = req.as_object_mut().ok_or(CallError::NotAnObject)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        obj.insert(self.id_field.into(), Value::from(id));
        self.exchange(Route::Id(id), &line_of(&req))
    }

    /// Sends a request as given when it carries a u64 id (for tests of the
    /// server's id handling, and for command lines that name their own id),
    /// else like [`LineClient::call`]. Fails with [`CallError::IdInUse`] if
    /// another request is waiting on that id. Fresh ids of later calls are
    /// above every id given here.
    pub fn call_keeping_id(&self, req: Value) -> Result<Value, CallError> {
        if !req.is_object() {
            return Err(CallError::NotAnObject);
        }
        match req.get(self.id_field).and_then(Value::as_u64) {
            Some(id) => {
                self.next_id
                    .fetch_max(id.saturating_add(1), Ordering::Relaxed);
                self.exchange(Route::Id(id), &line_of(&req))
            }
            None => self.call(req),
        }
    }

    /// Sends `line` as is (a `\n` is appended unless it ends with one) and
    /// waits for the next reply whose id is null — what the server sends
    /// for a line it cannot read an id from. For malformed-input tests; a
    /// line the server *can* read an id from gets a routed reply instead,
    /// and this call times out.
    pub fn send_raw(&self, line: &[u8]) -> Result<Value, CallError> {
        let mut bytes = line.to_vec();
        if bytes.last() != Some(&b'\n') {
            bytes.push(b'\n');
        }
        self.exchange(Route::IdNull, &bytes)
    }

    fn exchange(&self, route: Route, line: &[u8]) -> Result<Value, CallError> {
        let (tx, rx) = bounded(1);
        {
            // Register and write under the writer lock, so id-null waiters
            // queue in the order their lines reach the server.
            let mut w = lock(&self.writer);
            {
                let mut r = lock(&self.routes);
                if let Some(c) = &r.closed {
                    return Err(c.clone().into());
                }
                match route {
                    Route::Id(id) => {
                        if r.by_id.contains_key(&id) {
                            return Err(CallError::IdInUse(id));
                        }
                        r.by_id.insert(id, tx.clone());
                    }
                    Route::IdNull => r.id_null.push_back(tx.clone()),
                }
            }
            if let Err(e) = w.write_all(line) {
                drop(w);
                self.unregister(route, &tx);
                return Err(CallError::Send(e));
            }
        }
        let after = self.timeout();
        match rx.recv_timeout(after) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(closed)) => Err(closed.into()),
            Err(RecvTimeoutError::Timeout) => {
                self.unregister(route, &tx);
                Err(CallError::Timeout {
                    id: match route {
                        Route::Id(id) => Some(id),
                        Route::IdNull => None,
                    },
                    after,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Lost {
                reason: "the reader thread ended".into(),
            }),
        }
    }

    fn unregister(&self, route: Route, tx: &Waiter) {
        let mut r = lock(&self.routes);
        match route {
            Route::Id(id) => {
                if r.by_id.get(&id).is_some_and(|w| w.same_channel(tx)) {
                    r.by_id.remove(&id);
                }
            }
            Route::IdNull => r.id_null.retain(|w| !w.same_channel(tx)),
        }
    }
}

impl Drop for LineClient {
    fn drop(&mut self) {
        // Unblocks the reader's read; it then fails any waiter and exits.
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl std::fmt::Debug for LineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineClient")
            .field("peer", &self.peer)
            .finish()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn line_of(v: &Value) -> Vec<u8> {
    let mut s = v.to_string();
    s.push('\n');
    s.into_bytes()
}

/// The pushed channel's sending side: drops (and counts) the oldest entry
/// when full rather than blocking the reader.
struct PushedQueue {
    tx: Sender<Value>,
    rx: Receiver<Value>,
    dropped: Arc<AtomicU64>,
}

impl PushedQueue {
    fn push(&self, mut v: Value) {
        loop {
            match self.tx.try_send(v) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    v = back;
                    if self.rx.try_recv().is_ok() {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The reader thread: routes every line until the connection ends, then
/// fails every waiter with the reason.
fn read_loop(stream: TcpStream, id_field: &str, routes: &Mutex<Routes>, pushed: &PushedQueue) {
    let shut = stream.try_clone();
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    let closed = loop {
        if let Err(c) = read_line(&mut r, &mut buf) {
            break c;
        }
        if let Err(reason) = route(&buf, id_field, routes, pushed) {
            break Closed::BadLine(reason);
        }
    };
    if matches!(closed, Closed::BadLine(_)) {
        if let Ok(s) = shut {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    let (by_id, id_null) = {
        let mut r = lock(routes);
        r.closed = Some(closed.clone());
        (std::mem::take(&mut r.by_id), std::mem::take(&mut r.id_null))
    };
    for w in by_id.into_values().chain(id_null) {
        let _ = w.try_send(Err(closed.clone()));
    }
}

/// One line into `buf`, without its `\n`.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<(), Closed> {
    buf.clear();
    let limit = u64::try_from(MAX_REPLY_LINE).unwrap_or(u64::MAX) + 1;
    let n = r
        .by_ref()
        .take(limit)
        .read_until(b'\n', buf)
        .map_err(|e| Closed::Lost(format!("reading: {e}")))?;
    if n == 0 {
        return Err(Closed::Lost("the server closed the connection".into()));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(());
    }
    if buf.len() > MAX_REPLY_LINE {
        Err(Closed::BadLine(format!(
            "a line longer than {MAX_REPLY_LINE} bytes"
        )))
    } else {
        Err(Closed::Lost(
            "the server closed the connection in the middle of a line".into(),
        ))
    }
}

/// Routes one line; `Err` when it cannot be routed.
fn route(
    line: &[u8],
    id_field: &str,
    routes: &Mutex<Routes>,
    pushed: &PushedQueue,
) -> Result<(), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(line.get(..200).unwrap_or(line))
        )
    })?;
    let Value::Object(obj) = &v else {
        return Err(format!("not a JSON object: {v}"));
    };
    let target = match obj.get(id_field) {
        Some(Value::Null) => Route::IdNull,
        None if obj.contains_key("status") => Route::IdNull,
        None => {
            pushed.push(v);
            return Ok(());
        }
        Some(x) => Route::Id(
            x.as_u64()
                .ok_or_else(|| format!("{id_field} is neither a u64 nor null: {x}"))?,
        ),
    };
    let waiter = {
        let mut r = lock(routes);
        match target {
            Route::Id(id) => r.by_id.remove(&id),
            Route::IdNull => r.id_null.pop_front(),
        }
    };
    match (waiter, target) {
        (Some(w), _) => {
            let _ = w.try_send(Ok(v));
        }
        // Nobody asked: an id-null reply is still worth showing.
        (None, Route::IdNull) => pushed.push(v),
        // The caller gave up (timed out); its reply is dropped.
        (None, Route::Id(_)) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Framing and routing against a fake server on a local TcpListener
    //! (smbl/1-shaped lines; nfsl/1 differs only in the id field).

    use super::*;
    use serde_json::json;
    use std::net::TcpListener;
    use std::time::Instant;

    /// A fake server: accepts one connection and runs `script` on it.
    fn fake(
        script: impl FnOnce(BufReader<TcpStream>, TcpStream) + Send + 'static,
    ) -> (SocketAddr, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port (test setup)");
        let addr = l.local_addr().expect("a bound listener has an address");
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("the test client connects");
            let w = s.try_clone().expect("cloning a TcpStream");
            script(BufReader::new(s), w);
        });
        (addr, t)
    }

    fn recv_line(r: &mut BufReader<TcpStream>) -> Value {
        let mut l = String::new();
        r.read_line(&mut l).expect("reading a request line");
        serde_json::from_str(&l).expect("the client sends JSON")
    }

    /// Reads until the client closes the connection.
    fn wait_close(r: &mut BufReader<TcpStream>) {
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
    }

    fn send(w: &mut TcpStream, v: Value) {
        w.write_all(format!("{v}\n").as_bytes())
            .expect("writing a reply line");
    }

    #[test]
    fn replies_out_of_order_reach_their_callers() {
        let (addr, server) = fake(|mut r, mut w| {
            let a = recv_line(&mut r);
            let b = recv_line(&mut r);
            // Answer the second first.
            for req in [b, a] {
                send(
                    &mut w,
                    json!({"mid": req["mid"], "status": "STATUS_SUCCESS", "tag": req["tag"]}),
                );
            }
            wait_close(&mut r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        c.set_timeout(Duration::from_secs(10));
        std::thread::scope(|s| {
            let c = &c;
            let calls: Vec<_> = ["one", "two"]
                .into_iter()
                .map(|tag| s.spawn(move || (tag, c.call(json!({"cmd": "ECHO", "tag": tag})))))
                .collect();
            for t in calls {
                let (tag, r) = t.join().expect("caller thread");
                let r = r.expect("a reply");
                assert_eq!(r["tag"], json!(tag), "{r}");
                assert_eq!(r["status"], "STATUS_SUCCESS");
            }
        });
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn a_pushed_line_goes_to_the_channel_and_the_reply_to_the_caller() {
        let (addr, server) = fake(|mut r, mut w| {
            let req = recv_line(&mut r);
            send(
                &mut w,
                json!({"cmd": "LEASE_BREAK", "lease_key": "k", "new_state": "R"}),
            );
            send(
                &mut w,
                json!({"mid": req["mid"], "status": "STATUS_SHARING_VIOLATION"}),
            );
            wait_close(&mut r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        let r = c.call(json!({"cmd": "ECHO"})).expect("a reply");
        // A failure status is a reply, not an Err.
        assert_eq!(r["status"], "STATUS_SHARING_VIOLATION");
        let n = c
            .pushed()
            .recv_timeout(Duration::from_secs(10))
            .expect("the LEASE_BREAK");
        assert_eq!(n["cmd"], "LEASE_BREAK");
        assert_eq!(n["new_state"], "R");
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn dropped_connection_fails_pending_calls_at_once() {
        let (addr, server) = fake(|mut r, w| {
            // Two requests (one JSON, one raw), then hang up.
            let mut l = String::new();
            r.read_line(&mut l).expect("first line");
            l.clear();
            r.read_line(&mut l).expect("second line");
            drop(w);
            drop(r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        c.set_timeout(Duration::from_secs(30));
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let c = &c;
            let a = s.spawn(move || c.call(json!({"cmd": "ECHO"})));
            let b = s.spawn(move || c.send_raw(b"garbage"));
            for t in [a, b] {
                let e = t.join().expect("caller thread");
                assert!(matches!(e, Err(CallError::Lost { .. })), "{e:?}");
            }
        });
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waited out the timeout"
        );
        // Later calls fail the same way, without writing.
        assert!(matches!(
            c.call(json!({"cmd": "ECHO"})),
            Err(CallError::Lost { .. })
        ));
        server.join().expect("fake server");
    }

    #[test]
    fn raw_line_gets_the_id_null_reply_and_pushed_lines_stay_apart() {
        let (addr, server) = fake(|mut r, mut w| {
            let mut l = String::new();
            r.read_line(&mut l).expect("raw line");
            assert_eq!(l, "{not json\n");
            send(&mut w, json!({"cmd": "LEASE_BREAK", "lease_key": "k"}));
            send(
                &mut w,
                json!({"mid": null, "status": "STATUS_INVALID_PARAMETER", "error": "not JSON"}),
            );
            // An unsolicited mid-null reply is shown as a notification.
            send(
                &mut w,
                json!({"mid": null, "status": "STATUS_INVALID_PARAMETER"}),
            );
            wait_close(&mut r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        let r = c.send_raw(b"{not json").expect("a reply");
        assert_eq!(r["status"], "STATUS_INVALID_PARAMETER");
        assert!(r["mid"].is_null());
        let n = c.pushed();
        let first = n
            .recv_timeout(Duration::from_secs(10))
            .expect("LEASE_BREAK");
        assert_eq!(first["cmd"], "LEASE_BREAK");
        let second = n
            .recv_timeout(Duration::from_secs(10))
            .expect("stray reply");
        assert_eq!(second["status"], "STATUS_INVALID_PARAMETER");
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn bad_json_from_the_server_fails_the_caller_and_closes() {
        let (addr, server) = fake(|mut r, mut w| {
            let _ = recv_line(&mut r);
            w.write_all(b"{\"mid\": 1, oops\n").expect("write");
            // The client shuts the connection down: EOF here.
            let mut rest = String::new();
            let _ = r.read_line(&mut rest);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        c.set_timeout(Duration::from_secs(30));
        assert!(matches!(
            c.call(json!({"cmd": "ECHO"})),
            Err(CallError::BadLine { .. })
        ));
        assert!(matches!(
            c.call(json!({"cmd": "ECHO"})),
            Err(CallError::BadLine { .. })
        ));
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn timeout_then_late_reply_is_discarded() {
        let (addr, server) = fake(|mut r, mut w| {
            let first = recv_line(&mut r);
            let second = recv_line(&mut r);
            // Reply late to the first (its caller has given up), then to the second.
            send(
                &mut w,
                json!({"mid": first["mid"], "status": "STATUS_SUCCESS", "tag": "late"}),
            );
            send(
                &mut w,
                json!({"mid": second["mid"], "status": "STATUS_SUCCESS", "tag": "second"}),
            );
            wait_close(&mut r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        c.set_timeout(Duration::from_millis(200));
        assert!(matches!(
            c.call(json!({"cmd": "ECHO"})),
            Err(CallError::Timeout { id: Some(1), .. })
        ));
        c.set_timeout(Duration::from_secs(10));
        let r = c.call(json!({"cmd": "ECHO"})).expect("second reply");
        assert_eq!(r["tag"], json!("second"));
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn call_keeping_id_sends_the_given_id() {
        let (addr, server) = fake(|mut r, mut w| {
            let req = recv_line(&mut r);
            assert_eq!(req["mid"], 777);
            send(&mut w, json!({"mid": 777, "status": "STATUS_SUCCESS"}));
            wait_close(&mut r);
        });
        let c = LineClient::connect(addr, "mid", "test").expect("connect");
        let r = c
            .call_keeping_id(json!({"cmd": "ECHO", "mid": 777}))
            .expect("reply");
        assert_eq!(r["mid"], 777);
        assert!(matches!(c.call(json!([1])), Err(CallError::NotAnObject)));
        assert_eq!(c.next_id(), 778);
        drop(c);
        server.join().expect("fake server");
    }
}
