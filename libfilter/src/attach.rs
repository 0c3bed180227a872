//! A frontend's self-healing attachment to filterd.
//!
//! [`Attachment`] wraps a [`FilterClient`] and remembers every durable or
//! persistent handle opened or resumed through it. When the daemon goes away
//! (crash, restart, standby takeover) a named supervisor thread reconnects
//! with backoff under the same protocol and instance name, resumes every
//! remembered handle, and reports what happened as an [`AttachEvent`]. The
//! frontend keeps its clients' connections meanwhile: calls made during the
//! outage fail with [`ClientError::Disconnected`] (map them to a "retry" status
//! such as `NFS4ERR_DELAY`), and descriptors it already holds stay valid —
//! they refer to the open file, not to the daemon. Except when the daemon
//! stepped down (lost the ownership of a shared table to another node's:
//! [`crate::proto::Event::SteppingDown`], forwarded as
//! `AttachEvent::Daemon` just before `Lost`): the frontend then lets go
//! of its clients, which reconnect to the new owner's node, and the
//! attachment reconnects as for any loss.
//!
//! Events are never dropped: the queue to the frontend holds
//! [`EVENT_QUEUE_LIMIT`] events and the supervisor waits while it is full;
//! the connection's own queue filling up meanwhile fails the connection
//! (see [`crate::client::EVENT_QUEUE_LIMIT`]), which this attachment then
//! rides out like any other loss of the daemon.
//!
//! Lock hints survive a reattach (issue 13 #1): from the moment the daemon
//! is lost until the frontend has applied the [`AttachEvent::Reattached`]
//! that follows, [`Attachment::io_ready`] is false and the frontend checks
//! (or refuses with its retry status) every read and write, because a
//! restarted daemon may grant locks it could not tell this frontend about.
//! `Reattached::locked` names the files of resumed handles that have
//! byte-range locks (or a first lock waiting for this frontend); the frontend
//! marks them locked, then calls [`Attachment::resynced`]. Events from the
//! new connection (`LocksPresent` among them) are forwarded only after
//! `Reattached`, so a lock granted after a resume reply reaches the frontend
//! after the flags that reply set, never before.
//!
//! No I/O goes unchecked on a connection whose hello did not grant lock
//! hints: a daemon on a store shared between machines (etcd) withholds
//! them from a frontend that asks for [`crate::proto::FEATURE_FENCED_IO`]
//! (this attachment asks whenever it asks for hints), because a daemon
//! stopped past its lease keeps its socket open — `io_ready` stays true —
//! while another machine takes over, and unchecked writes through the
//! descriptors it passed would land over the new owner's work (review
//! rvnode 1). Checked, they wait for the stopped daemon, which answers
//! none of them.
//!
//! Unchecked I/O is gated per file (issue 13): a frontend makes the
//! decision "this file has no locks, no CheckIo" with
//! [`Attachment::decide_io`], checking in this order under the gate:
//! [`Attachment::io_ready`], that its handle is still live, the file's
//! locked flag; an [`IoDecision::Unchecked`] carries an [`UncheckedIo`]
//! guard that counts the pread/pwrite as in flight on that file until it is
//! dropped. On `LocksPresent` the frontend calls
//! [`Attachment::locks_present`], which marks the file (no unchecked I/O on
//! it starts after that) and acknowledges once no unchecked read or write
//! of *that file* is in flight — at once when none is, else from the
//! attachment's `lock-hint-acks` thread, so hints for other files are not
//! held up by a slow write and are acknowledged independently of each
//! other. The lock is granted after the last unchecked byte of the file
//! landed, never before. A `Reattached` is applied under
//! [`Attachment::exclusive_io`] (no unchecked I/O on any file in flight or
//! starting). Checked I/O (a CheckIo round trip, then the pread/pwrite)
//! counts in the gate only from the check's answer to the end of its
//! pread/pwrite ([`Attachment::checked`]), so the event thread never waits
//! on filterd; filterd itself holds back a conflicting lock until the
//! pass's `IoDone` (issue 13, F3).
//!
//! Drained before every hello (issue 13, review 1 and 2): when the daemon is
//! lost, the supervisor first makes [`Attachment::io_ready`] false (no new
//! unchecked I/O, no checked I/O counted after it), then waits until every
//! read and write decided or checked while the old daemon was there has
//! finished, and only then says hello to the new one. A restarted filterd therefore knows that a frontend that
//! has said hello has nothing in flight from before — whether that I/O went
//! through a non-durable handle the restart forgot or a persistent one it
//! resumes — and makes a first lock wait for the frontends it saw before
//! the restart until they have said hello (or the break timeout).
//!
//! Non-durable handles die with the daemon (they are not persistent state);
//! they are reported in [`AttachEvent::Reattached::lost`] together with any
//! persistent handle that filterd says is gone or not this frontend's. A
//! resume refused for a passing cause (busy, a failed commit, no answer in
//! time) is tried again with backoff for up to [`RESUME_PATIENCE`] before
//! `Reattached` (then lost); a connection that dies meanwhile is made
//! again and every handle resumed over it. The leases of those handles
//! died too, and the restarted daemon would grant another frontend's
//! conflicting open while this frontend's clients still cache under them:
//! so the attachment asks for [`crate::proto::FEATURE_RESYNCED`], and
//! [`Attachment::resynced`] tells the daemon ([`crate::proto::Request::Resynced`])
//! — call it only after acting on `lost` (breaking those leases). A
//! restarted daemon holds other frontends' opens until then.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::client::{ClientError, FilterClient, OpenedHandle, EVENT_QUEUE_LIMIT};
use crate::model::{ClientId, CreateGuid, Durability, FileId, InstanceName, Protocol, ResumeKey};
use crate::proto::{ErrorCode, Event, OpenRequest};

/// What the attachment reports to its frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    /// An event the daemon pushed (expiry, purge).
    Daemon(Event),
    /// The daemon went away; reconnecting.
    Lost,
    /// Attached again (to a daemon of `epoch`): `resumed` handles are back,
    /// `lost` ones are gone for good. Mark `locked` files locked, then call
    /// [`Attachment::resynced`] with `generation`: until then
    /// [`Attachment::io_ready`] is false.
    Reattached {
        /// The daemon's epoch.
        epoch: u64,
        /// Which reattach this is (for [`Attachment::resynced`]).
        generation: u64,
        /// Handles resumed.
        resumed: Vec<ResumeKey>,
        /// Files of resumed handles that have byte-range locks (or a first
        /// lock waiting for this frontend): I/O on them is checked.
        locked: Vec<FileId>,
        /// Handles that could not be resumed.
        lost: Vec<ResumeKey>,
        /// Of `lost`, the handles another frontend process of this
        /// instance attached since this one held them (the other node's,
        /// over a shared table: its client reconnected there). Not gone:
        /// that process's now, kept by filterd with what it recorded of
        /// them. A frontend must not release them or delete what its
        /// tables record of them, and what it remembers of their state is
        /// stale (nfsshim reloads its tables: review rvnfsnode 1).
        taken: Vec<ResumeKey>,
        /// The lease each resumed handle holds now, as the daemon says
        /// (`None`: none). A lease lowered while this frontend was away
        /// (broken at its timeout, or at once, while its holder was
        /// disconnected: another node owned the table, or the daemon
        /// restarted) is lower here than what the frontend last told its
        /// client, and no break of it will come: tell the client (a break
        /// without an acknowledgment) before calling
        /// [`Attachment::resynced`] (review rvping 2).
        leases: Vec<(ResumeKey, Option<crate::model::HeldLease>)>,
        /// Time from losing the daemon to being attached again.
        outage: Duration,
    },
}

struct Known {
    client: ClientId,
    durable: bool,
}

