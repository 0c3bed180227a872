//! Closes whose outcome filterd never told: rksmbd forgets such an open
//! and hands its handle to [`libfilter::settle::Unsettled`], which a
//! `close-settler` thread closes again until filterd answers for it (see
//! that module for why). Until then the client's retried CLOSE of it is
//! answered STATUS_FILE_NOT_AVAILABLE ([`Settling`]).

use std::sync::Arc;

pub use libfilter::settle::{may_hold, Unsettled};

use libfilter::model::ResumeKey;

use crate::files::{Kind, Open};
use crate::server::Shared;
use crate::wire::status;

/// An open whose CLOSE filterd never answered, as its FileId named it:
/// kept by its connection ([`crate::server::Connection::settling`]).
#[derive(Clone, Copy, Debug)]
pub struct Settling {
    session: u64,
    tree: u32,
    persistent_id: u64,
    /// Its handle, settling.
    pub key: ResumeKey,
}

impl Settling {
    /// The note of file open `o` (a directory has no handle to settle).
    pub fn of(o: &Open) -> Option<Settling> {
        match &o.kind {
            Kind::File { key, .. } => Some(Settling {
                session: o.session,
                tree: o.tree,
                persistent_id: o.persistent_id,
                key: *key,
            }),
            Kind::Dir { .. } => None,
        }
    }

    /// Whether a request of `session` and `tree` naming persistent id
    /// `persistent` (none: a related request's) names this open.
    pub fn named_by(&self, session: u64, tree: u32, persistent: Option<u64>) -> bool {
        self.session == session
            && self.tree == tree
            && persistent.is_none_or(|p| p == self.persistent_id)
    }
}

/// What a retried CLOSE of `n` is answered: STATUS_FILE_NOT_AVAILABLE
/// (retry) while its handle settles, else `Ok` — the close is made.
pub fn retried_close(sh: &Shared, n: &Settling) -> Result<(), u32> {
    if sh.unsettled.contains(n.key) {
        Err(status::FILE_NOT_AVAILABLE)
    } else {
        Ok(())
    }
}

/// The settling thread: runs for the life of rksmbd.
pub fn run(sh: Arc<Shared>) {
    sh.unsettled
        .run(|key, told| sh.filter.close_told(key, told));
}
