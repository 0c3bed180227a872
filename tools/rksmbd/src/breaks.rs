//! Lease and oplock breaks: filterd's `LeaseBreak` events become SMB2
//! lease break notifications (MS-SMB2 2.2.23.2) — or oplock break
//! notifications (2.2.23.1) for an oplock — on the connection that holds
//! it, and the client's acknowledgment (2.2.24.1, 2.2.24.2) goes back to
//! filterd (2.2.25.1, 2.2.25.2 answer it).
//!
//! An oplock is a filterd lease under a key rksmbd makes for the open
//! ([`oplock_key`], recognisable by its first eight bytes, so a reconnect
//! after an rksmbd restart still knows it was an oplock): level II is R,
//! exclusive RW, batch RWH.
//!
//! Each connection registers its writer here; a notification is written
//! by a short-lived thread of its own, so a client that does not read
//! stalls only that thread, never the events loop or other clients.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use libfilter::attach::AttachEvent;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::{ClientId, HeldLease, ResumeKey};
use libfilter::proto::{ErrorCode, Event, Reply as FilterReply, Request as FilterRequest};

use crate::breaking::BreaksInProgress;
use crate::files::status_of;
use crate::server::{Connection, Outcome, Reply, Request, Shared, MAX_SESSIONS_PER_CONNECTION};
use crate::wire::{self, status, Header, Reader, Writer};

/// A connection's socket, shared by its thread and lease-break writers.
pub type ConnWriter = Arc<Mutex<TcpStream>>;

/// How a lease is known to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A lease (v2: the notification carries the epoch).
    Lease {
        /// A v2 lease.
        v2: bool,
        /// The key as its client chose it (filterd knows the lease by
        /// [`scoped_key`]).
        key: [u8; 16],
    },
    /// An oplock on the open with this FileId.
    Oplock {
        /// The open's SMB2 FileId (persistent ‖ volatile).
        file_id: [u8; 16],
    },
}

/// Who holds which lease, and how to reach each connection.
#[derive(Default)]
pub struct Notifier {
    writers: Mutex<HashMap<u64, ConnWriter>>,
    /// The client GUID each connection negotiated, and the sessions
    /// logged on over it with their users (as [`Notifier::user_tag`]s): a
    /// lease's breaks go only to a connection with a live session of its
    /// user, never one that merely names the client GUID (it goes in
    /// clear), has not logged on, or whose session of that user ended (a
    /// PreviousSessionId from a reconnect on another connection, a
    /// LOGOFF): a half-open old connection could neither receive nor
    /// acknowledge the break (re-review rr39h F1).
    guids: Mutex<HashMap<u64, (uuid::Uuid, Vec<SessionOf>)>>,
    /// Keys for [`Notifier::user_tag`] (this process's own).
    tags: std::collections::hash_map::RandomState,
    /// Per lease key: who holds it and where its breaks go.
    holders: Mutex<HashMap<LeaseKey, Held>>,
    /// The lease of each filterd handle that holds one (to find the
    /// leases of handles a restarted filterd forgot).
    handles: Mutex<HashMap<ResumeKey, LeaseKey>>,
    /// Breaks awaiting an acknowledgment that came for a lease no
    /// connection holds yet: filterd sends a break in progress again to a
    /// holder that resumes (DH2C) behind the reply that resumes it, and
    /// the reconnect's thread may not have told [`Notifier::granted`]
    /// yet. The grant sends it ([`Notifier::route_or_park`]).
    undelivered: Mutex<HashMap<LeaseKey, Undelivered>>,
}

/// A session on a connection and its user's [`Notifier::user_tag`]
/// ([`Notifier::guids`]).
type SessionOf = (u64, u64);

/// A break waiting for its lease's grant ([`Notifier::undelivered`]).
#[derive(Debug, Clone, Copy)]
struct Undelivered {
    at: std::time::Instant,
    from: LeaseState,
    to: LeaseState,
    epoch: u16,
}

/// How long a break waits for its lease's grant
/// ([`Notifier::undelivered`]): a reconnect grants it within moments; one
/// that never comes (the DH2C failed) is dropped, and filterd lowers the
/// lease at its break timeout.
const UNDELIVERED_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Most breaks waiting for their lease's grant (a memory bound).
const MAX_UNDELIVERED: usize = 4096;

/// A lease or oplock some open of this rksmbd holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The connection it was last granted on.
    conn: u64,
    /// The client GUID of that connection.
    guid: uuid::Uuid,
    /// The user whose open it was granted to ([`Notifier::user_tag`]).
    user: u64,
    /// How the client knows it.
    holder: Holder,
    /// How many opens of this rksmbd hold it.
    opens: usize,
    /// The state last granted or broken to, and its epoch.
    state: LeaseState,
    epoch: u16,
    /// The last break of the lease that wants an acknowledgment, and the
    /// connection it was written to: sent again on the client's next
    /// route if that connection's socket ends while the break is still
    /// in progress ([`Notifier::disconnected`]).
    sent: Option<Sent>,
}

/// A lease break notification written to a connection ([`Held::sent`]).
#[derive(Debug, Clone, Copy)]
struct Sent {
    conn: u64,
    from: LeaseState,
    to: LeaseState,
    epoch: u16,
}

/// A lease filterd lowered without a word this rksmbd could pass on: its
/// client is told with a break that wants no acknowledgment
/// ([`send_unacked`]). Every handle of it a restarted filterd forgot
/// ([`Notifier::forgotten`]: to none), or lowered while this rksmbd was
/// detached ([`Notifier::lowered`]).
pub struct UnsaidBreak {
    key: LeaseKey,
    writer: ConnWriter,
    holder: Holder,
    /// What the client holds.
    from: LeaseState,
    /// What filterd holds now.
    to: LeaseState,
    /// The notification's epoch.
    epoch: u16,
}

/// The first bytes of the lease keys rksmbd makes for oplocks (filterd
/// breaks and grants them as oplocks by this tag).
const OPLOCK_TAG: &[u8; 8] = libfilter::lease::OPLOCK_KEY_TAG;

/// A fresh lease key for an oplock.
pub fn oplock_key() -> LeaseKey {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(OPLOCK_TAG);
    b[8..].copy_from_slice(&crate::ntlm::random_bytes::<8>());
    LeaseKey(uuid::Uuid::from_bytes(b))
}

/// The filterd lease key of lease `key` of client `guid`. A lease belongs
/// to its client's GUID (MS-SMB2 3.3.1.4: a LeaseTable per ClientGuid):
/// the same key from another client is another lease. Hashed, not mixed
/// reversibly, so no client can pick a key that lands on another's (both
/// GUID and key go in clear); never an oplock key (review B-4: two clients
/// sharing one key were both granted write caching of one file).
pub fn scoped_key(guid: uuid::Uuid, key: [u8; 16]) -> LeaseKey {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"rksmbd lease key\0")
        .chain_update(guid.as_bytes())
        .chain_update(key)
        .finalize();
    let mut b: [u8; 16] = digest
        .get(..16)
        .and_then(|d| d.try_into().ok())
        .unwrap_or_default();
    if b.starts_with(OPLOCK_TAG) {
        b[0] ^= 1;
    }
    LeaseKey(uuid::Uuid::from_bytes(b))
}

/// Whether a lease key is one rksmbd made for an oplock.
pub use libfilter::lease::is_oplock_key;

/// The lease state an oplock level asks for: level II R, exclusive RW,
/// batch RWH (2.2.13 RequestedOplockLevel).
pub fn oplock_state(level: u8) -> Option<LeaseState> {
    match level {
        0x01 => Some(LeaseState::R),
        0x08 => Some(LeaseState::R.with(LeaseState::W)),
        0x09 => Some(LeaseState::R.with(LeaseState::W).with(LeaseState::H)),
        _ => None,
    }
}

/// The oplock level a lease state amounts to.
pub fn oplock_level(s: LeaseState) -> u8 {
    if s.contains(LeaseState::W) && s.contains(LeaseState::H) {
        0x09
    } else if s.contains(LeaseState::W) {
        0x08
    } else if s.contains(LeaseState::R) {
        0x01
    } else {
        0
    }
}

impl Notifier {
    /// A connection starts: its writer can carry notifications.
    pub fn connected(&self, conn: u64, w: ConnWriter) {
        if let Ok(mut m) = self.writers.lock() {
            m.insert(conn, w);
        }
    }

    /// A connection negotiated: its client GUID.
    pub fn negotiated(&self, conn: u64, guid: uuid::Uuid) {
        if let Ok(mut m) = self.guids.lock() {
            m.insert(conn, (guid, Vec::new()));
        }
    }