struct Shared {
    socket: PathBuf,
    protocol: Protocol,
    instance: InstanceName,
    current: RwLock<FilterClient>,
    handles: Mutex<HashMap<ResumeKey, Known>>,
    events: Sender<AttachEvent>,
    stop: AtomicBool,
    features: u64,
    /// Which frontend process this is (said in every hello, see
    /// [`crate::proto::Role::Frontend`]): filterd stamps the handles this
    /// attachment attaches with it, and refuses a reattach of one that
    /// another process attached since ([`resume_known`]).
    incarnation: u64,
    /// Bumped when the daemon is found gone (before `Lost`).
    generation: AtomicU64,
    /// The generation whose `Reattached` the frontend has applied.
    synced: AtomicU64,
    /// Unchecked I/O in flight, per file.
    gate: IoGate,
    /// Write notices that could not be sent when the write was made
    /// ([`Attachment::wrote`]), one per key, for the `write-notices`
    /// thread. Bounded by the handles written since the last flush.
    /// Each key's value is the `deferred` count of its latest deferral, so
    /// that a flush takes out only notices it sent, not a later one.
    unsent: Mutex<HashMap<ResumeKey, u64>>,
    /// Signalled when a key is put in `unsent`.
    unsent_added: Condvar,
    /// Write notices ever deferred (for tests and operators).
    deferred: AtomicU64,
}

/// The I/O gate: which files have unchecked reads or writes in flight, and
/// the lock hints waiting for them to finish.
/// Longest [`Attachment::drain_file`] waits for a file's unchecked I/O.
pub const DRAIN_FILE_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct IoGate {
    state: Mutex<GateState>,
    /// Signalled whenever an unchecked I/O ends, the gate reopens, or a
    /// hint is queued.
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Unchecked reads and writes in flight, per file (no zero entries).
    in_flight: HashMap<FileId, std::collections::BTreeSet<u64>>,
    /// The number the next unchecked I/O gets (see [`Attachment::drain_file`]).
    next_ticket: u64,
    /// Held by [`Attachment::exclusive_io`]: no unchecked I/O starts.
    closed: bool,
    /// Files whose `LocksPresent` waits for their in-flight I/O before it
    /// is acknowledged (by the `lock-hint-acks` thread).
    acks_due: HashSet<FileId>,
}

impl IoGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        // Bounded, so stopping is noticed; callers loop on their condition.
        self.changed
            .wait_timeout(g, Duration::from_millis(200))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Waits until no unchecked I/O is in flight on any file (none may
    /// start meanwhile: the caller made that so).
    fn drain(&self) {
        let mut g = self.lock();
        while !g.in_flight.is_empty() {
            g = self.wait(g);
        }
    }
}

/// One unchecked read or write in flight on a file (see
/// [`Attachment::decide_io`]): drop it right after the pread/pwrite, before
/// any fsync or filterd round trip.
pub struct UncheckedIo<'a> {
    gate: &'a IoGate,
    file: FileId,
    ticket: u64,
}

impl Drop for UncheckedIo<'_> {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        if let Some(t) = g.in_flight.get_mut(&self.file) {
            t.remove(&self.ticket);
            if t.is_empty() {
                g.in_flight.remove(&self.file);
            }
        }
        drop(g);
        self.gate.changed.notify_all();
    }
}

/// A read or write a frontend may do now: hold it across the pread/pwrite
/// and drop it right after (before any fsync or filterd round trip).
pub enum IoPass<'a> {
    /// Decided here, no lock on the file ([`IoDecision::Unchecked`]).
    Unchecked(UncheckedIo<'a>),
    /// Allowed by filterd ([`Attachment::checked`]): dropping it sends
    /// `IoDone` (conflicting locks wait until then), and it counts in the
    /// gate like an unchecked one, so it is drained before a hello too.
    Checked {
        /// Its place in the gate.
        gate: UncheckedIo<'a>,
        /// filterd's pass.
        pass: crate::client::CheckedIo,
    },
}

/// The whole gate, held while a frontend applies a `Reattached` (see
/// [`Attachment::exclusive_io`]).
pub struct ExclusiveIo<'a> {
    gate: &'a IoGate,
}

impl Drop for ExclusiveIo<'_> {
    fn drop(&mut self) {
        self.gate.lock().closed = false;
        self.gate.changed.notify_all();
    }
}

/// What a frontend may do about one read or write (see
/// [`Attachment::decide_io`]).
pub enum IoDecision<'a> {
    /// Not attached, or the latest reattach not applied yet: refuse with
    /// the protocol's retry status.
    NotReady,
    /// The handle is gone (lost, expired): the protocol's closed/expired
    /// status.
    Gone,
    /// No locks on the file: do the pread/pwrite unchecked while holding
    /// this guard, and drop it right after (before any fsync).
    Unchecked(UncheckedIo<'a>),
    /// The file has locks: ask filterd (CheckIo), then do the I/O.
    Check,
}

/// A reconnecting frontend attachment. Cheap to clone.
#[derive(Clone)]
pub struct Attachment {
    shared: Arc<Shared>,
    events: Receiver<AttachEvent>,
}

thread_local! {
    /// Connections pinned on this thread ([`Attachment::pin`]), by their
    /// attachment's `Shared` address.
    static PINNED: std::cell::RefCell<Vec<(usize, FilterClient)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// [`Attachment::pin`]'s guard: the pin ends when it is dropped (on the
/// thread that took it: it is not `Send`).
#[must_use]
pub struct Pinned {
    key: usize,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        PINNED.with(|p| {
            let mut p = p.borrow_mut();
            if let Some(i) = p.iter().rposition(|(k, _)| *k == self.key) {
                p.remove(i);
            }
        });
    }
}

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// The least time a first attach's last attempt is given for its connect
/// and hello ([`Attachment::connect_patiently`]).
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

impl Attachment {
    /// Attaches and starts the supervisor.
    pub fn connect(
        socket: &Path,
        protocol: Protocol,
        instance: InstanceName,
    ) -> Result<Self, ClientError> {
        Self::connect_with(socket, protocol, instance, 0)
    }

