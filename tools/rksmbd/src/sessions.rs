//! What one connection may do to another's opens: a session set up with a
//! PreviousSessionId ends the old session (MS-SMB2 3.3.5.5.3), and a
//! CREATE with an AppInstanceId closes the open another connection made
//! under the same id (3.3.5.9.13). Each connection still owns its opens;
//! what crosses connections is the filterd handle of each of them, kept
//! here per session under a lock, so that the filterd close or detach of a
//! handle happens exactly once — by its own connection, or by the one that
//! ended its session or took over its app instance — never both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use libfilter::model::{ClientId, RelPath, ResumeKey};

use libfilter::client::SessionEnd;

use crate::files::NotClosed;
use crate::server::Shared;
use crate::unanswered::{Unanswered, Unanswereds};

/// Most sessions rksmbd tracks across all connections.
const MAX_SESSIONS: usize = 65_536;
/// Most AppInstanceIds remembered (one per client application instance);
/// beyond it new ones are not remembered, and a takeover by such an id
/// finds nothing to close.
const MAX_APP_INSTANCES: usize = 65_536;
/// Most durable v2 opens whose create GUID a DHnC can find by FileId.
const MAX_V2_BY_FILE_ID: usize = 262_144;

/// How long after its detach what a durable open left for its reconnect
/// (its position, its last end-of-file WRITE) is kept: the longest
/// durable timeout rksmbd grants, after which filterd has let the handle
/// go and no reconnect can come.
const KEPT_FOR: std::time::Duration =
    std::time::Duration::from_millis(crate::create::MAX_DURABLE_TIMEOUT_MS as u64);

/// What durable opens left for their reconnects, by create GUID, each
/// for at least [`KEPT_FOR`] after it was left: an entry is taken out
/// when its open is closed for good or left with nothing, and, once it
/// has expired, by the next sweep as another is put in (a sweep at most
/// once per `KEPT_FOR`, unless the map is full: an entry goes within
/// twice that) — before, an open filterd let expire
/// without a reconnect left its entry for good, and after
/// [`MAX_V2_BY_FILE_ID`] such ones nothing more was kept for anyone
/// (re-review rr39e F3).
#[derive(Debug)]
struct KeptForReconnect<V> {
    kept: HashMap<uuid::Uuid, (V, std::time::Instant)>,
    /// When expired entries are looked for again (when full, at once).
    next_prune: std::time::Instant,
}

impl<V> Default for KeptForReconnect<V> {
    fn default() -> Self {
        KeptForReconnect {
            kept: HashMap::new(),
            next_prune: std::time::Instant::now(),
        }
    }
}

impl<V: Copy> KeptForReconnect<V> {
    /// Keeps `v` for `create_guid`'s reconnect, left at `now`, unless
    /// [`MAX_V2_BY_FILE_ID`] others are kept.
    fn keep(&mut self, create_guid: uuid::Uuid, v: V, now: std::time::Instant) {
        let full = self.kept.len() >= MAX_V2_BY_FILE_ID;
        if full || now >= self.next_prune {
            self.kept
                .retain(|_, (_, left)| now.saturating_duration_since(*left) < KEPT_FOR);
            // Once per KEPT_FOR at most while not full: a sweep costs
            // one pass over the map.
            self.next_prune = now + KEPT_FOR;
        }
        if self.kept.len() < MAX_V2_BY_FILE_ID || self.kept.contains_key(&create_guid) {
            self.kept.insert(create_guid, (v, now));
        }
    }

    fn forget(&mut self, create_guid: uuid::Uuid) {
        self.kept.remove(&create_guid);
    }

    fn get(&self, create_guid: uuid::Uuid) -> Option<V> {
        self.kept.get(&create_guid).map(|(v, _)| *v)
    }
}

/// A session's filterd handles, as far as other connections need them.
pub struct Link {
    /// The logged-on user: only the same user may end the session.
    pub user: String,
    /// Where an SMB 3.x session lives, for a channel that binds it
    /// (multichannel, see [`crate::channels`]).
    pub home: OnceLock<Arc<crate::channels::Home>>,
    /// Ended by the session's LOGOFF: filterd's late answers to its
    /// DH2Q CREATEs are closed from then on, not left for a replay.
    end: SessionEnd,
    state: Mutex<LinkState>,
    /// Its DH2Q CREATEs answered STATUS_SERVER_UNAVAILABLE, whose opens
    /// its LOGOFF closes. Under its own lock, not `state`'s: that one is
    /// held across filterd calls ([`Link::close_elsewhere`]), and every
    /// durable CREATE's [`Registry::client_got`] waited behind it
    /// (re-review unavail4 1). Locked after [`Registry`]'s
    /// `unanswered_guids`, never across a filterd call.
    unanswered: Mutex<Unanswereds>,
}

#[derive(Default)]
struct LinkState {
    /// Ended by another connection (PreviousSessionId).
    revoked: bool,
    /// Open filterd handles by volatile FileId.
    live: HashMap<u64, Tracked>,
    /// Opens another connection closed (AppInstanceId) or a reattach
    /// lost, for the owning connection to forget, each with its
    /// descriptor slot: given back once that connection has closed the
    /// descriptor (given back at the close, an owner busy in a request
    /// kept the descriptor open uncounted, and takeovers chained behind
    /// such requests could take rksmbd past its cap, as re-review rr48d
    /// N1 found for PreviousSessionId).
    closed_elsewhere: Vec<(u64, shimline::descriptors::DescriptorSlot)>,
    /// The owning connection's inbox, nudged as another connection ends
    /// the session or closes or forgets one of its opens: its thread,
    /// maybe idle, then forgets them and closes their descriptors
    /// (`Connection::settle_elsewhere`), whose slots went with the
    /// handles ([`Tracked::counted`]).
    owner: Option<Arc<crate::channels::Inbox>>,
}

/// An open's filterd handle, as [`Link`] keeps it.
struct Tracked {
    key: ResumeKey,
    /// Granted durable, with its durable timeout (ms): how long its slot
    /// is left for its reconnect once released for one
    /// ([`Registry::hand_over`]).
    durable: Option<u32>,
    /// Its create GUID and the connection holding it in
    /// [`Registry::claim`], let go by whoever releases the handle: a
    /// connection whose session or open another ended may never make
    /// another request (half open), and a replay of the CREATE found the
    /// GUID held by it for good — the handle it got back attached then
    /// had no open behind it (review, session 28).
    held: Option<(uuid::Uuid, u64)>,
    /// The open's descriptor slot and its count under its user's share
    /// ([`crate::server::UserOpens`]), given back or handed over with the
    /// handle, whoever releases it: a durable handle detached for a
    /// reconnect — its connection lost, or its session ended by
    /// PreviousSessionId — leaves both for that reconnect
    /// ([`Registry::hand_over`]). The count was kept by the owning
    /// connection's open until that connection noticed, and an ended
    /// session's opens were counted twice by a DH2C of them on the new
    /// session, each refused (re-review: 80 held, 80 of 80 DH2C refused
    /// after PreviousSessionId); then given back to all at the ending,
    /// the slots with the old connection's forgetting, another user's
    /// CREATE could take them before the DH2Cs came, refused at the cap
    /// (prevsess48).
    counted: crate::server::OpenSlots,
    /// The open's delete-on-close mark: whoever releases the handle
    /// detaches or closes it with the told flag it holds.
    unsure: crate::files::DeleteUnsure,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    /// Records an open of the session, durable (with its timeout) or not,
    /// held by connection `conn` under `create_guid` if it has one, its
    /// descriptor slot and count under its user in `counted` until
    /// released (by whoever releases it). Refused, recording nothing and
    /// giving `counted` back to the caller, once another connection has
    /// ended the session: the ending released the handles tracked then
    /// and nobody would release this one (a CREATE granted after it — one
    /// that was pending — would leave filterd holding its handle, share
    /// mode and lease until rksmbd restarts); the caller releases it, and
    /// gives the counts back or, a reconnect's, hands them over again
    /// (re-review rr48a F4: dropped here, a reconnect's slot left for its
    /// next DH2C went to all).
    ///
    /// A durable handle with a create GUID is then found again here
    /// ([`Registry::found_again`]), tracked or refused (the caller hands
    /// the refused one over): after, not before, so that a reattach under
    /// way either meets it tracked or sees it found (re-review rr49g F2).
    #[allow(clippy::too_many_arguments)]
    pub fn track(
        &self,
        registry: &Registry,
        id: u64,
        key: ResumeKey,
        durable: Option<u32>,
        create_guid: Option<uuid::Uuid>,
        conn: u64,
        counted: crate::server::OpenSlots,
        unsure: crate::files::DeleteUnsure,
    ) -> Result<(), crate::server::OpenSlots> {
        let mut st = lock(&self.state);
        let tracked = if st.revoked {
            Err(counted)
        } else {
            let held = create_guid.map(|g| (g, conn));
            st.live.insert(
                id,
                Tracked {
                    key,
                    durable,
                    held,
                    counted,
                    unsure,
                },
            );
            Ok(())
        };
        drop(st);
        if let (Some(_), Some(_)) = (durable, create_guid) {
            registry.found_again(key);
        }
        tracked
    }

    /// The owning connection's inbox, nudged when another connection
    /// ends the session ([`LinkState::owner`]).
    pub fn owned_by(&self, inbox: Arc<crate::channels::Inbox>) {
        lock(&self.state).owner = Some(inbox);
    }

    /// The owning connection releases open `id`: `release` (the filterd
    /// close or detach) runs only if nobody else has released it, under
    /// the session's lock. When it fails with the handle kept (a CLOSE
    /// filterd refused or undid) the open stays the session's. Released
    /// (also when filterd did not tell the outcome), its descriptor slot
    /// and count under its user are the caller's, to give back before it
    /// lets the open's create GUID go, or to hand over
    /// ([`Registry::hand_over`]); none when another connection released
    /// the handle first.
    pub fn release(
        &self,
        id: u64,
        release: impl FnOnce() -> Result<(), NotClosed>,
    ) -> (Result<(), NotClosed>, Option<crate::server::OpenSlots>) {
        let mut st = lock(&self.state);
        let Some(entry) = st.live.remove(&id) else {
            return (Ok(()), None);
        };
        let r = release();
        if r.is_err_and(|e| e.kept) {
            st.live.insert(id, entry);
            return (r, None);
        }
        (r, Some(entry.counted))
    }

    /// What ends with the session's LOGOFF, for the calls of its DH2Q
    /// CREATEs ([`SessionEnd`]).
    pub fn end(&self) -> &SessionEnd {
        &self.end
    }

    /// Ended by another connection?
    pub fn revoked(&self) -> bool {
        lock(&self.state).revoked
    }

    /// Opens closed by another connection since the last call.
    pub fn take_closed_elsewhere(&self) -> Vec<(u64, shimline::descriptors::DescriptorSlot)> {
        std::mem::take(&mut lock(&self.state).closed_elsewhere)
    }

