//! The connection: shimline's line client ([`shimline::client::LineClient`]:
//! framing, `xid` assignment, routing replies by `xid` — read by the
//! calling thread when no other call reads, by an idle reader thread
//! between calls — and queuing what the server pushes) with nfsl's errors. The
//! routing rules, the bounded pushed queue (oldest dropped and counted,
//! never silently) and their tests live there, once for both protocols.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::Value;
use shimline::client::LineClient;

use crate::{Error, Reply};

/// How long a request waits for its reply unless [`Client::set_timeout`]
/// says otherwise.
pub const DEFAULT_TIMEOUT: Duration = shimline::client::DEFAULT_TIMEOUT;
/// Longest line accepted from the server; a longer one closes the
/// connection as [`Error::BadReply`].
pub const MAX_LINE: usize = shimline::client::MAX_REPLY_LINE;
/// Callbacks kept for the application; when it does not keep up the
/// oldest are dropped (and counted, [`Client::dropped_callbacks`]).
pub const CALLBACK_QUEUE: usize = shimline::client::PUSHED_QUEUE;

/// One nfsl/1 connection, shareable by threads (`&self` everywhere).
#[derive(Debug)]
pub struct Client {
    conn: LineClient,
}

impl Client {
    /// Connects (trying each address in turn) and starts the reader thread.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, Error> {
        Ok(Client {
            conn: LineClient::connect(addr, "xid", "nfsl")?,
        })
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.conn.peer_addr()
    }

    /// Sets how long each later request waits for its reply.
    pub fn set_timeout(&self, timeout: Duration) {
        self.conn.set_timeout(timeout)
    }

    /// How long a request waits for its reply.
    pub fn timeout(&self) -> Duration {
        self.conn.timeout()
    }

    /// Server callbacks (`CB_RECALL`), and any `xid`-null reply no
    /// [`Client::send_raw`] was waiting for. The channel disconnects once
    /// the connection has ended and it is drained.
    pub fn callbacks(&self) -> &Receiver<Value> {
        self.conn.pushed()
    }

    /// Entries dropped from that channel because it was full.
    pub fn dropped_callbacks(&self) -> u64 {
        self.conn.dropped_pushed()
    }

    /// Sends a request and waits for its reply. `req` must be a JSON object;
    /// its `xid` is set to a fresh one (any `xid` it had is replaced).
    pub fn call(&self, req: Value) -> Result<Reply, Error> {
        Ok(Reply::new(self.conn.call(req)?))
    }

    /// Sends a request as given when it carries a u64 `xid`, else like
    /// [`Client::call`]. Fails with [`Error::XidInUse`] if another request is
    /// waiting on that `xid`. Fresh `xid`s of later calls are above every
    /// `xid` given here.
    pub fn call_keeping_xid(&self, req: Value) -> Result<Reply, Error> {
        Ok(Reply::new(self.conn.call_keeping_id(req)?))
    }

    /// Sends the line `write` writes for a fresh `xid` and returns the
    /// reply's line (see [`shimline::client::LineClient::call_line`]).
    pub(crate) fn call_line(
        &self,
        write: impl FnOnce(u64, &mut Vec<u8>),
    ) -> Result<Vec<u8>, Error> {
        Ok(self.conn.call_line(write)?)
    }

    /// A reply line as a JSON tree (a line that is not ends the connection).
    pub(crate) fn value_of(&self, line: &[u8]) -> Result<Value, Error> {
        Ok(self.conn.value_of(line)?)
    }

    /// Sends `line` as is (a `\n` is appended unless it ends with one) and
    /// waits for the next reply whose `xid` is null (malformed-input tests).
    pub fn send_raw(&self, line: &[u8]) -> Result<Reply, Error> {
        Ok(Reply::new(self.conn.send_raw(line)?))
    }
}

impl From<shimline::client::CallError> for Error {
    fn from(e: shimline::client::CallError) -> Error {
        use shimline::client::CallError as C;
        match e {
            C::Connect(e) => Error::Connect(e),
            C::Send(e) => Error::Send(e),
            C::Lost { reason } => Error::ConnectionLost { reason },
            C::BadLine { reason } => Error::BadReply { reason },
            C::Timeout { id, after } => Error::Timeout { xid: id, after },
            C::NotAnObject => Error::NotAnObject,
            C::IdInUse(id) => Error::XidInUse(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fake, recv_line, wait_close};
    use serde_json::json;

    #[test]
    fn line_client_failures_become_nfsl_errors() {
        let (addr, server) = fake(|mut r, _w| {
            let _ = recv_line(&mut r);
            wait_close(&mut r);
        });
        let c = Client::connect(addr).expect("connect");
        c.set_timeout(Duration::from_millis(100));
        let r = c.call(json!({"op": "RECLAIM_COMPLETE"}));
        assert!(
            matches!(r, Err(Error::Timeout { xid: Some(1), .. })),
            "{r:?}"
        );
        assert!(matches!(c.call(json!([1])), Err(Error::NotAnObject)));
        drop(c);
        server.join().expect("fake server");
    }
}