    /// As [`Attachment::connect_with`], retrying every 50 ms for up to
    /// `within` while filterd is not there yet (it may be starting or
    /// recovering): a frontend started beside filterd just waits for it.
    /// A wait past a second calls `waiting` once with why, so that the
    /// frontend can say so (an operator who started it without filterd
    /// should not watch silence for `within`).
    pub fn connect_patiently(
        socket: &Path,
        protocol: Protocol,
        instance: InstanceName,
        features: u64,
        within: Duration,
        waiting: &mut dyn FnMut(&ClientError),
    ) -> Result<Self, ClientError> {
        let t0 = Instant::now();
        let mut said = false;
        loop {
            // Each attempt within what is left: a filterd that accepts and
            // does not answer (stopped, hung) ends the wait at `within`, not
            // at the call timeout — and, until the wait has been said, within
            // a second, so that it is said then.
            let mut left = within.saturating_sub(t0.elapsed()).max(MIN_ATTEMPT);
            if !said {
                left = left.min(Duration::from_secs(1));
            }
            match Self::attach(
                socket,
                protocol.clone(),
                instance.clone(),
                features,
                Some(left),
            ) {
                Ok(a) => return Ok(a),
                Err(e) if t0.elapsed() < within => {
                    if !said && t0.elapsed() >= Duration::from_secs(1) {
                        said = true;
                        waiting(&e);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Attaches asking for optional `features` (see [`crate::proto::FEATURES`]),
    /// at every reattach too; [`crate::proto::FEATURE_RESYNCED`] always
    /// (see [`Attachment::resynced`]).
    pub fn connect_with(
        socket: &Path,
        protocol: Protocol,
        instance: InstanceName,
        features: u64,
    ) -> Result<Self, ClientError> {
        Self::attach(socket, protocol, instance, features, None)
    }

    /// [`Attachment::connect_with`], its connect and hello bounded by
    /// `hello_within` when that is sooner than the call timeout.
    fn attach(
        socket: &Path,
        protocol: Protocol,
        instance: InstanceName,
        features: u64,
        hello_within: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let mut features = features | crate::proto::FEATURE_RESYNCED;
        // Hinted, it checks every I/O when a daemon withholds the hints.
        if features & crate::proto::FEATURE_LOCK_HINTS != 0 {
            features |= crate::proto::FEATURE_FENCED_IO;
        }
        let incarnation = crate::model::new_incarnation();
        let client = FilterClient::connect_frontend_as(
            socket,
            protocol.clone(),
            instance.clone(),
            Some(incarnation),
            features,
            hello_within,
        )?;
        // A first attach has nothing to apply (a daemon restarted since
        // this process last attached waits for this, not for a reattach).
        client.resynced();
        let (tx, rx) = bounded(EVENT_QUEUE_LIMIT);
        let shared = Arc::new(Shared {
            socket: socket.to_owned(),
            protocol,
            instance,
            current: RwLock::new(client),
            handles: Mutex::new(HashMap::new()),
            events: tx,
            stop: AtomicBool::new(false),
            features,
            incarnation,
            generation: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            gate: IoGate::default(),
            unsent: Mutex::new(HashMap::new()),
            unsent_added: Condvar::new(),
            deferred: AtomicU64::new(0),
        });
        let sup = shared.clone();
        std::thread::Builder::new()
            .name("filter-attach".into())
            .spawn(move || supervise(sup))?;
        let acks = shared.clone();
        std::thread::Builder::new()
            .name("lock-hint-acks".into())
            .spawn(move || acknowledge_hints(acks))?;
        let notices = shared.clone();
        std::thread::Builder::new()
            .name("write-notices".into())
            .spawn(move || flush_write_notices(notices))?;
        Ok(Attachment { shared, events: rx })
    }

    /// The current connection (replaced after a reattach) — on a thread
    /// that [`Attachment::pin`]ned this attachment, the pinned one.
    pub fn client(&self) -> FilterClient {
        let key = Arc::as_ptr(&self.shared) as usize;
        let pinned = PINNED.with(|p| {
            p.borrow()
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, c)| c.clone())
        });
        pinned.unwrap_or_else(|| self.current())
    }

    fn current(&self) -> FilterClient {
        match self.shared.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Pins the current connection to this thread until the guard is
    /// dropped: [`Attachment::client`] (and every call made through this
    /// attachment) on this thread uses it, even once the supervisor has
    /// stored another. Take it before checking [`Attachment::io_ready`]
    /// for work that decides from state kept in memory: a request that
    /// found the attachment ready makes its calls on that connection, and
    /// if the daemon is lost meanwhile they fail as on a lost connection
    /// ([`ClientError::Disconnected`]) instead of reaching a restarted
    /// daemon — or the other node's, after a fail-back — before the
    /// frontend has applied its reattach (re-review rr41e 1).
    pub fn pin(&self) -> Pinned {
        let key = Arc::as_ptr(&self.shared) as usize;
        let c = self.current();
        PINNED.with(|p| p.borrow_mut().push((key, c)));
        Pinned {
            key,
            _thread: std::marker::PhantomData,
        }
    }

    /// Whether this thread pinned a connection of this attachment
    /// ([`Attachment::pin`]) and that connection is lost: every call made
    /// through the attachment on this thread fails as on a lost
    /// connection until the pin is dropped, so waiting for filterd to
    /// answer is in vain. False on a thread that pinned nothing, whose
    /// calls reach the next connection once the supervisor has stored it.
    pub fn pinned_lost(&self) -> bool {
        let key = Arc::as_ptr(&self.shared) as usize;
        PINNED.with(|p| {
            p.borrow()
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .is_some_and(|(_, c)| c.peer_gone())
        })
    }

    /// Whether the frontend may trust its lock flags: attached, and the
    /// latest [`AttachEvent::Reattached`] applied. When false, every read
    /// and write must be refused with the protocol's retry status (filterd
    /// may have granted locks this frontend has not heard of). Asks the
    /// socket itself ([`FilterClient::peer_gone`]), so it turns false the
    /// moment the daemon is gone, before the supervisor notices.
    pub fn io_ready(&self) -> bool {
        self.io_ready_hinted().is_some()
    }

    /// [`Attachment::io_ready`], and if so whether its connection was
    /// granted [`crate::proto::FEATURE_LOCK_HINTS`] (read from the same
    /// connection): without them, no file's I/O may go unchecked — a
    /// daemon on a store shared between machines withholds them
    /// ([`crate::proto::FEATURE_FENCED_IO`]), as one that does not know
    /// them would.
    fn io_ready_hinted(&self) -> Option<bool> {
        let g = self.shared.generation.load(Ordering::Acquire);
        if self.shared.synced.load(Ordering::Acquire) != g {
            return None;
        }
        match self.shared.current.read() {
            Ok(c) if !c.peer_gone() => {
                Some(c.hello().features & crate::proto::FEATURE_LOCK_HINTS != 0)
            }
            _ => None,
        }
    }

    /// Whether the attachment is attached to a restarted filterd whose
    /// [`AttachEvent::Reattached`] the frontend has not applied yet
    /// ([`Attachment::resynced`]): its clients may still cache under
    /// leases of handles that filterd forgot, and the frontend's own
    /// opens, which filterd's open gate does not hold, should wait. False
    /// while filterd is gone (an open fails then as it would).
    pub fn resync_pending(&self) -> bool {
        self.resync_pending_on(&self.client())
    }

    /// [`Attachment::resync_pending`] for connection `client`, read from
    /// `current` before this call: the supervisor bumps the generation
    /// before it stores a new connection, so a new `client` is never
    /// judged by the generation of the one before it.
    fn resync_pending_on(&self, client: &FilterClient) -> bool {
        let g = self.shared.generation.load(Ordering::Acquire);
        self.shared.synced.load(Ordering::Acquire) != g && !client.peer_gone()
    }

    /// The frontend has applied the `Reattached` of `generation` (marked
    /// its `locked` files, sent its clients the breaks of leases whose
    /// handles are `lost`): I/O on other files may go unchecked again, and
    /// the daemon is told ([`crate::proto::Request::Resynced`]) — a
    /// restarted daemon holds other frontends' opens until then, so call
    /// this only once everything the reattach found has been acted on.
    pub fn resynced(&self, generation: u64) {
        self.shared.synced.store(generation, Ordering::Release);
        // The connection of that reattach, not of a later one.
        if self.shared.generation.load(Ordering::Acquire) == generation {
            self.client().resynced();
        }
    }

    /// How many reattaches the frontend has applied ([`Attachment::resynced`]
    /// with a later generation): work that failed for want of filterd
    /// (a [`crate::closer::Closer`]'s) is tried again when it grows.
    pub fn reattaches(&self) -> u64 {
        self.shared.synced.load(Ordering::Acquire)
    }

    /// Decides one read or write of `file`, in this order under the gate:
    /// [`Attachment::io_ready`], `live` (the frontend's handle of it is not
    /// lost or forgotten), the file's flag in `checked` — every file counts
    /// as flagged on a connection not granted lock hints (a daemon on a
    /// store shared between machines: [`crate::proto::FEATURE_FENCED_IO`]). An
    /// [`IoDecision::Unchecked`] counts as in flight on `file` until its
    /// guard is dropped: do the pread/pwrite, then drop it.
    pub fn decide_io(
        &self,
        checked: &Mutex<HashSet<FileId>>,
        file: FileId,
        live: impl FnOnce() -> bool,
    ) -> IoDecision<'_> {
        let gate = &self.shared.gate;
        let mut g = gate.lock();
        while g.closed {
            g = gate.wait(g);
        }
        let Some(hinted) = self.io_ready_hinted() else {
            return IoDecision::NotReady;
        };
        if !live() {
            return IoDecision::Gone;
        }
        // Poisoned: treat the file as locked. Not hinted: every file may
        // be (review rvnode 1).
        if !hinted || checked.lock().map(|l| l.contains(&file)).unwrap_or(true) {
            return IoDecision::Check;
        }
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.in_flight.entry(file).or_default().insert(ticket);
        IoDecision::Unchecked(UncheckedIo { gate, file, ticket })
    }

    /// A read or write of `file` that filterd allowed (`pass`, from
    /// [`FilterClient::check_io`] after [`IoDecision::Check`]): counted in
    /// flight on `file` like an unchecked one, so that the attachment
    /// drains it before its next hello (a filterd restarted meanwhile
    /// knows nothing of it; its locks wait for that hello) and
    /// [`Attachment::drain_file`] waits for it. `None` when the daemon was
    /// lost since the check (not [`Attachment::io_ready`], or `pass` is of
    /// an older connection): refuse the I/O with the retry status, as for
    /// [`IoDecision::NotReady`].
    pub fn checked(&self, file: FileId, pass: crate::client::CheckedIo) -> Option<IoPass<'_>> {
        let gate = &self.shared.gate;
        let mut g = gate.lock();
        while g.closed {
            g = gate.wait(g);
        }
        // Allowed by a daemon lost since (even if this attachment is back
        // and resynced already): that daemon's successor never heard of
        // it, and the drain before the hello did not wait for it.
        if !self.io_ready() || !pass.is_of(&self.client()) {
            return None;
        }
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.in_flight.entry(file).or_default().insert(ticket);
        Some(IoPass::Checked {
            gate: UncheckedIo { gate, file, ticket },
            pass,
        })
    }

    /// Held while the frontend applies what changes the decision of
    /// [`Attachment::decide_io`] for many files at once (a `Reattached`:
    /// dropping lost handles, [`Attachment::relearn_locks`]): waits for
    /// every unchecked read and write in flight to finish, and no new one
    /// starts until it is dropped.
    pub fn exclusive_io(&self) -> ExclusiveIo<'_> {
        let gate = &self.shared.gate;
        let mut g = gate.lock();
        while g.closed {
            g = gate.wait(g);
        }
        g.closed = true;
        while !g.in_flight.is_empty() {
            g = gate.wait(g);
        }
        ExclusiveIo { gate }
    }

    /// On `LocksPresent`: marks `file` locked in `checked` (no unchecked
    /// I/O on it starts after this), and acknowledges once no unchecked
    /// read or write of `file` is in flight — at once if none is, else from
    /// the `lock-hint-acks` thread, so this returns without waiting and
    /// hints for several files are acknowledged independently (filterd
    /// grants the first lock only after the acknowledgement).
    pub fn locks_present(&self, checked: &Mutex<HashSet<FileId>>, file: FileId) {
        let gate = &self.shared.gate;
        let mut g = gate.lock();
        match checked.lock() {
            Ok(mut l) => l.insert(file),
            Err(p) => p.into_inner().insert(file),
        };
        if g.in_flight.contains_key(&file) {
            g.acks_due.insert(file);
            drop(g);
            gate.changed.notify_all();
            return;
        }
        drop(g);
        let _ = self.client().lock_hint_ack(file);
    }

    /// Waits (up to [`DRAIN_FILE_WAIT`]) until no unchecked read or write of
    /// `file` that started before this call is in flight. A frontend calls it before it closes or
    /// detaches a handle at filterd, after taking the handle out of its
    /// own table (so `decide_io`'s `live` check lets no new one start):
    /// once filterd has forgotten the handle, a first lock on the file no
    /// longer waits for this frontend, so nothing of the handle may still
    /// be on its way to the file. Returns false when the wait ran out (a
    /// pwrite stuck that long is treated as failed, like a frontend that
    /// does not acknowledge a lock hint in time).
    pub fn drain_file(&self, file: FileId) -> bool {
        let gate = &self.shared.gate;
        let deadline = std::time::Instant::now() + DRAIN_FILE_WAIT;
        let mut g = gate.lock();
        // Only what started before this call: other opens of the file may
        // go on starting unchecked I/O, and a close must not wait for them.
        let before = g.next_ticket;
        while g
            .in_flight
            .get(&file)
            .and_then(|t| t.first())
            .is_some_and(|first| *first < before)
        {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            g = gate.wait(g);
        }
        true
    }

    /// Applies a [`AttachEvent::Reattached`]'s lock state to a frontend's
    /// set of files whose I/O it checks: marks `locked`, then
    /// [`Attachment::resynced`]. Call it under [`Attachment::exclusive_io`],
    /// after dropping the `lost` handles. (Files marked before stay marked:
    /// at worst their I/O is checked needlessly until their next
    /// `LocksGone`.)
    pub fn relearn_locks(
        &self,
        checked: &Mutex<HashSet<FileId>>,
        locked: Vec<FileId>,
        generation: u64,
    ) {
        match checked.lock() {
            Ok(mut l) => l.extend(locked),
            // Poisoned: its owner treats every file as locked anyway.
            Err(p) => p.into_inner().extend(locked),
        }
        self.resynced(generation);
    }

    /// Events for the frontend.
    pub fn events(&self) -> &Receiver<AttachEvent> {
        &self.events
    }

    fn remember(&self, h: &OpenedHandle, client: &ClientId) {
        if let Ok(mut m) = self.shared.handles.lock() {
            m.insert(
                h.info.key,
                Known {
                    client: client.clone(),
                    durable: h.info.durability != Durability::None,
                },
            );
        }
    }

    /// `h`, remembered for `client` when it was opened.
    fn remembering(
        &self,
        client: &ClientId,
        h: Result<OpenedHandle, ClientError>,
    ) -> Result<OpenedHandle, ClientError> {
        let h = h?;
        self.remember(&h, client);
        Ok(h)
    }

    fn forget(&self, key: ResumeKey) {
        if let Ok(mut m) = self.shared.handles.lock() {
            m.remove(&key);
        }
    }

    /// An open of the frontend's own, made by `open` on the current
    /// connection and remembered for `client`, unless that connection is
    /// to a restarted filterd whose reattach the frontend has not applied
    /// yet ([`Attachment::resync_pending`]): then nothing is asked and the
    /// answer is `Busy`. The check and the open use the one connection:
    /// checked by `resync_pending` and then opened through
    /// [`Attachment::open`], which reads the current connection again, a
    /// reattach stored between the two sent the open to the restarted
    /// filterd with its resync still pending (re-review rr39e F7).
    pub fn open_when_synced(
        &self,
        client: &ClientId,
        open: impl FnOnce(&FilterClient) -> Result<OpenedHandle, ClientError>,
    ) -> Result<OpenedHandle, ClientError> {
        let c = self.client();
        if self.resync_pending_on(&c) {
            return Err(ClientError::Refused(crate::proto::WireError::new(
                crate::proto::ErrorCode::Busy,
                "the breaks of leases filterd forgot are not written yet",
            )));
        }
        #[cfg(test)]
        tests::AFTER_RESYNC_CHECK.with(|h| h.take().map(|f| f()));
        self.remembering(client, open(&c))
    }

    /// Opens and remembers the handle.
    pub fn open(&self, req: OpenRequest) -> Result<OpenedHandle, ClientError> {
        let client = req.client.clone();
        self.remembering(&client, self.client().open(req))
    }

    /// As [`Attachment::open`], for a caller whose client replays the
    /// open's create GUID when told it failed
    /// ([`FilterClient::open_replayed_by_guid`]), in the client's session
    /// `end`.
    pub fn open_replayed_by_guid(
        &self,
        req: OpenRequest,
        end: &crate::client::SessionEnd,
    ) -> Result<OpenedHandle, ClientError> {
        let client = req.client.clone();
        self.remembering(&client, self.client().open_replayed_by_guid(req, end))
    }

    /// Replays an open and remembers the handle.
    pub fn replay_open(&self, req: OpenRequest) -> Result<OpenedHandle, ClientError> {
        let client = req.client.clone();
        self.remembering(&client, self.client().replay_open(req))
    }

    /// As [`Attachment::replay_open`], in the client's session `end`
    /// ([`FilterClient::replay_open_for`]).
    pub fn replay_open_for(
        &self,
        req: OpenRequest,
        end: &crate::client::SessionEnd,
    ) -> Result<OpenedHandle, ClientError> {
        let client = req.client.clone();
        self.remembering(&client, self.client().replay_open_for(req, end))
    }

    /// Takes a disconnected handle by create GUID to close it
    /// ([`FilterClient::resume_by_guid_to_close`]), and remembers it until
    /// its close is answered ([`Attachment::close`]).
    pub fn resume_by_guid_to_close(
        &self,
        client: ClientId,
        guid: CreateGuid,
        owner: Option<String>,
    ) -> Result<OpenedHandle, ClientError> {
        let h = self
            .client()
            .resume_by_guid_to_close(client.clone(), guid, owner);
        self.remembering(&client, h)
    }

    /// Resumes by key and remembers the handle.
    pub fn resume(&self, client: ClientId, key: ResumeKey) -> Result<OpenedHandle, ClientError> {
        let h = self.client().resume(client.clone(), key);
        self.remembering(&client, h)
    }

    /// Resumes by create GUID and remembers the handle.
    pub fn resume_by_guid(
        &self,
        client: ClientId,
        guid: CreateGuid,
    ) -> Result<OpenedHandle, ClientError> {
        self.resume_by_guid_of(client, guid, None)
    }

    /// Resumes by create GUID a handle that must also belong to `owner`
    /// ([`FilterClient::resume_by_guid_of`]) and remembers it.
    pub fn resume_by_guid_of(
        &self,
        client: ClientId,
        guid: CreateGuid,
        owner: Option<String>,
    ) -> Result<OpenedHandle, ClientError> {
        self.resume_by_guid_matching(client, guid, owner, None)
    }

    /// Resumes by create GUID a handle that must also belong to `owner`
    /// and match `matching` ([`FilterClient::resume_by_guid_matching`])
    /// and remembers it.
    pub fn resume_by_guid_matching(
        &self,
        client: ClientId,
        guid: CreateGuid,
        owner: Option<String>,
        matching: Option<crate::proto::ResumeMatch>,
    ) -> Result<OpenedHandle, ClientError> {
        let h = self
            .client()
            .resume_by_guid_matching(client.clone(), guid, owner, matching);
        self.remembering(&client, h)
    }

    /// Closes and forgets the handle.
    pub fn close(&self, key: ResumeKey) -> Result<(), ClientError> {
        self.close_recording(key, Vec::new(), Vec::new())
    }

    /// Closes a handle and writes and deletes records in the same commit
    /// ([`FilterClient::close_recording`]), and forgets the handle.
    pub fn close_recording(
        &self,
        key: ResumeKey,
        put: Vec<crate::model::RecordSpec>,
        delete: Vec<(crate::model::ReplayScope, u64)>,
    ) -> Result<(), ClientError> {
        self.notice_before_close(key)?;
        let r = self.client().close_recording(key, put, delete);
        self.forget_if_closed(key, r)
    }

    /// Closes a handle with the delete on close its client was last told
    /// ([`FilterClient::close_told`]), and forgets the handle.
    pub fn close_told(&self, key: ResumeKey, told: Option<bool>) -> Result<(), ClientError> {
        self.notice_before_close(key)?;
        let r = self.client().close_told(key, told);
        self.forget_if_closed(key, r)
    }

    /// Sends `key`'s kept write notice before its close; fails, the close
    /// not to be sent, when the notice could not go. Sent then, the close
    /// could overtake its own notice, which the write-notices thread sends
    /// later and filterd refuses: the break lost (re-review rr36: filterd
    /// reading again between one call timeout and two). Failed as a close
    /// whose send timed out fails, the handle remembered and its notice
    /// kept: the caller's retry sends both, in order, once filterd reads.
    fn notice_before_close(&self, key: ResumeKey) -> Result<(), ClientError> {
        if self.send_kept_notice(key) {
            Ok(())
        } else {
            Err(ClientError::Timeout(self.client().call_timeout()))
        }
    }

    /// A close's outcome `r`: the handle forgotten when filterd closed it.
    fn forget_if_closed(
        &self,
        key: ResumeKey,
        r: Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        // Forgotten only once filterd answered that the handle is not
        // (or no longer) this frontend's: after any other failure (gone,
        // reset, timed out; or a close filterd refused or undid, the handle
        // back and attached) the handle may still be open, and must be
        // resumed after a restart like any other — a forgotten open handle
        // stays disconnected, and every later close of it fails NotOwner.
        // One that was closed fails its resume and is `lost`.
        let closed = match &r {
            Ok(()) => true,
            Err(e @ ClientError::Refused(_)) => !e.close_undone(),
            Err(_) => false,
        };
        if closed {
            self.forget(key);
        }
        r
    }

    /// Detaches (client went away) and forgets the handle: it is resumed by
    /// whoever the client reconnects through, not by this attachment.
    pub fn detach(&self, key: ResumeKey) -> Result<(), ClientError> {
        self.detach_told(key, None)
    }

    /// Detaches the handle with the delete on close its client was last
    /// told ([`FilterClient::detach_told`]), and forgets it.
    pub fn detach_told(&self, key: ResumeKey, told: Option<bool>) -> Result<(), ClientError> {
        self.forget(key);
        // Not held back like a close: its callers do not try a detach
        // again, and a detach never sent left the handle attached to this
        // live connection. Left: a notice not sent within the call timeout
        // can follow the detach and be refused (docs/ARCHITECTURE.md).
        let _ = self.send_kept_notice(key);
        self.client().detach_told(key, told)
    }

    /// Sends `key`'s kept write notice, if one waits, before a request that
    /// ends this connection's hold on the handle (a close, a detach), in
    /// order on the same socket, waiting for room as that request will.
    /// Sent after it by the `write-notices` thread, filterd refused it (the
    /// handle no longer this connection's) and the break was lost: another
    /// key's R lease kept stale data after a write and a close, which a
    /// merely busy filterd's full socket was enough for (re-review
    /// rr-rcache2).
    /// It never gives the connection up: not sent within the call timeout
    /// (filterd stopped), the notice is kept again and false returned — a
    /// close then is not sent (see [`Attachment::close_recording`]); a
    /// detach goes on as it would have alone. True when no notice waited,
    /// it was sent, or filterd refused it (the request after it fails
    /// alike).
    fn send_kept_notice(&self, key: ResumeKey) -> bool {
        let kept = self
            .shared
            .unsent
            .lock()
            .map(|mut u| u.remove(&key).is_some())
            .unwrap_or(false);
        if !kept {
            return true;
        }
        match self.client().wrote_waiting(key) {
            Ok(true) => true,
            Ok(false) => {
                defer_wrote(&self.shared, key);
                false
            }
            Err(e) => {
                tracing::warn!(resume_key = %key, error = %e, "a kept write notice not sent before its handle went");
                defer_wrote(&self.shared, key);
                true
            }
        }
    }

    /// After a write (or a copy) through `key`: other keys' read caching
    /// of its file must go ([`FilterClient::try_wrote`]). Never waits and
    /// never fails the connection: a notice that cannot go now (filterd's
    /// socket is full — it is stopped or busy —, or it is away, or this
    /// frontend has not applied its reattach yet) is kept, once per key,
    /// and sent by the `write-notices` thread as soon as it can, after a
    /// reattach to the new daemon. Before, a stopped filterd held every
    /// write for the call timeout and then lost the whole frontend.
    pub fn wrote(&self, key: ResumeKey) {
        if self.io_ready() && matches!(self.client().try_wrote(key), Ok(true)) {
            return;
        }
        defer_wrote(&self.shared, key);
    }

    /// Write notices deferred so far ([`Attachment::wrote`]).
    pub fn deferred_write_notices(&self) -> u64 {
        self.shared.deferred.load(Ordering::Relaxed)
    }

    /// Handles this attachment would resume after a daemon restart.
    pub fn remembered(&self) -> usize {
        self.shared.handles.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // The supervisor, the hint-ack and the write-notice threads hold
        // their own Arcs; only the last handle stops them.
        if Arc::strong_count(&self.shared) <= 4 {
            self.shared.stop.store(true, Ordering::Release);
        }
    }
}

/// Keeps `key`'s write notice for the `write-notices` thread.
fn defer_wrote(shared: &Shared, key: ResumeKey) {
    let Ok(mut unsent) = shared.unsent.lock() else {
        return;
    };
    if unsent.is_empty() {
        tracing::warn!(resume_key = %key, "write notice deferred: filterd is not taking them now");
    }
    unsent.insert(key, shared.deferred.fetch_add(1, Ordering::Relaxed));
    shared.unsent_added.notify_one();
}

/// How long the `write-notices` thread waits before trying again while
/// filterd takes no notices.
const NOTICE_RETRY: Duration = Duration::from_millis(20);

/// The `write-notices` thread: sends the deferred write notices whenever
/// the frontend is attached and synced and filterd's socket has room,
/// until the attachment stops. A notice for a handle closed meanwhile is
/// refused by filterd (nothing else to break through it).
fn flush_write_notices(shared: Arc<Shared>) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let keys: Vec<(ResumeKey, u64)> = {
            let Ok(unsent) = shared.unsent.lock() else {
                return;
            };
            let Ok((unsent, _)) =
                shared
                    .unsent_added
                    .wait_timeout_while(unsent, Duration::from_millis(200), |u| u.is_empty())
            else {
                return;
            };
            unsent.iter().map(|(k, n)| (*k, *n)).collect()
        };
        if keys.is_empty() {
            continue;
        }
        let ready =
            shared.synced.load(Ordering::Acquire) == shared.generation.load(Ordering::Acquire);
        let client = match shared.current.read() {
            Ok(c) => c.clone(),
            Err(_) => return,
        };
        let mut sent = Vec::new();
        if ready && !client.peer_gone() {
            for (key, n) in keys {
                if !matches!(client.try_wrote(key), Ok(true)) {
                    break;
                }
                sent.push((key, n));
            }
        }
        let left = match shared.unsent.lock() {
            Ok(mut unsent) => {
                for (k, n) in &sent {
                    if unsent.get(k) == Some(n) {
                        unsent.remove(k);
                    }
                }
                unsent.len()
            }
            Err(_) => return,
        };
        if left > 0 {
            std::thread::sleep(NOTICE_RETRY);
        } else {
            tracing::info!("deferred write notices sent");
        }
    }
}

