//! libfilter — the resume-key filter's library.
//!
//! - [`model`]: what a handle is (resume key, client, share mode, durability…),
//!   as types that refuse bad values.
//! - [`share`]: the share-mode algebra (pure).
//! - [`lease`]: lease states, grants and the break table (pure).
//! - [`locks`]: the byte-range lock algebra, LockFileEx semantics (pure).
//! - [`store`]: the LMDB tables (heed), versioned records, schema and epoch.
//! - [`record`]: how a stored record value is encoded (a version byte, then
//!   postcard of a frozen mirror type; JSON still read).
//! - `etcd` (feature `etcd`): the same table in an etcd cluster, fenced by a
//!   lease, so a filterd on another machine can take over.
//! - [`proto`]: the frontend ↔ filterd wire protocol, the only place its
//!   messages are defined.
//! - [`client`]: the API a frontend links to: connect, open, resume, close,
//!   events. A third-party file server needs nothing else.
//! - [`attach`]: a reconnecting attachment that resumes a frontend's handles
//!   by itself after a daemon restart.
//! - [`closer`]: closes a frontend makes after a reply (a LOGOFF's), tried
//!   again once it has reattached to filterd.
//! - [`settle`]: closes again, until filterd answers, the handles whose
//!   close was never answered.
//! - [`runtime`]: the live daemon's record in its state dir (pid, socket),
//!   how filterctl finds it.
//! - `cli` (feature `cli`): the programs' command lines — a usage error is
//!   one line naming what is wrong, exit 2.
//! - `testing` (tests, feature `test-util`): values the crates' tests build.
//! - [`sys`]: the syscall backend (openat2, file handles, SCM_RIGHTS), the one
//!   module allowed `unsafe`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod attach;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod closer;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod lease;
pub mod locks;
pub mod model;
pub mod proto;
pub mod record;
pub mod runtime;
pub mod settle;
pub mod share;
pub mod store;
pub mod sys;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
