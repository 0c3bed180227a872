//! What the other threads tell the engine thread, and the few types they
//! share. The engine owns all state; the listener, the committer, the
//! fanotify reader and the main thread reach it only through these
//! commands (`crate::conn::EngineTx`). This module depends on nothing of
//! theirs, so none of them depends on the engine.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use libfilter::model::{FileId, IntentId};
use libfilter::proto::{ErrorCode, Hello, RequestFrame};

use crate::outbox::ConnWriter;

/// The engine's answer to a local open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it proceed.
    Allow,
    /// Refuse it (the opener gets EPERM).
    Deny,
}

/// Where the engine's verdict on a local open goes (the fanotify answerer).
pub type VerdictSink = Box<dyn FnOnce(Verdict) + Send>;

/// Identifies one accepted connection for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// SO_PEERCRED of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What connection threads and the committer tell the engine.
pub enum Command {
    /// The listener accepted a connection.
    Accepted {
        /// Its id.
        conn: ConnId,
        /// The socket.
        sock: OwnedFd,
        /// Its credentials.
        peer: Peer,
    },
    /// A peer said hello; the engine registers it and the poller answers.
    Hello {
        /// The connection.
        conn: ConnId,
        /// What it said.
        hello: Hello,
        /// Its credentials.
        peer: Peer,
        /// Where its replies go.
        writer: Arc<ConnWriter>,
    },
    /// A decoded request.
    Request {
        /// The connection.
        conn: ConnId,
        /// The request.
        frame: RequestFrame,
    },
    /// A connection ended.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A connection thread refused a malformed frame (for the counters).
    BadFrame,
    /// A commit failed: these groups did not commit (the others up to
    /// `through` did); the engine rolls them back with whatever built on
    /// them (the committer waits for
    /// [`crate::committer::Pipeline::rolled_back`]).
    CommitFailed {
        /// The sequences that failed.
        failed: Vec<u64>,
        /// The last sequence of the failed commit.
        through: u64,
        /// What to tell the clients whose requests are undone.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The intents of these parked opens are durable: do their changes.
    IntentsDurable(Vec<IntentId>),
    /// A commit the engine asked to hear of is resolved
    /// ([`crate::committer::Pipeline::wake_engine_at`]): requests and
    /// local opens that waited for it may go on.
    CommitsResolved,
    /// A local process is opening a file on the export (fanotify): decide.
    LocalOpen {
        /// The file.
        file: FileId,
        /// The process.
        pid: i32,
        /// The event's own descriptor of the file (for ignore marks),
        /// shared with the reader's answer: it stays open until the event
        /// is answered, so its number names no other event meanwhile.
        fd: std::sync::Arc<OwnedFd>,
        /// Where the verdict goes.
        reply: VerdictSink,
    },
    /// Stop: flush, then return.
    Shutdown,
}