/// Queues an event for the frontend, waiting while its queue is full (only
/// this thread waits; the socket reader never does). False when stopping.
fn deliver(shared: &Shared, ev: AttachEvent) -> bool {
    let mut ev = ev;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return false;
        }
        match shared.events.send_timeout(ev, Duration::from_millis(200)) {
            Ok(()) => return true,
            Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => ev = back,
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

/// Acknowledges the lock hints [`Attachment::locks_present`] queued, each
/// as soon as its own file has no unchecked I/O in flight.
fn acknowledge_hints(shared: Arc<Shared>) {
    let gate = &shared.gate;
    loop {
        let ready: Vec<FileId> = {
            let mut g = gate.lock();
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let ready: Vec<FileId> = g
                    .acks_due
                    .iter()
                    .filter(|f| !g.in_flight.contains_key(f))
                    .copied()
                    .collect();
                if !ready.is_empty() {
                    for f in &ready {
                        g.acks_due.remove(f);
                    }
                    break ready;
                }
                g = gate.wait(g);
            }
        };
        let client = match shared.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for f in ready {
            let _ = client.lock_hint_ack(f);
        }
    }
}

fn supervise(shared: Arc<Shared>) {
    loop {
        let (events, current) = match shared.current.read() {
            Ok(c) => (c.events().clone(), c.clone()),
            Err(_) => return,
        };
        // Forward daemon events until the connection is lost.
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::ConnectionLost)
                | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Ok(ev) => {
                    if !deliver(&shared, AttachEvent::Daemon(ev)) {
                        return;
                    }
                }
                // Drained, and the connection died without a word (its
                // ConnectionLost did not fit a full queue).
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if current.is_dead() => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
        }
        drop(current);
        let lost_at = Instant::now();
        // From here until the frontend applies the Reattached below, its
        // lock flags are not to be trusted.
        let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if !deliver(&shared, AttachEvent::Lost) {
            return;
        }
        // No unchecked I/O starts from here (not io_ready); wait for what
        // was decided while the old daemon was there, so that our hello
        // tells the new one that nothing from before is in flight (a first
        // lock after a restart waits for that hello).
        shared.gate.drain();
        // Attached again once every remembered handle is resumed or known
        // gone; a connection that dies meanwhile is made again.
        let (
            client,
            Resumed {
                resumed,
                mut locked,
                lost,
                taken,
                leases,
            },
        ) = loop {
            let Some(client) = reconnect(&shared) else {
                return;
            };
            match resume_known(&shared, &client) {
                Some(r) => break (client, r),
                None if shared.stop.load(Ordering::Acquire) => return,
                None => continue,
            }
        };
        let epoch = client.hello().epoch;
        locked.sort_unstable();
        locked.dedup();
        if let Ok(mut m) = shared.handles.lock() {
            for k in &lost {
                m.remove(k);
            }
        }
        if let Ok(mut c) = shared.current.write() {
            *c = client;
        }
        tracing::info!(
            epoch,
            resumed = resumed.len(),
            lost = lost.len(),
            "reattached to filterd"
        );
        if !deliver(
            &shared,
            AttachEvent::Reattached {
                epoch,
                generation,
                resumed,
                locked,
                lost,
                taken,
                leases,
                outage: lost_at.elapsed(),
            },
        ) {
            return;
        }
    }
}

