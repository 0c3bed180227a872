//! Lease breaks that must wait before they go to the client: for the
//! open holding their lease to be stored in smbshim's open table, and for
//! the replies of the calls that stored (or are making) opens under their
//! lease to be queued.
//!
//! filterd sends a break only after the reply that granted the lease, on
//! the same connection — but the reply goes to the thread whose CREATE (or
//! RECONNECT) asked, and the break to the member's event thread
//! (`forward_breaks`), which may look for the lease's open before that
//! thread has stored it. Such a break found no open and was dropped: the
//! breaking request waited the whole break timeout, and the client kept
//! a lease it no longer held (re-review rr38h). A client that sees the
//! break before the reply of an open under the lease takes the reply's
//! lease state over the one broken to, so a break waits ([`PendingBreak`])
//! for every call in flight that filterd answered before it, granting an
//! open under its lease ([`EarlyBreaks::park`]; of the lease's client,
//! once an open says whose it is), and for the reply of every call that
//! stored an open under it and is not yet answered (the server's
//! `HeldNotes`). Before (re-review rr39f 2), it waited behind one such
//! reply only, or was taken by the first open stored under the key: with
//! two CREATEs of one client under one key, the client could see the
//! break before the other's reply, and that open kept the state from
//! before the break.
//!
//! filterd sends a break of a lease only after every reply granting an
//! open under it (its `break_dependency`; replies waiting for a commit
//! are sent before what the engine sends next), on the same connection,
//! and libfilter's reader marks a call answered
//! (`libfilter::client::AnswerMark`, with the lease key its answer names)
//! before it reads the next frame: the calls marked when the break is
//! read are those it must wait for. A call not yet answered is not
//! waited for: it was granted nothing before the break — and it may be
//! waiting in filterd for another break's ack (re-review rr40c F1: a
//! CREATE of the holder's under the key that broke another client's
//! lease held the holder's break until that other break timed out). The
//! answer's key, not the request's, says which lease it holds (rr40c F2:
//! a replay naming no lease that reattached an open under the lease was
//! not waited for once the lease's client was known).
//!
//! A call that stores an open under the lease key on the break's file
//! takes the break ([`EarlyBreaks::take`]): applies it to its open and
//! holds it behind its own reply. Only a call in flight when the break
//! came can have been granted the lease before it — a later one, say the
//! same client opening the file again under the key after the break
//! ended, holds a lease filterd granted anew, and took a stale break
//! before (re-review rr39b 1). A break whose calls all ended without
//! storing such an open, and that no stored open held, goes nowhere — that
//! open was refused, or let go or closed (filterd ends the break of a
//! lease no attached open holds any more at once: its
//! `settle_unackable_break` and `lease_key_released`), so nothing waits
//! for an ack of it. As nfsshim's `Opening` does for its OPENs.
//!
//! Bounded: a call in flight holds an open slot (`open_slot`), and the
//! breaks waiting for calls are at most [`PARKED_MAX`] — past that the
//! oldest stops waiting for its calls (it goes if it has somewhere to go,
//! else, as before the fix, it waits out the break timeout in filterd).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use libfilter::client::AnswerMark;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::FileId;
use serde_json::Value;

/// Most breaks waiting for calls per member at once.
pub(crate) const PARKED_MAX: usize = 1024;

/// A lease break as filterd sent it (`Event::LeaseBreak`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Break {
    pub lease_key: LeaseKey,
    pub current_state: LeaseState,
    pub new_state: LeaseState,
    pub epoch: u16,
    pub ack_required: bool,
    pub file: Option<FileId>,
}

/// Whether a call of `client` whose filterd answer is marked in `mark`
/// made an open under lease `key` of `owner`'s (None: not known yet): it
/// was answered, granting an open under the key — to the lease's client,
/// once an open under the lease says whose it is.
fn answered_under(
    mark: &AnswerMark,
    client: uuid::Uuid,
    key: LeaseKey,
    owner: Option<uuid::Uuid>,
) -> bool {
    mark.answered() == Some(Some(key)) && owner.is_none_or(|o| o == client)
}

/// What [`EarlyBreaks::park`] did with a break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parked {
    /// Not parked: no call in flight may make an open under its lease.
    Not,
    Yes,
    /// Parked, and the oldest parked break, of this lease, stopped
    /// waiting for its calls for it ([`PARKED_MAX`]).
    Dropping(LeaseKey),
}

