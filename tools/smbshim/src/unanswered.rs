//! The create GUIDs of durable CREATEs that filterd did not answer in time
//! ([`Unanswered`]), each the one session's whose LOGOFF is to close it.
//!
//! smbshim answers a CREATE whose filterd call timed out (or whose filterd
//! connection was lost) STATUS_FILE_NOT_AVAILABLE, "retry": filterd may
//! still make the open, and libfilter then keeps it detached
//! (`FilterClient::open_replayed_by_guid`) so that the client's replay of
//! its create GUID finds it and runs nothing twice. Such an open is in no
//! session's table: a LOGOFF that closes the table's opens left it
//! disconnected for its durable timeout, refusing other clients and
//! counting against the client's caps. So a session notes the GUIDs of
//! its durable CREATEs while their call is in flight, and keeps those that
//! got no answer; its LOGOFF closes each by GUID
//! (`server::close_unanswered`), and a late answer that comes after the
//! LOGOFF is closed, not detached (`libfilter::client::SessionEnd`).
//!
//! A GUID belongs to one session at a time, and only its owner's LOGOFF
//! may close its open. A client may replay a GUID on another of its
//! sessions: that session's CREATE notes it and takes it over (the one
//! before no longer owns it, review rr-logoff 1), and a replay or
//! RECONNECT that got the open ([`Unanswered::taken`]) leaves it nobody's
//! (rr-logoff 2: the open may be detached again when that session's
//! connection drops, waiting for the client's RECONNECT). The owner is
//! kept after its session ended, until its LOGOFF's closer is done with
//! the GUID ([`Unanswered::claim`]; a close that failed is tried again
//! meanwhile): [`Unanswered::owns`] is checked right before each try of
//! the close, after any
//! takeover in flight was waited for, so a note or take between the
//! LOGOFF and the close is never missed.

use std::collections::{HashMap, VecDeque};

type Guid = uuid::Uuid;

/// Most unanswered create GUIDs one session keeps; the oldest beyond is
/// forgotten with a warning (its open, if filterd made it, waits for its
/// durable timeout after a LOGOFF, as all did before).
pub const UNANSWERED_MAX: usize = 1024;

/// The create GUIDs of CREATEs in flight or unanswered, each with the one
/// session it belongs to. Invariant: a live session's list holds GUID g
/// once, exactly when g's owner is that session.
#[derive(Debug, Default)]
pub struct Unanswered {
    /// (client GUID, create GUID) → the session that owns it.
    owner: HashMap<(Guid, Guid), u64>,
    /// Each session's GUIDs, oldest first, at most [`UNANSWERED_MAX`].
    of: HashMap<u64, VecDeque<Guid>>,
}

impl Unanswered {
    /// Session `session` of client `client` sends a CREATE with create
    /// GUID `guid`: it owns the GUID now, no other session does.
    pub fn note(&mut self, client: Guid, session: u64, guid: Guid) {
        if let Some(before) = self.owner.insert((client, guid), session) {
            self.unlist(before, guid);
        }
        let list = self.of.entry(session).or_default();
        list.push_back(guid);
        while list.len() > UNANSWERED_MAX {
            if let Some(old) = list.pop_front() {
                self.owner.remove(&(client, old));
                eprintln!(
                    "smbshim: more than {UNANSWERED_MAX} unanswered durable CREATEs in one session; \
                     create GUID {old} is forgotten (a LOGOFF will not close its open)"
                );
            }
        }
    }

    /// The CREATE `session` sent with `guid` was answered: nothing is left
    /// for its LOGOFF (if it still owns the GUID).
    pub fn answered(&mut self, client: Guid, session: u64, guid: Guid) {
        if self.owner.get(&(client, guid)) == Some(&session) {
            self.owner.remove(&(client, guid));
            self.unlist(session, guid);
        }
    }

    /// The open of `guid` is held by a session (a replay or RECONNECT got
    /// it): no LOGOFF may close it by GUID, even once it is detached again.
    pub fn taken(&mut self, client: Guid, guid: Guid) {
        if let Some(s) = self.owner.remove(&(client, guid)) {
            self.unlist(s, guid);
        }
    }

    /// `session` ended without a LOGOFF (its opens wait for a replay or a
    /// RECONNECT): it owns nothing any more.
    pub fn lost(&mut self, client: Guid, session: u64) {
        for g in self.of.remove(&session).unwrap_or_default() {
            if self.owner.get(&(client, g)) == Some(&session) {
                self.owner.remove(&(client, g));
            }
        }
    }

    /// `session` ended by its LOGOFF: its GUIDs, for its closer. It keeps
    /// owning them until [`Unanswered::claim`] (or another session's note
    /// or take) says otherwise.
    pub fn logged_off(&mut self, session: u64) -> Vec<Guid> {
        self.of.remove(&session).map(Vec::from).unwrap_or_default()
    }