/// Longest a reattach tries again the resume of a handle that filterd
/// refused for a passing cause ([`resume_known`]) before it reports the
/// handle lost.
pub const RESUME_PATIENCE: Duration = Duration::from_secs(30);

/// Connects to filterd again, with backoff, under the attachment's
/// protocol and instance name. None when the attachment stops.
fn reconnect(shared: &Shared) -> Option<FilterClient> {
    let mut backoff = Duration::from_millis(5);
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        match FilterClient::connect_frontend_as(
            &shared.socket,
            shared.protocol.clone(),
            shared.instance.clone(),
            Some(shared.incarnation),
            shared.features,
            None,
        ) {
            Ok(c) => return Some(c),
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What a reattach's resumes came to (see [`AttachEvent::Reattached`]).
#[derive(Default)]
struct Resumed {
    resumed: Vec<ResumeKey>,
    locked: Vec<FileId>,
    lost: Vec<ResumeKey>,
    /// Of `lost`, those another frontend process attached since.
    taken: Vec<ResumeKey>,
    leases: Vec<(ResumeKey, Option<crate::model::HeldLease>)>,
}

/// Whether a refused resume says the handle is not (or no longer) this
/// frontend's to resume: gone, expired, lost its file, another client's,
/// owner's or instance's, or attached by another frontend process since
/// this one held it (a reattach names `if_last_held`: the other node's
/// frontend of the same instance took it over meanwhile). Any other failure (busy, a commit that failed,
/// no answer in time) may pass.
pub fn resume_refused_for_good(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::NoSuchHandle) | Some(ErrorCode::NotOwner) | Some(ErrorCode::AccessDenied)
    )
}

