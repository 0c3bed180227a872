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
//! counts against nobody until it is resumed (no uid is stored): it holds
//! no descriptor of its own until then, though one holding byte-range
//! locks holds its lock descriptor from recovery on (the locks are
//! mirrored again at once), and one whose resume failed keeps the
//! descriptor the resume opened. A handle counts what it holds
//! ([`Engine::weigh`]): one descriptor, and one more while its byte-range
//! locks' descriptor (`Handle::lock_fd`) is open — the lock path refuses
//! a lock whose descriptor would take its user past its share
//! (`Engine::lock`), and every place that opens or closes that
//! descriptor weighs the handle again ([`Engine::reweigh`]).
//!
//! The room is what the descriptor limit leaves to handles (the limit
//! less the reserve for reading local opens and the budget for replies
//! queued unread, `main`); one user may hold at most three quarters of
//! it, as one user may hold three quarters of the connections
//! (`Engine::on_hello`). Past it, the user's opens and a handle's first
//! lock (which opens its lock descriptor) are refused (`LimitReached`);
//! other users still open. A handle holding locks but no descriptor for
//! them gets further locks unmirrored (not enforced against local
//! processes) until its user has room. A resume or replay of a handle
//! already in the table is never refused (it was held to a share when it
//! was opened, and refusing it loses a connected client's open after a
//! restart or a failover), only counted against the resuming user. So
//! within one run a user holds at most its share (more only by another
//! user's handles it resumed or took over), but across a restart or a
//! failover its share plus what it held before: it opens a full share
//! first, then resumes its recovered handles (review rr50b M1; the remedy
//! left is storing the uid in the handle's record). Root, filterd's own user and the uids named by
//! `--share-exempt-uid` are exempt: a process of root or filterd's user
//! can kill filterd anyway, and an operator may trust a frontend's
//! service user with the whole room.
//!
//! [`Shares`] is the arithmetic (no handles, no connections), tested on
//! its own; the engine keeps it in step with its handle table at the
//! table's only entries and exits (`Engine::insert_unfiled`,
//! `Engine::remove_as`), where a handle changes hands
//! (`Engine::attribute`) and where its lock descriptor comes or goes
//! (`Engine::reweigh`), so a rolled-back open (removed quietly) or a
//! failed close (reinserted whole) gives back or takes again exactly what
//! it counted.

use std::collections::HashMap;

use libfilter::model::{RelPath, ResumeKey};
use libfilter::proto::{ErrorCode, WireError};

use super::{err, ConnId, Engine, Handle};

