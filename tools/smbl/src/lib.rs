//! smbl — a small client for smbl/1, the SMB-like protocol smbshim serves
//! (docs/smb-like.md; the contract is /work/shared/spec/smb-like.md).
//!
//! smbl/1 is one JSON object per line over TCP. Requests carry `cmd` and a
//! client-chosen `mid`; every request gets exactly one reply with the same
//! `mid` and a `status`, in any order; the server also pushes notifications
//! (`{"cmd": "LEASE_BREAK", ...}`, no `mid`).
//!
//! [`Client`] owns one connection. A reader thread routes each reply to the
//! caller waiting on its `mid`, so one `Client` can be shared by several
//! threads (`&self` everywhere) and requests pipeline; notifications go to a
//! channel ([`Client::notifications`]). [`Client::call`] sends any request
//! and returns its [`Reply`]; the typed conveniences in [`ops`] build the
//! common requests. A non-success status is an ordinary `Ok(Reply)`, since
//! tests inspect statuses; [`Error`] is only for transport and protocol
//! failures (connection lost, timeout, a reply that is not JSON).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let c = smbl::Client::connect("127.0.0.1:4450")?;
//! let s = c.session_setup(uuid::Uuid::new_v4(), "alice", None)?;
//! let session = s.session_id().ok_or("no session_id")?;
//! let mut args = smbl::CreateArgs::new(session, "notes.txt");
//! args.durable = Some(smbl::Durable::persistent(uuid::Uuid::new_v4()));
//! let open = c.create(&args)?.require_success()?;
//! let file_id = open.file_id().ok_or("no file_id")?;
//! c.write(session, file_id, 0, b"hello", None, false)?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod error;
mod fast;
pub mod ops;
mod reply;

pub use client::{Client, DEFAULT_TIMEOUT, MAX_LINE, NOTIFICATION_QUEUE};
pub use error::Error;
pub use fast::Outcome;
pub use ops::{CreateArgs, Durable, LockSpec};
pub use reply::{Reply, StatusError};