/// Resumes every remembered handle over `client`, the new connection.
/// Non-durable handles died with the daemon: lost. A handle refused for
/// good ([`resume_refused_for_good`]) is lost; one refused for a passing
/// cause is tried again with backoff, for up to [`RESUME_PATIENCE`], then
/// lost. (Every failure was `lost` before, and the frontend dropped an
/// open whose handle filterd kept, disconnected, holding the file for its
/// timeout, after one busy or failed commit.) None when the connection
/// died meanwhile (its resumes are undone by filterd: attach again and
/// resume all) or the attachment stops.
fn resume_known(shared: &Shared, client: &FilterClient) -> Option<Resumed> {
    let known: Vec<(ResumeKey, ClientId, bool)> = shared
        .handles
        .lock()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (*k, v.client.clone(), v.durable))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Resumed::default();
    let mut pending = Vec::new();
    for (key, cid, durable) in known {
        if durable {
            pending.push((key, cid));
        } else {
            out.lost.push(key);
        }
    }
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut retry = false;
    // Handles whose late answer is no longer undone (`keep_attached`).
    let mut held = HashSet::new();
    while !pending.is_empty() {
        let mut again = Vec::new();
        for (key, cid) in pending {
            // Attached is all that counts: the frontend still holds the
            // descriptor it had, so one cut from this reply for want of a
            // free one (a full table) is no loss — before, it failed the
            // new connection too, and the reattach never came through
            // while the table stayed full.
            match client.resume_attached(cid.clone(), key) {
                Ok(info) => {
                    if info.locked {
                        out.locked.push(info.file);
                    }
                    out.resumed.push(key);
                    out.leases.push((key, info.lease));
                }
                // A resume tried before may have attached the handle after
                // all (its answer came too late; an older filterd also kept
                // a handle whose resume did not commit attached): a retry is
                // then refused "attached, not disconnected". Attached to
                // this instance is resumed; its lock state unknown, its file
                // is marked locked (every read and write checked).
                // Its late answer is then not undone (`keep_attached`,
                // before the look: the `Detach` detached the live open).
                Err(e) if retry && e.code() == Some(ErrorCode::NoSuchHandle) => {
                    client.keep_attached(key);
                    held.insert(key);
                    match attached_here(shared, client, key) {
                        Here::Attached(file, lease) => {
                            out.locked.push(file);
                            out.resumed.push(key);
                            out.leases.push((key, lease));
                        }
                        // The late answer's detach came first: resumed
                        // again. Or the look went unanswered (timed out,
                        // busy): looked at again — reported lost, the
                        // handle would stay attached to this live
                        // connection with no open on it.
                        Here::Disconnected | Here::Unknown => again.push((key, cid)),
                        Here::Not => {
                            if taken_elsewhere(shared, client, key) {
                                out.taken.push(key);
                            }
                            out.lost.push(key);
                        }
                    }
                }
                Err(e) if resume_refused_for_good(&e) => {
                    // Taken by another process of this instance, or gone:
                    // told apart by a look at the handle's stamp.
                    if e.code() == Some(ErrorCode::NoSuchHandle)
                        && taken_elsewhere(shared, client, key)
                    {
                        out.taken.push(key);
                    }
                    out.lost.push(key);
                }
                Err(_) if client.is_dead() => return None,
                Err(e) => {
                    tracing::warn!(resume_key = %key, error = %e, "resume refused for now: trying again");
                    again.push((key, cid));
                }
            }
        }
        if again.is_empty() {
            break;
        }
        if started.elapsed() >= RESUME_PATIENCE {
            tracing::warn!(
                handles = again.len(),
                "resumes still refused after {RESUME_PATIENCE:?}: reported lost"
            );
            out.lost.extend(again.into_iter().map(|(k, _)| k));
            break;
        }
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        pending = again;
        retry = true;
    }
    let_go_of_held(client, &held, &out.lost);
    Some(out)
}

