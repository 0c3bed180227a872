//! The connection: framing (one JSON object per line), `xid` assignment, and
//! the reader thread that routes every line the server sends.
//!
//! Routing, by what the line carries:
//! - a u64 `xid`: the reply to the request with that xid, handed to the
//!   caller waiting in [`Client::call`] (dropped if that caller timed out);
//! - `"xid": null`, or a `status` and no `xid`: the reply to a line the
//!   server could not read an xid from, handed to the oldest waiting
//!   [`Client::send_raw`]; with none waiting it goes to the callback
//!   channel, so nothing the server says is lost silently;
//! - no `xid` and no `status` (`CB_RECALL`): a callback.
//!
//! A waiter registers before its line is written, under the writer lock, so
//! the queue of `send_raw` waiters is in the order the server sees the
//! lines. When the connection ends, every waiter gets the reason at once; no
//! call waits out its timeout on a dead connection.

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
/// Longest line accepted from the server (a READ of the server's 4 MiB
/// line limit is ~5.6 MiB of base64); a longer one closes the connection
/// as [`Error::BadReply`].
pub const MAX_LINE: usize = 16 << 20;
/// Callbacks kept for the application; when it does not keep up the oldest
/// are dropped (and counted, [`Client::dropped_callbacks`]), so an unread
/// channel never stalls reply routing.
pub const CALLBACK_QUEUE: usize = 1024;

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
    by_xid: HashMap<u64, Waiter>,
    xid_null: VecDeque<Waiter>,
    closed: Option<Closed>,
}

