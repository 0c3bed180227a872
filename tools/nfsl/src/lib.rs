//! nfsl — a small client for nfsl/1, the NFS-like protocol nfsshim serves
//! (docs/nfs-like.md; the contract is the shared spec `spec/nfs-like.md`).
//!
//! nfsl/1 is one JSON object per line over TCP. Requests carry `op` and a
//! client-chosen `xid`; every request gets exactly one reply with the same
//! `xid` and a `status`, in any order; the server also sends callbacks
//! (`{"op": "CB_RECALL", ...}`, no `xid`).
//!
//! [`Client`] owns one connection. A reader thread routes each reply to the
//! caller waiting on its `xid`, so one `Client` can be shared by several
//! threads and requests pipeline; callbacks go to a channel
//! ([`Client::callbacks`]). A status other than `NFS4_OK` is an ordinary
//! `Ok(Reply)`, since tests inspect statuses; [`Error`] is only for
//! transport and protocol failures (connection lost, timeout, a reply that
//! is not JSON).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod reply;
#[cfg(test)]
mod testing;

pub use client::{Client, CALLBACK_QUEUE, DEFAULT_TIMEOUT, MAX_LINE};
pub use error::Error;
pub use reply::{Reply, StateId, StatusError, NFS4_OK, SEQ_REJECTIONS};