/// Detaches every handle of `lost` marked held (`keep_attached`): its late
/// answer, no longer undone, may have attached it to this connection, and
/// the frontend forgets a lost open — left so, it stayed attached to
/// nobody until the connection died (reads on it FILE_CLOSED, other
/// clients' opens refused as sharing violations, a reconnect not found).
/// Detached, it waits disconnected for its durable timeout, resumable. A
/// handle not attached here is refused (`NotOwner`, `NoSuchHandle`):
/// harmless.
fn let_go_of_held(client: &FilterClient, held: &HashSet<ResumeKey>, lost: &[ResumeKey]) {
    for key in lost.iter().filter(|k| held.contains(k)) {
        if let Err(e) = client.detach(*key) {
            tracing::debug!(resume_key = %key, error = %e, "lost handle not detached");
        }
    }
}

/// Whether filterd holds handle `key` as attached last by another
/// frontend process (its `attached_by` neither this attachment's
/// incarnation nor 0, unknown): the reason a reattach that names
/// `if_last_held` refuses it (`NoSuchHandle`, as for a handle that is
/// gone). Not learnt (the look unanswered): false — taken for gone, as
/// before.
fn taken_elsewhere(shared: &Shared, client: &FilterClient, key: ResumeKey) -> bool {
    matches!(
        client.call(crate::proto::Request::Handle {
            key,
            learning: false,
        }),
        Ok((crate::proto::Reply::Handle(v), _))
            if v.record.attached_by != 0 && v.record.attached_by != shared.incarnation
    )
}

/// Where a handle whose resume was refused "attached" is.
enum Here {
    /// Attached to this attachment's instance: its file and its lease.
    Attached(FileId, Option<crate::model::HeldLease>),
    /// Disconnected (a late answer's detach came first): to resume.
    Disconnected,
    /// Anywhere else, or gone.
    Not,
    /// Not learnt: the look went unanswered or was refused for a passing
    /// cause.
    Unknown,
}