    /// Ends the session from another connection: durable handles are
    /// detached in filterd (a DH2C on the new session resumes them), the
    /// others closed.
    ///
    /// Nothing is released here: the owning connection releases the
    /// session's opens as a lost connection does (durable ones detached,
    /// their slots handed over; `Connection::settle_session`), woken for
    /// it at once or settling once the request it serves ends. Each
    /// open's descriptor slot and count stay with its descriptor until
    /// then. Handed over here, while that connection still had the
    /// descriptors open, a chain of PreviousSessionId logons whose old
    /// connections each waited in a request made rksmbd hold descriptors
    /// no slot counted, without bound (re-review rr48d N1). A reconnect
    /// meanwhile waits for the open ([`Registry::ending`]).
    fn revoke(&self, registry: &Registry) {
        let mut st = lock(&self.state);
        st.revoked = true;
        for t in st.live.values() {
            if let (Some(_), Some((g, conn))) = (t.durable, t.held) {
                registry.ending(g, conn);
            }
        }
        st.nudge_owner();
    }

    /// The owning connection forgets its ended session, once it has
    /// released the session's opens: whatever the session still tracks
    /// (nothing, as [`Link::track`] refuses an ended session; kept so
    /// that no path leaves a handle behind the forgotten opens) is
    /// released, durable handles detached and their slots handed over.
    pub fn release_rest(&self, sh: &Shared) {
        release_all(&mut lock(&self.state), sh);
    }

    /// Closes open `id` from another connection; false when it is gone,
    /// or when filterd refused or undid the close (then the open stays its
    /// connection's, as after a failed CLOSE).
    fn close_elsewhere(&self, sh: &Shared, id: u64) -> bool {
        let mut st = lock(&self.state);
        let Some(t) = st.live.remove(&id) else {
            return false;
        };
        let key = t.key;
        // The told flag rides on the close: no set-back call of its own
        // on this (another) connection's thread under the session's lock.
        let told = t.unsure.release_told();
        if let Err(e) = sh.filter.close_told(key, told) {
            tracing::warn!(resume_key = %key, error = %e, "closing the open of an app instance");
            if e.close_undone() {
                // Not released after all: the open stays its connection's,
                // and a change of it answered later is its own.
                t.unsure.release_undone();
                st.live.insert(id, t);
                return false;
            }
            // Unknown outcome: the open is forgotten, the handle closed
            // again until filterd answers.
            if crate::settle::may_hold(&e) {
                sh.unsettled.add_told(key, told);
            }
        }
        let Tracked { held, counted, .. } = t;
        // Counted under its user no more once closed: a reconnect that
        // finds the GUID let go must not find the open counted either.
        // Its descriptor slot stays until the owner closes the descriptor.
        let crate::server::OpenSlots { fd, user } = counted;
        drop(user);
        if let Some((g, conn)) = held {
            sh.registry.let_go(g, conn);
        }
        st.closed_elsewhere.push((id, fd));
        st.nudge_owner();
        true
    }

    fn is_live(&self, id: u64) -> bool {
        lock(&self.state).live.contains_key(&id)
    }

    /// Forgets the durable opens of handles in `lost`, which a reattach
    /// to filterd could not take back (another rksmbd process, the other
    /// node's, reconnected them since): nothing is released in filterd —
    /// the handle is not this process's any more — its claim and count go
    /// at once, and the owning connection forgets the open at its next
    /// look ([`Link::take_closed_elsewhere`]). Those of `lost` it
    /// tracks, durable or not, go in `seen`.
    fn forget_lost(
        &self,
        registry: &Registry,
        lost: &std::collections::HashSet<ResumeKey>,
        seen: &mut std::collections::HashSet<ResumeKey>,
    ) {
        let mut st = lock(&self.state);
        seen.extend(st.live.values().map(|t| t.key).filter(|k| lost.contains(k)));
        let ids: Vec<u64> = st
            .live
            .iter()
            .filter(|(_, t)| t.durable.is_some() && lost.contains(&t.key))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(t) = st.live.remove(&id) else {
                continue;
            };
            let Tracked { held, counted, .. } = t;
            let crate::server::OpenSlots { fd, user } = counted;
            drop(user);
            if let Some((g, conn)) = held {
                registry.let_go(g, conn);
            }
            st.closed_elsewhere.push((id, fd));
        }
        if !st.closed_elsewhere.is_empty() {
            st.nudge_owner();
        }
    }
}

impl LinkState {
    /// Wakes the owning connection to forget the opens released here
    /// (`Connection::settle_elsewhere`): their slots went with the
    /// handles, and it would hold their descriptors until its next
    /// request.
    fn nudge_owner(&self) {
        if let Some(inbox) = &self.owner {
            inbox.nudge();
        }
    }
}

/// Releases every handle an ended session still tracks with no open of
/// its connection behind it ([`Link::release_rest`]): durable ones
/// detached in filterd, their descriptor slots and counts under
/// their user left for their reconnects as a lost connection leaves them
/// ([`Registry::hand_over`]: until the durable timeout, unless another
/// connection holds the open by then), the others closed, their slots and
/// counts given back.
fn release_all(st: &mut LinkState, sh: &Shared) {
    for (_, t) in st.live.drain() {
        let Tracked {
            key,
            durable,
            held,
            counted,
            unsure,
        } = t;
        let told = unsure.release_told();
        let r = match durable {
            Some(_) => sh.filter.detach_told(key, told),
            None => sh.filter.close_told(key, told),
        };
        // Counted here no more (the owning connection may notice only at
        // its next request), before a DH2C can find the GUID let go:
        // handed over to that DH2C, or given back. Given back to all, the
        // DH2C the new session sends could find the slot taken by another
        // user's CREATE, and was refused at the cap (prevsess48).
        match (durable, held) {
            (Some(ms), Some((g, conn))) => sh.registry.hand_over((g, key, ms), conn, counted),
            _ => drop(counted),
        }
        // Only once it is detached: a replay that claims the create GUID
        // meanwhile gets the open from filterd again, and must not get it
        // before this detach (`create::claim`).
        if let Some((g, conn)) = held {
            sh.registry.let_go(g, conn);
        }
        if let Err(e) = r {
            tracing::warn!(resume_key = %key, error = %e, "releasing a handle of an ended session");
            if durable.is_none() && crate::settle::may_hold(&e) {
                sh.unsettled.add_told(key, told);
            }
        }
    }
}

/// The open an AppInstanceId last named.
struct AppOpen {
    session: u64,
    id: u64,
    path: RelPath,
    create_guid: uuid::Uuid,
}

/// Create GUID → the sessions that may list it as unanswered ([`Link`]'s
/// `unanswered`). Entries of sessions gone are pruned as it grows.
#[derive(Default)]
struct UnansweredIndex {
    by_guid: HashMap<uuid::Uuid, Vec<Weak<Link>>>,
    /// Size at which the next prune runs.
    prune_at: usize,
}

impl UnansweredIndex {
    fn add(&mut self, guid: uuid::Uuid, link: &Arc<Link>) {
        if self.by_guid.len() >= self.prune_at {
            self.by_guid
                .retain(|_, ls| ls.iter().any(|l| l.strong_count() > 0));
            self.prune_at = (self.by_guid.len() * 2).max(1024);
        }
        let ls = self.by_guid.entry(guid).or_default();
        if !ls.iter().any(|l| l.as_ptr() == Arc::as_ptr(link)) {
            ls.push(Arc::downgrade(link));
        }
    }

    /// `link` no longer lists `guid`.
    fn remove(&mut self, guid: uuid::Uuid, link: &Link) {
        if let Some(ls) = self.by_guid.get_mut(&guid) {
            ls.retain(|l| !std::ptr::eq(l.as_ptr(), link));
            if ls.is_empty() {
                self.by_guid.remove(&guid);
            }
        }
    }
}

/// Every connection's sessions, app instances and durable v2 FileIds.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<u64, Arc<Link>>>,
    /// Sessions another connection ended (PreviousSessionId,
    /// [`Registry::end_previous`]) whose owning connection has not
    /// released their opens yet (`Connection::settle_session`), by
    /// session id: out of `sessions` from the ending on, a reattach to
    /// filterd that lost one of their handles still reaches them
    /// ([`Registry::forget_lost`]). Before (re-review rr48f L1) it did
    /// not: the owner's release, its detach refused, handed the open's
    /// slot and count over for a reconnect that could not come, held
    /// until the open's durable timeout. Weak: a connection that ends
    /// without settling (a panic) keeps nothing alive here; such entries
    /// are pruned as the map grows. Locked after `sessions`.
    unsettled: Mutex<HashMap<u64, Weak<Link>>>,
    apps: Mutex<HashMap<[u8; 16], AppOpen>>,
    /// AppInstanceIds of unanswered CREATEs some session may remember
    /// ([`Registry::unanswered_of_app`] looks through the sessions only
    /// for these), at most [`MAX_APP_INSTANCES`].
    unanswered_apps: Mutex<std::collections::HashSet<[u8; 16]>>,
    /// The sessions whose lists of unanswered CREATEs may hold each create
    /// GUID: [`Registry::client_got`], run by every durable CREATE, looks
    /// at these only (none, nearly always) — it looked at every session,
    /// under the `closing` lock, each under a lock also held across
    /// filterd calls (re-review unavail4 1).
    unanswered_guids: Mutex<UnansweredIndex>,
    /// Opens (filterd client, create GUID: as filterd names them, so that
    /// another user's reuse of a GUID is another open) taken from the
    /// sessions' lists for the closer thread to close
    /// ([`Registry::to_close`]) that it is not done with yet
    /// ([`Registry::closing_claim`]; a close that failed is tried again):
    /// the client's getting an open of one meanwhile takes it out
    /// ([`Registry::client_got`]), and so does another session's noting
    /// it ([`Registry::unanswered`]). Locked before
    /// `unanswered_apps`, `sessions`, `unanswered_guids` and a session's
    /// state or list of unanswered CREATEs.
    closing: Mutex<std::collections::HashSet<(ClientId, uuid::Uuid)>>,
    v2_by_file_id: Mutex<HashMap<u64, uuid::Uuid>>,
    /// Durable opens held by a connection: create GUID → connection.
    held: Mutex<HashMap<uuid::Uuid, u64>>,
    /// The file position (FilePositionInformation) of a durable open
    /// that set one, by create GUID, for its reconnect.
    positions: Mutex<KeptForReconnect<u64>>,
    /// The last end-of-file WRITE of a durable open, by create GUID, for
    /// its reconnect: a replay of it is not appended again.
    appends: Mutex<KeptForReconnect<crate::files::LastAppend>>,
    /// Locks filterd may hold for a durable handle whose client went
    /// away before it learnt the outcome, by resume key: settled when the
    /// handle is reconnected ([`crate::lock::settle_reconnected`]).
    unlearnt: Mutex<HashMap<ResumeKey, Vec<crate::lock::Unlearnt>>>,
    /// Connections whose client went away, detaching their durable opens
    /// one by one (`Connection::lost`): a reconnect or replay of one of
    /// them waits for it longer than for a connection that lives on.
    letting_go: Mutex<std::collections::HashSet<u64>>,
    /// Create GUIDs of durable opens whose session another connection
    /// ended (PreviousSessionId, [`Link::revoke`]), still held by the
    /// owning connection until it detaches them, closes their
    /// descriptors and hands their slots over
    /// (`Connection::settle_session`): a reconnect or replay of one waits
    /// for it as for a connection letting go, and is
    /// STATUS_FILE_NOT_AVAILABLE (retried) past that wait, not
    /// STATUS_OBJECT_NAME_NOT_FOUND. Locked after `held`.
    ending: Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// The descriptor slots of durable opens whose connection was lost,
    /// and their counts under their users, by create GUID, handed to
    /// their reconnect or replay ([`Registry::take_handed`]) for the
    /// open's durable timeout after it was let go ([`handed_for`]).
    /// Given back to all as the connection let go, the slot could be
    /// taken by another CREATE before the client's DH2C came, which was
    /// then refused at the cap (re-review rr46a F3). At most one per slot
    /// of the cap.
    handed: Mutex<HandedSlots>,
}

