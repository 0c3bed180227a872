//! nfsl — a small client for nfsl/1, the NFS-like protocol nfsshim serves
//! (docs/nfs-like.md; the contract is the shared spec `spec/nfs-like.md`).
//!
//! nfsl/1 is one JSON object per line over TCP. Requests carry `op` and a
//! client-chosen `xid`; every request gets exactly one reply with the same
//! `xid` and a `status`, in any order; the server also sends callbacks
//! (`{"op": "CB_RECALL", ...}`, no `xid`). Every op except EXCHANGE_ID,
//! CREATE_SESSION and DESTROY_CLIENTID carries a `seq` naming a session
//! slot, which gives the server exactly-once semantics per slot.
//!
//! [`Client`] owns one connection. A reader thread routes each reply to the
//! caller waiting on its `xid`, so one `Client` can be shared by several
//! threads and requests pipeline; callbacks go to a channel
//! ([`Client::callbacks`]). [`Session`] keeps the client side of a
//! session's slot table and sends requests with the right `seq`
//! ([`Session::call`] for a new request, [`Session::resend`] to re-send the
//! last one of a slot); its typed methods build the common requests
//! ([`ops`]). A status other than `NFS4_OK` is an ordinary `Ok(Reply)`,
//! since tests inspect statuses; [`Error`] is only for transport, protocol
//! and slot-table failures (connection lost, timeout, a reply that is not
//! JSON, a slot the session does not have). [`Session::open_outcome`] and
//! [`Session::close_outcome`] send the same OPEN and CLOSE lines without a
//! JSON tree and read the reply's status and stateid borrowed from its
//! line ([`Outcome`]), for loops of opens (benchmarks).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let c = Arc::new(nfsl::Client::connect("127.0.0.1:2049")?);
//! let id = c.exchange_id("alice@host", "0123456789abcdef")?.require_ok()?;
//! let created = c.create_session(id.clientid().ok_or("no clientid")?)?;
//! let s = nfsl::Session::from_reply(c.clone(), &created).ok_or("no session")?;
//! let mut args = nfsl::OpenArgs::new("alice-open", "notes.txt");
//! args.create = Some((nfsl::CreateMode::Unchecked, None));
//! let open = s.open(0, &args)?.require_ok()?;
//! let stateid = open.stateid().ok_or("no stateid")?;
//! s.write(0, &stateid, 0, b"hello")?.require_ok()?;
//! s.close(0, &stateid)?.require_ok()?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod fast;
pub mod ops;
mod reply;
mod session;
#[cfg(test)]
mod testing;

pub use client::{Client, CALLBACK_QUEUE, DEFAULT_TIMEOUT, MAX_LINE};
pub use error::Error;
pub use fast::Outcome;
pub use ops::{Access, CreateMode, Deny, LockType, OpenArgs, WantDelegation, TO_EOF};
pub use reply::{Reply, StateId, StatusError, NFS4_OK, SEQ_REJECTIONS};
pub use session::{Seq, Session, MAX_SLOTS};