/// Which reply a waiter waits for.
#[derive(Clone, Copy)]
enum Route {
    Xid(u64),
    XidNull,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single insert/remove/take; a panic
    // in one cannot leave the routes half-updated, so a poisoned lock is
    // still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One nfsl/1 connection, shareable by threads (`&self` everywhere).
pub struct Client {
    writer: Mutex<TcpStream>,
    routes: Arc<Mutex<Routes>>,
    next_xid: AtomicU64,
    timeout_ms: AtomicU64,
    callbacks: Receiver<Value>,
    dropped: Arc<AtomicU64>,
    peer: SocketAddr,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    /// Connects (trying each address in turn) and starts the reader thread.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, Error> {
        let stream = TcpStream::connect(addr).map_err(Error::Connect)?;
        // A request is one small write; Nagle must not hold it back behind
        // an unacknowledged earlier one.
        stream.set_nodelay(true).map_err(Error::Connect)?;
        let peer = stream.peer_addr().map_err(Error::Connect)?;
        let read_half = stream.try_clone().map_err(Error::Connect)?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (ctx, crx) = bounded(CALLBACK_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reader = {
            let callbacks = CallbackQueue {
                tx: ctx,
                rx: crx.clone(),
                dropped: dropped.clone(),
            };
            let routes = routes.clone();
            std::thread::Builder::new()
                .name(format!("nfsl-reader-{peer}"))
                .spawn(move || read_loop(read_half, &routes, &callbacks))
                .map_err(Error::Connect)?
        };
        Ok(Client {
            writer: Mutex::new(stream),
            routes,
            next_xid: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(millis(DEFAULT_TIMEOUT)),
            callbacks: crx,
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

    /// Server callbacks (`CB_RECALL`), and any `xid`-null reply no
    /// [`Client::send_raw`] was waiting for. The channel disconnects once
    /// the connection has ended and it is drained.
    pub fn callbacks(&self) -> &Receiver<Value> {
        &self.callbacks
    }

    /// Callbacks dropped because the channel was full.
    pub fn dropped_callbacks(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its reply. `req` must be a JSON object;
    /// its `xid` is set to a fresh one (any `xid` it had is replaced).
    pub fn call(&self, mut req: Value) -> Result<Reply, Error> {
        let obj = req.as_object_mut().ok_or(Error::NotAnObject)?;
        let xid = self.next_xid.fetch_add(1, Ordering::Relaxed);
        obj.insert("xid".into(), Value::from(xid));
        self.exchange(Route::Xid(xid), &line_of(&req))
    }

    /// Sends a request as given when it carries a u64 `xid` (for tests of
    /// the server's xid handling, and for `nfsshim client` lines that name
    /// their own xid), else like [`Client::call`]. Fails with
    /// [`Error::XidInUse`] if another request is waiting on that xid. Fresh
    /// xids of later [`Client::call`]s are above every xid given here.
    pub fn call_keeping_xid(&self, req: Value) -> Result<Reply, Error> {
        if !req.is_object() {
            return Err(Error::NotAnObject);
        }
        match req.get("xid").and_then(Value::as_u64) {
            Some(xid) => {
                // Later fresh xids stay clear of the ones callers chose.
                self.next_xid
                    .fetch_max(xid.saturating_add(1), Ordering::Relaxed);
                self.exchange(Route::Xid(xid), &line_of(&req))
            }
            None => self.call(req),
        }
    }

    /// Sends `line` as is (a `\n` is appended unless it ends with one) and
    /// waits for the next reply whose `xid` is null — what the server sends
    /// for a line it cannot read an xid from (not JSON, not an object, a bad
    /// or missing `xid`, too long). For malformed-input tests; a line the
    /// server *can* read an xid from gets a routed reply instead, and this
    /// call times out.
    pub fn send_raw(&self, line: &[u8]) -> Result<Reply, Error> {
        let mut bytes = line.to_vec();
        if bytes.last() != Some(&b'\n') {
            bytes.push(b'\n');
        }
        self.exchange(Route::XidNull, &bytes)
    }

    fn exchange(&self, route: Route, line: &[u8]) -> Result<Reply, Error> {
        let (tx, rx) = bounded(1);
        {
            // Register and write under the writer lock, so xid-null waiters
            // queue in the order their lines reach the server.
            let mut w = lock(&self.writer);
            {
                let mut r = lock(&self.routes);
                if let Some(c) = &r.closed {
                    return Err(c.clone().into());
                }
                match route {
                    Route::Xid(xid) => {
                        if r.by_xid.contains_key(&xid) {
                            return Err(Error::XidInUse(xid));
                        }
                        r.by_xid.insert(xid, tx.clone());
                    }
                    Route::XidNull => r.xid_null.push_back(tx.clone()),
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
                    xid: match route {
                        Route::Xid(x) => Some(x),
                        Route::XidNull => None,
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
            Route::Xid(xid) => {
                if r.by_xid.get(&xid).is_some_and(|w| w.same_channel(tx)) {
                    r.by_xid.remove(&xid);
                }
            }
            Route::XidNull => r.xid_null.retain(|w| !w.same_channel(tx)),
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

/// The callback channel's sending side, which drops the oldest entry when
/// full rather than blocking the reader.
struct CallbackQueue {
    tx: Sender<Value>,
    rx: Receiver<Value>,
    dropped: Arc<AtomicU64>,
}

impl CallbackQueue {
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
fn read_loop(stream: TcpStream, routes: &Mutex<Routes>, callbacks: &CallbackQueue) {
    let shut = stream.try_clone();
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    let closed = loop {
        if let Err(c) = read_line(&mut r, &mut buf) {
            break c;
        }
        if let Err(reason) = route(&buf, routes, callbacks) {
            break Closed::BadLine(reason);
        }
    };
    if matches!(closed, Closed::BadLine(_)) {
        if let Ok(s) = shut {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    let (by_xid, xid_null) = {
        let mut r = lock(routes);
        r.closed = Some(closed.clone());
        (
            std::mem::take(&mut r.by_xid),
            std::mem::take(&mut r.xid_null),
        )
    };
    for w in by_xid.into_values().chain(xid_null) {
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
fn route(line: &[u8], routes: &Mutex<Routes>, callbacks: &CallbackQueue) -> Result<(), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(line.get(..200).unwrap_or(line))
        )
    })?;
    let Value::Object(obj) = &v else {
        return Err(format!("not a JSON object: {v}"));
    };
    let target = match obj.get("xid") {
        Some(Value::Null) => Route::XidNull,
        None if obj.contains_key("status") => Route::XidNull,
        None => {
            callbacks.push(v);
            return Ok(());
        }
        Some(x) => Route::Xid(
            x.as_u64()
                .ok_or_else(|| format!("xid is neither a u64 nor null: {x}"))?,
        ),
    };
    let waiter = {
        let mut r = lock(routes);
        match target {
            Route::Xid(xid) => r.by_xid.remove(&xid),
            Route::XidNull => r.xid_null.pop_front(),
        }
    };
    match (waiter, target) {
        (Some(w), _) => {
            let _ = w.try_send(Ok(v));
        }
        // Nobody asked: an xid-null reply is still worth showing.
        (None, Route::XidNull) => callbacks.push(v),
        // The caller gave up (timed out); its reply is dropped.
        (None, Route::Xid(_)) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Framing and routing against a fake server on a local TcpListener.

    use super::*;
    use crate::testing::{fake, recv_line, send, wait_close};
    use serde_json::json;
    use std::time::Instant;

    #[test]
    fn replies_out_of_order_reach_their_callers() {
        let (addr, server) = fake(|mut r, mut w| {
            let a = recv_line(&mut r);
            let b = recv_line(&mut r);
            // Answer the second first.
            for req in [b, a] {
                send(
                    &mut w,
                    json!({"xid": req["xid"], "status": "NFS4_OK", "tag": req["tag"]}),
                );
            }
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        c.set_timeout(Duration::from_secs(10));
        std::thread::scope(|s| {
            let c = &c;
            let calls: Vec<_> = ["one", "two"]
                .into_iter()
                .map(|tag| s.spawn(move || (tag, c.call(json!({"op": "ECHO", "tag": tag})))))
                .collect();
            for t in calls {
                let (tag, r) = t.join().unwrap();
                let r = r.unwrap();
                assert_eq!(r.get("tag"), Some(&json!(tag)), "{r}");
                assert!(r.is_ok());
            }
        });
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn cb_recall_goes_to_the_channel_and_the_reply_to_the_caller() {
        let (addr, server) = fake(|mut r, mut w| {
            let req = recv_line(&mut r);
            send(
                &mut w,
                json!({"op": "CB_RECALL", "stateid": {"other": "d1", "seqid": 1}}),
            );
            send(
                &mut w,
                json!({"xid": req["xid"], "status": "NFS4ERR_DELAY"}),
            );
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        let r = c.call(json!({"op": "OPEN"})).unwrap();
        // A failure status is a reply, not an Err.
        assert_eq!(r.status(), "NFS4ERR_DELAY");
        let cb = c.callbacks().recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(cb["op"], "CB_RECALL");
        assert_eq!(
            crate::StateId::from_json(&cb["stateid"]).map(|s| s.other),
            Some("d1".to_owned())
        );
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn dropped_connection_fails_pending_calls_at_once() {
        let (addr, server) = fake(|mut r, w| {
            // Two requests (one JSON, one raw), then hang up.
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            l.clear();
            r.read_line(&mut l).unwrap();
            drop(w);
            drop(r);
        });
        let c = Client::connect(addr).unwrap();
        c.set_timeout(Duration::from_secs(30));
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let c = &c;
            let a = s.spawn(move || c.call(json!({"op": "READ"})));
            let b = s.spawn(move || c.send_raw(b"garbage"));
            for t in [a, b] {
                let e = t.join().unwrap();
                assert!(matches!(e, Err(Error::ConnectionLost { .. })), "{e:?}");
            }
        });
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waited out the timeout"
        );
        // Later calls fail the same way, without writing.
        assert!(matches!(
            c.call(json!({"op": "READ"})),
            Err(Error::ConnectionLost { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn raw_line_gets_the_xid_null_reply_and_callbacks_stay_apart() {
        let (addr, server) = fake(|mut r, mut w| {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert_eq!(l, "{not json\n");
            send(
                &mut w,
                json!({"op": "CB_RECALL", "stateid": {"other": "d", "seqid": 1}}),
            );
            send(
                &mut w,
                json!({"xid": null, "status": "NFS4ERR_INVAL", "error": "not JSON"}),
            );
            // An unsolicited xid-null reply is shown on the callback channel.
            send(&mut w, json!({"xid": null, "status": "NFS4ERR_INVAL"}));
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        let r = c.send_raw(b"{not json").unwrap();
        assert_eq!(r.status(), "NFS4ERR_INVAL");
        assert_eq!(r.xid(), None);
        let cb = c.callbacks();
        let first = cb.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first["op"], "CB_RECALL");
        let second = cb.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(second["status"], "NFS4ERR_INVAL");
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn bad_json_from_the_server_fails_the_caller_and_closes() {
        let (addr, server) = fake(|mut r, mut w| {
            let _ = recv_line(&mut r);
            w.write_all(b"{\"xid\": 1, oops\n").unwrap();
            // The client shuts the connection down: EOF here.
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        c.set_timeout(Duration::from_secs(30));
        let echo = || c.call(json!({"op": "ECHO"}));
        assert!(matches!(echo(), Err(Error::BadReply { .. })));
        assert!(matches!(echo(), Err(Error::BadReply { .. })));
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn call_keeping_xid_sends_the_given_xid() {
        let (addr, server) = fake(|mut r, mut w| {
            let req = recv_line(&mut r);
            assert_eq!(req["xid"], 777);
            send(&mut w, json!({"xid": 777, "status": "NFS4_OK"}));
            let req = recv_line(&mut r);
            send(&mut w, json!({"xid": req["xid"], "status": "NFS4_OK"}));
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        let r = c
            .call_keeping_xid(json!({"op": "RECLAIM_COMPLETE", "xid": 777}))
            .unwrap();
        assert_eq!(r.xid(), Some(777));
        let next = c
            .call_keeping_xid(json!({"op": "RECLAIM_COMPLETE"}))
            .unwrap();
        assert_eq!(next.xid(), Some(778), "fresh xids stay above given ones");
        assert!(matches!(
            c.call_keeping_xid(json!([1])),
            Err(Error::NotAnObject)
        ));
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn timeout_then_late_reply_is_discarded() {
        let (addr, server) = fake(|mut r, mut w| {
            let first = recv_line(&mut r);
            let second = recv_line(&mut r);
            // Reply late to the first (its caller has given up), then to the second.
            send(
                &mut w,
                json!({"xid": first["xid"], "status": "NFS4_OK", "tag": "late"}),
            );
            send(
                &mut w,
                json!({"xid": second["xid"], "status": "NFS4_OK", "tag": "second"}),
            );
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        c.set_timeout(Duration::from_millis(200));
        assert!(matches!(
            c.call(json!({"op": "ECHO"})),
            Err(Error::Timeout { xid: Some(1), .. })
        ));
        c.set_timeout(Duration::from_secs(10));
        let r = c.call(json!({"op": "ECHO", "xid": 99})).unwrap();
        assert_eq!(r.get("tag"), Some(&json!("second")));
        assert_eq!(r.xid(), Some(2), "call replaces a caller's xid");
        assert!(matches!(c.call(json!([1])), Err(Error::NotAnObject)));
        drop(c);
        server.join().unwrap();
    }
}