/// A LEASE_BREAK notification and what it waits for before it goes: its
/// gates, each passed once — the arrival (`forward_breaks` until it has
/// looked for opens and calls), the calls in flight when it came that may
/// make an open under its lease (one gate for all of them while parked,
/// [`EarlyBreaks`]), and each reply, not yet queued, of a call that stored
/// an open under it (the server's `HeldNotes`). The last gate passed sends
/// it: on the connection of the last reply queued, else on the one of the
/// session of an open under the lease ([`PendingBreak::fall_back_to`]);
/// with neither, it goes nowhere.
pub(crate) struct PendingBreak {
    note: Value,
    gates: Mutex<Gates>,
}

#[derive(Default)]
struct Gates {
    /// Gates not yet passed.
    open: usize,
    /// The connection of the last reply queued that it waited for.
    via: Option<shimline::Writer>,
    /// The connection of the session of an open under its lease.
    to: Option<shimline::Writer>,
    /// Every gate passed with no connection known: it goes to `to` once
    /// known.
    unsent: bool,
}

impl Gates {
    /// Sends `note` on `via`, else on `to`; false if neither took it.
    fn send(&self, note: &Value) -> bool {
        [self.via.as_ref(), self.to.as_ref()]
            .into_iter()
            .flatten()
            .any(|w| shimline::send(w, note))
    }
}

impl PendingBreak {
    /// The break `note`, with its arrival gate only.
    pub(crate) fn new(note: Value) -> Arc<PendingBreak> {
        Arc::new(PendingBreak {
            note,
            gates: Mutex::new(Gates {
                open: 1,
                ..Gates::default()
            }),
        })
    }

    /// One more gate to pass before it goes.
    pub(crate) fn gate(&self) {
        if let Ok(mut g) = self.gates.lock() {
            g.open = g.open.saturating_add(1);
        }
    }

    /// One gate passed — a reply queued on `w`, or without a connection (a
    /// call that ended, a reply that did not go, the arrival). The last
    /// sends it. Never blocks: `shimline::send` queues.
    pub(crate) fn pass(&self, w: Option<&shimline::Writer>) {
        let Ok(mut g) = self.gates.lock() else {
            return;
        };
        // Every gate passed already: it went (or waits for `to`) once.
        if g.open == 0 {
            return;
        }
        if let Some(w) = w {
            g.via = Some(w.clone());
        }
        g.open -= 1;
        if g.open == 0 {
            g.unsent = !g.send(&self.note);
        }
    }

    /// The connection of the session of an open under its lease, where it
    /// goes when no reply's connection takes it: a client whose CREATE
    /// named its session on another connection that then died still holds
    /// the lease there, and would keep it while the breaker waits the
    /// whole break timeout (re-review rr39f). Sent now if it waited for
    /// this.
    pub(crate) fn fall_back_to(&self, to: shimline::Writer) {
        let Ok(mut g) = self.gates.lock() else {
            return;
        };
        g.to = Some(to);
        if g.unsent {
            g.unsent = !g.send(&self.note);
        }
    }

    /// Whether every gate was passed: it went, or goes once a connection
    /// is known (tests).
    #[cfg(test)]
    fn due(&self) -> bool {
        self.gates.lock().is_ok_and(|g| g.open == 0)
    }
}

/// One member's calls in flight that make opens, and the breaks waiting
/// for them.
#[derive(Default)]
pub(crate) struct EarlyBreaks(Mutex<Inner>);

/// A break waiting for calls.
struct Parking {
    b: Break,
    pending: Arc<PendingBreak>,
    /// The calls in flight when it came that may make an open under its
    /// lease and have not ended: it holds one gate of `pending` while any
    /// is left.
    calls: BTreeSet<u64>,
}

#[derive(Default)]
struct Inner {
    /// The number the next call gets.
    next: u64,
    /// The calls in flight, by number, each with its filterd answer's
    /// mark and its client's GUID.
    in_flight: BTreeMap<u64, (Arc<AnswerMark>, uuid::Uuid)>,
    /// Oldest first.
    parked: VecDeque<Parking>,
}

impl Inner {
    /// Call `n` is no longer waited for by the parked breaks (it ended, or
    /// took them); those it was the last call of pass their gate.
    fn let_go_of(&mut self, n: u64, only: impl Fn(&Break) -> bool) {
        self.parked.retain_mut(|p| {
            if only(&p.b) && p.calls.remove(&n) && p.calls.is_empty() {
                p.pending.pass(None);
                return false;
            }
            true
        });
    }
}