/// What a lost connection's durable open leaves for its reconnect
/// ([`Registry::hand_over`]).
struct Handed {
    fd: shimline::descriptors::DescriptorSlot,
    user: Option<crate::server::UserSlot>,
    /// Its filterd handle: filterd closing it ([`Registry::handle_gone`])
    /// gives the slot back.
    key: ResumeKey,
    until: std::time::Instant,
}

/// The slots left for reconnects ([`Registry::hand_over`]), by create
/// GUID, by deadline (those past it are given back at every caps and
/// share check, looking at the earliest only: re-review rr47b F1) and
/// by filterd handle.
#[derive(Default)]
struct HandedSlots {
    by_guid: HashMap<uuid::Uuid, Handed>,
    by_deadline: std::collections::BTreeSet<(std::time::Instant, uuid::Uuid)>,
    by_key: HashMap<ResumeKey, uuid::Uuid>,
    /// Handles a reattach to filterd found lost ([`Registry::forget_lost`]),
    /// each until [`KEPT_FOR`] after: a slot left for one would wait for a
    /// reconnect that cannot come, and none is ([`Registry::hand_over`],
    /// [`Registry::put_back`]). An owner already past its session's lock
    /// (its `Link::release` done, its detach refused by the restarted
    /// filterd) when the reattach forgot the session's handles handed the
    /// slot over after the reattach's [`HandedSlots::mark_lost`], and it
    /// waited out the open's durable timeout (re-review rr49b F1). Only
    /// those no session tracked: the others are forgotten, or never
    /// handed over (not durable). At most [`MAX_V2_BY_FILE_ID`]; one found
    /// again here (a reconnect resumed it, [`Registry::found_again`]) is
    /// taken out.
    lost: HashMap<ResumeKey, std::time::Instant>,
    /// [`Registry::forget_lost`] calls under way: while any is, the
    /// handles found again here ([`Registry::found_again`]) are kept in
    /// `found`, and not marked lost by them (re-review rr49g F2).
    reattaches: usize,
    found: std::collections::HashSet<ResumeKey>,
}

impl HandedSlots {
    fn insert(&mut self, guid: uuid::Uuid, h: Handed) {
        self.remove(guid);
        self.by_deadline.insert((h.until, guid));
        self.by_key.insert(h.key, guid);
        self.by_guid.insert(guid, h);
    }

    fn remove(&mut self, guid: uuid::Uuid) -> Option<Handed> {
        let h = self.by_guid.remove(&guid)?;
        self.by_deadline.remove(&(h.until, guid));
        self.by_key.remove(&h.key);
        Some(h)
    }

    /// A reattach found handles `keys` lost at `now`, and no session
    /// tracked them: none is left a slot from now on until [`KEPT_FOR`]
    /// has passed (past the longest durable timeout, the handle is gone
    /// anyway). Expired marks are looked for once, when the table is
    /// full; still full, the rest are not marked: how many. A pass over
    /// the table for each key held the lock for minutes at a filterd
    /// restart (re-review rr49g F1).
    fn mark_lost(
        &mut self,
        keys: impl IntoIterator<Item = ResumeKey>,
        now: std::time::Instant,
    ) -> usize {
        let mut pruned = false;
        let mut unmarked = 0;
        for key in keys {
            if self.lost.len() >= MAX_V2_BY_FILE_ID && !pruned {
                self.lost.retain(|_, until| now < *until);
                pruned = true;
            }
            if self.lost.len() < MAX_V2_BY_FILE_ID || self.lost.contains_key(&key) {
                self.lost.insert(key, now + KEPT_FOR);
            } else {
                unmarked += 1;
            }
        }
        unmarked
    }

    /// Whether a reattach found handle `key` lost (less than
    /// [`KEPT_FOR`] before `now`).
    fn is_lost(&self, key: ResumeKey, now: std::time::Instant) -> bool {
        self.lost.get(&key).is_some_and(|until| now < *until)
    }

    /// Drops those past their deadline at `now`: whether there were any.
    fn expire(&mut self, now: std::time::Instant) -> bool {
        let mut any = false;
        while let Some(&(until, guid)) = self.by_deadline.first() {
            if now < until {
                break;
            }
            any |= self.remove(guid).is_some();
            // Not left behind should the maps disagree.
            self.by_deadline.remove(&(until, guid));
        }
        any
    }
}

/// How long a lost connection's durable open keeps its descriptor slot
/// and its user's count for its reconnect ([`Registry::hand_over`]): the
/// open's granted durable timeout (`timeout_ms`, at most
/// [`crate::create::MAX_DURABLE_TIMEOUT_MS`]), past which filterd closes
/// its handle and no reconnect can come; a debug build's
/// `$RKSMBD_TEST_HANDED_SLOT_MS` shortens it (tests).
fn handed_for(timeout_ms: u32) -> std::time::Duration {
    static TEST: OnceLock<u64> = OnceLock::new();
    match crate::create::test_hook_ms(&TEST, "RKSMBD_TEST_HANDED_SLOT_MS") {
        0 => std::time::Duration::from_millis(u64::from(
            match timeout_ms {
                0 => libfilter::model::DEFAULT_DURABLE_TIMEOUT_MS,
                t => t,
            }
            .min(crate::create::MAX_DURABLE_TIMEOUT_MS),
        )),
        ms => std::time::Duration::from_millis(ms),
    }
}

impl Registry {
    /// A session has logged on.
    pub fn logged_on(&self, session: u64, user: &str) -> Arc<Link> {
        let link = Arc::new(Link {
            user: user.to_owned(),
            home: OnceLock::new(),
            end: SessionEnd::default(),
            state: Mutex::default(),
            unanswered: Mutex::default(),
        });
        let mut m = lock(&self.sessions);
        if m.len() < MAX_SESSIONS {
            m.insert(session, link.clone());
        }
        link
    }

    /// The logged-on session `session`, for a channel binding it.
    pub fn link(&self, session: u64) -> Option<Arc<Link>> {
        lock(&self.sessions).get(&session).cloned()
    }

    /// The session is over (LOGOFF, lost connection).
    pub fn ended(&self, session: u64) {
        let mut m = lock(&self.sessions);
        m.remove(&session);
        lock(&self.unsettled).remove(&session);
    }

    /// Session `session`, which another connection ended, is settled: its
    /// owning connection has released its opens
    /// (`Connection::settle_session`), and nothing of it is left for
    /// [`Registry::forget_lost`] to reach.
    pub fn settled(&self, session: u64) {
        lock(&self.unsettled).remove(&session);
    }

    /// PreviousSessionId: ends session `previous` if `user` owns it.
    /// Returns whether it did. The session stays within reach of
    /// [`Registry::forget_lost`] until its owner has settled it
    /// ([`Registry::settled`]).
    pub fn end_previous(&self, previous: u64, user: &str) -> bool {
        let link = {
            let mut m = lock(&self.sessions);
            match m.get(&previous) {
                Some(l) if l.user == user => {
                    let link = m.remove(&previous);
                    if let Some(l) = &link {
                        // Under the `sessions` lock: a reattach's look
                        // ([`Registry::forget_lost`]) finds it in either.
                        let mut u = lock(&self.unsettled);
                        if u.len() >= MAX_SESSIONS {
                            u.retain(|_, w| w.strong_count() > 0);
                        }
                        if u.len() < MAX_SESSIONS {
                            u.insert(previous, Arc::downgrade(l));
                        }
                    }
                    link
                }
                _ => None,
            }
        };
        match link {
            Some(l) => {
                l.revoke(self);
                true
            }
            None => false,
        }
    }

    /// AppInstanceId (3.3.5.9.13): before an open of `path` under `app`,
    /// closes the open the id names if it is another open of the same
    /// file (not the same create GUID, which is the client's own replay).
    pub fn take_over_app_instance(
        &self,
        sh: &Shared,
        app: [u8; 16],
        path: &RelPath,
        create_guid: uuid::Uuid,
    ) {
        let old = {
            let mut apps = lock(&self.apps);
            match apps.get(&app) {
                Some(o) if o.path == *path && o.create_guid != create_guid => apps.remove(&app),
                _ => None,
            }
        };
        let Some(old) = old else { return };
        let Some(l) = self.link_or_unsettled(old.session) else {
            return;
        };
        if l.close_elsewhere(sh, old.id) {
            tracing::info!(
                session = old.session,
                "closed the open of a replaced app instance"
            );
        } else if l.is_live(old.id) {
            // filterd did not close it: the id still names it (the new
            // open is refused while it holds the file).
            lock(&self.apps).entry(app).or_insert(old);
        }
    }

    /// Session `session`, logged on, or ended by another connection
    /// (PreviousSessionId) and not yet settled by its owner: an
    /// AppInstanceId takeover closes an open of either. Only the logged-on
    /// were looked at before: the takeover of an open whose session was
    /// ended but whose owner was busy in a request found nothing to close,
    /// its `apps` entry already taken out, and the new open met the old
    /// one's share mode, attached, then detached until its durable timeout
    /// (re-review rr49b, out of scope there).
    fn link_or_unsettled(&self, session: u64) -> Option<Arc<Link>> {
        let m = lock(&self.sessions);
        if let Some(l) = m.get(&session) {
            return Some(l.clone());
        }
        let u = lock(&self.unsettled);
        u.get(&session).and_then(Weak::upgrade)
    }

    /// A DH2Q CREATE with AppInstanceId `app` was answered
    /// STATUS_SERVER_UNAVAILABLE: the id's next takeover looks for it.
    /// Beyond [`MAX_APP_INSTANCES`] ids it is not remembered (a LOGOFF
    /// still closes its open).
    pub fn app_unanswered(&self, app: [u8; 16]) {
        let mut m = lock(&self.unanswered_apps);
        if m.len() < MAX_APP_INSTANCES {
            m.insert(app);
        }
    }