    /// `user` logged on over connection `conn` in session `session` (a
    /// session set up or a channel bound); `live` says which of the
    /// connection's sessions still live (in its table, logged on, not
    /// ended). The connection's entries are those of its live sessions
    /// (those that went without a word here go now), so they are at most
    /// [`MAX_SESSIONS_PER_CONNECTION`], the sessions a connection may
    /// have, its own and channels bound to it alike. Before (review rr39k
    /// A4), a session that left the connection's table unsaid — a channel
    /// bound while its session ended at its home, then unbound — kept its
    /// entry, 64 such filled the list (capped there), and a
    /// session logged on after them was not written down: its user's
    /// breaks no longer went to the connection, nor were its
    /// acknowledgments taken there. Returns whether it is written down
    /// (not on a connection that never negotiated, nor past the bound,
    /// which cannot be).
    pub fn logged_on(
        &self,
        conn: u64,
        (session, user): (u64, &str),
        live: impl Fn(u64) -> bool,
    ) -> bool {
        let tag = self.user_tag(user);
        // Asked outside the lock: `live` may wait for a session's own
        // lock, which an ending elsewhere holds while it releases the
        // session's handles in filterd, and the events thread must not
        // wait behind it. Only this connection's thread adds its entries.
        let known: Vec<u64> = self.guids.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.get(&conn)
                    .map(|(_, users)| users.iter().map(|(s, _)| *s).collect())
                    .unwrap_or_default()
            },
        );
        let gone: Vec<u64> = known.into_iter().filter(|s| !live(*s)).collect();
        let Ok(mut m) = self.guids.lock() else {
            return false;
        };
        let Some((_, users)) = m.get_mut(&conn) else {
            return false;
        };
        if users.contains(&(session, tag)) {
            return true;
        }
        users.retain(|(s, _)| !gone.contains(s));
        if users.len() >= MAX_SESSIONS_PER_CONNECTION {
            // Cannot be: the connection's table holds no more sessions.
            tracing::error!(
                conn,
                session,
                "more live sessions on a connection than it may have: its user's lease breaks do not come here"
            );
            return false;
        }
        users.push((session, tag));
        true
    }

    /// Session `session` ended (LOGOFF, PreviousSessionId from another
    /// connection, its home connection gone): the connections it was on
    /// no longer carry its user's breaks unless another session of that
    /// user lives there.
    pub fn session_ended(&self, session: u64) {
        if let Ok(mut m) = self.guids.lock() {
            for (_, users) in m.values_mut() {
                users.retain(|(s, _)| *s != session);
            }
        }
    }

    /// Session `session` left connection `conn` (a channel unbound, or a
    /// session the connection forgot), wherever else it lives on.
    pub fn session_left(&self, conn: u64, session: u64) {
        if let Some((_, users)) = self
            .guids
            .lock()
            .ok()
            .as_mut()
            .and_then(|m| m.get_mut(&conn))
        {
            users.retain(|(s, _)| *s != session);
        }
    }

    /// A user's name as a number (this process's keyed hash).
    fn user_tag(&self, user: &str) -> u64 {
        self.tags.hash_one(user)
    }

    /// Whether `user` logged on over connection `conn` as the user lease
    /// `key` was granted to: its acknowledgment may come there.
    pub fn may_acknowledge(&self, key: &LeaseKey, conn: u64) -> bool {
        let Some(user) = self
            .holders
            .lock()
            .ok()
            .and_then(|m| m.get(key).map(|h| h.user))
        else {
            // Not one of this rksmbd's: filterd says what it knows.
            return true;
        };
        self.carries(conn, user)
    }

    /// Whether connection `conn` has a live session of user tag `user`.
    fn carries(&self, conn: u64, user: u64) -> bool {
        self.guids.lock().is_ok_and(|m| {
            m.get(&conn)
                .is_some_and(|(_, users)| users.iter().any(|(_, t)| *t == user))
        })
    }

    /// A connection ends: its leases are no longer reachable through it,
    /// unless another connection of the same client GUID lives on (the
    /// leases of a client are its, not a connection's: MS-SMB2 3.3.4.7).
    /// A lease break written to it whose acknowledgment `breaking` still
    /// awaits is sent again, the same notification, on the client's next
    /// route (3.3.4.7 lets the server use another channel when the first
    /// fails): before, the client never heard of it — the connection's
    /// socket had ended, maybe before it read the break — and filterd
    /// lowered the lease at its break timeout, untold. A client that did
    /// read the first and acknowledges twice is told STATUS_UNSUCCESSFUL
    /// the second time (no break in progress), which changes nothing.
    pub fn disconnected(&self, conn: u64, breaking: &BreaksInProgress) {
        let again = self.moved_from(conn, breaking);
        for (key, w, frame) in again {
            tracing::info!(conn, lease_key = %key.0, "lease break sent again on the client's next live connection");
            send(w, frame);
        }
    }

    /// [`Self::disconnected`] but for the sending: moves the leases of
    /// `conn` and returns the breaks to send again, with where.
    fn moved_from(
        &self,
        conn: u64,
        breaking: &BreaksInProgress,
    ) -> Vec<(LeaseKey, ConnWriter, Vec<u8>)> {
        if let Ok(mut m) = self.writers.lock() {
            m.remove(&conn);
        }
        if let Ok(mut m) = self.guids.lock() {
            m.remove(&conn);
        }
        let Ok(mut m) = self.holders.lock() else {
            return Vec::new();
        };
        let mut moved = Vec::new();
        for (k, h) in m.iter() {
            if h.conn != conn {
                continue;
            }
            let other = match h.holder {
                Holder::Lease { .. } => self.oldest_of(h.guid, h.user),
                Holder::Oplock { .. } => None,
            };
            moved.push((*k, other));
        }
        for (k, other) in moved {
            match (other, m.get_mut(&k)) {
                (Some(c), Some(h)) => h.conn = c,
                _ => {
                    m.remove(&k);
                }
            }
        }
        let mut again = Vec::new();
        for (k, h) in m.iter_mut() {
            let Some(s) = h.sent.filter(|s| s.conn == conn) else {
                continue;
            };
            // Once per route: whatever happens next, not again from here.
            h.sent = None;
            // Still awaiting its acknowledgment (an acknowledgment taken
            // clears the record, [`Notifier::answered`]), and the last
            // break of the lease: its epoch is the lease's, and so is its
            // new state — or its old one, granted again meanwhile (a
            // second open under the key, a reconnect: filterd grants the
            // state the break started from while it is in progress;
            // re-review rr42f 1: compared with the new state alone, such
            // a break was not sent again). A chained break's next step
            // keeps the epoch, and its state is neither.
            let in_progress = breaking.contains(k)
                && s.epoch == h.epoch
                && (s.to == h.state || s.from == h.state);
            if !in_progress || !matches!(h.holder, Holder::Lease { .. }) {
                continue;
            }
            if let Some((c, w)) = self.route_of(h) {
                h.sent = Some(Sent { conn: c, ..s });
                again.push((*k, w, notification(h.holder, s.from, s.to, s.epoch, true)));
            }
        }
        again
    }

    /// The oldest live connection of client `guid` that `user` logged on
    /// over, where Windows and Samba send a client's lease breaks
    /// (smbtorture smb2.lease.v2_complex1 checks the transport).
    fn oldest_of(&self, guid: uuid::Uuid, user: u64) -> Option<u64> {
        let guids = self.guids.lock().ok()?;
        let writers = self.writers.lock().ok()?;
        guids
            .iter()
            .filter(|(c, (g, users))| {
                *g == guid && users.iter().any(|(_, t)| *t == user) && writers.contains_key(c)
            })
            .map(|(c, _)| *c)
            .min()
    }

    /// A lease or oplock was granted (or reconnected) on `conn`, whose
    /// client GUID is `guid`. Returns how the client knows it: a lease
    /// keeps the version it was first granted with while any open holds
    /// it (Windows answers a v1 request for a v2 lease with a v2
    /// response, and the other way round).
    pub fn granted(
        &self,
        lease: HeldLease,
        handle: ResumeKey,
        (conn, guid, user): (u64, uuid::Uuid, &str),
        holder: Holder,
    ) -> Holder {
        let user = self.user_tag(user);
        if let Ok(mut h) = self.handles.lock() {
            h.insert(handle, lease.key);
        }
        let Ok(mut m) = self.holders.lock() else {
            return holder;
        };
        let e = m.entry(lease.key).or_insert(Held {
            conn,
            guid,
            user,
            holder,
            opens: 0,
            state: lease.state,
            epoch: lease.epoch,
            sent: None,
        });
        e.conn = conn;
        e.guid = guid;
        e.user = user;
        e.state = lease.state;
        e.epoch = lease.epoch;
        if !matches!(
            (e.holder, holder),
            (Holder::Lease { .. }, Holder::Lease { .. })
        ) {
            e.holder = holder;
        }
        e.opens += 1;
        let known = e.holder;
        // A break filterd sent again for this lease before this grant
        // (a holder resumed mid-break) goes to its client now.
        let parked = self
            .undelivered
            .lock()
            .ok()
            .and_then(|mut u| u.remove(&lease.key))
            .filter(|p| p.at.elapsed() < UNDELIVERED_FOR)
            // Only a break of the lease as granted now: one of an earlier
            // grant of the key (lowered or released since) is stale
            // (re-review rr39h F2).
            .filter(|p| p.from == lease.state && p.epoch == lease.epoch);
        if let Some(p) = parked {
            let held = *e;
            if let Some((to, w)) = self.route_of(&held) {
                tracing::info!(lease_key = %lease.key.0, "lease break in progress sent to the client that resumed its lease");
                e.sent = Some(Sent {
                    conn: to,
                    from: p.from,
                    to: p.to,
                    epoch: p.epoch,
                });
                send(w, notification(known, p.from, p.to, p.epoch, true));
            }
        }
        known
    }

    /// An open holding lease `key` was closed. Returns whether it was the
    /// last open of this rksmbd holding it.
    pub fn released(&self, key: LeaseKey) -> bool {
        let Ok(mut m) = self.holders.lock() else {
            return false;
        };
        let Some(e) = m.get_mut(&key) else {
            return true;
        };
        e.opens = e.opens.saturating_sub(1);
        if e.opens == 0 {
            m.remove(&key);
            return true;
        }
        false
    }

    /// filterd handle `handle` is closed or detached: its lease is no
    /// longer its.
    pub fn handle_gone(&self, handle: &ResumeKey) {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(handle);
        }
    }

    /// filterd broke lease `key` to `state` (at `epoch`).
    fn broken(&self, key: &LeaseKey, state: LeaseState, epoch: u16) {
        if let Some(h) = self
            .holders
            .lock()
            .ok()
            .as_mut()
            .and_then(|m| m.get_mut(key))
        {
            h.state = state;
            h.epoch = epoch;
        }
    }

    /// An acknowledgment of `key`'s break in progress is taken: the break
    /// it answers is no longer sent again if its connection ends (its
    /// record is handed back, [`Notifier::unanswered`], when the
    /// acknowledgment fails and the break goes on). Before (re-review
    /// rr42a F1) the record stayed until the next break's route replaced
    /// it, and a chained break's next step, in progress at the same epoch
    /// before it was routed, had the acknowledged one sent again.
    fn answered(&self, key: &LeaseKey) -> Option<Sent> {
        let mut m = self.holders.lock().ok()?;
        m.get_mut(key)?.sent.take()
    }

    /// An acknowledgment [`Notifier::answered`] took failed and the break
    /// goes on: its record is back, unless a later break's replaced it.
    fn unanswered(&self, key: &LeaseKey, sent: Option<Sent>) {
        let Some(sent) = sent else { return };
        if let Some(h) = self
            .holders
            .lock()
            .ok()
            .as_mut()
            .and_then(|m| m.get_mut(key))
        {
            h.sent.get_or_insert(sent);
        }
    }

    /// The client acknowledged a break of lease `key`, and filterd holds
    /// `state` (at `epoch`) now: what the client may ack is a subset of
    /// the break's new state (MS-SMB2 3.3.5.22.2), so the holder is told
    /// it. Only ever lowered: a later break's event may have come first.
    /// (Before re-review rr41i 2 the holder stayed at the break's state,
    /// and the next reattach sent a needless break at the client's epoch.)
    fn acked(&self, key: &LeaseKey, state: LeaseState, epoch: u16) {
        if let Some(h) = self
            .holders
            .lock()
            .ok()
            .as_mut()
            .and_then(|m| m.get_mut(key))
            // Only at the break's own epoch: an upgrade granted since (a
            // CREATE of the same key on another connection) moved it, and
            // lowering that would keep its next break from the client
            // (re-review rr41n).
            .filter(|h| h.epoch == epoch && h.state.contains(state))
        {
            h.state = state;
            h.epoch = epoch;
        }
    }

    /// A restarted filterd forgot handles `lost`: the leases no other
    /// handle of this rksmbd holds went with them (MS-SMB2 3.3.4.17: the
    /// lease of a server-closed open's last open is freed) and hold
    /// nothing now. Returns those that held any caching, with where to
    /// tell their client.
    pub fn forgotten(&self, lost: &[ResumeKey]) -> Vec<UnsaidBreak> {
        let Ok(mut handles) = self.handles.lock() else {
            return Vec::new();
        };
        let mut leases: Vec<LeaseKey> = lost.iter().filter_map(|k| handles.remove(k)).collect();
        leases.sort_unstable();
        leases.dedup();
        leases.retain(|l| !handles.values().any(|h| h == l));
        drop(handles);
        let mut gone = Vec::new();
        for key in leases {
            let route = self.route(&key);
            // The entry stays, counting the opens rksmbd still has until
            // their client closes them; it holds nothing now.
            let held = self.holders.lock().ok().and_then(|mut m| {
                let h = m.get_mut(&key)?;
                let was = (h.state, h.epoch);
                h.state = LeaseState::NONE;
                Some(was)
            });
            if let (Some((writer, holder)), Some((state, epoch))) = (route, held) {
                if state != LeaseState::NONE {
                    gone.push(UnsaidBreak {
                        key,
                        writer,
                        holder,
                        from: state,
                        to: LeaseState::NONE,
                        epoch: epoch.wrapping_add(1),
                    });
                }
            }
        }
        gone
    }

    /// A reattach resumed handles whose leases filterd holds now as
    /// `leases` says (`None`: none). A lease lowered while this rksmbd was
    /// detached — broken at its timeout, or at once, while its holder was
    /// disconnected (another node owned the table; a restarted filterd
    /// whose other frontends' clients opened first) — was never told to
    /// its client, and filterd will not break it again: such leases are
    /// lowered here and returned, with where to tell their client (review
    /// rvping 2: after a fail-back the client held on to RW caching while
    /// another client's writes went in). A lease held by several resumed
    /// handles counts once, at the least any of them holds.
    pub fn lowered(&self, leases: &[(ResumeKey, Option<HeldLease>)]) -> Vec<UnsaidBreak> {
        let mut now: HashMap<LeaseKey, (LeaseState, Option<u16>)> = HashMap::new();
        if let Ok(handles) = self.handles.lock() {
            for (handle, held) in leases {
                // The lease this rksmbd granted the handle; one the handle
                // holds no more (or another's) holds nothing of it now.
                let Some(key) = handles.get(handle).copied() else {
                    continue;
                };
                let (state, epoch) = match held {
                    Some(l) if l.key == key => (l.state, Some(l.epoch)),
                    _ => (LeaseState::NONE, None),
                };
                let e = now.entry(key).or_insert((state, epoch));
                e.0 = e.0.and(state);
                e.1 = e.1.max(epoch);
            }
        }
        let mut out = Vec::new();
        for (key, (state, epoch)) in now {
            let told = self.holders.lock().ok().and_then(|mut m| {
                let h = m.get_mut(&key)?;
                // What the client was told and filterd holds both: a
                // state filterd holds that the client was not told (it
                // never should) is not granted by a break either
                // (re-review rr41i 5: such was skipped, the client kept
                // what filterd no longer holds).
                let to = h.state.and(state);
                if to == h.state {
                    return None;
                }
                let was = (h.state, h.epoch);
                // filterd's epoch grew at the change; one past the
                // client's when it says none (the lease is gone).
                h.epoch = epoch.unwrap_or_else(|| h.epoch.wrapping_add(1));
                h.state = to;
                Some((was.0, to, h.epoch))
            });
            let Some((from, state, epoch)) = told else {
                continue;
            };
            if let Some((writer, holder)) = self.route(&key) {
                out.push(UnsaidBreak {
                    key,
                    writer,
                    holder,
                    from,
                    to: state,
                    epoch,
                });
            }
        }
        out
    }

    /// Whether any open of this rksmbd holds a lease or an oplock (a
    /// write then asks filterd to break other keys' read caching).
    pub fn any_held(&self) -> bool {
        self.holders.lock().is_ok_and(|m| !m.is_empty())
    }

    /// Where a break of `key` goes: an oplock's to the connection of its
    /// open (its FileId names it there); a lease's to the oldest live
    /// connection of its client GUID, else the one it was granted on.
    fn route(&self, key: &LeaseKey) -> Option<(ConnWriter, Holder)> {
        let h = self.holders.lock().ok()?.get(key).copied()?;
        Some((self.writer_of(&h)?, h.holder))
    }

    /// The writer of the connection where a break of `h` goes.
    fn writer_of(&self, h: &Held) -> Option<ConnWriter> {
        self.route_of(h).map(|(_, w)| w)
    }

    /// The connection where a break of `h` goes, and its writer.
    fn route_of(&self, h: &Held) -> Option<(u64, ConnWriter)> {
        let conn = match h.holder {
            // Never a connection without a live session of its user
            // (one whose session a reconnect ended may be half open): the
            // break waits for the reconnect's grant instead.
            Holder::Lease { .. } => self
                .oldest_of(h.guid, h.user)
                .or_else(|| self.carries(h.conn, h.user).then_some(h.conn))?,
            Holder::Oplock { .. } => h.conn,
        };
        Some((conn, self.writers.lock().ok()?.get(&conn).cloned()?))
    }

    /// [`Self::route`] for a break awaiting an acknowledgment (from
    /// `from` to `to` at `epoch`): with no connection holding the lease
    /// it waits for the lease's grant ([`Self::undelivered`]; under the
    /// holders' lock, so a grant meanwhile either routes it here or finds
    /// it waiting).
    fn route_or_park(
        &self,
        key: &LeaseKey,
        (from, to, epoch): (LeaseState, LeaseState, u16),
    ) -> Option<(ConnWriter, Holder)> {
        let mut m = self.holders.lock().ok()?;
        if let Some(h) = m.get_mut(key) {
            if let Some((conn, w)) = self.route_of(h) {
                // Noted under the holders' lock: a connection that ends
                // after this finds it ([`Self::disconnected`]).
                h.sent = Some(Sent {
                    conn,
                    from,
                    to,
                    epoch,
                });
                return Some((w, h.holder));
            }
        }
        if let Ok(mut u) = self.undelivered.lock() {
            u.retain(|_, p| p.at.elapsed() < UNDELIVERED_FOR);
            if u.len() < MAX_UNDELIVERED || u.contains_key(key) {
                let at = std::time::Instant::now();
                u.insert(
                    *key,
                    Undelivered {
                        at,
                        from,
                        to,
                        epoch,
                    },
                );
            } else {
                tracing::warn!(lease_key = %key.0, "too many lease breaks waiting for their grant: this one is dropped (filterd lowers its lease at the break timeout)");
            }
        }
        drop(m);
        None
    }

    /// A break of `key` without an acknowledgment (filterd lowered the
    /// lease): one waiting for its grant is void.
    fn unpark(&self, key: &LeaseKey) {
        if let Ok(mut u) = self.undelivered.lock() {
            u.remove(key);
        }
    }
}

