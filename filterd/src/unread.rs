//! Shares of what filterd keeps queued for peers that have not read it:
//! the accounting behind the outbox's global limits (review rr48c M1, M4;
//! re-review rr48e F1, F2).
//!
//! Each connection's queue (frames its socket did not take: its peer has
//! not read what went before) holds bytes and, in a reply that carries a
//! handle's descriptor, a reference that keeps the descriptor open even
//! after its handle is closed. Both are bounded per connection
//! ([`crate::outbox`]) and here in total, by a budget ([`Unread`]).
//!
//! Only frames *queued unread* count: a reply parked until a commit is
//! filterd's own wait, not the peer's, and says nothing about whether the
//! peer reads; a peer that reads drains its queue. When a claim takes the
//! total past the budget, the budget is shared equally among the peer
//! *users* (uids, from `SO_PEERCRED`) holding some of it, and only a
//! connection of a user over its share is ever closed for it — the
//! user's connection holding the most. Per user, because an attacker
//! chooses how many connections it spreads over (rr48e F1: "the
//! connection holding the most" was then the honest frontend), not which
//! uid the kernel gives it; and a process of the frontend's own uid can
//! kill the frontend anyway. A claim of a user within its share is never
//! refused for the budget: the total may pass the budget by what users
//! within their shares hold, at most the budget again.
//!
//! This module is the arithmetic only (no locks, no sockets), so that it
//! can be tested on its own; [`crate::outbox::Pool`] applies it.

use std::collections::HashMap;

/// What is queued unread: frames carrying a descriptor, and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unread {
    /// Frames carrying a descriptor (each keeps one open at most).
    pub fds: usize,
    /// Bytes of frames.
    pub bytes: usize,
}

impl Unread {
    /// One frame of `bytes` bytes, with a descriptor or not.
    pub fn frame(bytes: usize, fd: bool) -> Unread {
        Unread {
            fds: usize::from(fd),
            bytes,
        }
    }

    fn add(&mut self, o: Unread) {
        self.fds = self.fds.saturating_add(o.fds);
        self.bytes = self.bytes.saturating_add(o.bytes);
    }

    fn sub(&mut self, o: Unread) {
        debug_assert!(
            self.fds >= o.fds && self.bytes >= o.bytes,
            "{self:?} - {o:?}"
        );
        self.fds = self.fds.saturating_sub(o.fds);
        self.bytes = self.bytes.saturating_sub(o.bytes);
    }

    /// How much of `r`.
    pub fn get(&self, r: Resource) -> usize {
        match r {
            Resource::Fds => self.fds,
            Resource::Bytes => self.bytes,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Unread::default()
    }
}

/// One of the two things budgeted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Descriptors (frames carrying one).
    Fds,
    /// Bytes.
    Bytes,
}

impl Resource {
    /// What it is, for a log line or a refusal.
    pub fn word(self) -> &'static str {
        match self {
            Resource::Fds => "replies carrying a descriptor",
            Resource::Bytes => "bytes",
        }
    }
}

/// A connection's part.
#[derive(Debug)]
struct Member {
    uid: u32,
    unread: Unread,
    /// Closed (or being closed): no longer a candidate, though what it
    /// still holds counts until it is freed.
    closing: bool,
}

/// Every connection's unread frames, by connection and by user, against
/// a budget.
#[derive(Debug)]
pub struct Shares {
    budget: Unread,
    total: Unread,
    by_uid: HashMap<u32, Unread>,
    members: HashMap<u64, Member>,
}

impl Shares {
    /// No connection yet; `budget` for all together.
    pub fn new(budget: Unread) -> Shares {
        Shares {
            budget,
            total: Unread::default(),
            by_uid: HashMap::new(),
            members: HashMap::new(),
        }
    }

    /// The budget.
    pub fn budget(&self) -> Unread {
        self.budget
    }

    /// What all connections hold.
    pub fn total(&self) -> Unread {
        self.total
    }

    /// What connection `id` holds.
    pub fn of(&self, id: u64) -> Unread {
        self.members
            .get(&id)
            .map_or_else(Unread::default, |m| m.unread)
    }

    /// What user `uid`'s connections hold.
    pub fn of_user(&self, uid: u32) -> Unread {
        self.by_uid.get(&uid).copied().unwrap_or_default()
    }

    /// Connection `id` of user `uid` comes, holding nothing.
    pub fn join(&mut self, id: u64, uid: u32) {
        self.members.insert(
            id,
            Member {
                uid,
                unread: Unread::default(),
                closing: false,
            },
        );
    }