    /// The client was told SUCCESS for an open of create GUID `guid` as
    /// filterd client `client` (a
    /// replay that took the late open, a fresh CREATE that reused the
    /// GUID, a DH2C): no session's LOGOFF closes it as an unanswered
    /// CREATE's any more. Only replays did before, and a retry without
    /// the replay flag, made fresh once the late answer left nothing,
    /// was closed by the LOGOFF that detached it for a DH2C (re-review
    /// unavail3 1).
    ///
    /// Also out of those handed to the closer thread and not yet closed,
    /// under the same lock as [`Registry::to_close`] took them: whenever
    /// the SUCCESS came, the closer never closes the open.
    ///
    /// Only `client`'s: filterd names an open by client and create GUID,
    /// and another user's (or client's) CREATE reusing the GUID is
    /// another open — its SUCCESS took the GUID out for every client,
    /// cancelling the close of this one (kept for minutes now that a
    /// failed close is tried again).
    ///
    /// Touches only the sessions that listed `guid` ([`UnansweredIndex`]),
    /// under small locks none holds across a filterd call.
    pub fn client_got(&self, client: &ClientId, guid: uuid::Uuid) {
        let mut closing = lock(&self.closing);
        closing.remove(&(client.clone(), guid));
        let Some(links) = lock(&self.unanswered_guids).by_guid.remove(&guid) else {
            return;
        };
        // `closing` held on: a LOGOFF's `to_close` takes the list
        // under it, and must see `guid` forgotten or hand it over here.
        let listing: Vec<_> = links
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|l| lock(&l.unanswered).forget(client, guid))
            .collect();
        // Still listed for another client (the index is locked before a
        // session's list).
        let mut index = lock(&self.unanswered_guids);
        for l in &listing {
            index.add(guid, l);
        }
    }

    /// A DH2Q CREATE of session `link` was answered
    /// STATUS_SERVER_UNAVAILABLE.
    /// The GUID is that session's from now on: one handed to the closer
    /// thread (another session's LOGOFF, or a takeover, still trying its
    /// close) is left to this session, whose client replays it.
    pub fn unanswered(&self, link: &Arc<Link>, u: Unanswered) {
        let mut closing = lock(&self.closing);
        closing.remove(&(u.client.clone(), u.guid));
        let mut index = lock(&self.unanswered_guids);
        let guid = u.guid;
        for old in lock(&link.unanswered).note(u) {
            index.remove(old, link);
        }
        index.add(guid, link);
    }

    /// LOGOFF of session `link`: late answers to its CREATEs are closed
    /// from now on; the CREATEs answered STATUS_SERVER_UNAVAILABLE, for
    /// the caller to close ([`crate::unanswered::close`]). Ended first,
    /// under the list's lock: a detach not yet sent is a close, one sent
    /// already reaches filterd before the caller's resume.
    pub fn log_off(&self, link: &Link) -> Vec<Unanswered> {
        let mut index = lock(&self.unanswered_guids);
        let mut list = lock(&link.unanswered);
        link.end.end();
        let gone = list.take();
        for u in &gone {
            index.remove(u.guid, link);
        }
        gone
    }

    /// The unanswered CREATEs `take` takes from the sessions' lists (a
    /// LOGOFF's, a takeover's), marked as handed to the closer thread.
    pub fn to_close(&self, take: impl FnOnce() -> Vec<Unanswered>) -> Vec<Unanswered> {
        let mut closing = lock(&self.closing);
        let gone = take();
        closing.extend(gone.iter().map(|u| (u.client.clone(), u.guid)));
        gone
    }

    /// The closer thread is done with the open of `guid` (closed, found
    /// gone, or given up): false if the client got it since it was handed
    /// over ([`Registry::client_got`]) or another hand-over's close was
    /// done with it already.
    pub fn closing_claim(&self, client: &ClientId, guid: uuid::Uuid) -> bool {
        lock(&self.closing).remove(&(client.clone(), guid))
    }

    /// Whether the closer thread may close the open of `guid`: handed over
    /// and not got by the client since. It stays handed over until the
    /// closer is done with it ([`Registry::closing_claim`]): a close that
    /// failed is tried again, and a SUCCESS meanwhile must still be seen.
    pub fn closing_owns(&self, client: &ClientId, guid: uuid::Uuid) -> bool {
        lock(&self.closing).contains(&(client.clone(), guid))
    }

    /// AppInstanceId (3.3.5.9.13) of a new open of `path`, create GUID
    /// `guid`: the unanswered CREATEs of the same app instance and file
    /// in any session, taken out for the caller to close as the id's
    /// earlier open is closed ([`crate::unanswered::close`]).
    pub fn unanswered_of_app(
        &self,
        app: [u8; 16],
        path: &RelPath,
        guid: uuid::Uuid,
    ) -> Vec<Unanswered> {
        if !lock(&self.unanswered_apps).remove(&app) {
            return Vec::new();
        }
        let links: Vec<Arc<Link>> = lock(&self.sessions).values().cloned().collect();
        let mut index = lock(&self.unanswered_guids);
        let mut taken = Vec::new();
        let mut more = false;
        for l in links {
            let mut list = lock(&l.unanswered);
            let took = list.take_app(app, path, guid);
            for u in &took {
                index.remove(u.guid, &l);
            }
            taken.extend(took);
            more |= list.has_app(app);
        }
        if more {
            // Of another file: for a later takeover.
            self.app_unanswered(app);
        }
        taken
    }

    /// Remembers the open an AppInstanceId now names.
    pub fn app_instance_opened(
        &self,
        app: [u8; 16],
        session: u64,
        id: u64,
        path: RelPath,
        create_guid: uuid::Uuid,
    ) {
        let mut apps = lock(&self.apps);
        if apps.len() >= MAX_APP_INSTANCES && !apps.contains_key(&app) {
            // Forget ids whose open is gone before refusing a new one.
            let sessions = lock(&self.sessions);
            apps.retain(|_, o| sessions.get(&o.session).is_some_and(|l| l.is_live(o.id)));
            if apps.len() >= MAX_APP_INSTANCES {
                return;
            }
        }
        apps.insert(
            app,
            AppOpen {
                session,
                id,
                path,
                create_guid,
            },
        );
    }

    /// A durable v2 open's create GUID, for a DHnC that names only the
    /// persistent FileId (smbtorture's reopen2b does; Windows clients
    /// reconnect a v2 open with DH2C). Remembered by this rksmbd process
    /// only, up to [`MAX_V2_BY_FILE_ID`] opens.
    pub fn v2_opened(&self, persistent_file_id: u64, create_guid: uuid::Uuid) {
        let mut m = lock(&self.v2_by_file_id);
        if m.len() < MAX_V2_BY_FILE_ID {
            m.insert(persistent_file_id, create_guid);
        }
    }

    /// A durable v2 open is closed for good.
    pub fn v2_closed(&self, persistent_file_id: u64) {
        lock(&self.v2_by_file_id).remove(&persistent_file_id);
    }

    /// The create GUID of the durable v2 open with this persistent FileId.
    pub fn v2_create_guid(&self, persistent_file_id: u64) -> Option<uuid::Uuid> {
        lock(&self.v2_by_file_id).get(&persistent_file_id).copied()
    }

    /// Connection `conn` holds the durable open with this create GUID.
    pub fn held(&self, create_guid: uuid::Uuid, conn: u64) {
        let mut m = lock(&self.held);
        m.insert(create_guid, conn);
        lock(&self.ending).remove(&create_guid);
        // Counted here now: a slot left for its reconnect is no more
        // (one handed over by a connection that let go after this one's
        // move took a slot of its own).
        lock(&self.handed).remove(create_guid);
    }

    /// Connection `conn` takes the durable open with this create GUID,
    /// unless another connection holds it (that one's number and kind
    /// then, read under the same lock: read after, the holder could have
    /// let go in between and a live one been reported).
    pub fn claim(&self, create_guid: uuid::Uuid, conn: u64) -> Result<(), (u64, OpenHolder)> {
        let mut m = lock(&self.held);
        match m.get(&create_guid) {
            Some(other) if *other != conn => Err((*other, self.kind_of_open(create_guid, *other))),
            _ => {
                m.insert(create_guid, conn);
                lock(&self.ending).remove(&create_guid);
                Ok(())
            }
        }
    }

    /// Connection `conn` takes the durable open with this create GUID if
    /// no connection holds it, itself included: false if one does.
    pub fn claim_free(&self, create_guid: uuid::Uuid, conn: u64) -> bool {
        let mut m = lock(&self.held);
        if m.contains_key(&create_guid) {
            return false;
        }
        m.insert(create_guid, conn);
        // Its new holder is not ending (re-review rr48f L2).
        lock(&self.ending).remove(&create_guid);
        true
    }

    /// Whether connection `conn` lets its opens go (lock order: `held`
    /// first, then `letting_go`).
    /// The unanswered-closer counts as letting go: it lets go after one
    /// filterd call; counted live, a replay waiting for it gave up after
    /// 1 s (STATUS_FILE_NOT_AVAILABLE) and a DH2C was answered a final
    /// STATUS_OBJECT_NAME_NOT_FOUND (re-review unavail4 4).
    fn kind_of(&self, conn: u64) -> OpenHolder {
        if conn == crate::unanswered::CLOSER_CONN || lock(&self.letting_go).contains(&conn) {
            OpenHolder::LettingGo
        } else {
            OpenHolder::Live
        }
    }

    /// A reattach to filterd could not take back the durable handles in
    /// `lost`: every session forgets their opens ([`Link::forget_lost`]),
    /// so that no stale connection reads, writes or locks through a
    /// handle another rksmbd process reconnected meanwhile (rvnode
    /// finding 3), and a DH2C finds the open held by no connection here.
    /// Sessions another connection ended whose owner has not released
    /// their opens yet too: their slots go back as the owner closes the
    /// descriptors, not handed over for a reconnect that cannot come
    /// (re-review rr48f L1).
    ///
    /// The sessions first, then the slots left for reconnects, under
    /// their lock: a slot an owner already releasing one of the handles
    /// (past its session's lock, the detach refused by the restarted
    /// filterd) handed over before is given back, and one it hands over
    /// after is refused ([`HandedSlots::mark_lost`]). The slots first, such an
    /// owner's hand-over after them waited out the open's durable
    /// timeout (re-review rr49b F1).
    ///
    /// Marked are only the lost handles no session tracked (an owner past
    /// its `Link::release`, a slot handed over or taken by a reconnect)
    /// and none found again here while this ran: every non-durable handle
    /// of a filterd restart was marked, and the table's cap was reachable
    /// (re-review rr49g F1). A reconnect resuming one of them meanwhile
    /// (a DH2C is not held during a reattach) is found again after it is
    /// tracked: either the walk meets it tracked, or it is in `found`
    /// (rr49g F2).
    pub fn forget_lost(&self, lost: &[ResumeKey]) {
        if lost.is_empty() {
            return;
        }
        lock(&self.handed).reattaches += 1;
        let keys: std::collections::HashSet<ResumeKey> = lost.iter().copied().collect();
        let mut seen = std::collections::HashSet::new();
        let links: Vec<Arc<Link>> = {
            // Both under the `sessions` lock: an ending moves a session
            // from one to the other under it.
            let m = lock(&self.sessions);
            let ended: Vec<Arc<Link>> = lock(&self.unsettled)
                .values()
                .filter_map(Weak::upgrade)
                .collect();
            m.values().cloned().chain(ended).collect()
        };
        for l in links {
            l.forget_lost(self, &keys, &mut seen);
        }
        let now = std::time::Instant::now();
        let mut m = lock(&self.handed);
        for key in &keys {
            // One resumed here during the walk and handed over again
            // since left its slot for a reconnect that can come
            // (re-review rr49k F-A).
            if m.found.contains(key) {
                continue;
            }
            if let Some(&g) = m.by_key.get(key) {
                m.remove(g);
            }
        }
        let unseen: Vec<ResumeKey> = keys
            .into_iter()
            .filter(|k| !seen.contains(k) && !m.found.contains(k))
            .collect();
        let unmarked = m.mark_lost(unseen, now);
        m.reattaches = m.reattaches.saturating_sub(1);
        if m.reattaches == 0 {
            m.found = Default::default();
        }
        drop(m);
        if unmarked > 0 {
            tracing::warn!(
                unmarked,
                max = MAX_V2_BY_FILE_ID,
                "a reattach to filterd lost more handles than are marked lost: their slots, if handed over still, wait out their durable timeouts"
            );
        }
    }

    /// Handle `key` is an open's here again (a reconnect resumed it): a
    /// reattach that found it lost before no longer stops its slot from
    /// being left for its next reconnect ([`HandedSlots::mark_lost`]).
    pub fn found_again(&self, key: ResumeKey) {
        let mut m = lock(&self.handed);
        m.lost.remove(&key);
        if m.reattaches > 0 {
            m.found.insert(key);
        }
    }

    /// The durable open with this create GUID and filterd handle `key`,
    /// granted `timeout_ms`, detached as connection `conn` was lost or
    /// its session ended by another's PreviousSessionId
    /// ([`Link::revoke`]), leaves its descriptor slot for its reconnect or
    /// replay
    /// ([`Registry::take_handed`]) until that timeout has passed
    /// ([`handed_for`]; given back at the next caps or share check then,
    /// [`Registry::give_back_expired`]) or filterd closed the handle
    /// ([`Registry::handle_gone`]) — unless another connection holds the
    /// open already (its move counted a slot of its own): the slot is
    /// given back then. Its count under its user (`counted.user`) goes
    /// with it:
    /// kept for the reconnect too, it is not asked of the user's share
    /// again, and a user resetting its connections keeps no more slots
    /// than its share.
    pub fn hand_over(
        &self,
        (create_guid, key, timeout_ms): (uuid::Uuid, ResumeKey, u32),
        conn: u64,
        counted: crate::server::OpenSlots,
    ) {
        let m = lock(&self.held);
        if m.get(&create_guid) == Some(&conn) {
            let now = std::time::Instant::now();
            let mut handed = lock(&self.handed);
            if handed.is_lost(key, now) {
                // A reattach found it lost while this connection was
                // releasing it: no reconnect can come (re-review rr49b
                // F1). Given back as the guards go.
                drop(handed);
                drop(m);
                drop(counted);
                tracing::debug!(
                    conn,
                    %create_guid,
                    resume_key = %key,
                    "a durable open detached after a reattach found its handle lost gives its descriptor slot back"
                );
                return;
            }
            let h = Handed {
                fd: counted.fd,
                user: counted.user,
                key,
                until: now + handed_for(timeout_ms),
            };
            handed.insert(create_guid, h);
            // One line for every way here (its connection lost, its
            // session ended by PreviousSessionId, a reconnect landing on a
            // session ended meanwhile); tests count "leaves its descriptor
            // slot for its reconnect".
            tracing::debug!(
                conn,
                %create_guid,
                resume_key = %key,
                "a durable open detached (its connection lost or its session ended) leaves its descriptor slot for its reconnect"
            );
        }
    }

    /// The descriptor slot a lost connection left for the durable open
    /// with one of these create GUIDs, if any ([`Registry::hand_over`]),
    /// with what puts it back ([`Registry::put_back`]).
    pub fn take_handed(&self, create_guids: &[uuid::Uuid]) -> Option<crate::server::CreateSlot> {
        let mut m = lock(&self.handed);
        m.expire(std::time::Instant::now());
        create_guids.iter().find_map(|&g| {
            let h = m.remove(g)?;
            Some(crate::server::CreateSlot {
                fd: h.fd,
                user: h.user,
                handed: Some((g, h.key, h.until)),
            })
        })
    }

    /// A slot taken from those left for reconnects
    /// ([`Registry::take_handed`]) by a CREATE that ended without an open
    /// but for the moment only (`temporary`: a DH2C or replay told to
    /// retry, gone pending, its claim given up, its filterd call timed
    /// out, refused at a cap) is left for its reconnect again, with its
    /// deadline — unless a connection holds the open now (its own count
    /// stands for it) or the deadline passed. Given back to all, another
    /// CREATE could take it before the client's retry, refused then at the
    /// cap for an open it was granted (re-review rr47b F2). One that
    /// failed for good (no such handle, access denied, …) gives it back:
    /// put back, it was held up to the open's durable timeout for an open
    /// that another reconnect had closed meanwhile, or that filterd had
    /// purged while this CREATE held the slot, no event to come for it
    /// (re-review rr47c F1). Any other slot is given back.
    pub fn put_back(&self, slot: crate::server::CreateSlot, temporary: bool) {
        let Some((guid, key, until)) = slot.handed.filter(|_| temporary) else {
            return;
        };
        let m = lock(&self.held);
        let now = std::time::Instant::now();
        if !m.contains_key(&guid) && now < until {
            let mut handed = lock(&self.handed);
            // Nor for a handle a reattach found lost meanwhile (the
            // slot taken before it, so `handle_gone` found nothing).
            if !handed.is_lost(key, now) {
                let h = Handed {
                    fd: slot.fd,
                    user: slot.user,
                    key,
                    until,
                };
                handed.insert(guid, h);
            }
        }
    }

    /// Gives back the slots left for reconnects past their deadline (the
    /// open's durable timeout): whether there were any. Looked for at
    /// every caps and share check of a CREATE (re-review rr47b F1: looked
    /// for only when no descriptor slot was free, a user whose lost opens
    /// were never reconnected was refused every CREATE for its share
    /// while the server had descriptors to spare); the earliest deadline
    /// only is looked at when none is past.
    pub fn give_back_expired(&self) -> bool {
        lock(&self.handed).expire(std::time::Instant::now())
    }

    /// filterd closed handle `key` (its durable timeout, a break closing
    /// it while disconnected, a purge, or it could not be resumed on a
    /// restarted filterd): a slot left for its reconnect is given back.
    pub fn handle_gone(&self, key: ResumeKey) {
        let mut m = lock(&self.handed);
        if let Some(&g) = m.by_key.get(&key) {
            m.remove(g);
        }
    }

    /// Connection `conn` no longer holds it.
    pub fn let_go(&self, create_guid: uuid::Uuid, conn: u64) {
        let mut m = lock(&self.held);
        if m.get(&create_guid) == Some(&conn) {
            m.remove(&create_guid);
            lock(&self.ending).remove(&create_guid);
        }
    }

    /// A durable open's file position is now `pos` (0 also when it is
    /// closed for good). Up to [`MAX_V2_BY_FILE_ID`] non-zero positions
    /// are remembered, each for [`KEPT_FOR`], by this rksmbd process only.
    pub fn keep_position(&self, create_guid: uuid::Uuid, pos: u64) {
        let mut m = lock(&self.positions);
        if pos == 0 {
            m.forget(create_guid);
        } else {
            m.keep(create_guid, pos, std::time::Instant::now());
        }
    }

    /// The durable open with `create_guid` is closed for good: its
    /// position is forgotten.
    pub fn durable_closed(&self, create_guid: uuid::Uuid) {
        lock(&self.handed).remove(create_guid);
        self.keep_position(create_guid, 0);
        self.keep_append(create_guid, None);
    }

    /// A durable open's last end-of-file WRITE, as it is detached (none:
    /// another WRITE came after it). Up to [`MAX_V2_BY_FILE_ID`] are
    /// remembered, each for [`KEPT_FOR`], by this rksmbd process only.
    pub fn keep_append(&self, create_guid: uuid::Uuid, last: Option<crate::files::LastAppend>) {
        let mut m = lock(&self.appends);
        match last {
            None => m.forget(create_guid),
            Some(l) => m.keep(create_guid, l, std::time::Instant::now()),
        }
    }

    /// The last end-of-file WRITE a reconnected durable open resumes with.
    pub fn last_append(&self, create_guid: uuid::Uuid) -> Option<crate::files::LastAppend> {
        lock(&self.appends).get(create_guid)
    }

    /// Lock `u` of handle `key` is unlearnt: its client went away first.
    pub fn unlearnt(&self, key: ResumeKey, u: crate::lock::Unlearnt) {
        let mut m = lock(&self.unlearnt);
        if m.len() < MAX_V2_BY_FILE_ID || m.contains_key(&key) {
            m.entry(key).or_default().push(u);
        } else {
            tracing::warn!(resume_key = %key, "too many unlearnt locks kept: this one is forgotten");
        }
    }

    /// The unlearnt locks of handle `key`, now being reconnected.
    pub fn take_unlearnt(&self, key: ResumeKey) -> Vec<crate::lock::Unlearnt> {
        lock(&self.unlearnt).remove(&key).unwrap_or_default()
    }

    /// The position a reconnected durable open resumes at (0 when none
    /// was kept).
    pub fn position(&self, create_guid: uuid::Uuid) -> u64 {
        lock(&self.positions).get(create_guid).unwrap_or(0)
    }

    /// Does a connection other than `conn` hold it?
    pub fn held_by_other_connection(&self, create_guid: uuid::Uuid, conn: u64) -> bool {
        self.holder_other_than(create_guid, conn).is_some()
    }

    /// Who holds the durable open with this create GUID, when another
    /// connection than `conn` does.
    pub fn holder_other_than(&self, create_guid: uuid::Uuid, conn: u64) -> Option<OpenHolder> {
        let m = lock(&self.held);
        let other = m.get(&create_guid).copied().filter(|c| *c != conn)?;
        Some(self.kind_of_open(create_guid, other))
    }

    /// Who holds the open `create_guid`, held by connection `conn`: one
    /// whose session was ended lets it go ([`Registry::ending`]).
    fn kind_of_open(&self, create_guid: uuid::Uuid, conn: u64) -> OpenHolder {
        if lock(&self.ending).contains(&create_guid) {
            return OpenHolder::LettingGo;
        }
        self.kind_of(conn)
    }

    /// The durable open `create_guid` is its holder's, connection
    /// `conn`, to let go: its session was ended by another connection
    /// ([`Link::revoke`]). Marked only while `conn` holds it: the mark
    /// goes as that holder lets go, and one set under another holder (a
    /// move took the open since) stayed, a live holder then reported
    /// letting go (re-review rr48f L2).
    fn ending(&self, create_guid: uuid::Uuid, conn: u64) {
        let m = lock(&self.held);
        if m.get(&create_guid) == Some(&conn) {
            lock(&self.ending).insert(create_guid);
        }
    }

    /// Connection `conn` has lost its client, found by a request still
    /// running there (its pump read the end of the socket): it counts as
    /// letting its opens go from now on, though it lets them go only once
    /// that request ends, under the guard [`Registry::letting_go`] takes
    /// (whose drop ends this mark too).
    pub fn client_gone(&self, conn: u64) {
        lock(&self.letting_go).insert(conn);
    }

    /// Connection `conn`, marked by [`Registry::client_gone`], has a
    /// client again (a channel bound since): it no longer counts as
    /// letting its opens go.
    pub fn client_back(&self, conn: u64) {
        lock(&self.letting_go).remove(&conn);
    }

    /// Connection `conn` has lost its client and lets its opens go now;
    /// until the guard is dropped (also if the teardown panics), when
    /// whatever it still holds is let go.
    pub fn letting_go(&self, conn: u64) -> LettingGo<'_> {
        lock(&self.letting_go).insert(conn);
        LettingGo {
            registry: self,
            conn,
        }
    }
}

