//! Closes whose outcome filterd never told: rksmbd forgets such an open
//! and hands its handle to [`libfilter::settle::Unsettled`], which a
//! `close-settler` thread closes again until filterd answers for it (see
//! that module for why).

use std::sync::Arc;

pub use libfilter::settle::{may_hold, Unsettled};

use crate::server::Shared;

/// The settling thread: runs for the life of rksmbd.
pub fn run(sh: Arc<Shared>) {
    sh.unsettled
        .run(|key, told| sh.filter.close_told(key, told));
}