/// SMB lease state bits (R 1, H 2, W 4) of a filterd lease state.
pub fn lease_bits(s: LeaseState) -> u32 {
    [(LeaseState::R, 1), (LeaseState::H, 2), (LeaseState::W, 4)]
        .iter()
        .filter(|(st, _)| s.contains(*st))
        .map(|(_, b)| *b)
        .sum()
}

/// filterd's lease state of SMB lease state bits.
pub fn lease_state(bits: u32) -> LeaseState {
    let mut s = LeaseState::NONE;
    for (bit, st) in [(1, LeaseState::R), (2, LeaseState::H), (4, LeaseState::W)] {
        if bits & bit != 0 {
            s = s.with(st);
        }
    }
    s
}

/// The break notification for `holder`, framed for TCP: a lease break
/// (2.2.23.2) or an oplock break (2.2.23.1).
fn notification(
    holder: Holder,
    from: LeaseState,
    to: LeaseState,
    epoch: u16,
    ack: bool,
) -> Vec<u8> {
    let mut w = Writer::new();
    Header {
        credit_charge: 0,
        status: status::SUCCESS,
        command: 0x12,
        credits: 0,
        flags: wire::FLAG_RESPONSE,
        next_command: 0,
        message_id: u64::MAX,
        async_id: 0,
        tree_id: 0,
        session_id: 0,
        signature: [0; 16],
    }
    .encode(&mut w);
    match holder {
        Holder::Lease { v2, key } => {
            w.u16(44)
                .u16(if v2 { epoch } else { 0 })
                .u32(u32::from(ack));
            w.bytes(&key);
            w.u32(lease_bits(from)).u32(lease_bits(to));
            w.u32(0).u32(0).u32(0);
        }
        Holder::Oplock { file_id } => {
            w.u16(24).u8(oplock_level(to)).u8(0).u32(0).bytes(&file_id);
        }
    }
    let mut frame = wire::len32(w.len()).to_be_bytes().to_vec();
    frame.extend_from_slice(&w.0);
    frame
}