/// Descriptors `h` holds, and counts against its user: its own, and its
/// locks' while that is open.
pub(super) fn weight(h: &Handle) -> usize {
    1 + usize::from(h.lock_fd.is_some())
}

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
    pub(super) fn new(room: usize, mut exempt: Vec<u32>) -> Shares {
        // Sorted, once each: root and filterd's own user are often one.
        exempt.sort_unstable();
        exempt.dedup();
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

    /// `uid` holds `n` more.
    pub(super) fn charge(&mut self, uid: u32, n: usize) {
        if n > 0 {
            let held = self.by_uid.entry(uid).or_default();
            *held = held.saturating_add(n);
        }
    }

    /// `uid` holds `n` fewer.
    pub(super) fn discharge(&mut self, uid: u32, n: usize) {
        if let Some(held) = self.by_uid.get_mut(&uid) {
            debug_assert!(*held >= n, "uid {uid} holds {held}, gives back {n}");
            *held = held.saturating_sub(n);
            if *held == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }

    /// Whether `n` more descriptors would take `uid` past its share.
    pub(super) fn refuses(&self, uid: u32, n: usize) -> bool {
        !self.exempt.contains(&uid) && self.held(uid).saturating_add(n) > self.share()
    }
}

impl Engine {
    /// Logs, once at start, the room, one user's share of it and the
    /// exempt uids (root, filterd's own, `--share-exempt-uid`), so an
    /// operator can see the flag took effect (review rr50b L4).
    pub fn log_handle_shares(&self) {
        let s = &self.handle_shares;
        tracing::info!(
            handle_room = s.room(),
            handle_share = s.share(),
            share_exempt = ?s.exempt,
            "handles shared by peer user: a uid not exempt holds at most handle_share"
        );
    }

    /// Refuses an open of `path` on `conn` whose user holds its share of
    /// the handles' room already (`LimitReached`; counted:
    /// `opens_refused_share`). An open of a connection not known (none
    /// reaches here: a waiting open of a connection gone is dropped) is
    /// refused too, as its handle would count against nobody.
    pub(super) fn keep_within_share(
        &mut self,
        conn: ConnId,
        path: &RelPath,
    ) -> Result<(), WireError> {
        let Some(uid) = self.conns.get(&conn).map(|c| c.peer.uid) else {
            debug_assert!(false, "an open of connection {conn:?}, not known");
            return Err(err(
                ErrorCode::LimitReached,
                format!("{path}: its connection is gone"),
            ));
        };
        if !self.handle_shares.refuses(uid, 1) {
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
                "{path}: user {uid}'s handles count as {held} of the {room} descriptors filterd leaves to handles, as many as one user may (three quarters; one a handle and one for its locks); close handles, raise filterd's limit or exempt the user (filterd --share-exempt-uid)"
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
            self.handle_shares.discharge(old, h.weighed);
        }
        h.weighed = 0;
        if let Some(new) = uid {
            h.weighed = weight(h);
            self.handle_shares.charge(new, h.weighed);
        }
    }

    /// `h`, joining the table, counts what it holds against its user.
    pub(super) fn weigh(&mut self, h: &mut Handle) {
        h.weighed = 0;
        if let Some(uid) = h.uid {
            h.weighed = weight(h);
            self.handle_shares.charge(uid, h.weighed);
        }
    }

    /// Handle `key`'s lock descriptor was opened or closed: its user's
    /// count follows.
    pub(super) fn reweigh(&mut self, key: ResumeKey) {
        let Some(h) = self.handles.get_mut(&key) else {
            return;
        };
        let Some(uid) = h.uid else {
            return;
        };
        let now = weight(h);
        let was = std::mem::replace(&mut h.weighed, now);
        if now > was {
            self.handle_shares.charge(uid, now - was);
        } else {
            self.handle_shares.discharge(uid, was - now);
        }
    }

    /// Whether opening handle `key`'s lock descriptor would take its user
    /// past its share (none to open, or no user: no).
    pub(super) fn lock_fd_refused(&self, key: ResumeKey) -> bool {
        self.handles.get(&key).is_some_and(|h| {
            h.lock_fd.is_none() && h.uid.is_some_and(|uid| self.handle_shares.refuses(uid, 1))
        })
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
        while !s.refuses(1001, 1) {
            s.charge(1001, 1);
            n += 1;
        }
        assert_eq!(n, 30);
        assert_eq!(s.held(1001), 30);
        assert!(!s.refuses(1002, 1), "another user still opens");
        for _ in 0..40 {
            assert!(!s.refuses(0, 2), "root is exempt");
            s.charge(0, 2);
        }
        s.discharge(1001, 2);
        assert!(!s.refuses(1001, 2), "room again once some go");
        assert!(s.refuses(1001, 3));
        s.discharge(1001, 28);
        assert_eq!(s.held(1001), 0);
        assert_eq!(s.holders(), vec![(0, 80)]);
    }

    /// A room of nothing refuses every counted user; the
    /// default (no limit known) refuses nobody.
    #[test]
    fn tiny_and_unbounded_rooms() {
        let s = Shares::new(0, Vec::new());
        assert!(s.refuses(7, 1));
        let s = Shares::new(usize::MAX, Vec::new());
        assert!(!s.refuses(7, 2));
    }
}
