//! Transport, protocol and slot-table failures of a [`crate::Client`] or
//! [`crate::Session`]. A status other than `NFS4_OK` is not one of them: it
//! comes back as an ordinary [`crate::Reply`], since callers (tests above
//! all) inspect statuses.

use std::time::Duration;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the server failed.
    #[error("connecting to the nfsl/1 server")]
    Connect(#[source] std::io::Error),
    /// Writing the request to the connection failed.
    #[error("sending a request")]
    Send(#[source] std::io::Error),
    /// The connection is gone (closed by the server, a read error, or an
    /// earlier protocol failure); every pending and later request fails so.
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// What ended it.
        reason: String,
    },
    /// The server sent a line this client cannot route (not JSON, not an
    /// object, an `xid` that is neither a u64 nor null, or too long). The
    /// connection is closed: later replies could not be trusted either.
    #[error("bad line from the server: {reason}")]
    BadReply {
        /// What was wrong with it.
        reason: String,
    },
    /// No reply within the client's timeout ([`crate::Client::set_timeout`]).
    /// The connection stays usable; a late reply is discarded.
    #[error("no reply to xid {xid:?} within {after:?}")]
    Timeout {
        /// The request's xid (`None` for [`crate::Client::send_raw`]).
        xid: Option<u64>,
        /// The timeout that passed.
        after: Duration,
    },
    /// [`crate::Client::call_keeping_xid`] was given an `xid` that another
    /// request of this client is still waiting on. Nothing was sent.
    #[error("xid {0} is already waiting for a reply")]
    XidInUse(u64),
    /// The request given to [`crate::Client::call`] is not a JSON object.
    #[error("a request must be a JSON object")]
    NotAnObject,
    /// A [`crate::Session`] was asked for a slot beyond its slot table.
    /// Nothing was sent; build the `seq` with [`crate::Session::seq`] to send
    /// such a slot on purpose (an `NFS4ERR_BADSLOT` test).
    #[error("slot {slot} is outside the session's {slots} slots")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
        /// How many slots the session has.
        slots: usize,
    },
    /// [`crate::Session::resend`] on a slot that has sent nothing yet.
    #[error("slot {slot} has no request to re-send")]
    NothingToResend {
        /// The slot asked for.
        slot: u32,
    },
}