/// Forwards filterd's events for as long as the attachment lives.
pub fn forward(sh: Arc<Shared>) {
    while let Ok(ev) = sh.filter.events().recv() {
        if let AttachEvent::Reattached {
            generation,
            lost,
            leases,
            ..
        } = ev
        {
            // Back on a restarted filterd, the I/O of before drained:
            // rksmbd checks every read and write, so it has no lock
            // state to relearn; checked I/O is counted again. The breaks
            // of forgotten leases go first: `resynced` tells filterd,
            // which holds other frontends' opens until then, so none of
            // them is granted before a holder was sent its break.
            // And the leases filterd lowered while rksmbd was away: their
            // clients are told before any of their I/O is served again
            // (checked I/O waits for `resynced`). Both go at once, with
            // one deadline: a client that does not read holds the resync
            // up [`FORGOTTEN_BREAKS_WAIT`] at most, not twice that
            // (re-review rr41i 1: the second wait queued behind the first
            // on the same stuck writer).
            test_delay_before_the_forgotten_breaks();
            tell_at_the_reattach(&sh.notifier, &sh.breaking, &lost, &leases);
            // Handles another rksmbd process reconnected since: their
            // opens here are stale (before `resynced`, which lets waiting
            // locks be tried again).
            sh.registry.forget_lost(&lost);
            sh.filter.resynced(generation);
            // filterd is back: the closes it never answered go now, not
            // after the outage's backoff (rvchaos 1).
            sh.unsettled.kick();
            if sh.clients.open() {
                tracing::warn!("filterd serves again: accepting clients again");
            }
            continue;
        }
        if ev == AttachEvent::Daemon(Event::SteppingDown) {
            // Another node's filterd owns the table now: this one will not
            // serve it again until it wins it back, and every request of
            // our clients would be answered FILE_NOT_AVAILABLE meanwhile,
            // which an SMB 3 client replays on the same connection for
            // ever. Closed, they reconnect — to the new owner where the
            // address moved (review rvnode, finding 3).
            let n = sh.clients.let_go();
            tracing::warn!(
                connections = n,
                "filterd stepped down (another node owns the table): closed the client connections; refusing new ones until filterd serves again"
            );
            continue;
        }
        if let AttachEvent::Daemon(Event::Expired { key } | Event::Purged { key }) = ev {
            // A lost connection's durable open filterd closed (its
            // timeout, or closed for a conflicting open, MS-SMB2 3.3.4.7):
            // no reconnect comes for the slot left for it (re-review
            // rr47b F1).
            sh.registry.handle_gone(key);
            tracing::debug!(resume_key = %key, "filterd closed a disconnected handle");
            continue;
        }
        let AttachEvent::Daemon(Event::LeaseBreak {
            lease_key,
            current_state,
            new_state,
            epoch,
            ack_required,
            // Its keys are scoped to the client already (`scoped_key`).
            ..
        }) = ev
        else {
            tracing::debug!(?ev, "filterd event");
            continue;
        };
        sh.breaking.noticed(lease_key, ack_required);
        sh.notifier.broken(&lease_key, new_state, epoch);
        if !ack_required {
            sh.notifier.unpark(&lease_key);
        }
        if !ack_required && libfilter::lease::ack_required(current_state) {
            // A break from W or H always wants an acknowledgment, so this
            // is filterd lowering a lease at its break timeout. MS-SMB2
            // 3.3.2.5 (and 3.3.2.1 for oplocks) tells the client nothing
            // then: a notification here, arriving whenever the machine is
            // slow enough, reads to a client as a break of a later step
            // (smbtorture smb2.lease.timeout counted it under load).
            tracing::debug!(lease_key = %lease_key.0, "lease lowered at the break timeout");
            continue;
        }
        let route = match ack_required {
            true => sh
                .notifier
                .route_or_park(&lease_key, (current_state, new_state, epoch)),
            false => sh.notifier.route(&lease_key),
        };
        let Some((w, holder)) = route else {
            tracing::debug!(lease_key = %lease_key.0, "break for a lease no connection holds (yet)");
            continue;
        };
        let frame = notification(holder, current_state, new_state, epoch, ack_required);
        send(w, frame);
    }
}

/// Writes a break notification to its connection, in order after the
/// breaks already waiting for it (a client that does not read stalls only
/// its own connection's writer; see [`OUTBOX`]).
fn send(w: ConnWriter, frame: Vec<u8>) {
    send_then(w, frame, None);
}

/// Most break notifications one connection may have waiting to be
/// written: a memory bound (~150 bytes each), not the test of a client
/// that does not read — that is the writer's deadline, after which the
/// connection is shut down and what waits fails at once. It is four
/// connections' worth of leases (`MAX_OPENS_PER_CONNECTION`), all broken
/// at once, as after a filterd restart, and routed to one connection of
/// their client GUID (review D-3: 4,096 shut a reading client's connection
/// down then). Past it the connection is shut down.
const MAX_WAITING_BREAKS: usize = 4 * crate::server::MAX_OPENS_PER_CONNECTION;

/// A break notification waiting for its connection, and whom to tell once
/// its write returned.
type Waiting = (Vec<u8>, Option<std::sync::mpsc::Sender<()>>);

/// One connection's break notifications waiting to be written.
struct Queue {
    writer: ConnWriter,
    frames: std::collections::VecDeque<Waiting>,
    /// More than [`MAX_WAITING_BREAKS`] piled up: the connection is shut
    /// down and what waits is not written.
    overflowed: bool,
}

/// The break notifications waiting for each connection (by its writer),
/// each connection's written in order by one thread of its own that lives
/// while any wait: a client holding thousands of leases that stops
/// reading costs one thread and a bounded queue, not a thread per break
/// (review B-2: 4,023 threads).
static OUTBOX: std::sync::LazyLock<Mutex<HashMap<usize, Queue>>> =
    std::sync::LazyLock::new(Mutex::default);

