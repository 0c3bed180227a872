//! The connection: framing (one JSON object per line), `mid` assignment, and
//! the reader thread that routes every line the server sends.
//!
//! Routing, by what the line carries:
//! - a u64 `mid`: the reply to the request with that mid, handed to the
//!   caller waiting in [`Client::call`] (dropped if that caller timed out);
//! - `"mid": null`, or a `status` and no `mid`: the reply to a line the
//!   server could not read a mid from, handed to the oldest waiting
//!   [`Client::send_raw`]; with none waiting it goes to the notification
//!   channel, so nothing the server says is lost silently;
//! - no `mid` and no `status` (`LEASE_BREAK`): a notification.
//!
//! A waiter registers before its line is written, under the writer lock, so
//! the FIFO of `send_raw` waiters is in the order the server sees the lines.
//! When the connection ends, every waiter gets the reason at once; no call
//! waits out its timeout on a dead connection.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::Value;

use crate::{Error, Reply};

/// How long a request waits for its reply unless [`Client::set_timeout`]
/// says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line accepted from the server (a 4 MiB READ is ~5.6 MiB of
/// base64); a longer one closes the connection as [`Error::BadReply`].
pub const MAX_LINE: usize = 16 << 20;
/// Notifications kept for the application; when it does not keep up the
/// oldest are dropped (and counted, [`Client::dropped_notifications`]), so
/// an unread channel never stalls reply routing.
pub const NOTIFICATION_QUEUE: usize = 1024;

/// Why the connection ended, handed to every waiter.
#[derive(Debug, Clone)]
enum Closed {
    Lost(String),
    BadLine(String),
}

impl From<Closed> for Error {
    fn from(c: Closed) -> Error {
        match c {
            Closed::Lost(reason) => Error::ConnectionLost { reason },
            Closed::BadLine(reason) => Error::BadReply { reason },
        }
    }
}

type Waiter = Sender<Result<Value, Closed>>;

/// Who is waiting for which reply.
#[derive(Default)]
struct Routes {
    by_mid: HashMap<u64, Waiter>,
    mid_null: VecDeque<Waiter>,
    closed: Option<Closed>,
}