    /// Whether `session` (logged off) still owns `guid`, for its closer to
    /// close the open: it keeps owning it (a close that fails is tried
    /// again, and a note or take by another session meanwhile must still
    /// be seen).
    pub fn owns(&self, client: Guid, session: u64, guid: Guid) -> bool {
        self.owner.get(&(client, guid)) == Some(&session)
    }

    /// Whether `session` (logged off) still owns `guid`; it owns it no
    /// more either way (its closer is done with it).
    pub fn claim(&mut self, client: Guid, session: u64, guid: Guid) -> bool {
        let mine = self.owner.get(&(client, guid)) == Some(&session);
        if mine {
            self.owner.remove(&(client, guid));
        }
        mine
    }

    fn unlist(&mut self, session: u64, guid: Guid) {
        if let Some(l) = self.of.get_mut(&session) {
            l.retain(|g| *g != guid);
            if l.is_empty() {
                self.of.remove(&session);
            }
        }
    }
}

/// One unanswered create GUID of a logged-off session, for its member's
/// `logoff-closer` thread ([`Closer`]).
#[derive(Debug, Clone)]
pub struct ToClose {
    pub session: u64,
    pub client: Guid,
    pub user: String,
    pub guid: Guid,
}

/// A member's create GUIDs of logged-off sessions whose opens are still
/// to be closed, by the member's `logoff-closer` thread: each close is a
/// resume and a close in filterd, bounded by the call timeout only, so a
/// LOGOFF answers first and never holds its connection's other requests
/// (nor its end) behind them (rr-logoff 4). One that failed for a passing
/// cause (filterd down or restarting) is tried again once the member has
/// reattached (`libfilter::closer`), the session still owning the GUID
/// meanwhile.
pub type Closer = libfilter::closer::Closer<ToClose>;

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u128) -> Guid {
        uuid::Uuid::from_u128(n)
    }

    #[test]
    fn bounded_oldest_forgotten_and_answered_ones_leave() {
        let mut u = Unanswered::default();
        for n in 0..(UNANSWERED_MAX as u128 + 3) {
            u.note(g(0), 1, g(n));
        }
        u.answered(g(0), 1, g(5));
        let left = u.logged_off(1);
        assert_eq!(left.len(), UNANSWERED_MAX - 1);
        assert_eq!(left.first(), Some(&g(3)), "the three oldest were forgotten");
        assert!(!left.contains(&g(5)));
        assert!(!u.claim(g(0), 1, g(0)), "forgotten");
        assert!(u.claim(g(0), 1, g(3)));
        assert!(u.logged_off(1).is_empty());
    }

    /// rr-logoff 1: a GUID another session of the client replayed since
    /// is that session's; its note moves it, once, with no copy left.
    #[test]
    fn a_guid_belongs_to_the_session_that_noted_it_last() {
        let (c, x) = (g(100), g(7));
        let mut u = Unanswered::default();
        u.note(c, 1, x);
        u.note(c, 1, x);
        u.note(c, 2, x);
        assert!(u.logged_off(1).is_empty(), "S2 owns it");
        assert_eq!(u.logged_off(2), [x], "once");
        assert!(u.claim(c, 2, x));
        assert!(!u.claim(c, 2, x), "claimed once");
    }

    /// rr-logoff 2: between a LOGOFF and its closer's claim, another
    /// session's note or take of the GUID (its replay got the open) keeps
    /// the closer off it. The closer's looks keep it the session's (a
    /// close that failed is tried again) until then.
    #[test]
    fn a_guid_noted_or_taken_after_the_logoff_is_not_claimed() {
        let (c, x, y) = (g(100), g(7), g(8));
        let mut u = Unanswered::default();
        u.note(c, 1, x);
        u.note(c, 1, y);
        assert_eq!(u.logged_off(1), [x, y]);
        assert!(u.owns(c, 1, x) && u.owns(c, 1, x), "looking keeps it");
        u.note(c, 2, x);
        u.taken(c, y);
        assert!(!u.owns(c, 1, x) && !u.owns(c, 1, y));
        assert!(!u.claim(c, 1, x), "S2 replays it");
        assert!(!u.claim(c, 1, y), "a session holds it");
        u.answered(c, 2, x);
        assert!(!u.claim(c, 1, x), "answered for S2: not S1's again");
    }

    /// A session lost with its connection owns nothing; others keep theirs.
    #[test]
    fn a_lost_session_owns_nothing() {
        let (c, x, y) = (g(100), g(7), g(8));
        let mut u = Unanswered::default();
        u.note(c, 1, x);
        u.note(c, 2, y);
        u.lost(c, 1);
        assert!(!u.claim(c, 1, x));
        assert_eq!(u.logged_off(2), [y]);
        assert!(u.claim(c, 2, y));
    }
}