/// A connection letting its opens go ([`Registry::letting_go`]).
pub struct LettingGo<'a> {
    registry: &'a Registry,
    conn: u64,
}

impl Drop for LettingGo<'_> {
    fn drop(&mut self) {
        let mut m = lock(&self.registry.held);
        // Their ending marks go with them (re-review rr48f L2).
        let mut ending = lock(&self.registry.ending);
        m.retain(|g, c| {
            let other = *c != self.conn;
            if !other {
                ending.remove(g);
            }
            other
        });
        drop(ending);
        lock(&self.registry.letting_go).remove(&self.conn);
    }
}

/// A connection holding an open another one wants.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpenHolder {
    /// Serving its client: it may hold the open for good.
    Live,
    /// Its client gone, it is detaching its opens one by one (each a
    /// filterd commit): it lets this one go soon.
    LettingGo,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(
        fd: shimline::descriptors::DescriptorSlot,
        user: Option<crate::server::UserSlot>,
    ) -> crate::server::OpenSlots {
        crate::server::OpenSlots { fd, user }
    }

    fn link() -> Link {
        Link {
            user: "alice".into(),
            home: OnceLock::new(),
            end: SessionEnd::default(),
            state: Mutex::default(),
            unanswered: Mutex::default(),
        }
    }

    /// What a durable open left for its reconnect goes [`KEPT_FOR`] after
    /// it was left, when another is kept: before, an open filterd let
    /// expire without a reconnect kept its entry for good, and once
    /// [`MAX_V2_BY_FILE_ID`] were kept nothing more was (re-review rr39e
    /// F3).
    #[test]
    fn what_an_expired_durable_open_left_is_pruned() {
        let t0 = std::time::Instant::now();
        let mut m = KeptForReconnect::<u64>::default();
        let old = uuid::Uuid::new_v4();
        m.keep(old, 7, t0);
        // Within the timeout: kept.
        m.keep(uuid::Uuid::new_v4(), 1, t0 + KEPT_FOR / 2);
        assert_eq!(m.get(old), Some(7));
        // Past it: gone as another is kept.
        // (Looked for once per KEPT_FOR: an entry goes within twice it.)
        let later = t0 + 2 * KEPT_FOR + std::time::Duration::from_secs(1);
        m.keep(uuid::Uuid::new_v4(), 1, later);
        assert_eq!(m.get(old), None);
        // Full of expired entries: a new one is still kept.
        let mut m = KeptForReconnect::<u64>::default();
        for _ in 0..MAX_V2_BY_FILE_ID {
            m.keep(uuid::Uuid::new_v4(), 1, t0);
        }
        let new = uuid::Uuid::new_v4();
        m.keep(new, 9, t0 + std::time::Duration::from_secs(1));
        assert_eq!(m.get(new), None, "full of live entries: refused");
        m.keep(new, 9, later);
        assert_eq!(m.get(new), Some(9));
        assert_eq!(m.kept.len(), 1);
    }

    /// A session another connection ended tracks no handle made after
    /// (a CREATE that was pending): its caller releases it. Before, the
    /// handle was tracked by a session nobody released again, and filterd
    /// held it until rksmbd restarted. The counts of the one refused are
    /// the caller's again (re-review rr48a F4).
    #[test]
    fn an_ended_session_tracks_no_new_handle() {
        let l = link();
        let r = Registry::default();
        let fds = shimline::descriptors::Descriptors::new(2);
        assert!(l
            .track(
                &r,
                1,
                ResumeKey::new_random(),
                None,
                None,
                7,
                slots(fds.force(), None),
                Default::default()
            )
            .is_ok());
        lock(&l.state).revoked = true;
        let refused = l.track(
            &r,
            2,
            ResumeKey::new_random(),
            Some(0),
            None,
            7,
            slots(fds.force(), None),
            Default::default(),
        );
        assert!(l.is_live(1) && !l.is_live(2));
        assert_eq!(fds.held(), 2, "the refused one's slot is the caller's");
        drop(refused);
        assert_eq!(fds.held(), 1);
    }

    fn c() -> ClientId {
        ClientId::new("c").expect("client id")
    }

    fn unanswered(n: u128, app: Option<u8>) -> Unanswered {
        Unanswered {
            guid: uuid::Uuid::from_u128(n),
            client: c(),
            owner: None,
            app: app.map(|a| ([a; 16], RelPath::new("f").expect("path"))),
        }
    }

    /// A create GUID handed to the closer stays handed over while the
    /// closer looks at it (a close that failed is tried again) — until
    /// the client got an open of it, another session's replay was told
    /// to retry (that session's now), or the closer is done with it.
    #[test]
    fn a_guid_handed_to_the_closer_stays_until_got_noted_or_done() {
        let r = Registry::default();
        let (s1, s2) = (r.logged_on(1, "alice"), r.logged_on(2, "alice"));
        let [x, y, z] = [10, 11, 12].map(uuid::Uuid::from_u128);
        for n in 10..13 {
            r.unanswered(&s1, unanswered(n, None));
        }
        assert_eq!(r.to_close(|| r.log_off(&s1)).len(), 3);
        assert!(
            r.closing_owns(&c(), x) && r.closing_owns(&c(), x),
            "looking keeps it"
        );
        r.client_got(&c(), x);
        assert!(!r.closing_owns(&c(), x), "the client got it");
        r.unanswered(&s2, unanswered(11, None));
        assert!(!r.closing_owns(&c(), y), "S2's replay was told to retry");
        assert!(r.closing_claim(&c(), z) && !r.closing_owns(&c(), z), "done");
    }

    /// Another user's CREATE reusing a create GUID (another open in
    /// filterd, which names opens by client and GUID) leaves alice's
    /// alone: one handed to the closer stays handed over whether bob's
    /// was answered STATUS_SERVER_UNAVAILABLE or SUCCESS, and one a live
    /// session lists stays listed for its LOGOFF.
    #[test]
    fn another_user_s_create_of_the_guid_leaves_the_close_alone() {
        let r = Registry::default();
        let (s1, s2) = (r.logged_on(1, "alice"), r.logged_on(2, "bob"));
        let s3 = r.logged_on(3, "alice");
        let [x, y, z] = [10, 20, 21].map(uuid::Uuid::from_u128);
        let bob = ClientId::new("smb-user:bob").expect("client id");
        r.unanswered(&s1, unanswered(10, None));
        assert_eq!(r.to_close(|| r.log_off(&s1)).len(), 1);
        let bob_s = Unanswered {
            client: bob.clone(),
            ..unanswered(10, None)
        };
        r.unanswered(&s2, bob_s);
        assert!(r.closing_owns(&c(), x), "bob's told to retry");
        r.client_got(&bob, x);
        assert!(r.closing_owns(&c(), x), "bob's told SUCCESS");
        r.unanswered(&s3, unanswered(20, None));
        r.unanswered(&s3, unanswered(21, None));
        r.client_got(&bob, y);
        r.client_got(&bob, z);
        r.client_got(&c(), z);
        // Still indexed after bob's: alice's own SUCCESS finds it.
        r.client_got(&c(), y);
        assert!(r.log_off(&s3).is_empty());
    }

    /// A session's LOGOFF ends its `SessionEnd` and hands over its
    /// unanswered CREATEs, but not one a replay (from any session) took
    /// since; an app instance's takeover takes that instance's, from
    /// whichever session.
    #[test]
    fn logoff_hands_over_the_unanswered_creates_no_replay_took() {
        let r = Registry::default();
        let (s1, s2) = (r.logged_on(1, "alice"), r.logged_on(2, "alice"));
        r.unanswered(&s1, unanswered(10, None));
        r.unanswered(&s1, unanswered(11, None));
        r.unanswered(&s2, unanswered(12, Some(7)));
        r.app_unanswered([7; 16]);
        r.client_got(&c(), uuid::Uuid::from_u128(11));
        let f = RelPath::new("f").expect("path");
        let other = RelPath::new("g").expect("path");
        assert!(r
            .unanswered_of_app([7; 16], &other, uuid::Uuid::from_u128(99))
            .is_empty());
        let taken = r.unanswered_of_app([7; 16], &f, uuid::Uuid::from_u128(99));
        assert_eq!(taken.len(), 1);
        assert!(r
            .unanswered_of_app([7; 16], &f, uuid::Uuid::from_u128(99))
            .is_empty());
        assert!(!s1.end().has_ended());
        let left = r.log_off(&s1);
        assert!(s1.end().has_ended() && !s2.end().has_ended());
        assert_eq!(
            left.iter().map(|u| u.guid.as_u128()).collect::<Vec<_>>(),
            [10]
        );
        assert!(r.log_off(&s2).is_empty());
    }

    /// `client_got` of a GUID no session lists waits for no session's
    /// lock: every durable CREATE runs it, and it took every session's
    /// state lock — held across filterd calls by an app instance
    /// takeover's close — so one slow close stalled them all (re-review
    /// unavail4 1). One of a GUID a session lists forgets it there.
    #[test]
    fn client_got_waits_for_no_unrelated_session() {
        let r = Arc::new(Registry::default());
        let (s1, s2) = (r.logged_on(1, "alice"), r.logged_on(2, "alice"));
        r.unanswered(&s1, unanswered(10, None));
        r.unanswered(&s2, unanswered(20, None));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            // Another connection's filterd call under s2's locks.
            let _state = lock(&s2.state);
            let _list = lock(&s2.unanswered);
            let r2 = r.clone();
            std::thread::spawn(move || {
                r2.client_got(&c(), uuid::Uuid::from_u128(10));
                r2.client_got(&c(), uuid::Uuid::from_u128(99));
                let _ = tx.send(());
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(),
                "client_got waited for an unrelated session's lock"
            );
        }
        assert!(r.log_off(&s1).is_empty());
        assert_eq!(r.log_off(&s2).len(), 1);
    }

    /// The unanswered-closer's claim counts as letting go: waiters give
    /// it [`OpenHolder::LettingGo`]'s time, not a live holder's 1 s.
    #[test]
    fn the_closer_counts_as_letting_go() {
        let r = Registry::default();
        let g = uuid::Uuid::new_v4();
        let closer = crate::unanswered::CLOSER_CONN;
        assert!(r.claim_free(g, closer));
        assert_eq!(r.holder_other_than(g, 2), Some(OpenHolder::LettingGo));
        assert_eq!(r.claim(g, 2), Err((closer, OpenHolder::LettingGo)));
        r.let_go(g, closer);
        assert_eq!(r.claim(g, 2), Ok(()));
    }

    /// Re-review rr46a F3: a lost connection's durable open leaves its
    /// descriptor slot for its reconnect — not for another CREATE — only
    /// while that connection holds it (one whose move counted a slot of
    /// its own took it over), until that move counts it, the open is
    /// closed for good, or the slot is given back as expired.
    #[test]
    fn a_lost_connections_slot_waits_for_its_reconnect_only() {
        let fds = shimline::descriptors::Descriptors::new(1);
        let r = Registry::default();
        let g = uuid::Uuid::new_v4();
        let named = (g, ResumeKey(uuid::Uuid::new_v4()), 60_000);
        let users = Arc::new(crate::server::UserOpens::default());
        r.held(g, 1);
        r.hand_over(named, 1, slots(fds.force(), Some(users.count("alice"))));
        r.let_go(g, 1);
        assert!(fds.reserve().is_none(), "kept for the reconnect");
        assert!(users.full("alice", 1), "counted under its user still");
        assert!(r.take_handed(&[uuid::Uuid::new_v4()]).is_none());
        let slot = r.take_handed(&[uuid::Uuid::new_v4(), g]);
        assert!(
            slot.as_ref().is_some_and(|s| s.user.is_some()),
            "the reconnect's"
        );
        drop(slot);
        assert_eq!(fds.held(), 0);
        assert!(!users.full("alice", 1));
        // Handed over after another connection's move held it: given back.
        r.held(g, 1);
        r.held(g, 2);
        r.hand_over(named, 1, slots(fds.force(), None));
        assert_eq!(fds.held(), 0);
        // Handed over before that move held it: given back as it does.
        r.held(g, 1);
        r.hand_over(named, 1, slots(fds.force(), None));
        r.held(g, 2);
        assert_eq!(fds.held(), 0);
        // Closed for good, or expired (`give_back_expired` drops what is
        // past its time).
        r.held(g, 1);
        r.hand_over(named, 1, slots(fds.force(), None));
        r.durable_closed(g);
        assert_eq!(fds.held(), 0);
        r.held(g, 1);
        r.hand_over(named, 1, slots(fds.force(), None));
        assert!(!r.give_back_expired(), "not yet");
        past_its_time(&r, g);
        assert!(r.give_back_expired());
        assert_eq!(fds.held(), 0);
    }

    /// Moves the deadline of the slot left for `g` to now.
    fn past_its_time(r: &Registry, g: uuid::Uuid) {
        let mut m = lock(&r.handed);
        if let Some(h) = m.remove(g) {
            m.insert(
                g,
                Handed {
                    until: std::time::Instant::now(),
                    ..h
                },
            );
        }
    }

    /// Re-review rr47b F1: a slot left for a reconnect that never came,
    /// and its user's count, go back once the open's durable timeout
    /// passed — at any caps or share check, not only when no descriptor
    /// is free — or as soon as filterd says it closed the handle; the
    /// deadline is the open's own timeout, not a fixed 60 s (F3).
    #[test]
    fn a_slot_left_for_a_reconnect_that_never_came_goes_back() {
        let fds = shimline::descriptors::Descriptors::new(8);
        let r = Registry::default();
        let users = Arc::new(crate::server::UserOpens::default());
        let (g1, g2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (k1, k2) = (
            ResumeKey(uuid::Uuid::new_v4()),
            ResumeKey(uuid::Uuid::new_v4()),
        );
        r.held(g1, 1);
        r.held(g2, 1);
        r.hand_over(
            (g1, k1, 300_000),
            1,
            slots(fds.force(), Some(users.count("alice"))),
        );
        r.hand_over(
            (g2, k2, 120_000),
            1,
            slots(fds.force(), Some(users.count("alice"))),
        );
        assert!(users.full("alice", 2));
        {
            let m = lock(&r.handed);
            let at = |g| m.by_guid.get(&g).map(|h| h.until);
            let (Some(a), Some(b)) = (at(g1), at(g2)) else {
                panic!("both left");
            };
            let d = a.saturating_duration_since(b);
            assert!(
                d > std::time::Duration::from_secs(170),
                "each for its own timeout ({d:?})"
            );
        }
        // filterd closed g2's handle.
        r.handle_gone(k2);
        assert!(!users.full("alice", 2));
        assert_eq!(fds.held(), 1);
        // g1's timeout passed: the next check gives it back, with room.
        past_its_time(&r, g1);
        assert!(r.give_back_expired());
        assert_eq!(fds.held(), 0);
        assert!(!users.full("alice", 1));
        assert!(lock(&r.handed).by_deadline.is_empty());
        assert!(lock(&r.handed).by_key.is_empty());
    }

    /// Re-review rr47b F2: a reconnect or replay that took the slot left
    /// for it and ended without an open leaves it for the next try, with
    /// its deadline — not once a connection holds the open, nor past the
    /// deadline.
    #[test]
    fn a_reconnect_ending_without_its_open_leaves_the_slot_again() {
        let fds = shimline::descriptors::Descriptors::new(1);
        let r = Registry::default();
        let users = Arc::new(crate::server::UserOpens::default());
        let g = uuid::Uuid::new_v4();
        let named = (g, ResumeKey(uuid::Uuid::new_v4()), 60_000);
        r.held(g, 1);
        r.hand_over(named, 1, slots(fds.force(), Some(users.count("alice"))));
        r.let_go(g, 1);
        let slot = r.take_handed(&[g]);
        let until = slot.as_ref().and_then(|s| s.handed).map(|h| h.2);
        assert!(until.is_some(), "taken as handed");
        slot.into_iter().for_each(|s| r.put_back(s, true));
        assert!(fds.reserve().is_none(), "left for the retry");
        assert!(users.full("alice", 1));
        let again = r.take_handed(&[g]);
        assert_eq!(again.as_ref().and_then(|s| s.handed).map(|h| h.2), until);
        // Held by a connection meanwhile: given back.
        r.held(g, 2);
        again.into_iter().for_each(|s| r.put_back(s, true));
        assert_eq!(fds.held(), 0);
        assert!(!users.full("alice", 1));
        // A fresh CREATE's slot is just given back.
        r.let_go(g, 2);
        let fresh = fds.reserve().map(|fd| crate::server::CreateSlot {
            fd,
            user: None,
            handed: None,
        });
        fresh.into_iter().for_each(|s| r.put_back(s, true));
        assert_eq!(fds.held(), 0);
    }

    /// Re-review rr47c F1: a reconnect that took the slot left for its
    /// open and failed for good gives it back, not to its open — closed by
    /// a second reconnect meanwhile, or purged by filterd while the slot
    /// was taken (no event comes for it then). Put back, the slot and the
    /// user's count were held until the open's durable timeout.
    #[test]
    fn a_reconnect_failing_for_good_gives_the_slot_back() {
        let fds = shimline::descriptors::Descriptors::new(2);
        let r = Registry::default();
        let users = Arc::new(crate::server::UserOpens::default());
        let g = uuid::Uuid::new_v4();
        let key = ResumeKey(uuid::Uuid::new_v4());
        let lost = |conn| {
            r.held(g, conn);
            r.hand_over(
                (g, key, 60_000),
                conn,
                slots(fds.force(), Some(users.count("alice"))),
            );
            r.let_go(g, conn);
        };
        // Two reconnects of one open: the first takes the slot and waits
        // in filterd; the second reconnects with a fresh one, and its
        // client closes the open; the first then finds no such handle.
        lost(1);
        let first = r.take_handed(&[g]);
        assert!(first.as_ref().is_some_and(|s| s.handed.is_some()));
        let second = fds.reserve();
        r.held(g, 3);
        r.durable_closed(g);
        r.let_go(g, 3);
        drop(second);
        first.into_iter().for_each(|s| r.put_back(s, false));
        assert_eq!(fds.held(), 0, "the slot is given back");
        assert!(!users.full("alice", 1), "and the user's count");
        assert!(r.take_handed(&[g]).is_none());
        // filterd purges the handle just after the reconnect took its
        // slot: `handle_gone` finds nothing left; the reconnect fails.
        lost(4);
        let taken = r.take_handed(&[g]);
        r.handle_gone(key);
        taken.into_iter().for_each(|s| r.put_back(s, false));
        assert_eq!(fds.held(), 0, "the slot is given back");
        assert!(!users.full("alice", 1), "and the user's count");
        assert!(lock(&r.handed).by_key.is_empty());
    }

    /// An open held by a connection whose client went away is told apart
    /// from one held by a live connection until that one has let all go.
    #[test]
    fn a_connection_letting_go_is_told_from_a_live_one() {
        let r = Registry::default();
        let g = uuid::Uuid::new_v4();
        r.held(g, 1);
        assert_eq!(r.holder_other_than(g, 1), None);
        assert_eq!(r.holder_other_than(g, 2), Some(OpenHolder::Live));
        let going = r.letting_go(1);
        assert_eq!(r.holder_other_than(g, 2), Some(OpenHolder::LettingGo));
        assert_eq!(r.claim(g, 2), Err((1, OpenHolder::LettingGo)));
        // Ended without letting `g` go (a panic in the teardown): the
        // guard lets it go.
        drop(going);
        assert_eq!(r.holder_other_than(g, 2), None);
        r.held(g, 1);
        assert_eq!(r.holder_other_than(g, 2), Some(OpenHolder::Live));
        assert_eq!(r.claim(g, 2), Err((1, OpenHolder::Live)));
    }

    /// Session 5 of alice's, on connection 1, tracking durable open 1
    /// (60 s), held by that connection, counted in `fds` and `users`:
    /// the session, the open's create GUID and its filterd handle.
    fn alices_durable_open(
        r: &Registry,
        fds: &Arc<shimline::descriptors::Descriptors>,
        users: &Arc<crate::server::UserOpens>,
    ) -> (Arc<Link>, uuid::Uuid, ResumeKey) {
        let link = r.logged_on(5, "alice");
        let (g, key) = (uuid::Uuid::new_v4(), ResumeKey(uuid::Uuid::new_v4()));
        r.held(g, 1);
        let counted = slots(fds.force(), Some(users.count("alice")));
        let tracked = link.track(
            r,
            1,
            key,
            Some(60_000),
            Some(g),
            1,
            counted,
            Default::default(),
        );
        assert!(tracked.is_ok());
        (link, g, key)
    }

    /// Re-review rr48f L1: a session another connection ended is out of
    /// the registry's sessions, and a reattach that lost one of its
    /// handles before its owner released it forgot nothing there: the
    /// owner's release, its detach refused, handed the open's slot and
    /// count over for a reconnect that could not come, until the open's
    /// durable timeout. The reattach reaches it now: the count goes back
    /// at once, the slot once the owner closes the descriptor, and
    /// nothing is left for the owner to release or hand over.
    #[test]
    fn a_reattach_reaches_a_session_ended_but_not_yet_settled() {
        let fds = shimline::descriptors::Descriptors::new(2);
        let users = Arc::new(crate::server::UserOpens::default());
        let r = Registry::default();
        let (link, g, key) = alices_durable_open(&r, &fds, &users);
        assert!(r.end_previous(5, "alice"));
        assert!(r.link(5).is_none(), "out of the sessions");
        assert_eq!(r.holder_other_than(g, 2), Some(OpenHolder::LettingGo));
        r.forget_lost(&[key]);
        assert!(!users.full("alice", 1), "its count goes back at once");
        assert_eq!(r.holder_other_than(g, 2), None, "its GUID let go");
        // The owner settles: nothing to release or hand over.
        let (released, counted) = link.release(1, || Ok(()));
        assert!(released.is_ok() && counted.is_none());
        let gone = link.take_closed_elsewhere();
        assert_eq!(gone.len(), 1);
        assert_eq!(fds.held(), 1, "the slot stays until the descriptor closes");
        drop(gone);
        assert_eq!(fds.held(), 0);
        assert!(lock(&r.handed).by_guid.is_empty(), "nothing handed over");
        r.settled(5);
        assert!(lock(&r.unsettled).is_empty());
        // A session ended by the owner's connection's end goes too.
        let other = r.logged_on(6, "alice");
        assert!(r.end_previous(6, "alice"));
        r.ended(6);
        assert!(lock(&r.unsettled).is_empty());
        drop(other);
    }

    /// Re-review rr49b F1: an owner already releasing a durable open (its
    /// `Link::release` done, the detach refused by the restarted filterd)
    /// when a reattach found the handle lost handed the slot over after
    /// the reattach had given back what was handed: held until the open's
    /// durable timeout for a reconnect that could not come. Refused now,
    /// and so is a slot a reconnect took before the reattach and puts
    /// back; a handle resumed here since is left for its reconnect again.
    #[test]
    fn a_hand_over_after_a_reattach_lost_the_handle_gives_the_slot_back() {
        let fds = shimline::descriptors::Descriptors::new(2);
        let users = Arc::new(crate::server::UserOpens::default());
        let r = Registry::default();
        let (link, g, key) = alices_durable_open(&r, &fds, &users);
        // The owner releases it; the reattach comes before its hand-over.
        let (released, counted) = link.release(1, || Ok(()));
        let Some(counted) = counted.filter(|_| released.is_ok()) else {
            panic!("released by its owner");
        };
        r.forget_lost(&[key]);
        r.hand_over((g, key, 60_000), 1, counted);
        r.let_go(g, 1);
        assert_eq!(fds.held(), 0, "the slot is given back");
        assert!(!users.full("alice", 1), "and the user's count");
        assert!(lock(&r.handed).by_guid.is_empty(), "nothing handed over");
        // A reconnect took the slot before the reattach, and is told to
        // retry after it: not put back.
        let (g2, k2) = (uuid::Uuid::new_v4(), ResumeKey(uuid::Uuid::new_v4()));
        r.held(g2, 1);
        r.hand_over((g2, k2, 60_000), 1, slots(fds.force(), None));
        r.let_go(g2, 1);
        let taken = r.take_handed(&[g2]);
        assert!(taken.as_ref().is_some_and(|s| s.handed.is_some()));
        r.forget_lost(&[k2]);
        taken.into_iter().for_each(|s| r.put_back(s, true));
        assert_eq!(fds.held(), 0, "not put back");
        // Resumed here since (a reconnect after the client came back),
        // tracked as `Connection::add_open` tracks it: left for its next
        // reconnect again (re-review rr49g F3).
        r.held(g, 2);
        let again = link.track(
            &r,
            2,
            key,
            Some(60_000),
            Some(g),
            2,
            slots(fds.force(), None),
            Default::default(),
        );
        assert!(again.is_ok());
        let (released, counted) = link.release(2, || Ok(()));
        let Some(counted) = counted.filter(|_| released.is_ok()) else {
            panic!("released by its owner");
        };
        r.hand_over((g, key, 60_000), 2, counted);
        assert_eq!(fds.held(), 1, "left for its reconnect");
        // A hand-over before the reattach is given back by it.
        r.forget_lost(&[key]);
        assert_eq!(fds.held(), 0);
    }

    /// Re-review rr49g F1, F2: a reattach marked every handle it lost,
    /// non-durable ones too (never handed over), and a filterd restart
    /// could fill the table. Only those no session tracks are marked now,
    /// and not one found again here while it ran.
    #[test]
    fn a_reattach_marks_only_the_lost_handles_no_session_tracks() {
        let fds = shimline::descriptors::Descriptors::new(4);
        let users = Arc::new(crate::server::UserOpens::default());
        let r = Registry::default();
        let (link, _, durable) = alices_durable_open(&r, &fds, &users);
        let plain = ResumeKey(uuid::Uuid::new_v4());
        let tracked = link.track(
            &r,
            2,
            plain,
            None,
            None,
            1,
            slots(fds.force(), None),
            Default::default(),
        );
        assert!(tracked.is_ok());
        let (gone, found) = (
            ResumeKey(uuid::Uuid::new_v4()),
            ResumeKey(uuid::Uuid::new_v4()),
        );
        // `found` is resumed here while another reattach is under way.
        lock(&r.handed).reattaches += 1;
        r.found_again(found);
        r.forget_lost(&[durable, plain, gone, found]);
        let m = lock(&r.handed);
        let marked: Vec<ResumeKey> = m.lost.keys().copied().collect();
        assert_eq!(marked, vec![gone], "only the one no session tracks");
        drop(m);
        assert!(link.is_live(2), "a non-durable one stays its owner's");
        assert!(!link.is_live(1), "a durable one is forgotten");
    }

    /// Re-review rr49k F-A: a handle resumed here while a reattach walked
    /// (found again) and handed over again since keeps the slot it left
    /// for its reconnect, though that reattach reports it lost.
    #[test]
    fn a_handle_resumed_during_a_reattach_keeps_the_slot_it_left_since() {
        let fds = shimline::descriptors::Descriptors::new(4);
        let users = Arc::new(crate::server::UserOpens::default());
        let r = Registry::default();
        let (g, key) = (uuid::Uuid::new_v4(), ResumeKey(uuid::Uuid::new_v4()));
        lock(&r.handed).reattaches += 1;
        r.found_again(key);
        r.held(g, 7);
        r.hand_over(
            (g, key, 60_000),
            7,
            slots(fds.force(), Some(users.count("alice"))),
        );
        assert!(lock(&r.handed).by_key.contains_key(&key), "handed over");
        r.forget_lost(&[key]);
        assert!(
            lock(&r.handed).by_key.contains_key(&key),
            "left for its reconnect"
        );
        assert_eq!(fds.held(), 1);
    }

    /// Re-review rr49g F1: at the cap every further lost handle ran a
    /// pass over all the marks, under the lock every CREATE takes. One
    /// pass at most for a reattach now; still full, the rest are not
    /// marked; expired ones make room.
    #[test]
    fn the_lost_marks_stop_at_their_cap() {
        let key = || ResumeKey(uuid::Uuid::new_v4());
        let at = std::time::Instant::now();
        let mut m = HandedSlots::default();
        let first = key();
        let full: Vec<ResumeKey> = std::iter::once(first)
            .chain(std::iter::repeat_with(key))
            .take(MAX_V2_BY_FILE_ID)
            .collect();
        assert_eq!(m.mark_lost(full, at), 0);
        let later = at + std::time::Duration::from_secs(1);
        let more: Vec<ResumeKey> = std::iter::repeat_with(key).take(20_000).collect();
        let took = std::time::Instant::now();
        assert_eq!(m.mark_lost(more.iter().copied(), later), 20_000);
        assert!(
            took.elapsed() < std::time::Duration::from_secs(5),
            "one pass, not one for each key: {:?}",
            took.elapsed()
        );
        assert!(!m.is_lost(more[0], later), "not marked");
        assert_eq!(m.mark_lost([first], later), 0, "marked already: renewed");
        assert!(m.is_lost(first, later + KEPT_FOR / 2));
        // Past KEPT_FOR the marks make room, all but the renewed one.
        let after = at + KEPT_FOR;
        assert_eq!(m.mark_lost(more.iter().copied(), after), 0);
        assert_eq!(m.lost.len(), 20_001);
    }

    /// Re-review rr48f L2: an ending marked a GUID whoever held it, and
    /// a connection's end (the `LettingGo` guard) and `claim_free` left
    /// the mark: a live holder reached since was reported letting go (a
    /// 5 s wait, and STATUS_FILE_NOT_AVAILABLE instead of NOT_FOUND).
    #[test]
    fn an_ending_mark_is_its_holders_only_and_goes_with_it() {
        let r = Registry::default();
        let g = uuid::Uuid::new_v4();
        // Held by another connection (a move took it): not marked.
        r.held(g, 2);
        r.ending(g, 1);
        assert_eq!(r.holder_other_than(g, 3), Some(OpenHolder::Live));
        assert!(lock(&r.ending).is_empty());
        // Marked while its holder holds it; that holder's end unmarks it.
        r.ending(g, 2);
        assert_eq!(r.holder_other_than(g, 3), Some(OpenHolder::LettingGo));
        drop(r.letting_go(2));
        assert!(lock(&r.ending).is_empty(), "the guard's let-go unmarks it");
        assert!(r.claim_free(g, 4));
        assert_eq!(r.holder_other_than(g, 3), Some(OpenHolder::Live));
        // A mark left behind (the owner's thread died without its
        // guard) goes as `claim_free` takes the GUID.
        r.let_go(g, 4);
        lock(&r.ending).insert(g);
        assert!(r.claim_free(g, 5));
        assert_eq!(r.holder_other_than(g, 3), Some(OpenHolder::Live));
    }
}