/// Where filterd holds handle `key`: attached to this attachment's
/// instance (whose only live connection is `client`), disconnected, or
/// not here. One another frontend process attached last (its
/// `attached_by` neither this attachment's incarnation nor 0, unknown) is
/// not here, attached or not: its reattach is refused for good.
fn attached_here(shared: &Shared, client: &FilterClient, key: ResumeKey) -> Here {
    let ours = |by: u64| by == 0 || by == shared.incarnation;
    match client.call(crate::proto::Request::Handle {
        key,
        learning: false,
    }) {
        Ok((crate::proto::Reply::Handle(v), _)) if !ours(v.record.attached_by) => Here::Not,
        Ok((crate::proto::Reply::Handle(v), _))
            if v.record.conn == crate::model::ConnState::Connected
                && v.record.frontend == shared.instance =>
        {
            Here::Attached(v.record.file, v.record.lease)
        }
        Ok((crate::proto::Reply::Handle(v), _))
            if matches!(v.record.conn, crate::model::ConnState::Disconnected { .. }) =>
        {
            Here::Disconnected
        }
        Ok(_) => Here::Not,
        Err(e) if resume_refused_for_good(&e) => Here::Not,
        Err(_) => Here::Unknown,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::client::tests::{fake_daemon_granting, pushing_daemon};

    thread_local! {
        /// Run once by [`Attachment::open_when_synced`] between its check
        /// and its open (a reattach stored just then).
        pub(crate) static AFTER_RESYNC_CHECK: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
            std::cell::Cell::new(None);
    }

    /// A fake filterd granting write notices that reads nothing until
    /// `held` says so (or its sender goes), then records, in order, the
    /// write notices and the close of `key` it gets, answers the close and
    /// returns them.
    fn notice_and_close_daemon(
        key: ResumeKey,
        held: std::sync::mpsc::Receiver<()>,
    ) -> (
        std::path::PathBuf,
        std::path::PathBuf,
        std::thread::JoinHandle<Vec<&'static str>>,
    ) {
        use crate::proto::{self, Reply, Request, ServerFrame};
        use crate::sys::{self, Packet};
        use std::os::fd::AsFd;
        fake_daemon_granting(proto::FEATURE_WRITE_NOTICES, move |c, buf, _| {
            let _ = held.recv();
            let mut seen = Vec::new();
            loop {
                let Ok(Packet::Data { len, .. }) = sys::recv_packet(c.as_fd(), buf) else {
                    return seen;
                };
                let Ok(f) = proto::decode_request(&buf[..len]) else {
                    return seen;
                };
                match f.req {
                    Request::Wrote { key: k } if k == key => seen.push("wrote"),
                    Request::Close { key: k, .. } if k == key => {
                        seen.push("close");
                        let reply = ServerFrame::Reply {
                            id: Some(f.id),
                            result: Ok(Reply::Done),
                        };
                        let bytes = proto::encode(&reply).expect("encode");
                        sys::send_packet(c.as_fd(), &bytes, None).expect("reply");
                        return seen;
                    }
                    _ => {}
                }
            }
        })
    }

    /// A thread that pinned the attachment keeps its connection when the
    /// supervisor stores another; other threads, and it once the pin is
    /// dropped, see the new one (re-review rr41e 1).
    #[test]
    fn a_pinned_thread_keeps_its_connection_across_a_reattach() {
        let (hold1, held1) = std::sync::mpsc::channel::<()>();
        let (hold2, held2) = std::sync::mpsc::channel::<()>();
        let (dir1, path1, d1) = crate::client::tests::fake_daemon_granting(0, move |c, _, _| {
            let _ = held1.recv();
            drop(c);
        });
        let (dir2, path2, d2) = crate::client::tests::fake_daemon_granting(0, move |c, _, _| {
            let _ = held2.recv();
            drop(c);
        });
        let a = attach_t(&path1);
        let first = a.client();
        let pin = a.pin();
        let second = FilterClient::connect_frontend(
            &path2,
            Protocol::new("t").expect("protocol"),
            InstanceName::new("t").expect("instance"),
        )
        .expect("second");
        *a.shared.current.write().expect("current") = second.clone();
        assert!(a.client().same_connection(&first));
        std::thread::scope(|s| {
            s.spawn(|| assert!(a.client().same_connection(&second)));
        });
        drop(pin);
        assert!(a.client().same_connection(&second));
        drop((hold1, hold2));
        let _ = (d1.join(), d2.join());
        drop(a);
        let _ = std::fs::remove_dir_all(&dir1);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    /// A thread that pinned a connection the daemon has closed learns it
    /// is lost ([`Attachment::pinned_lost`]); a thread that pinned
    /// nothing is not told so (its calls reach the next connection).
    #[test]
    fn a_pinned_thread_learns_its_connection_is_lost() {
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (dir, path, d) = crate::client::tests::fake_daemon_granting(0, move |c, _, _| {
            let _ = held.recv();
            drop(c);
        });
        let a = attach_t(&path);
        assert!(!a.pinned_lost());
        let pin = a.pin();
        assert!(!a.pinned_lost());
        drop(hold);
        let _ = d.join();
        let t0 = std::time::Instant::now();
        while !a.pinned_lost() {
            assert!(t0.elapsed() < Duration::from_secs(10), "never lost");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::scope(|s| {
            s.spawn(|| assert!(!a.pinned_lost()));
        });
        drop(pin);
        assert!(!a.pinned_lost());
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An attachment of protocol and instance "t" to the daemon at `path`.
    fn attach_t(path: &std::path::Path) -> Attachment {
        Attachment::connect(
            path,
            Protocol::new("t").expect("protocol"),
            InstanceName::new("t").expect("instance"),
        )
        .expect("attach")
    }

    /// A write notice kept for the `write-notices` thread goes before a
    /// close of its handle, on the same socket: sent after it, filterd
    /// refused it (the handle gone) and the break was lost (re-review
    /// rr-rcache2).
    #[test]
    fn a_kept_write_notice_goes_before_its_handles_close() {
        let key = ResumeKey::new_random();
        let (_, held) = std::sync::mpsc::channel::<()>();
        let (dir, path, daemon) = notice_and_close_daemon(key, held);
        let a = attach_t(&path);
        // filterd took no notice now: kept for the write-notices thread.
        defer_wrote(&a.shared, key);
        a.close(key).expect("close");
        let seen = daemon.join().expect("daemon");
        assert_eq!(seen.first(), Some(&"wrote"), "{seen:?}");
        assert_eq!(seen.last(), Some(&"close"));
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A close whose kept write notice could not go within the call
    /// timeout is not sent either: sent, it waited for room too, and a
    /// filterd reading again before that second wait ended took the close
    /// first, refused the notice the write-notices thread sent after it
    /// (the handle gone) and the break was lost (re-review rr36). It fails
    /// as a timed-out close, and the caller's retry sends both, in order.
    #[test]
    fn a_close_whose_kept_notice_cannot_go_is_not_sent_ahead_of_it() {
        let key = ResumeKey::new_random();
        let filler = ResumeKey::new_random();
        let timeout = Duration::from_millis(300);
        // Reads nothing until told: between one call timeout and two after
        // the close began.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (dir, path, daemon) = notice_and_close_daemon(key, held);
        let a = attach_t(&path);
        a.shared
            .current
            .write()
            .expect("current")
            .set_timeout(timeout);
        let client = a.client();
        let mut sent = 0;
        while client.try_wrote(filler).expect("try") {
            sent += 1;
            assert!(sent < 1_000_000, "the socket never filled");
        }
        defer_wrote(&a.shared, key);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(timeout + timeout / 2);
            let _ = release.send(());
        });
        let t0 = Instant::now();
        let first = a.close(key);
        if first.is_err() {
            assert!(
                t0.elapsed() < timeout * 2,
                "the close waited past its timeout"
            );
            a.close(key).expect("the close tried again");
        }
        let seen = daemon.join().expect("daemon");
        releaser.join().expect("releaser");
        assert_eq!(seen, vec!["wrote", "close"], "first close: {first:?}");
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An open of the frontend's own is held (`Busy`, nothing asked) while
    /// the connection it would go to is to a restarted filterd whose
    /// reattach is not applied yet, and goes to the very connection that
    /// check was made on: a reattach stored between the two no longer
    /// sends it to the restarted filterd unchecked (re-review rr39e F7).
    #[test]
    fn an_open_goes_to_the_connection_its_resync_check_saw() {
        use crate::sys::{self, Packet};
        use std::os::fd::AsFd;
        // A live filterd: reads until its client goes.
        let (live_dir, live_path, live) = fake_daemon_granting(0, |c, buf, _| {
            while let Ok(Packet::Data { len, .. }) = sys::recv_packet(c.as_fd(), buf) {
                if len == 0 {
                    break;
                }
            }
        });
        // A filterd that goes as soon as it said hello.
        let (gone_dir, gone_path, gone) = fake_daemon_granting(0, |_, _, _| {});
        let a = attach_t(&live_path);
        let id = ClientId::new("c").expect("client id");
        let refused = |r: Result<OpenedHandle, ClientError>| matches!(r, Err(ClientError::Refused(ref e)) if e.code == ErrorCode::Busy);
        let no_open = || Err(ClientError::Disconnected);

        // Attached and synced: the open goes.
        let mut asked = false;
        let r = a.open_when_synced(&id, |_| {
            asked = true;
            no_open()
        });
        assert!(asked && !refused(r));
        // A reattach not applied yet, on a live connection: held.
        let g = a.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let r = a.open_when_synced(&id, |_| panic!("asked filterd"));
        assert!(refused(r));

        // The current connection is the dead one (the reattach not yet
        // stored): the check lets the open go, and the reattach stores the
        // live connection before the open is sent. It goes to the dead
        // one (and fails as it would), not to the restarted filterd.
        let dead = FilterClient::connect_frontend_within(
            &gone_path,
            Protocol::new("t").expect("protocol"),
            InstanceName::new("t").expect("instance"),
            0,
            None,
        )
        .expect("connect");
        gone.join().expect("gone daemon");
        let t0 = Instant::now();
        while !dead.peer_gone() {
            assert!(t0.elapsed() < Duration::from_secs(30), "never gone");
            std::thread::sleep(Duration::from_millis(5));
        }
        let live_client = std::mem::replace(&mut *a.shared.current.write().expect("current"), dead);
        let shared = Arc::clone(&a.shared);
        AFTER_RESYNC_CHECK.with(|h| {
            h.set(Some(Box::new(move || {
                *shared.current.write().expect("current") = live_client;
            })))
        });
        let mut went_to_dead = None;
        let _ = a.open_when_synced(&id, |c| {
            went_to_dead = Some(c.peer_gone());
            no_open()
        });
        assert!(a.resync_pending(), "the reattach was stored");
        assert_eq!(
            went_to_dead,
            Some(true),
            "the open went to another connection"
        );
        // The reattach applied: opens go again.
        a.resynced(g);
        assert!(!refused(a.open_when_synced(&id, |_| no_open())));
        drop(a);
        let _ = live.join();
        let _ = std::fs::remove_dir_all(&live_dir);
        let _ = std::fs::remove_dir_all(&gone_dir);
    }

    /// Issue 13 #2: the supervisor used try_send into bounded(1024) and
    /// dropped events when the frontend fell behind. Now a frontend that
    /// reads nothing for a while loses nothing it is told about: the
    /// attachment's queue and the connection's fill, the connection fails
    /// (not silently), and once the frontend reads again it gets every
    /// event that was queued, in order, then `Lost` and `Reattached`.
    #[test]
    fn a_slow_frontend_gets_every_event_then_lost_and_reattached() {
        let dir = std::env::temp_dir().join(format!("rkf-att-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s");
        let limit = u64::try_from(EVENT_QUEUE_LIMIT).expect("fits");
        // More than both queues hold together.
        let daemon = pushing_daemon(&path, 2 * limit + 10, true);
        let a = Attachment::connect(
            &path,
            Protocol::new("t").expect("protocol"),
            InstanceName::new("t").expect("instance"),
        )
        .expect("attach");
        // The frontend is busy: the connection fails once both queues fill.
        let t0 = Instant::now();
        while !a.client().is_dead() {
            assert!(t0.elapsed() < Duration::from_secs(60), "never failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(a.client().events_overflowed());
        // Now it reads: every queued event in order, then Lost, Reattached.
        let mut next = 0u64;
        let ended = loop {
            match a
                .events()
                .recv_timeout(Duration::from_secs(30))
                .expect("an event")
            {
                AttachEvent::Daemon(Event::LocksGone { file }) => {
                    assert_eq!(file.ino, next, "in order, none dropped");
                    next += 1;
                }
                other => break other,
            }
        };
        // Both queues' worth, and the one the supervisor held while it
        // waited for room; the one that did not fit failed the connection.
        assert_eq!(next, 2 * limit + 1);
        assert_eq!(ended, AttachEvent::Lost);
        let r = a
            .events()
            .recv_timeout(Duration::from_secs(30))
            .expect("reattached");
        assert!(matches!(r, AttachEvent::Reattached { .. }), "{r:?}");
        drop(a);
        let (shut, again) = daemon.join().expect("daemon");
        assert!(shut && again, "shut down, then a new hello");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