    /// Connection `id` goes; what it still held is given back.
    pub fn leave(&mut self, id: u64) {
        let held = self.of(id);
        self.discharge(id, held);
        self.members.remove(&id);
    }

    /// Connection `id` queued `add` more.
    pub fn charge(&mut self, id: u64, add: Unread) {
        let Some(m) = self.members.get_mut(&id).filter(|_| !add.is_empty()) else {
            return;
        };
        m.unread.add(add);
        self.by_uid.entry(m.uid).or_default().add(add);
        self.total.add(add);
    }

    /// Connection `id`'s peer read `sub` (or it was dropped).
    pub fn discharge(&mut self, id: u64, sub: Unread) {
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        m.unread.sub(sub);
        if let Some(u) = self.by_uid.get_mut(&m.uid) {
            u.sub(sub);
            if u.is_empty() {
                self.by_uid.remove(&m.uid);
            }
        }
        self.total.sub(sub);
    }

    /// Connection `id` is closed: never picked again.
    pub fn closing(&mut self, id: u64) {
        if let Some(m) = self.members.get_mut(&id) {
            m.closing = true;
        }
    }

    /// The first resource that `add` needs and that is over the budget
    /// now (`add` counted already): descriptors before bytes.
    pub fn over(&self, add: Unread) -> Option<Resource> {
        [Resource::Fds, Resource::Bytes]
            .into_iter()
            .find(|&r| add.get(r) > 0 && self.total.get(r) > self.budget.get(r))
    }

    /// Each holding user's share of `r`: the budget divided equally
    /// among the users that hold some.
    pub fn share(&self, r: Resource) -> usize {
        let users = self.by_uid.values().filter(|u| u.get(r) > 0).count();
        self.budget.get(r) / users.max(1)
    }

    /// Whether user `uid` holds more than its share of `r`.
    pub fn over_share(&self, uid: u32, r: Resource) -> bool {
        self.of_user(uid).get(r) > self.share(r)
    }

    /// The connection to close for `r`: of the users over their share,
    /// the one holding the most, its open connection holding the most.
    /// None when no user is over its share (or none of theirs is still
    /// open): then nobody is closed.
    pub fn victim(&self, r: Resource) -> Option<u64> {
        let share = self.share(r);
        let mut users: Vec<(usize, u32)> = self
            .by_uid
            .iter()
            .filter(|(_, u)| u.get(r) > share)
            .map(|(uid, u)| (u.get(r), *uid))
            .collect();
        // Most first; equal holdings by uid, so that the choice is stable.
        users.sort_unstable_by(|a, b| b.cmp(a));
        users.into_iter().find_map(|(_, uid)| {
            self.members
                .iter()
                .filter(|(_, m)| m.uid == uid && !m.closing && m.unread.get(r) > 0)
                .max_by_key(|(id, m)| (m.unread.get(r), std::cmp::Reverse(**id)))
                .map(|(id, _)| *id)
        })
    }