fn outbox() -> std::sync::MutexGuard<'static, HashMap<usize, Queue>> {
    OUTBOX.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`send`], then a word on `done` once the write returned.
fn send_then(w: ConnWriter, frame: Vec<u8>, done: Option<std::sync::mpsc::Sender<()>>) {
    let id = Arc::as_ptr(&w) as usize;
    let mut ob = outbox();
    if let Some(q) = ob.get_mut(&id) {
        // Its writer thread is running and takes this one in turn.
        if q.frames.len() < MAX_WAITING_BREAKS {
            q.frames.push_back((frame, done));
        } else if !q.overflowed {
            tracing::warn!(
                "a client lets its break notifications pile up unread: its connection is shut down"
            );
            q.overflowed = true;
        }
        return;
    }
    let q = Queue {
        writer: w,
        frames: std::collections::VecDeque::from([(frame, done)]),
        overflowed: false,
    };
    ob.insert(id, q);
    drop(ob);
    let spawned = std::thread::Builder::new()
        .name("lease-break".into())
        .spawn(move || write_waiting(id));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not send a lease break");
        outbox().remove(&id);
    }
}

/// The writer thread of one connection's break notifications: writes them
/// in order until none waits (or, the queue overflowed, shuts the
/// connection down and drops them: its client reconnects and its leases
/// are broken at the break timeout).
fn write_waiting(id: usize) {
    loop {
        let (w, item, overflowed) = {
            let mut ob = outbox();
            let Some(q) = ob.get_mut(&id) else {
                return;
            };
            let Some(item) = q.frames.pop_front() else {
                ob.remove(&id);
                return;
            };
            (q.writer.clone(), item, q.overflowed)
        };
        let (frame, done) = item;
        if overflowed {
            crate::server::shut_down(&w);
        } else {
            crate::server::write_whole(&w, &frame);
        }
        if let Some(d) = done {
            let _ = d.send(());
        }
    }
}

/// Tests only (debug builds): `$RKSMBD_TEST_FORGOTTEN_BREAKS_DELAY_MS`
/// holds the breaks of forgotten leases (and so the resync) after a
/// reattach, as a client that does not read may (tests/smb3/restart_fresh_create.py).
fn test_delay_before_the_forgotten_breaks() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::create::test_delay(
        &DELAY,
        "RKSMBD_TEST_FORGOTTEN_BREAKS_DELAY_MS",
        "the breaks of forgotten leases are held",
    );
}