/// A call that makes an open, in flight from [`EarlyBreaks::begin`] until
/// dropped (after its open is stored, or it failed).
pub(crate) struct Making<'a> {
    early: &'a EarlyBreaks,
    n: u64,
    mark: Arc<AnswerMark>,
}

impl Making<'_> {
    /// Where filterd's answer to the call is marked: its request is made
    /// under it (`libfilter::client::marking_answers`).
    pub(crate) fn mark(&self) -> &Arc<AnswerMark> {
        &self.mark
    }

    /// The call's number: it may take the breaks parked for it
    /// ([`EarlyBreaks::take`]).
    pub(crate) fn number(&self) -> u64 {
        self.n
    }
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        if let Ok(mut i) = self.early.0.lock() {
            i.in_flight.remove(&self.n);
            i.let_go_of(self.n, |_| true);
        }
    }
}

impl EarlyBreaks {
    /// A call of client `client` that may make an open starts (before
    /// its request is sent, under [`Making::mark`]).
    pub(crate) fn begin(&self, client: uuid::Uuid) -> Making<'_> {
        let mark = Arc::new(AnswerMark::default());
        let n = self.0.lock().map_or(u64::MAX, |mut i| {
            let n = i.next;
            i.next = i.next.wrapping_add(1);
            i.in_flight.insert(n, (mark.clone(), client));
            n
        });
        Making {
            early: self,
            n,
            mark,
        }
    }

    /// Break `b` (`pending`) waits for the calls in flight that filterd
    /// answered, granting an open under its lease, if any
    /// ([`answered_under`]; of `client`, when an open under the lease
    /// says whose it is): they were granted it before it and may not have
    /// stored their opens, or not queued their replies. Called under the
    /// open table's lock, as [`EarlyBreaks::take`] is; the caller logs a
    /// break dropped for room once out of it.
    pub(crate) fn park(
        &self,
        b: Break,
        pending: &Arc<PendingBreak>,
        client: Option<uuid::Uuid>,
    ) -> Parked {
        let Ok(mut i) = self.0.lock() else {
            return Parked::Not;
        };
        let calls: BTreeSet<u64> = i
            .in_flight
            .iter()
            .filter(|(_, (mark, c))| answered_under(mark, *c, b.lease_key, client))
            .map(|(n, _)| *n)
            .collect();
        if calls.is_empty() {
            return Parked::Not;
        }
        let dropped = match i.parked.len() >= PARKED_MAX {
            true => i.parked.pop_front().map(|old| {
                old.pending.pass(None);
                old.b.lease_key
            }),
            false => None,
        };
        pending.gate();
        i.parked.push_back(Parking {
            b,
            pending: pending.clone(),
            calls,
        });
        match dropped {
            Some(k) => Parked::Dropping(k),
            None => Parked::Yes,
        }
    }

    /// The parked breaks of lease `key` on `file` that wait for call
    /// `call` (its [`Making::number`]), which just stored an open under
    /// the key — those that came while it was in flight — oldest first,
    /// each with a gate more for the caller to hold behind the call's
    /// reply. They no longer wait for the call, nor for calls the call's
    /// client, now known as the lease's, makes those of no longer
    /// ([`answered_under`]).
    pub(crate) fn take(
        &self,
        key: LeaseKey,
        file: FileId,
        call: u64,
    ) -> Vec<(Break, Arc<PendingBreak>)> {
        let Ok(mut i) = self.0.lock() else {
            return Vec::new();
        };
        let mine = |b: &Break| b.lease_key == key && b.file.is_none_or(|f| f == file);
        let client = i.in_flight.get(&call).map(|(_, c)| *c);
        let Inner {
            in_flight, parked, ..
        } = &mut *i;
        let mut taken = Vec::new();
        for p in parked
            .iter_mut()
            .filter(|p| mine(&p.b) && p.calls.contains(&call))
        {
            p.pending.gate();
            taken.push((p.b, p.pending.clone()));
            p.calls.retain(|n| {
                *n == call
                    || in_flight
                        .get(n)
                        .is_some_and(|(mark, c)| answered_under(mark, *c, key, client))
            });
        }
        i.let_go_of(call, mine);
        taken
    }

    /// Forgets every parked break: filterd restarted, and no break of
    /// before is in progress there. They never go.
    pub(crate) fn clear(&self) {
        if let Ok(mut i) = self.0.lock() {
            i.parked.clear();
        }
    }

    /// How many breaks are parked (tests).
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.0.lock().map_or(0, |i| i.parked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brk(key: LeaseKey, file: Option<FileId>) -> Break {
        Break {
            lease_key: key,
            current_state: LeaseState::parse("RWH").unwrap_or(LeaseState::NONE),
            new_state: LeaseState::NONE,
            epoch: 2,
            ack_required: true,
            file,
        }
    }

    fn key() -> LeaseKey {
        LeaseKey(uuid::Uuid::new_v4())
    }

    /// Two clients.
    const A: uuid::Uuid = uuid::Uuid::from_u128(1);
    const B: uuid::Uuid = uuid::Uuid::from_u128(2);

    /// A call of `client` filterd answered, granting an open under
    /// `lease` (None: without a lease).
    fn answered(e: &EarlyBreaks, lease: Option<LeaseKey>, client: uuid::Uuid) -> Making<'_> {
        let m = e.begin(client);
        m.mark().mark_answered(lease);
        m
    }

    /// Parks `b` as `forward_breaks` does, its arrival gate passed.
    fn park(e: &EarlyBreaks, b: Break) -> (Parked, Arc<PendingBreak>) {
        let p = PendingBreak::new(Value::Null);
        let parked = e.park(b, &p, None);
        p.pass(None);
        (parked, p)
    }

    /// Nothing is parked with no call in flight that filterd answered
    /// with an open under the lease, and a break goes once every such call
    /// has ended — not with a later call still in flight, which cannot
    /// have been granted its lease.
    #[test]
    fn a_break_is_parked_only_for_the_calls_in_flight_when_it_came() {
        let e = EarlyBreaks::default();
        let k = key();
        assert_eq!(park(&e, brk(k, None)).0, Parked::Not);
        let first = answered(&e, Some(k), A);
        let _other = answered(&e, Some(key()), A);
        let _none = answered(&e, None, A);
        assert_eq!(park(&e, brk(k, None)).0, Parked::Yes);
        let later = answered(&e, Some(k), A);
        assert_eq!(e.parked(), 1);
        drop(first);
        assert_eq!(e.parked(), 0, "the call it waited for failed");
        // One parked for both calls stays while either is in flight.
        let again = answered(&e, Some(k), A);
        assert_eq!(park(&e, brk(k, None)).0, Parked::Yes);
        drop(later);
        assert_eq!(e.parked(), 1);
        drop(again);
        assert_eq!(e.parked(), 0);
    }

    /// A break waits for no call filterd has not answered: such a call
    /// may itself wait in filterd for another break's ack, and the break
    /// waited with it until the break timeout (re-review rr40c F1). Once
    /// answered, a call whose answer names the lease is waited for,
    /// whatever its request named (rr40c F2: a replay naming no lease).
    #[test]
    fn a_break_waits_for_no_unanswered_call() {
        let e = EarlyBreaks::default();
        let (k, f) = (key(), FileId { dev: 1, ino: 2 });
        let waiting = e.begin(A);
        assert_eq!(park(&e, brk(k, Some(f))).0, Parked::Not);
        let replay = e.begin(A);
        replay.mark().mark_answered(Some(k));
        assert_eq!(park(&e, brk(k, Some(f))).0, Parked::Yes);
        assert_eq!(e.take(k, f, replay.number()).len(), 1);
        drop((waiting, replay));
    }

    /// A stored open takes the breaks of its lease key on its file (or
    /// of no file named), once; others stay parked.
    #[test]
    fn an_open_takes_the_breaks_of_its_lease_on_its_file() {
        let e = EarlyBreaks::default();
        let (k, other) = (key(), key());
        let m = answered(&e, Some(k), A);
        let o = answered(&e, Some(other), A);
        let (f, g) = (FileId { dev: 1, ino: 2 }, FileId { dev: 1, ino: 3 });
        for b in [
            brk(k, Some(f)),
            brk(k, Some(g)),
            brk(other, Some(f)),
            brk(k, None),
        ] {
            assert_eq!(park(&e, b).0, Parked::Yes);
        }
        let n = m.number();
        let taken: Vec<Break> = e.take(k, f, n).into_iter().map(|(b, _)| b).collect();
        assert_eq!(taken, vec![brk(k, Some(f)), brk(k, None)]);
        assert!(e.take(k, f, n).is_empty(), "taken once");
        assert!(e.take(other, f, n).is_empty(), "not its lease");
        assert_eq!(e.parked(), 2);
        e.clear();
        assert_eq!(e.parked(), 0);
        drop(o);
    }

    /// However many breaks come while a call is in flight, at most
    /// [`PARKED_MAX`] are held, the latest.
    #[test]
    fn the_parked_breaks_are_bounded() {
        let e = EarlyBreaks::default();
        let k = key();
        let m = answered(&e, Some(k), A);
        assert_eq!(
            park(&e, brk(k, Some(FileId { dev: 0, ino: 1 }))).0,
            Parked::Yes
        );
        for _ in 1..PARKED_MAX {
            assert_eq!(
                park(&e, brk(k, Some(FileId { dev: 0, ino: 2 }))).0,
                Parked::Yes
            );
        }
        assert_eq!(park(&e, brk(k, None)).0, Parked::Dropping(k));
        assert_eq!(e.parked(), PARKED_MAX);
        let f = FileId { dev: 0, ino: 0 };
        assert_eq!(e.take(k, f, m.number()).len(), 1, "the latest only");
        let first = FileId { dev: 0, ino: 1 };
        assert!(e.take(k, first, m.number()).is_empty(), "dropped for room");
    }

    /// A break parked before a call began is not that call's: the call
    /// was granted its lease after the break (re-review rr39b 1: a client
    /// that opened a file again under the key took a stale break, of a
    /// lease it no longer held as the break said). Calls answered when it
    /// came still may take it.
    #[test]
    fn a_break_goes_only_to_a_call_in_flight_when_it_came() {
        let e = EarlyBreaks::default();
        let (k, f) = (key(), FileId { dev: 1, ino: 2 });
        let long = answered(&e, Some(k), A);
        assert_eq!(park(&e, brk(k, Some(f))).0, Parked::Yes);
        let again = answered(&e, Some(k), A);
        assert!(e.take(k, f, again.number()).is_empty());
        assert_eq!(e.parked(), 1);
        assert_eq!(e.take(k, f, long.number()).len(), 1);
    }

    /// A break waiting for two calls under its lease is taken by both
    /// (each open under the lease holds what it was broken to) and goes
    /// once the last gate passes — both calls ended and both replies
    /// queued — not when the first open is stored and its reply queued
    /// (re-review rr39f 2: it went behind the first reply only).
    #[test]
    fn a_break_waits_for_every_call_under_its_lease() {
        let e = EarlyBreaks::default();
        let (k, f) = (key(), FileId { dev: 1, ino: 2 });
        let (one, two) = (answered(&e, Some(k), A), answered(&e, Some(k), A));
        let (parked, p) = park(&e, brk(k, Some(f)));
        assert_eq!(parked, Parked::Yes);
        let first = e.take(k, f, one.number());
        assert_eq!(first.len(), 1);
        drop(one);
        // The first reply is queued (its connection gone here).
        first.iter().for_each(|(_, p)| p.pass(None));
        assert!(!p.due());
        assert_eq!(e.parked(), 1, "still waiting for the second call");
        let second = e.take(k, f, two.number());
        assert_eq!(second.len(), 1);
        assert_eq!(e.parked(), 0);
        drop(two);
        assert!(!p.due(), "the second reply is not queued");
        second.iter().for_each(|(_, p)| p.pass(None));
        assert!(p.due());
    }

    /// Once an open says whose the lease is, a break waits for that
    /// client's calls only: another client's answered under the same key
    /// (it holds another lease) is waited for only while no open says.
    #[test]
    fn a_break_waits_for_its_clients_calls_only() {
        let e = EarlyBreaks::default();
        let (k, f) = (key(), FileId { dev: 1, ino: 2 });
        let others_key = answered(&e, Some(k), B);
        let p = PendingBreak::new(Value::Null);
        assert_eq!(e.park(brk(k, Some(f)), &p, Some(A)), Parked::Not);
        p.pass(None);
        assert!(p.due());
        // Parked for all while whose it is is not known; the first open
        // stored under it says.
        let (mine, again) = (answered(&e, Some(k), A), answered(&e, Some(k), A));
        let (parked, p) = park(&e, brk(k, Some(f)));
        assert_eq!(parked, Parked::Yes);
        let taken = e.take(k, f, mine.number());
        assert_eq!(taken.len(), 1);
        taken.iter().for_each(|(_, p)| p.pass(None));
        assert_eq!(
            e.parked(),
            1,
            "waiting for alice's other call under the key"
        );
        drop(again);
        assert_eq!(e.parked(), 0, "not for the others");
        assert!(p.due());
        drop(others_key);
    }
}