    /// User of connection `id`.
    pub fn uid_of(&self, id: u64) -> Option<u32> {
        self.members.get(&id).map(|m| m.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fds(n: usize) -> Unread {
        Unread { fds: n, bytes: 0 }
    }

    /// rr48e F1: an attacker spread thin over many connections, the
    /// budget full; an honest frontend of another user holding more than
    /// any one of them is never the one picked — the attacker's user is
    /// over its share, the frontend's is not.
    #[test]
    fn spreading_over_connections_does_not_make_another_user_the_victim() {
        let mut s = Shares::new(Unread {
            fds: 1000,
            bytes: usize::MAX,
        });
        for id in 0..100 {
            s.join(id, 65534);
            s.charge(id, fds(10));
        }
        s.join(1000, 0);
        s.charge(1000, fds(300));
        assert_eq!(s.total().fds, 1300);
        assert_eq!(s.over(fds(1)), Some(Resource::Fds));
        assert_eq!(s.share(Resource::Fds), 500);
        assert!(!s.over_share(0, Resource::Fds));
        assert!(s.over_share(65534, Resource::Fds));
        let v = s.victim(Resource::Fds).expect("a victim");
        assert_eq!(
            s.uid_of(v),
            Some(65534),
            "the spread user's, not the frontend"
        );
        // Closed one by one, the spread user's connections go until the
        // total is back within the budget; the frontend's never.
        let mut closed = 0;
        while s.over(fds(1)).is_some() {
            let v = s.victim(Resource::Fds).expect("a victim while over");
            assert_ne!(v, 1000);
            s.closing(v);
            s.discharge(v, s.of(v));
            closed += 1;
        }
        assert_eq!(closed, 30);
        assert_eq!(s.of(1000), fds(300));
    }

    /// Within a user, the connection holding the most goes first (a peer
    /// that reads drains its queue; one that does not, does not).
    #[test]
    fn within_a_user_the_connection_holding_the_most_goes() {
        let mut s = Shares::new(fds(100));
        s.join(1, 7);
        s.join(2, 7);
        s.charge(1, fds(5));
        s.charge(2, fds(96));
        assert_eq!(s.victim(Resource::Fds), Some(2));
        s.closing(2);
        // A connection being closed is not picked again, though what it
        // holds still counts until it is freed (rr48e F2: an eviction that
        // frees nothing is no room made).
        assert_eq!(s.over(fds(1)), Some(Resource::Fds));
        assert_eq!(s.victim(Resource::Fds), Some(1));
        s.closing(1);
        assert_eq!(s.victim(Resource::Fds), None);
    }

    /// Nobody within the budget is a victim, and a user within its share
    /// never is.
    #[test]
    fn nobody_goes_within_the_budget_or_within_a_share() {
        let mut s = Shares::new(fds(100));
        s.join(1, 1);
        s.join(2, 2);
        s.charge(1, fds(50));
        s.charge(2, fds(50));
        assert_eq!(s.over(fds(1)), None);
        s.charge(2, fds(1));
        assert_eq!(s.over(fds(1)), Some(Resource::Fds));
        assert_eq!(s.victim(Resource::Fds), Some(2));
        assert!(!s.over_share(1, Resource::Fds));
        // A claim adding no descriptors is not over for descriptors.
        assert_eq!(s.over(Unread::frame(10, false)), None);
    }

    /// Bytes are shared as descriptors are.
    #[test]
    fn bytes_have_shares_too() {
        let mut s = Shares::new(Unread {
            fds: usize::MAX,
            bytes: 1 << 20,
        });
        s.join(1, 1);
        s.join(2, 2);
        s.charge(1, Unread::frame(900 << 10, false));
        s.charge(2, Unread::frame(200 << 10, false));
        assert_eq!(
            s.over(Unread::frame(1, false)),
            Some(Resource::Bytes),
            "over by bytes"
        );
        assert_eq!(s.victim(Resource::Bytes), Some(1));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Join(u64, u32),
        Charge(u64, Unread),
        Read(u64, Unread),
        Close(u64),
        Leave(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let id = 0u64..6;
        let un = (0usize..3, 0usize..500).prop_map(|(fds, bytes)| Unread { fds, bytes });
        prop_oneof![
            (id.clone(), 0u32..3).prop_map(|(i, u)| Step::Join(i, u)),
            (id.clone(), un.clone()).prop_map(|(i, u)| Step::Charge(i, u)),
            (id.clone(), un).prop_map(|(i, u)| Step::Read(i, u)),
            id.clone().prop_map(Step::Close),
            id.prop_map(Step::Leave),
        ]
    }

    proptest! {
        /// The totals are always the sum of the connections', by user and
        /// in all; a victim is always an open connection of a user over
        /// its share.
        #[test]
        fn totals_add_up_and_victims_are_over_their_share(
            steps in proptest::collection::vec(step(), 0..60)
        ) {
            let mut s = Shares::new(Unread { fds: 6, bytes: 1000 });
            for st in steps {
                match st {
                    Step::Join(i, u) => {
                        if s.members.contains_key(&i) { s.leave(i); }
                        s.join(i, u);
                    }
                    Step::Charge(i, u) => s.charge(i, u),
                    Step::Read(i, u) => {
                        let held = s.of(i);
                        let u = Unread { fds: u.fds.min(held.fds), bytes: u.bytes.min(held.bytes) };
                        s.discharge(i, u);
                    }
                    Step::Close(i) => s.closing(i),
                    Step::Leave(i) => s.leave(i),
                }
                let mut total = Unread::default();
                let mut by_uid: HashMap<u32, Unread> = HashMap::new();
                for m in s.members.values() {
                    total.add(m.unread);
                    by_uid.entry(m.uid).or_default().add(m.unread);
                }
                by_uid.retain(|_, u| !u.is_empty());
                prop_assert_eq!(total, s.total());
                prop_assert_eq!(&by_uid, &s.by_uid);
                for r in [Resource::Fds, Resource::Bytes] {
                    if let Some(v) = s.victim(r) {
                        let m = &s.members[&v];
                        prop_assert!(!m.closing);
                        prop_assert!(s.over_share(m.uid, r));
                        prop_assert!(m.unread.get(r) > 0);
                    }
                }
            }
        }
    }
}