/// Tests only (debug builds): `$RKSMBD_TEST_FORWARDED_ACK_HOLD_MS` holds
/// a lease break acknowledgment a channel forwarded, at its home before it
/// is checked, until that channel no longer counts for the lease (its
/// socket ended, [`Notifier::disconnected`]), at most that long: the home
/// then serves an acknowledgment whose channel is gone, as a busy home
/// may (tests/smb3/channel_ack_then_gone.py, re-review rr42a F2).
fn test_hold_a_forwarded_acknowledgment(notifier: &Notifier, key: &LeaseKey, channel: u64) {
    static HOLD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = crate::create::test_hook_ms(&HOLD, "RKSMBD_TEST_FORWARDED_ACK_HOLD_MS");
    if ms == 0 {
        return;
    }
    tracing::info!(
        ms,
        channel,
        "test hook: a forwarded lease break acknowledgment is held until its channel ends"
    );
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while notifier.may_acknowledge(key, channel) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Longest the breaks sent at a reattach (of forgotten and of lowered
/// leases, one deadline for all) are waited for before rksmbd tells
/// filterd it has resynced: a client that does not read holds up
/// other frontends' opens after a filterd restart this long at most.
const FORGOTTEN_BREAKS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A restarted filterd forgot handles `lost` (every one not persistent):
/// their opens are gone as on a server restart, and so are the leases
/// only they held. Nothing in MS-SMB2 tells a client whose connection
/// lives on that a server closed its open (3.3.4.17), so a client caching
/// writes under such a lease would go on doing so while another client's
/// open gets in. rksmbd tells it as the object store breaking the lease
/// (3.3.4.7): a break to none, without an acknowledgment (there is no
/// lease left to acknowledge to, 3.3.5.22.2), so it stops caching and
/// flushes — and its flush finds the open closed (STATUS_FILE_CLOSED).
/// Those breaks ([`Notifier::forgotten`]) go with those of the leases
/// filterd lowered while this rksmbd was detached ([`Notifier::lowered`],
/// after: a forgotten handle holds no lease to lower), each with what to
/// say of it.
/// Sends them all with [`send_unacked`], one deadline for all.
fn tell_at_the_reattach(
    notifier: &Notifier,
    breaking: &BreaksInProgress,
    lost: &[ResumeKey],
    leases: &[(ResumeKey, Option<HeldLease>)],
) {
    let forgotten = notifier.forgotten(lost).into_iter();
    let forgotten = forgotten.map(|g| (g, "lease of handles filterd forgot broken to none"));
    let lowered = notifier.lowered(leases).into_iter();
    let lowered = lowered.map(|g| (g, "lease lowered while rksmbd was detached: break sent"));
    send_unacked(notifier, breaking, forgotten.chain(lowered).collect());
}

/// Sends each of `breaks` to its client, wanting no acknowledgment (no
/// break is in progress in filterd: the lease is lowered already), and
/// says what goes with each. Returns once every break was written (or
/// after [`FORGOTTEN_BREAKS_WAIT`], one deadline for all).
fn send_unacked(
    notifier: &Notifier,
    breaking: &BreaksInProgress,
    breaks: Vec<(UnsaidBreak, &'static str)>,
) {
    let (done, written) = std::sync::mpsc::channel();
    let mut sent = 0;
    for (g, what) in breaks {
        breaking.noticed(g.key, false);
        notifier.unpark(&g.key);
        tracing::info!(lease_key = %g.key.0, from = %g.from, to = %g.to, epoch = g.epoch, "{what}");
        let frame = notification(g.holder, g.from, g.to, g.epoch, false);
        send_then(g.writer, frame, Some(done.clone()));
        sent += 1;
    }
    // Only the writers hold senders now: one that could not be spawned
    // ends the wait instead of holding it to the end.
    drop(done);
    let until = std::time::Instant::now() + FORGOTTEN_BREAKS_WAIT;
    for _ in 0..sent {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if written.recv_timeout(left).is_err() {
            tracing::warn!(
                "a lease break sent at the reattach is not written yet: resynced anyway"
            );
            break;
        }
    }
}

/// OPLOCK_BREAK from the client: an oplock (2.2.24.1) or lease (2.2.24.2)
/// break acknowledgment goes to filterd and is answered with what is held
/// now (2.2.25.1, 2.2.25.2).
pub fn acknowledge(c: &mut Connection, req: &Request<'_>) -> Outcome {
    let mut r = Reader::new(req.body);
    match r.u16("structure size")? {
        24 => return acknowledge_oplock(c, req, r),
        36 => {}
        _ => return Err(status::INVALID_PARAMETER),
    }
    r.u16("reserved")?;
    r.u32("flags")?;
    let key_bytes = r.array::<16>("lease key")?;
    let state = r.u32("lease state")?;
    let key = scoped_key(c.client_guid, key_bytes);
    // Only over a connection the lease's user logged on over: another
    // user's connection may name the client GUID (it goes in clear). The
    // one it came on: a channel's, when forwarded (before, the home's was
    // asked, and once the home's socket had ended every acknowledgment
    // through a channel was refused, STATUS_UNSUCCESSFUL).
    // Either counts: a channel whose socket ended before the home served
    // its acknowledgment carries no session any more (re-review rr42a F2),
    // and both have the lease's client GUID (`start_binding`).
    let notifier = &c.sh.notifier;
    if c.origin() != c.id {
        test_hold_a_forwarded_acknowledgment(notifier, &key, c.origin());
    }
    if !notifier.may_acknowledge(&key, c.origin()) && !notifier.may_acknowledge(&key, c.id) {
        return Err(status::UNSUCCESSFUL);
    }
    // No break in progress (never, or lowered at the break timeout):
    // STATUS_UNSUCCESSFUL; a state the break does not allow:
    // STATUS_REQUEST_NOT_ACCEPTED (3.3.5.22.2).
    if !c.sh.breaking.take(&key) {
        return Err(status::UNSUCCESSFUL);
    }
    let sent = c.sh.notifier.answered(&key);
    let reply =
        c.sh.filter
            .client()
            .call(FilterRequest::LeaseBreakAck {
                lease_key: key,
                state: lease_state(state),
                // The key is scoped to the client already (`scoped_key`);
                // naming the client (`create::client_of` for a leased
                // open) makes filterd check it too.
                client: ClientId::new(c.client_guid.to_string()).ok(),
            })
            .map_err(|e| match e.code() {
                // filterd's break timeout may have taken the lease just
                // before (its event can trail filterd's other replies).
                Some(ErrorCode::BadFrame) if lease_gone(c, key) => status::UNSUCCESSFUL,
                Some(ErrorCode::BadFrame) => {
                    c.sh.breaking.restore(key);
                    c.sh.notifier.unanswered(&key, sent);
                    status::REQUEST_NOT_ACCEPTED
                }
                _ => {
                    c.sh.breaking.restore(key);
                    c.sh.notifier.unanswered(&key, sent);
                    status_of(&e)
                }
            })?;
    let held = match reply.0 {
        FilterReply::Lease(l) => {
            c.sh.notifier.acked(&key, l.state, l.epoch);
            lease_bits(l.state)
        }
        _ => state,
    };
    let mut w = Writer::new();
    w.u16(36).u16(0).u32(0).bytes(&key_bytes).u32(held).u64(0);
    Ok(Reply::ok(w.0))
}

/// Whether filterd holds no caching for lease `key` on this connection's
/// opens any more (filterd's break timeout lowered it).
fn lease_gone(c: &Connection, key: LeaseKey) -> bool {
    let Some(resume_key) = c.opens.values().find_map(|o| match (&o.kind, o.lease) {
        (crate::files::Kind::File { key: k, .. }, Some(l)) if l == key => Some(*k),
        _ => None,
    }) else {
        return true;
    };
    match c.sh.filter.client().call(FilterRequest::Handle {
        key: resume_key,
        learning: false,
    }) {
        Ok((FilterReply::Handle(v), _)) => {
            v.record.lease.is_none_or(|l| l.state == LeaseState::NONE)
        }
        _ => false,
    }
}

fn acknowledge_oplock(c: &mut Connection, req: &Request<'_>, mut r: Reader<'_>) -> Outcome {
    let level = r.u8("oplock level")?;
    r.u8("reserved")?;
    r.u32("reserved2")?;
    let file_id = r.array::<16>("file id")?;
    let mut fr = Reader::new(&file_id);
    let persistent = fr.u64("persistent")?;
    let volatile = fr.u64("volatile")?;
    let key = crate::files::oplock_of(c, req, (persistent, volatile))?;
    let state = oplock_state(level).unwrap_or(LeaseState::NONE);
    let reply =
        c.sh.filter
            .client()
            .call(FilterRequest::LeaseBreakAck {
                lease_key: key,
                state,
                // An oplock's key names its one open (`files::oplock_of`).
                client: None,
            })
            .map_err(|e| status_of(&e))?;
    let held = match reply.0 {
        FilterReply::Lease(l) => {
            c.sh.notifier.acked(&key, l.state, l.epoch);
            oplock_level(l.state)
        }
        _ => level,
    };
    let mut w = Writer::new();
    w.u16(24).u8(held).u8(0).u32(0).bytes(&file_id);
    Ok(Reply::ok(w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_bits_roundtrip_and_notification_layout() {
        for b in 0..8 {
            assert_eq!(lease_bits(lease_state(b)), b);
        }
        let f = notification(
            Holder::Lease {
                v2: true,
                key: [3; 16],
            },
            lease_state(7),
            lease_state(1),
            2,
            true,
        );
        assert_eq!(f.len(), 4 + 64 + 44);
        assert_eq!(&f[4 + 64..4 + 66], &44u16.to_le_bytes());
        assert_eq!(&f[4 + 72..4 + 88], &[3; 16]);
        assert_eq!(&f[4 + 88..4 + 96], &[7, 0, 0, 0, 1, 0, 0, 0]);
        let o = notification(
            Holder::Oplock { file_id: [9; 16] },
            lease_state(7),
            lease_state(1),
            0,
            true,
        );
        assert_eq!(o.len(), 4 + 64 + 24);
        assert_eq!(o[4 + 66], 0x01, "broken to level II");
        assert_eq!(&o[4 + 72..], &[9; 16]);
    }

    /// One client's lease key is its own: the same key from another
    /// client GUID names another filterd lease, the same client's always
    /// the same one, and none is taken for an oplock's (review B-4).
    #[test]
    fn lease_keys_are_scoped_by_client() {
        let (a, b) = (
            uuid::Uuid::from_bytes([1; 16]),
            uuid::Uuid::from_bytes([2; 16]),
        );
        let key = [5; 16];
        assert_eq!(scoped_key(a, key), scoped_key(a, key));
        assert_ne!(scoped_key(a, key), scoped_key(b, key));
        assert_ne!(scoped_key(a, key), scoped_key(a, [6; 16]));
        for n in 0..=255u8 {
            assert!(!is_oplock_key(&scoped_key(a, [n; 16])));
        }
    }

    /// A break that needs an acknowledgment and finds no connection
    /// holding its lease (filterd sent it again behind a DH2C's resume,
    /// before the reconnect granted the lease here) is written to the
    /// client when the lease is granted; one filterd lowered meanwhile, or
    /// one of an earlier grant of the key, is not (review rvfailover: it was dropped, and the client never heard
    /// of the break its reconnect was to acknowledge).
    #[test]
    fn a_break_before_its_reconnects_grant_is_sent_by_the_grant() {
        use std::io::Read as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut client, _) = listener.accept().unwrap();
        let n = Notifier::default();
        n.connected(1, Arc::new(Mutex::new(stream)));
        let guid = uuid::Uuid::from_bytes([5; 16]);
        n.negotiated(1, guid);
        n.logged_on(1, (1, "alice"), |_| true);
        let holder = Holder::Lease {
            v2: true,
            key: [3; 16],
        };
        let grant = |key: LeaseKey, handle: u8| {
            let lease = HeldLease {
                key,
                state: lease_state(7),
                epoch: 2,
            };
            let h = ResumeKey(uuid::Uuid::from_bytes([handle; 16]));
            n.granted(lease, h, (1, guid, "alice"), holder);
        };
        let (rwh, rh) = (lease_state(7), lease_state(3));
        let key = LeaseKey(uuid::Uuid::from_bytes([3; 16]));
        assert!(n.route_or_park(&key, (rwh, rh, 2)).is_none());
        let lowered = LeaseKey(uuid::Uuid::from_bytes([4; 16]));
        assert!(n.route_or_park(&lowered, (rwh, rh, 2)).is_none());
        n.unpark(&lowered);
        grant(lowered, 2);
        // A break of an earlier grant of its key (epoch 1, the lease is
        // granted at 2 now) is stale: not sent (re-review rr39h F2).
        let stale = LeaseKey(uuid::Uuid::from_bytes([6; 16]));
        assert!(n.route_or_park(&stale, (rwh, rh, 1)).is_none());
        grant(stale, 3);
        grant(key, 1);
        let want = notification(holder, rwh, rh, 2, true);
        let mut got = vec![0u8; want.len()];
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, want, "the break of the key granted, alone");
        assert!(n.route_or_park(&key, (rwh, rh, 2)).is_some(), "routed now");
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut more = [0u8; 1];
        assert!(client.read(&mut more).is_err(), "nothing else was sent");
    }

    /// A lease goes with the last of its handles filterd forgot, once,
    /// and not while a handle it resumed (persistent) still holds it.
    #[test]
    fn a_lease_goes_with_the_last_handle_filterd_forgot() {
        let (n, guid, _writers, _listener) = connections(1);
        n.logged_on(1, (1, "alice"), |_| true);
        let key = LeaseKey(uuid::Uuid::from_bytes([3; 16]));
        let (a, b) = (
            ResumeKey(uuid::Uuid::from_bytes([1; 16])),
            ResumeKey(uuid::Uuid::from_bytes([2; 16])),
        );
        for h in [a, b] {
            let lease = HeldLease {
                key,
                state: lease_state(7),
                epoch: 4,
            };
            n.granted(
                lease,
                h,
                (1, guid, "alice"),
                Holder::Lease {
                    v2: true,
                    key: [3; 16],
                },
            );
        }
        assert!(n.forgotten(&[a]).is_empty(), "b still holds it");
        let gone = n.forgotten(&[b]);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (
                gone[0].key,
                lease_bits(gone[0].from),
                lease_bits(gone[0].to),
                gone[0].epoch
            ),
            (key, 7, 0, 5)
        );
        assert!(n.forgotten(&[a, b]).is_empty(), "told once");
        assert!(!n.released(key) && n.released(key), "the opens still count");
    }

    /// A reattach's leases: one filterd holds lower than its client was
    /// told is lowered and returned once (review rvping 2), counted at
    /// the least of its handles; one as told, or another key's, is not.
    #[test]
    fn a_lease_lowered_while_detached_is_told_once() {
        let (n, guid, _writers, _listener) = connections(1);
        n.logged_on(1, (1, "alice"), |_| true);
        let (key, other) = (
            LeaseKey(uuid::Uuid::from_bytes([3; 16])),
            LeaseKey(uuid::Uuid::from_bytes([4; 16])),
        );
        let (a, b, c) = (
            ResumeKey(uuid::Uuid::from_bytes([1; 16])),
            ResumeKey(uuid::Uuid::from_bytes([2; 16])),
            ResumeKey(uuid::Uuid::from_bytes([6; 16])),
        );
        let held = |key, bits, epoch| HeldLease {
            key,
            state: lease_state(bits),
            epoch,
        };
        let holder = Holder::Lease {
            v2: true,
            key: [3; 16],
        };
        for h in [a, b] {
            n.granted(held(key, 7, 1), h, (1, guid, "alice"), holder);
        }
        n.granted(held(other, 7, 1), c, (1, guid, "alice"), holder);
        let now = [
            (a, Some(held(key, 3, 2))),
            (b, Some(held(key, 3, 2))),
            (c, Some(held(other, 7, 1))),
        ];
        let told = n.lowered(&now);
        assert_eq!(told.len(), 1, "only the lowered lease");
        assert_eq!(
            (
                told[0].key,
                lease_bits(told[0].from),
                lease_bits(told[0].to),
                told[0].epoch
            ),
            (key, 7, 3, 2)
        );
        assert!(n.lowered(&now).is_empty(), "told once");
        // A handle filterd says holds no lease (or another key's): none.
        let told = n.lowered(&[(a, None)]);
        assert_eq!(
            (
                lease_bits(told[0].from),
                lease_bits(told[0].to),
                told[0].epoch
            ),
            (3, 0, 3)
        );
    }

    /// An acknowledgment of less than the break left (RH to R, which
    /// MS-SMB2 3.3.5.22.2 allows) is what the holder holds: a reattach
    /// finding filterd at R sends no break (re-review rr41i 2: one went,
    /// RH to R at the client's own epoch). A state filterd holds that the
    /// client was not told (RW, told RH) breaks to what both hold (rr41i
    /// 5: it was skipped).
    #[test]
    fn an_acked_lowering_is_no_break_at_the_reattach() {
        let (n, guid, _writers, _listener) = connections(1);
        n.logged_on(1, (1, "alice"), |_| true);
        let key = lease_on(&n, (1, guid, "alice"));
        // `lease_on`'s handle.
        let a = ResumeKey(uuid::Uuid::from_bytes([1; 16]));
        let at = |bits, epoch| {
            Some(HeldLease {
                key,
                state: lease_state(bits),
                epoch,
            })
        };
        // filterd's break RWH -> RH at epoch 2, the client acks R.
        n.broken(&key, lease_state(3), 2);
        n.acked(&key, lease_state(1), 2);
        assert!(n.lowered(&[(a, at(1, 2))]).is_empty(), "told already");
        // A later break's event first: the ack does not raise it again.
        n.broken(&key, LeaseState::NONE, 3);
        n.acked(&key, lease_state(1), 2);
        assert!(n.lowered(&[(a, at(0, 3))]).is_empty(), "none told");
        // Told RH, filterd holds RW: broken to R.
        n.broken(&key, lease_state(3), 4);
        let told = n.lowered(&[(a, at(5, 5))]);
        assert_eq!(
            told.iter()
                .map(|g| (lease_bits(g.from), lease_bits(g.to), g.epoch))
                .collect::<Vec<_>>(),
            [(3, 1, 5)]
        );
    }

    /// An acknowledgment whose answer is handled after an upgrade of the
    /// same lease was granted (another connection's CREATE, epoch moved)
    /// leaves the upgrade: the client holds it, and a lowering of it while
    /// detached is told at the reattach (re-review rr41n: the ack lowered
    /// the holder to R, and RWH lowered to R was never told).
    #[test]
    fn an_ack_handled_after_an_upgrade_leaves_the_upgrade() {
        let (n, guid, _writers, _listener) = connections(1);
        n.logged_on(1, (1, "alice"), |_| true);
        let key = lease_on(&n, (1, guid, "alice"));
        let a = ResumeKey(uuid::Uuid::from_bytes([1; 16]));
        let (_, holder) = lease_rwh();
        n.broken(&key, lease_state(1), 2);
        let b = ResumeKey(uuid::Uuid::from_bytes([9; 16]));
        let upgraded = HeldLease {
            key,
            state: lease_state(7),
            epoch: 3,
        };
        n.granted(upgraded, b, (1, guid, "alice"), holder);
        n.acked(&key, lease_state(1), 2);
        let now = Some(HeldLease {
            key,
            state: lease_state(1),
            epoch: 4,
        });
        let told = n.lowered(&[(a, now), (b, now)]);
        assert_eq!(told.len(), 1, "RWH lowered to R is told");
    }

    /// A reattach's breaks of forgotten leases and of lowered ones, to a
    /// client whose writer is stuck, are waited for once: about
    /// [`FORGOTTEN_BREAKS_WAIT`], not twice that (re-review rr41i 1: the
    /// lowered ones were sent, and waited for, behind the forgotten ones).
    #[test]
    fn a_reattachs_breaks_to_a_stuck_client_share_one_deadline() {
        let (n, guid, writers, _listener) = connections(1);
        n.logged_on(1, (1, "alice"), |_| true);
        let lowered = lease_on(&n, (1, guid, "alice"));
        let lowered_handle = ResumeKey(uuid::Uuid::from_bytes([1; 16]));
        let (mut lease, holder) = lease_rwh();
        lease.key = LeaseKey(uuid::Uuid::from_bytes([4; 16]));
        let lost = ResumeKey(uuid::Uuid::from_bytes([2; 16]));
        n.granted(lease, lost, (1, guid, "alice"), holder);
        let now = HeldLease {
            key: lowered,
            state: lease_state(3),
            epoch: 2,
        };
        // The client's writer is held: nothing is written meanwhile.
        let stuck = writers[0].lock().unwrap();
        let at = std::time::Instant::now();
        tell_at_the_reattach(
            &n,
            &BreaksInProgress::default(),
            &[lost],
            &[(lowered_handle, Some(now))],
        );
        let waited = at.elapsed();
        drop(stuck);
        // Two deadlines one after the other wait at least twice the bound;
        // one leaves nearly a whole bound of slack for a loaded machine.
        assert!(
            waited >= FORGOTTEN_BREAKS_WAIT
                && waited < 2 * FORGOTTEN_BREAKS_WAIT - std::time::Duration::from_millis(50),
            "waited {waited:?}"
        );
    }

    /// A lease's breaks go to the oldest connection of its client GUID
    /// that its user logged on over, and its acknowledgment is taken only
    /// there: not from an older connection that only names the GUID (it
    /// goes in clear) or that another user logged on over (review,
    /// session 28: such a connection absorbed the breaks, and the client
    /// went on caching past the break timeout).
    #[test]
    fn breaks_go_only_where_the_leases_user_logged_on() {
        let (n, guid, writers, _listener) = connections(3);
        // 1 never logs on; 2 is mallory's; 3 is alice's.
        n.logged_on(2, (2, "mallory"), |_| true);
        n.logged_on(3, (3, "alice"), |_| true);
        let key = lease_on(&n, (3, guid, "alice"));
        let (w, _) = n.route(&key).unwrap();
        assert!(Arc::ptr_eq(&w, &writers[2]), "alice's connection");
        assert!(!n.may_acknowledge(&key, 1) && !n.may_acknowledge(&key, 2));
        assert!(n.may_acknowledge(&key, 3));
        // Alice's older connection, once she logs on over it, is where
        // Windows would send them (smb2.lease.v2_complex1).
        n.logged_on(1, (1, "alice"), |_| true);
        let (w, _) = n.route(&key).unwrap();
        assert!(Arc::ptr_eq(&w, &writers[0]), "the oldest of alice's");
    }

    /// A reconnect on a new connection whose SESSION_SETUP ends the old
    /// session (PreviousSessionId) takes the user's lease breaks off the
    /// old connection, which may be half open: a break goes to the new
    /// connection (or, with none of the user's, waits for the DH2C's
    /// grant) (re-review rr39h
    /// F1: it went to the older, dead one, was never acknowledged, and
    /// the client later wrote back over another client's data).
    #[test]
    fn a_previous_sessions_connection_gets_no_more_breaks() {
        let (n, guid, writers, _listener) = connections(2);
        let (lease, holder) = lease_rwh();
        n.logged_on(1, (10, "alice"), |_| true);
        let key = lease_on(&n, (1, guid, "alice"));
        // The reconnect: session 20 on connection 2 ends session 10.
        n.logged_on(2, (20, "alice"), |_| true);
        n.session_ended(10);
        let (rwh, rh) = (lease_state(7), lease_state(3));
        let (w, _) = n.route_or_park(&key, (rwh, rh, 2)).unwrap();
        assert!(Arc::ptr_eq(&w, &writers[1]), "the client's live connection");
        assert!(!n.may_acknowledge(&key, 1));
        // Neither to the old connection with the new one not logged on.
        n.session_ended(20);
        assert!(
            n.route_or_park(&key, (rwh, rh, 2)).is_none(),
            "parked for the grant"
        );
        n.logged_on(2, (20, "alice"), |_| true);
        n.granted(
            lease,
            ResumeKey(uuid::Uuid::from_bytes([2; 16])),
            (2, guid, "alice"),
            holder,
        );
        let (w, _) = n.route(&key).unwrap();
        assert!(Arc::ptr_eq(&w, &writers[1]), "the reconnect's connection");
        assert!(n.may_acknowledge(&key, 2));
    }

    /// A notifier with connections 1..=`count` of one client GUID,
    /// connected and negotiated (not logged on): the GUID, their writers,
    /// and the listener their sockets reach (to keep while they are used).
    fn connections(count: u64) -> (Notifier, uuid::Uuid, Vec<ConnWriter>, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let n = Notifier::default();
        let guid = uuid::Uuid::from_bytes([5; 16]);
        let writers = (1..=count)
            .map(|conn| {
                let w: ConnWriter = Arc::new(Mutex::new(
                    TcpStream::connect(listener.local_addr().unwrap()).unwrap(),
                ));
                n.connected(conn, w.clone());
                n.negotiated(conn, guid);
                w
            })
            .collect();
        (n, guid, writers, listener)
    }

    /// A v2 lease RWH at epoch 1, and how its client knows it.
    fn lease_rwh() -> (HeldLease, Holder) {
        let lease = HeldLease {
            key: LeaseKey(uuid::Uuid::from_bytes([3; 16])),
            state: lease_state(7),
            epoch: 1,
        };
        let holder = Holder::Lease {
            v2: true,
            key: [3; 16],
        };
        (lease, holder)
    }

    /// [`lease_rwh`] granted to `user` on connection `conn`: its key.
    fn lease_on(n: &Notifier, (conn, guid, user): (u64, uuid::Uuid, &str)) -> LeaseKey {
        let (lease, holder) = lease_rwh();
        let handle = ResumeKey(uuid::Uuid::from_bytes([1; 16]));
        n.granted(lease, handle, (conn, guid, user), holder);
        lease.key
    }

    /// Alice on connections 1 and 2, [`lease_on`] 1, and its break RWH to
    /// RH at epoch 2 in progress and written to 1: the notifier, the key,
    /// and what keeps the connections open.
    fn break_sent_on_one_of_two(
        breaking: &BreaksInProgress,
    ) -> (Notifier, LeaseKey, (Vec<ConnWriter>, std::net::TcpListener)) {
        let (n, guid, writers, listener) = connections(2);
        n.logged_on(1, (1, "alice"), |_| true);
        n.logged_on(2, (1, "alice"), |_| true);
        let key = lease_on(&n, (1, guid, "alice"));
        let (rwh, rh) = (lease_state(7), lease_state(3));
        breaking.noticed(key, true);
        n.broken(&key, rh, 2);
        assert!(n.route_or_park(&key, (rwh, rh, 2)).is_some());
        (n, key, (writers, listener))
    }

    /// A lease break written to a connection whose socket then ends goes
    /// again, the same notification, to the client's next live connection
    /// while its acknowledgment is awaited, once per route; not one
    /// acknowledged meanwhile, nor one broken further since (its epoch is
    /// not the lease's), nor an oplock's (its FileId names it on its own
    /// connection only).
    #[test]
    fn a_break_in_progress_goes_again_where_the_client_lives_on() {
        let (n, guid, writers, _listener) = connections(3);
        for conn in 1..=3 {
            n.logged_on(conn, (1, "alice"), |_| true);
        }
        let key = lease_on(&n, (1, guid, "alice"));
        let breaking = BreaksInProgress::default();
        let (rwh, rh) = (lease_state(7), lease_state(3));
        breaking.noticed(key, true);
        n.broken(&key, rh, 2);
        let (w, holder) = n.route_or_park(&key, (rwh, rh, 2)).unwrap();
        assert!(Arc::ptr_eq(&w, &writers[0]), "the oldest connection");
        let again = n.moved_from(1, &breaking);
        assert_eq!(again.len(), 1, "sent again");
        let (k, w, frame) = &again[0];
        assert_eq!(*k, key);
        assert!(Arc::ptr_eq(w, &writers[1]), "on the next oldest");
        assert_eq!(*frame, notification(holder, rwh, rh, 2, true));
        assert!(n.moved_from(1, &breaking).is_empty(), "once");
        // Connection 3 never carried it: its end sends nothing.
        assert!(n.moved_from(3, &breaking).is_empty());

        // Acknowledged before the connection ended: not sent again.
        let (n, key, _conns) = break_sent_on_one_of_two(&breaking);
        assert!(breaking.take(&key));
        assert!(n.moved_from(1, &breaking).is_empty(), "acknowledged");

        // Acknowledged, and the chained break's next step at the same
        // epoch in progress before it is routed (re-review rr42a F1).
        let (n, key, _conns) = break_sent_on_one_of_two(&breaking);
        assert!(breaking.take(&key));
        let sent = n.answered(&key);
        breaking.noticed(key, true);
        assert!(
            n.moved_from(1, &breaking).is_empty(),
            "the step acknowledged"
        );
        // Granted again mid-break at the state the break started from (a
        // second open under the key): still sent again (re-review rr42f 1).
        let (n, _, (_w, _l)) = break_sent_on_one_of_two(&breaking);
        let (mut lease, holder) = lease_rwh();
        lease.epoch = 2;
        n.granted(
            lease,
            ResumeKey(uuid::Uuid::from_bytes([9; 16])),
            (1, uuid::Uuid::from_bytes([5; 16]), "alice"),
            holder,
        );
        assert_eq!(
            n.moved_from(1, &breaking).len(),
            1,
            "granted again mid-break"
        );
        // An acknowledgment that failed hands its record back.
        let (n, key, _conns) = break_sent_on_one_of_two(&breaking);
        assert!(breaking.take(&key));
        let taken = n.answered(&key);
        assert!(taken.is_some() && sent.is_some());
        breaking.restore(key);
        n.unanswered(&key, taken);
        assert_eq!(n.moved_from(1, &breaking).len(), 1, "the break goes on");

        // Broken further since (another break's event, not routed yet).
        let (n, key, _conns) = break_sent_on_one_of_two(&breaking);
        n.broken(&key, lease_state(1), 3);
        assert!(n.moved_from(1, &breaking).is_empty(), "a later break");

        // An oplock: its break goes to its own connection only.
        let (n, guid, _writers, _listener) = connections(2);
        n.logged_on(1, (1, "alice"), |_| true);
        n.logged_on(2, (1, "alice"), |_| true);
        let (mut lease, _) = lease_rwh();
        lease.key = oplock_key();
        let handle = ResumeKey(uuid::Uuid::from_bytes([2; 16]));
        let oplock = Holder::Oplock { file_id: [4; 16] };
        n.granted(lease, handle, (1, guid, "alice"), oplock);
        breaking.noticed(lease.key, true);
        n.broken(&lease.key, rh, 2);
        assert!(n.route_or_park(&lease.key, (rwh, rh, 2)).is_some());
        assert!(n.moved_from(1, &breaking).is_empty(), "an oplock");
    }

    /// A connection's sessions that went without a word to the notifier
    /// (channels whose home went: rksmbd unbinds them) hold no entries
    /// once another session logs on there: however many came and went,
    /// a session logged on over the connection carries its user's breaks
    /// and acknowledgments, and the connection holds no more entries than
    /// it may have sessions (review rr39k A4: 64 such filled the list,
    /// and alice's session after them was not written down — her breaks
    /// went nowhere and her acknowledgments there were refused).
    #[test]
    fn sessions_gone_unsaid_leave_room_for_a_live_ones_user() {
        let (n, guid, writers, _listener) = connections(1);
        // The connection's table: sessions in it, as `session_lives`.
        let table = Mutex::new(std::collections::HashSet::new());
        let live = |s| table.lock().unwrap().contains(&s);
        let max = u64::try_from(MAX_SESSIONS_PER_CONNECTION).unwrap();
        for session in 100..100 + 2 * max {
            table.lock().unwrap().insert(session);
            assert!(n.logged_on(1, (session, "bob"), live));
            // Gone from the table, unsaid.
            table.lock().unwrap().remove(&session);
        }
        // A full table of live sessions fits.
        for session in 1..max {
            table.lock().unwrap().insert(session);
            assert!(n.logged_on(1, (session, "bob"), live));
        }
        table.lock().unwrap().insert(max);
        assert!(n.logged_on(1, (max, "alice"), live), "written down");
        let key = lease_on(&n, (1, guid, "alice"));
        let (w, _) = n.route(&key).expect("alice's breaks come here");
        assert!(Arc::ptr_eq(&w, &writers[0]));
        assert!(n.may_acknowledge(&key, 1));
        let entries = n.guids.lock().unwrap().get(&1).map(|(_, u)| u.len());
        assert_eq!(entries, Some(MAX_SESSIONS_PER_CONNECTION));
        // A channel unbound says so: its entry goes, the others stay.
        n.session_left(1, max);
        assert!(n.route(&key).is_none() && !n.may_acknowledge(&key, 1));
    }

    #[test]
    fn oplocks_map_onto_lease_states() {
        for level in [0x01u8, 0x08, 0x09] {
            assert_eq!(oplock_level(oplock_state(level).unwrap()), level);
        }
        assert!(oplock_state(0).is_none());
        assert!(is_oplock_key(&oplock_key()));
        assert!(!is_oplock_key(&LeaseKey(uuid::Uuid::from_bytes([1; 16]))));
    }
}