/// Which reply a waiter waits for.
#[derive(Clone, Copy)]
enum Route {
    Mid(u64),
    MidNull,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single insert/remove; a panic in
    // one cannot leave the map half-updated, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One smbl/1 connection, shareable by threads (`&self` everywhere).
pub struct Client {
    writer: Mutex<TcpStream>,
    routes: Arc<Mutex<Routes>>,
    next_mid: AtomicU64,
    timeout_ms: AtomicU64,
    notifications: Receiver<Value>,
    dropped: Arc<AtomicU64>,
    peer: SocketAddr,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    /// Connects (trying each address in turn) and starts the reader thread.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, Error> {
        let stream = TcpStream::connect(addr).map_err(Error::Connect)?;
        // One request is one small write; do not let Nagle hold it back
        // behind an unacknowledged earlier one.
        stream.set_nodelay(true).map_err(Error::Connect)?;
        let peer = stream.peer_addr().map_err(Error::Connect)?;
        let read_half = stream.try_clone().map_err(Error::Connect)?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (ntx, nrx) = bounded(NOTIFICATION_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reader = {
            let (routes, nrx, dropped) = (routes.clone(), nrx.clone(), dropped.clone());
            std::thread::Builder::new()
                .name(format!("smbl-reader-{peer}"))
                .spawn(move || {
                    read_loop(
                        read_half,
                        &routes,
                        &Notifier {
                            tx: ntx,
                            rx: nrx,
                            dropped,
                        },
                    )
                })
                .map_err(Error::Connect)?
        };
        Ok(Client {
            writer: Mutex::new(stream),
            routes,
            next_mid: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(millis(DEFAULT_TIMEOUT)),
            notifications: nrx,
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

    /// Server notifications (`LEASE_BREAK`), and any `mid`-null reply no
    /// [`Client::send_raw`] was waiting for. The channel disconnects once
    /// the connection has ended and it is drained.
    pub fn notifications(&self) -> &Receiver<Value> {
        &self.notifications
    }

    /// Notifications dropped because the channel was full.
    pub fn dropped_notifications(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its reply. `req` must be a JSON object;
    /// its `mid` is set to a fresh one (any `mid` it had is replaced).
    pub fn call(&self, mut req: Value) -> Result<Reply, Error> {
        let obj = req.as_object_mut().ok_or(Error::NotAnObject)?;
        let mid = self.next_mid.fetch_add(1, Ordering::Relaxed);
        obj.insert("mid".into(), Value::from(mid));
        self.exchange(Route::Mid(mid), &line_of(&req))
    }

    /// Sends a request as given when it carries a u64 `mid` (for tests of
    /// the server's mid handling), else like [`Client::call`]. Fails with
    /// [`Error::MidInUse`] if another request is waiting on that mid. Fresh
    /// mids of later [`Client::call`]s are above every mid given here.
    pub fn call_keeping_mid(&self, req: Value) -> Result<Reply, Error> {
        match req.get("mid").and_then(Value::as_u64) {
            Some(mid) => {
                // Later fresh mids stay clear of the ones callers chose.
                self.next_mid
                    .fetch_max(mid.saturating_add(1), Ordering::Relaxed);
                self.exchange(Route::Mid(mid), &line_of(&req))
            }
            None => self.call(req),
        }
    }

    /// Sends `line` as is (a `\n` is appended unless it ends with one) and
    /// waits for the next reply whose `mid` is null — what the server sends
    /// for a line it cannot read a mid from (not JSON, not an object, a bad
    /// or missing `mid`, too long). For malformed-input tests; a line the
    /// server *can* read a mid from gets a routed reply instead, and this
    /// call times out.
    pub fn send_raw(&self, line: &[u8]) -> Result<Reply, Error> {
        let mut bytes = line.to_vec();
        if bytes.last() != Some(&b'\n') {
            bytes.push(b'\n');
        }
        self.exchange(Route::MidNull, &bytes)
    }

    fn exchange(&self, route: Route, line: &[u8]) -> Result<Reply, Error> {
        let (tx, rx) = bounded(1);
        {
            // Register and write under the writer lock, so mid-null waiters
            // queue in the order their lines reach the server.
            let mut w = lock(&self.writer);
            {
                let mut r = lock(&self.routes);
                if let Some(c) = &r.closed {
                    return Err(c.clone().into());
                }
                match route {
                    Route::Mid(mid) => {
                        if r.by_mid.contains_key(&mid) {
                            return Err(Error::MidInUse(mid));
                        }
                        r.by_mid.insert(mid, tx.clone());
                    }
                    Route::MidNull => r.mid_null.push_back(tx.clone()),
                }
            }
            if let Err(e) = w.write_all(line) {
                drop(w);
                self.unregister(route, &tx);
                return Err(Error::Send(e));
            }
        }
        let after = self.timeout();
        match rx.recv_timeout(after) {
            Ok(Ok(v)) => Ok(Reply::new(v)),
            Ok(Err(closed)) => Err(closed.into()),
            Err(RecvTimeoutError::Timeout) => {
                self.unregister(route, &tx);
                Err(Error::Timeout {
                    mid: match route {
                        Route::Mid(m) => Some(m),
                        Route::MidNull => None,
                    },
                    after,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::ConnectionLost {
                reason: "the reader thread ended".into(),
            }),
        }
    }

    fn unregister(&self, route: Route, tx: &Waiter) {
        let mut r = lock(&self.routes);
        match route {
            Route::Mid(mid) => {
                if r.by_mid.get(&mid).is_some_and(|w| w.same_channel(tx)) {
                    r.by_mid.remove(&mid);
                }
            }
            Route::MidNull => r.mid_null.retain(|w| !w.same_channel(tx)),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Unblocks the reader's read; it then fails any waiter and exits.
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("peer", &self.peer).finish()
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

/// The notification channel's sending side, which drops the oldest entry
/// when full rather than blocking the reader.
struct Notifier {
    tx: Sender<Value>,
    rx: Receiver<Value>,
    dropped: Arc<AtomicU64>,
}

impl Notifier {
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
fn read_loop(stream: TcpStream, routes: &Mutex<Routes>, notifier: &Notifier) {
    let shut = stream.try_clone();
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    let closed = loop {
        match read_line(&mut r, &mut buf) {
            Ok(()) => {}
            Err(c) => break c,
        }
        if let Err(reason) = route(&buf, routes, notifier) {
            break Closed::BadLine(reason);
        }
    };
    if matches!(closed, Closed::BadLine(_)) {
        if let Ok(s) = shut {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    let (by_mid, mid_null) = {
        let mut r = lock(routes);
        r.closed = Some(closed.clone());
        (
            std::mem::take(&mut r.by_mid),
            std::mem::take(&mut r.mid_null),
        )
    };
    for w in by_mid.into_values().chain(mid_null) {
        let _ = w.try_send(Err(closed.clone()));
    }
}

/// One line into `buf`, without its `\n`.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<(), Closed> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
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
    if buf.len() > MAX_LINE {
        Err(Closed::BadLine(format!(
            "a line longer than {MAX_LINE} bytes"
        )))
    } else {
        Err(Closed::Lost(
            "the server closed the connection in the middle of a line".into(),
        ))
    }
}

/// Routes one line; `Err` when it cannot be routed.
fn route(line: &[u8], routes: &Mutex<Routes>, notifier: &Notifier) -> Result<(), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(line.get(..200).unwrap_or(line))
        )
    })?;
    let Value::Object(obj) = &v else {
        return Err(format!("not a JSON object: {v}"));
    };
    let target = match obj.get("mid") {
        Some(Value::Null) => Route::MidNull,
        None if obj.contains_key("status") => Route::MidNull,
        None => {
            notifier.push(v);
            return Ok(());
        }
        Some(m) => Route::Mid(
            m.as_u64()
                .ok_or_else(|| format!("mid is neither a u64 nor null: {m}"))?,
        ),
    };
    let waiter = {
        let mut r = lock(routes);
        match target {
            Route::Mid(mid) => r.by_mid.remove(&mid),
            Route::MidNull => r.mid_null.pop_front(),
        }
    };
    match (waiter, target) {
        (Some(w), _) => {
            let _ = w.try_send(Ok(v));
        }
        // Nobody asked: a mid-null reply is still worth showing.
        (None, Route::MidNull) => notifier.push(v),
        // The caller gave up (timed out); its reply is dropped.
        (None, Route::Mid(_)) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Framing and routing against a fake server on a local TcpListener.

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
        let c = Client::connect(addr).expect("connect");
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
                assert_eq!(r.get("tag"), Some(&json!(tag)), "{r}");
                assert!(r.is_success());
            }
        });
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn notification_goes_to_the_channel_and_reply_to_the_caller() {
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
        let c = Client::connect(addr).expect("connect");
        let r = c.echo().expect("a reply");
        // A failure status is a reply, not an Err.
        assert_eq!(r.status(), "STATUS_SHARING_VIOLATION");
        let n = c
            .notifications()
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
        let c = Client::connect(addr).expect("connect");
        c.set_timeout(Duration::from_secs(30));
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let c = &c;
            let a = s.spawn(move || c.echo());
            let b = s.spawn(move || c.send_raw(b"garbage"));
            for t in [a, b] {
                let e = t.join().expect("caller thread");
                assert!(matches!(e, Err(Error::ConnectionLost { .. })), "{e:?}");
            }
        });
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waited out the timeout"
        );
        // Later calls fail the same way, without writing.
        assert!(matches!(c.echo(), Err(Error::ConnectionLost { .. })));
        server.join().expect("fake server");
    }

    #[test]
    fn raw_line_gets_the_mid_null_reply_and_notifications_stay_apart() {
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
        let c = Client::connect(addr).expect("connect");
        let r = c.send_raw(b"{not json").expect("a reply");
        assert_eq!(r.status(), "STATUS_INVALID_PARAMETER");
        assert_eq!(r.mid(), None);
        let n = c.notifications();
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
        let c = Client::connect(addr).expect("connect");
        c.set_timeout(Duration::from_secs(30));
        assert!(matches!(c.echo(), Err(Error::BadReply { .. })));
        assert!(matches!(c.echo(), Err(Error::BadReply { .. })));
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
        let c = Client::connect(addr).expect("connect");
        c.set_timeout(Duration::from_millis(200));
        assert!(matches!(c.echo(), Err(Error::Timeout { mid: Some(1), .. })));
        c.set_timeout(Duration::from_secs(10));
        let r = c.echo().expect("second reply");
        assert_eq!(r.get("tag"), Some(&json!("second")));
        drop(c);
        server.join().expect("fake server");
    }

    #[test]
    fn call_keeping_mid_sends_the_given_mid() {
        let (addr, server) = fake(|mut r, mut w| {
            let req = recv_line(&mut r);
            assert_eq!(req["mid"], 777);
            send(&mut w, json!({"mid": 777, "status": "STATUS_SUCCESS"}));
            wait_close(&mut r);
        });
        let c = Client::connect(addr).expect("connect");
        let r = c
            .call_keeping_mid(json!({"cmd": "ECHO", "mid": 777}))
            .expect("reply");
        assert_eq!(r.mid(), Some(777));
        assert!(matches!(c.call(json!([1])), Err(Error::NotAnObject)));
        assert_eq!(c.next_mid.load(Ordering::Relaxed), 778);
        drop(c);
        server.join().expect("fake server");
    }
}
