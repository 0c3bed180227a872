//! Each peer user's share of the descriptors handles may take (attack49
//! F2): one admitted peer (a member of the socket's group) opening
//! durable handles under a new client id each time was bounded only by
//! the per-instance limit, and took every descriptor filterd had — every
//! frontend's open was then refused.
//!
//! A handle counts against the *user* (uid, from `SO_PEERCRED`) of the
//! connection that opened it or last attached it (a resume, a replayed
//! create, a takeover by another instance), while it is in the handle
//! table: a disconnected one counts until it is expired, purged or
//! closed, as it keeps its descriptor. A handle recovered at a restart
//! counts against nobody until it is resumed (no uid is stored; it holds
//! no descriptor until then). Each handle counts as
//! [`DESCRIPTORS_PER_HANDLE`] descriptors: its own, and the one its
//! byte-range locks take (`Handle::lock_fd`) — so a user that locks every
//! handle it holds still stays within its share, with no check on the
//! lock path.
//!
//! The room is what the descriptor limit leaves to handles (the limit
//! less the reserve for reading local opens and the budget for replies
//! queued unread, `main`); one user may hold at most three quarters of
//! it, as one user may hold three quarters of the connections
//! (`Engine::on_hello`). Past it, the user's opens and the resumes that
//! take a descriptor are refused (`LimitReached`); other users still
//! open. Root and filterd's own user are exempt: a process of either can
//! kill filterd anyway, and a frontend run as root must not lose a
//! quarter of the room to a rule meant for the socket's group.
//!
//! [`Shares`] is the arithmetic (no handles, no connections), tested on
//! its own; the engine keeps it in step with its handle table at the
//! table's only entries and exits (`Engine::insert_unfiled`,
//! `Engine::remove_as`) and where a handle changes hands
//! (`Engine::attribute`), so a rolled-back open (removed quietly) or a
//! failed close (reinserted whole) gives back or takes again exactly what
//! it counted.

use std::collections::HashMap;

use libfilter::model::{RelPath, ResumeKey};
use libfilter::proto::{ErrorCode, WireError};

use super::{err, ConnId, Engine};

/// Descriptors one handle counts as: its own and its locks'.
pub(super) const DESCRIPTORS_PER_HANDLE: usize = 2;

/// Descriptors held by users' handles, against a room.
#[derive(Debug)]
pub(super) struct Shares {
    room: usize,
    exempt: Vec<u32>,
    by_uid: HashMap<u32, usize>,
}

impl Shares {
    /// Nothing held; `room` descriptors for all users' handles, `exempt`
    /// users never refused.
    pub(super) fn new(room: usize, exempt: Vec<u32>) -> Shares {
        Shares {
            room,
            exempt,
            by_uid: HashMap::new(),
        }
    }

    /// The most one user may hold: three quarters of the room.
    pub(super) fn share(&self) -> usize {
        self.room - self.room / 4
    }

    /// The room.
    pub(super) fn room(&self) -> usize {
        self.room
    }

    /// What user `uid`'s handles count as.
    pub(super) fn held(&self, uid: u32) -> usize {
        self.by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Users holding some, and what each holds (for tests).
    #[cfg(test)]
    pub(super) fn holders(&self) -> Vec<(u32, usize)> {
        let mut v: Vec<_> = self.by_uid.iter().map(|(u, n)| (*u, *n)).collect();
        v.sort_unstable();
        v
    }

    /// A handle of `uid` joins.
    pub(super) fn charge(&mut self, uid: u32) {
        *self.by_uid.entry(uid).or_default() += DESCRIPTORS_PER_HANDLE;
    }

    /// A handle of `uid` leaves.
    pub(super) fn discharge(&mut self, uid: u32) {
        if let Some(n) = self.by_uid.get_mut(&uid) {
            debug_assert!(*n >= DESCRIPTORS_PER_HANDLE, "uid {uid} holds {n}");
            *n = n.saturating_sub(DESCRIPTORS_PER_HANDLE);
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }

    /// Whether one more handle of `uid` would take it past its share.
    pub(super) fn refuses(&self, uid: u32) -> bool {
        !self.exempt.contains(&uid)
            && self.held(uid).saturating_add(DESCRIPTORS_PER_HANDLE) > self.share()
    }
}

impl Engine {
    /// Refuses an open (or a resume taking a descriptor) of `path` on
    /// `conn` whose user holds its share of the handles' room already
    /// (`LimitReached`; counted: `opens_refused_share`).
    pub(super) fn keep_within_share(
        &mut self,
        conn: ConnId,
        path: &RelPath,
    ) -> Result<(), WireError> {
        let Some(uid) = self.conns.get(&conn).map(|c| c.peer.uid) else {
            return Ok(());
        };
        if !self.handle_shares.refuses(uid) {
            return Ok(());
        }
        self.stats.opens_refused += 1;
        self.stats.opens_refused_share += 1;
        let n = self.stats.opens_refused_share;
        let (held, room) = (self.handle_shares.held(uid), self.handle_shares.room());
        if n.is_power_of_two() {
            tracing::warn!(
                uid,
                held,
                room,
                refused = n,
                "protocol opens refused: a user holds its share of the descriptors for handles"
            );
        }
        Err(err(
            ErrorCode::LimitReached,
            format!(
                "{path}: user {uid}'s handles count as {held} of the {room} descriptors filterd leaves to handles, as many as one user may (three quarters; {DESCRIPTORS_PER_HANDLE} a handle); close handles or raise filterd's limit"
            ),
        ))
    }

    /// Handle `key` counts against `uid` from now on (see the module doc).
    pub(super) fn attribute(&mut self, key: ResumeKey, uid: Option<u32>) {
        let Some(h) = self.handles.get_mut(&key) else {
            return;
        };
        if h.uid == uid {
            return;
        }
        if let Some(old) = std::mem::replace(&mut h.uid, uid) {
            self.handle_shares.discharge(old);
        }
        if let Some(new) = uid {
            self.handle_shares.charge(new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One user takes three quarters of the room and no more; another
    /// still gets in; an exempt user is never refused.
    #[test]
    fn one_user_holds_at_most_three_quarters_of_the_room() {
        let mut s = Shares::new(40, vec![0]);
        assert_eq!(s.share(), 30);
        let mut n = 0;
        while !s.refuses(1001) {
            s.charge(1001);
            n += 1;
        }
        assert_eq!(n, 15, "30 descriptors, two a handle");
        assert_eq!(s.held(1001), 30);
        assert!(!s.refuses(1002), "another user still opens");
        for _ in 0..40 {
            assert!(!s.refuses(0), "root is exempt");
            s.charge(0);
        }
        s.discharge(1001);
        assert!(!s.refuses(1001), "room again once one goes");
        for _ in 0..14 {
            s.discharge(1001);
        }
        assert_eq!(s.held(1001), 0);
        assert_eq!(s.holders(), vec![(0, 80)]);
    }

    /// A room too small for one handle refuses every counted user; the
    /// default (no limit known) refuses nobody.
    #[test]
    fn tiny_and_unbounded_rooms() {
        let s = Shares::new(1, Vec::new());
        assert!(s.refuses(7));
        let s = Shares::new(usize::MAX, Vec::new());
        assert!(!s.refuses(7));
    }
}
