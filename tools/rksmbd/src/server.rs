//! The SMB2 connection: NetBIOS framing, compound requests, signing,
//! credits, and the commands that are not about files — NEGOTIATE,
//! SESSION_SETUP, LOGOFF, TREE_CONNECT, TREE_DISCONNECT, ECHO, CANCEL,
//! IOCTL. File commands are in [`crate::files`].
//!
//! One thread per TCP connection owns everything of that connection
//! (sessions, trees, opens): nothing is shared between connections but
//! the filterd attachment and the read-only configuration, so a slow
//! client only ever stalls its own thread. A session bound to further
//! connections of its client (multichannel, [`crate::channels`]) stays
//! owned by the thread that set it up; the other connections hand it the
//! session's PDUs. Every open lives in filterd; rksmbd keeps nothing
//! durable.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libfilter::attach::Attachment;
use libfilter::model::{InstanceName, Protocol};

use crate::credits::Credits;
use crate::crypto::{self, Dialect, SigningAlgorithm};
use crate::files::{Ending, NotClosed, Open};
use crate::ntlm;
use crate::spnego;
use crate::users::Users;
use crate::wire::{self, status, Command, Header, Reader, WireError, Writer, HEADER_LEN};

/// Largest READ, WRITE or transaction rksmbd offers (1 MiB).
pub const MAX_IO: u32 = 1 << 20;
/// Largest NetBIOS frame accepted: one maximal WRITE and its headers.
const MAX_PDU: usize = MAX_IO as usize + 64 * 1024;
/// Most forwarded PDUs a home serves before it looks at its own socket
/// again ([`Connection::serve_inbox`]).
const INBOX_TURN: usize = 4;
/// Most PDUs a home reads from its own socket in a row while channels'
/// PDUs or notifications wait ([`Connection::poll_inputs`]): a client
/// that keeps its home socket full must not hold back what its channels
/// sent (the adversarial review of issue 14: 4,096 pipelined ECHOs on the
/// home delayed a channel's READ by 2.2 s).
const SOCKET_TURN: u32 = 16;
/// Most connections not logged on yet (no SESSION_SETUP has succeeded on
/// them): past it a new connection ends the oldest of the peer address
/// that has most ([`NotLoggedOn`]).
const MAX_NOT_LOGGED_ON: usize = 128;
/// Most connections one user may be logged on over; a SESSION_SETUP past
/// it is STATUS_REQUEST_NOT_ACCEPTED ([`PerUser`]).
const MAX_CONNECTIONS_PER_USER: usize = 256;
/// How long a frame may take to arrive once its first byte has: reads
/// follow a poll that found the socket readable, so only a client that
/// stops (or trickles) in the middle of a frame waits this long.
const FRAME_TIMEOUT: Duration = WRITE_TIMEOUT;
/// The slowest a frame's body may arrive, in bytes a second, on top of
/// [`FRAME_TIMEOUT`]: a 1 MiB WRITE gets 30 s + 128 s. With 30 s for any
/// frame, a client uploading below ~35 KB/s could never finish a
/// full-size WRITE (third adversarial review).
const FRAME_MIN_RATE: u64 = 8 * 1024;
/// Most bytes of responses one compound gathers: its later requests whose
/// responses carry data are not run and answer
/// STATUS_INSUFFICIENT_RESOURCES. Without it one
/// compound of READs held a response of any size in memory (and past
/// 16 MiB its NetBIOS length no longer fit), whatever the channel and
/// memory bounds (the adversarial review of issue 14: 8 compounds of 64
/// READs held 1 GiB).
const MAX_COMPOUND_OUT: usize = 2 * MAX_IO as usize;

/// Most connections whose last request a connection thread remembers
/// ([`Connection::last_requests`]): its own and its channels' (the least
/// recently served goes first).
const LAST_REQUESTS: usize = 64;
/// Opens one connection may hold (directory opens hold a descriptor in
/// rksmbd; file opens are also limited per client by filterd).
pub const MAX_OPENS_PER_CONNECTION: usize = 16_384;
/// Sessions one connection may hold.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 64;
/// Sessions one connection may have half made (a SESSION_SETUP answered
/// STATUS_MORE_PROCESSING_REQUIRED, or a binding under way): a client
/// logs on one session at a time, binding a channel one more. Each holds
/// the client's NTLM NEGOTIATE until its AUTHENTICATE; before this bound
/// all 64 sessions of a connection could be half made by a client that
/// never logged on (adversarial review: 120 such connections held 1 GB).
const MAX_HALF_SESSIONS_PER_CONNECTION: usize = 4;
/// The longest security blob a SESSION_SETUP may carry. Only NTLMSSP is
/// offered: its AUTHENTICATE, the largest leg, is a few hundred bytes
/// plus the target info and names, well under this; a longer blob (a
/// Kerberos ticket, which would be refused anyway) is
/// STATUS_INVALID_PARAMETER before it is decoded.
const MAX_SECURITY_BLOB: usize = 16 * 1024;
/// How long a connection may stay without a logged-on session before it
/// is ended, unless `--logon-timeout` says otherwise: a client logs on
/// right after NEGOTIATE, and one that never does held a slot (and its
/// half-made sessions) for as long as it liked.
pub const LOGON_TIMEOUT: Duration = Duration::from_secs(60);
/// Tree connects one session may hold.
const MAX_TREES_PER_SESSION: usize = 64;
/// How deeply requests served while another waits may nest.
const MAX_PUMP_DEPTH: u8 = 4;
/// How long a reply may take to write before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Capability bits (MS-SMB2 2.2.4).
const CAP_LEASING: u32 = 0x2;
const CAP_LARGE_MTU: u32 = 0x4;
const CAP_MULTI_CHANNEL: u32 = 0x8;
const CAP_PERSISTENT_HANDLES: u32 = 0x10;
/// Share capability: continuously available.
const SHARE_CAP_CONTINUOUS_AVAILABILITY: u32 = 0x10;
/// Security mode bits.
const SIGNING_ENABLED: u16 = 0x1;
const SIGNING_REQUIRED: u16 = 0x2;

/// FSCTL codes.
const FSCTL_VALIDATE_NEGOTIATE_INFO: u32 = 0x0014_0204;
const FSCTL_DFS_GET_REFERRALS: u32 = 0x0006_0194;
const FSCTL_DFS_GET_REFERRALS_EX: u32 = 0x0006_01B0;
const FSCTL_CREATE_OR_GET_OBJECT_ID: u32 = 0x0009_00C0;
const FSCTL_QUERY_NETWORK_INTERFACE_INFO: u32 = 0x0014_01FC;
/// SESSION_SETUP request flag: bind an existing session (2.2.5).
const SESSION_FLAG_BINDING: u8 = 0x01;
/// Channels one session may have besides its home connection (32 in
/// all, as Windows and Samba allow).
const MAX_CHANNELS_PER_SESSION: usize = 31;
const FSCTL_LMR_REQUEST_RESILIENCY: u32 = 0x0014_01D4;
const FSCTL_SRV_REQUEST_RESUME_KEY: u32 = 0x0014_0078;
const FSCTL_GET_COMPRESSION: u32 = 0x0009_003C;
const FSCTL_SET_COMPRESSION: u32 = 0x0009_C040;
const FSCTL_SRV_COPYCHUNK: u32 = 0x0014_40F2;
const FSCTL_SRV_COPYCHUNK_WRITE: u32 = 0x0014_80F2;

/// What rksmbd serves, fixed at start.
pub struct Config {
    /// The one share's name.
    pub share: String,
    /// The accounts that may log on.
    pub users: Users,
    /// The name rksmbd gives itself in NTLM.
    pub server_name: String,
    /// How long a connection may go without a logged-on session
    /// ([`LOGON_TIMEOUT`] by default).
    pub logon_timeout: Duration,
    /// How far ahead a logon may be queued for its turn after failed
    /// logons of its user and address (`--logon-queue`): one further
    /// ahead is refused unchecked ([`crate::logons`]).
    pub logon_queue: Duration,
}

/// The ServerGuid of the rksmbd serving frontend instance `instance`:
/// a name-based UUID (RFC 9562 version 8, SHA-256 of a fixed label and
/// the name, as RFC 9562 B.2 shows), so that every rksmbd of one
/// instance — restarted, or on another node after a failover — is the
/// same server to its clients, and two instances are not. It is also the
/// BirthVolumeId of FSCTL_GET_OBJECT_ID and part of copy-chunk resume
/// keys. Before (review rvnode, finding 3) it was drawn at random per
/// process: after a failover to node B (or a restart) clients saw a
/// new server.
pub fn server_guid_of(instance: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"rksmbd ServerGuid\0")
        .chain_update(instance.as_bytes())
        .finalize();
    let mut g = [0u8; 16];
    g.copy_from_slice(&digest[..16]);
    g[6] = (g[6] & 0x0F) | 0x80; // version 8
    g[8] = (g[8] & 0x3F) | 0x80; // the RFC variant
    g
}

/// What every connection shares: the filterd attachment, the export root
/// (for directories, see [`crate::files`]) and the configuration.
pub struct Shared {
    /// The filterd attachment every open goes through.
    pub filter: Attachment,
    /// The export root, as filterd reports it, opened `O_PATH`.
    pub root: OwnedFd,
    /// The configuration.
    pub config: Config,
    /// This server's GUID.
    pub server_guid: [u8; 16],
    /// The client connections, let go of when filterd steps down.
    pub clients: Arc<shimline::ClientGate>,
    /// Lease holders and connection writers, for lease breaks.
    pub notifier: crate::breaks::Notifier,
    /// Leases with a break in progress.
    pub breaking: crate::breaking::BreaksInProgress,
    /// Sessions, app instances and durable v2 FileIds across connections.
    pub registry: crate::sessions::Registry,
    /// Files and directories an open marked delete-on-close, which
    /// QUERY_DIRECTORY does not list.
    pub delete_pending: crate::files::DeletePending,
    /// Directory opens' share modes, across connections.
    pub dir_shares: Arc<crate::dirshare::DirShares>,
    /// The descriptors opens hold, capped below the descriptor limit
    /// ([`opens_allowed`]): a CREATE past it is
    /// STATUS_INSUFFICIENT_RESOURCES.
    pub fds: Arc<shimline::descriptors::Descriptors>,
    /// Handles of forgotten opens whose close filterd never answered.
    pub unsettled: crate::settle::Unsettled,
    /// The persistent FileIds of those handles' opens, for a reconnect
    /// naming one on any connection ([`crate::settle::SettlingFileIds`]).
    pub settling_ids: crate::settle::SettlingFileIds,
    /// The `unanswered-closer` thread's queue: the opens of unanswered
    /// CREATEs a LOGOFF or a takeover closes ([`crate::unanswered`]).
    pub closer: crate::unanswered::Closer,
    /// Replays answered here without filterd (a non-durable open's lock
    /// sequence, a pending LOCK replayed), told to filterd every
    /// [`REPLAY_REPORT_EVERY`] for `replays_detected`.
    pub replays: libfilter::client::ReplayCounter,
    /// Connections not logged on yet.
    not_logged_on: NotLoggedOn,
    /// Connections logged on, per user.
    per_user: PerUser,
    /// Opens held, per user: each user's share of [`Shared::fds`].
    pub user_opens: Arc<UserOpens>,
    /// Failed logons, by peer address and user.
    logon_failures: crate::logons::Failures,
    next_session: AtomicU64,
}

/// Connections no SESSION_SETUP has succeeded on yet, oldest first: at
/// most [`MAX_NOT_LOGGED_ON`]; a new one past that ends the oldest of the
/// peer address that has most (a client opening many connections at once
/// from one address — 32 in rkbench — is never cut short while the table
/// has room). The connection caps count every connection alike, so
/// before this clients that connected and sent nothing (or half a frame)
/// held every slot for as long as they liked and everyone else was
/// refused (adversarial review of issue 14: 1,024 stalled connections
/// from four addresses). Ending simply the oldest let connections from
/// one address end others' logons under way (3,000 a second ended every
/// logon that took 200 ms, second review); now a flooding peer ends its
/// own. A client with c connections not logged on can still be cut short
/// by a peer spread over about 128 / c addresses (docs/smb3.md).
#[derive(Default)]
struct NotLoggedOn(Mutex<std::collections::VecDeque<Waiting>>);

/// A connection not logged on yet: its number, peer address and socket.
type Waiting = (u64, Option<std::net::IpAddr>, TcpStream);

impl NotLoggedOn {
    /// Connection `conn` from `peer` arrived: counted in, ending another
    /// past the bound (shut down: its thread's read ends).
    fn arrived(&self, conn: u64, peer: Option<std::net::IpAddr>, stream: &TcpStream) {
        let Ok(mut l) = self.0.lock() else { return };
        let count = |l: &std::collections::VecDeque<Waiting>, ip: Option<std::net::IpAddr>| {
            l.iter().filter(|(_, p, _)| *p == ip).count()
        };
        let victim = if l.len() >= MAX_NOT_LOGGED_ON {
            l.iter().map(|(_, p, _)| *p).max_by_key(|p| count(&l, *p))
        } else {
            None
        };
        if let Some(ip) = victim {
            if let Some(i) = l.iter().position(|(_, p, _)| *p == ip) {
                if let Some((old, _, s)) = l.remove(i) {
                    tracing::info!(conn = old, "ending a connection that did not log on");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        if let Ok(s) = stream.try_clone() {
            l.push_back((conn, peer, s));
        }
    }

    /// Connection `conn` logged on or ended.
    fn left(&self, conn: u64) {
        if let Ok(mut l) = self.0.lock() {
            l.retain(|(c, _, _)| *c != conn);
        }
    }
}

/// Connections logged on, per user: at most [`MAX_CONNECTIONS_PER_USER`].
/// Before, one account's idle connections could take every slot of the
/// connection caps and lock every other user out (second adversarial
/// review of issue 14: 4 addresses × 256).
#[derive(Default)]
struct PerUser(Mutex<HashMap<String, usize>>);

impl PerUser {
    /// One more connection of `user`, unless it has the most already.
    fn add(&self, user: &str) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        let n = m.entry(user.to_owned()).or_default();
        if *n >= MAX_CONNECTIONS_PER_USER {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection of `user` ended.
    fn remove(&self, user: &str) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(n) = m.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(user);
                }
            }
        }
    }
}

/// The fewest opens a user may hold ([`UserOpens::share`]), unless the
/// cap itself is smaller.
const MIN_OPENS_PER_USER: usize = 64;

/// Opens held per user, across that user's connections (as [`PerUser`]
/// counts connections): a user holds at most a quarter of the open cap
/// ([`Shared::fds`]), or [`MIN_OPENS_PER_USER`] where that is more, and a
/// CREATE past it is STATUS_INSUFFICIENT_RESOURCES for that user only.
/// Before (review), the cap was server-wide and one user's directory opens
/// (which filterd never sees) took all of it: under a descriptor limit of
/// 512, 320 opens of one directory, and every other user's CREATE was
/// refused.
#[derive(Default)]
pub struct UserOpens(Mutex<HashMap<String, usize>>);

impl UserOpens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The opens one user may hold under a cap of `cap`.
    pub fn share(cap: usize) -> usize {
        (cap / 4).max(MIN_OPENS_PER_USER.min(cap))
    }

    /// Whether `user` holds its share of `cap` already.
    pub fn full(&self, user: &str, cap: usize) -> bool {
        self.lock()
            .get(user)
            .is_some_and(|n| *n >= Self::share(cap))
    }

    /// One more open of `user`, counted until the slot is dropped (even
    /// past its share: the open is made; a CREATE checks before).
    pub fn count(self: &Arc<Self>, user: &str) -> UserSlot {
        *self.lock().entry(user.to_owned()).or_default() += 1;
        UserSlot {
            opens: self.clone(),
            user: user.to_owned(),
        }
    }
}

/// An open's counts: its descriptor under the open cap, itself under its
/// user's share ([`UserOpens`]); each given back when this is dropped,
/// or handed over for the open's reconnect
/// ([`crate::sessions::Registry::hand_over`]).
pub struct OpenSlots {
    pub fd: shimline::descriptors::DescriptorSlot,
    pub user: Option<UserSlot>,
}

/// The counts a CREATE took at the caps' check for the open it makes
/// (`create::over_open_caps`): a descriptor slot, and with one a lost
/// connection left for the open's reconnect
/// ([`crate::sessions::Registry::hand_over`]) that open's count under its
/// user, which the user's share is then not asked again for.
pub struct CreateSlot {
    /// Under the descriptor cap.
    pub fd: shimline::descriptors::DescriptorSlot,
    /// Under the user's share, when handed over with `fd`.
    pub user: Option<UserSlot>,
    /// Taken from those left for a reconnect: the open's create GUID,
    /// filterd handle and the deadline, to leave it for the reconnect
    /// again should this CREATE end without an open
    /// ([`crate::sessions::Registry::put_back`]).
    pub handed: Option<(uuid::Uuid, libfilter::model::ResumeKey, std::time::Instant)>,
}

/// One open counted in [`UserOpens`] until this is dropped.
pub struct UserSlot {
    opens: Arc<UserOpens>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self.opens.lock();
        if let Some(n) = m.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// Most connections served at once (and from one address), as the shims
/// have them.
const MAX_CONNECTIONS: usize = 1024;
const MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Descriptors a connection may hold: its socket, the writer's clone, one
/// while it is not logged on ([`NotLoggedOn`]) and its channel outbox's.
const DESCRIPTORS_PER_CONNECTION: usize = 4;

/// How many descriptors rksmbd's opens (files and directories) may hold,
/// the descriptor limit raised first to the hard limit
/// ([`shimline::descriptors::opens_allowed`]). Before review wB there was
/// no cap: one client's opens filled the table (under a limit of 128,
/// 117 opens), its next CREATEs failed STATUS_INTERNAL_ERROR (EMFILE),
/// every other client's connection was closed as it came (no descriptor
/// for its writer) and filterd could not be reattached; and the soft
/// limit (often 1,024) was never raised.
fn opens_allowed() -> usize {
    shimline::descriptors::opens_allowed(MAX_CONNECTIONS * DESCRIPTORS_PER_CONNECTION)
}

/// What rksmbd asks filterd for beyond the attachment's own: directory
/// renames that know the handles below them, reconnects checked against
/// the open's user, time-ordered resume keys (the persistent FileId
/// takes the half of a key that differs: `create::persistent_id`), and
/// its own count of the replays it answers without filterd
/// ([`Shared::replays`]). The only records rksmbd looks up are its
/// handles' records of how they were made ([`crate::made`]), no replays:
/// the bit keeps those lookups from being counted as replays, and its
/// create-GUID and durable lock-sequence replays go through filterd and
/// are counted there. And reconnects that filterd checks against the
/// open's FileId, lease key and persistence before it resumes anything
/// (`create::reconnect_match`, re-review rr39e F4). And replays that
/// only resume, for a replayed CREATE let past the caps of opens
/// (`OpenRequest::resume_only`, re-review rr46e F1).
const FEATURES: u64 = libfilter::proto::FEATURE_RENAME_DIRECTORY
    | libfilter::proto::FEATURE_RESUME_OWNER
    | libfilter::proto::FEATURE_RESUME_MATCH
    | libfilter::proto::FEATURE_TIME_ORDERED_KEYS
    | libfilter::proto::FEATURE_REPLAY_REPORTS
    | libfilter::proto::FEATURE_WRITE_NOTICES
    | libfilter::proto::FEATURE_STEP_DOWN
    | libfilter::proto::FEATURE_RESUME_ONLY;

/// How often the replays rksmbd answered itself are told to filterd.
const REPLAY_REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Attaches to filterd, listens, serves forever.
pub fn run(filter: &Path, listen: &str, instance: &str, config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let attach = Attachment::connect_patiently(
        filter,
        Protocol::new(libfilter::lease::MSFSA_PROTOCOL)?,
        InstanceName::new(instance)?,
        FEATURES,
        shimline::cli::filterd_start_wait(),
        &mut shimline::cli::say_waiting_for_filterd(
            "rksmbd",
            filter,
            shimline::cli::filterd_start_wait(),
        ),
    )
    .context("attaching to filterd")?;
    let shared = start(attach, instance, config)?;
    let listener = shimline::announce(listen).with_context(|| format!("listening on {listen}"))?;
    // Connection caps as the shims have them. The refusal shimline writes
    // is a JSON line, which an SMB client reads as a broken reply and
    // drops — a refusal all the same.
    let cfg = shimline::Listen {
        prefix: "rksmbd",
        id_field: "mid",
        busy_status: "STATUS_INSUFFICIENT_RESOURCES",
        max_connections: MAX_CONNECTIONS,
        max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
    };
    let gate = shared.clients.clone();
    shimline::accept_forever_gated(listener, cfg, gate, move |conn, stream| {
        let mut c = Connection::new(shared.clone(), conn);
        c.serve(stream);
        c.lost();
    });
    Ok(())
}

/// What the connections of an attachment share, with the threads that
/// forward filterd's events and settle unanswered closes running.
fn start(attach: Attachment, instance: &str, config: Config) -> anyhow::Result<Arc<Shared>> {
    use anyhow::Context;
    let logon_failures = crate::logons::Failures::new(config.logon_queue);
    let root = crate::files::open_root(&attach).context("opening the export root")?;
    let (closer, closing) = crate::unanswered::Closer::new();
    let shared = Arc::new(Shared {
        filter: attach,
        root,
        config,
        server_guid: server_guid_of(instance),
        clients: Arc::default(),
        notifier: crate::breaks::Notifier::default(),
        breaking: crate::breaking::BreaksInProgress::default(),
        registry: crate::sessions::Registry::default(),
        delete_pending: crate::files::DeletePending::default(),
        dir_shares: Arc::default(),
        fds: shimline::descriptors::Descriptors::new(opens_allowed()),
        unsettled: crate::settle::Unsettled::default(),
        settling_ids: crate::settle::SettlingFileIds::default(),
        closer,
        replays: libfilter::client::ReplayCounter::default(),
        not_logged_on: NotLoggedOn::default(),
        per_user: PerUser::default(),
        user_opens: Arc::default(),
        logon_failures,
        next_session: AtomicU64::new(u64::from(u32::from_le_bytes(ntlm::random_bytes())) << 32 | 1),
    });
    let events = shared.clone();
    std::thread::Builder::new()
        .name("filter-events".into())
        .spawn(move || crate::breaks::forward(events))?;
    let settling = shared.clone();
    std::thread::Builder::new()
        .name("close-settler".into())
        .spawn(move || crate::settle::run(settling))?;
    // Only a weak reference, as below: the thread ends once the server
    // is dropped (and with it the closer's sender).
    let closing_for = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("unanswered-closer".into())
        .spawn(move || closing.run(&closing_for))?;
    // Only a weak reference: the thread ends once the server is dropped
    // (the fuzz harness drops it).
    let reporting = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("replay-reports".into())
        .spawn(move || loop {
            std::thread::sleep(REPLAY_REPORT_EVERY);
            let Some(sh) = reporting.upgrade() else {
                return;
            };
            sh.replays.flush(&sh.filter.client());
        })?;
    Ok(shared)
}

/// rksmbd's request handling without its sockets, for the fuzz targets
/// (fuzz/fuzz_targets/smb2_requests.rs): a connection is fed the bytes a
/// client would send and answers them through the very code the read
/// loop runs — transport framing, the compound chain, every header and
/// command body, CREATE contexts, SPNEGO and NTLMSSP — against a live
/// filterd. Nothing here changes how rksmbd serves.
pub struct Harness(Arc<Shared>, AtomicU64);

impl Harness {
    /// Attaches to filterd at `filter` as instance `instance`.
    pub fn attach(filter: &Path, instance: &str, config: Config) -> anyhow::Result<Harness> {
        let attach = Attachment::connect_with(
            filter,
            Protocol::new(libfilter::lease::MSFSA_PROTOCOL)?,
            InstanceName::new(instance)?,
            FEATURES,
        )?;
        Ok(Harness(start(attach, instance, config)?, AtomicU64::new(1)))
    }

    /// A fresh connection; dropping it is losing it (its opens go).
    pub fn connection(&self) -> HarnessConnection {
        HarnessConnection(Connection::new(
            self.0.clone(),
            self.1.fetch_add(1, Ordering::Relaxed),
        ))
    }
}

/// A connection of a [`Harness`].
pub struct HarnessConnection(Connection);

impl HarnessConnection {
    /// Answers `stream` as the read loop would have read it from the
    /// socket: the responses, up to the frame that ends the connection
    /// (a bad transport header, a truncated frame, or a PDU whose answer
    /// is `Err`), which is then `Err`.
    pub fn frames(&mut self, mut stream: &[u8]) -> Vec<Result<Vec<u8>, WireError>> {
        let mut out = Vec::new();
        while let Some((head, rest)) = stream.split_first_chunk::<4>() {
            let n = match wire::frame(*head, MAX_PDU) {
                wire::Frame::KeepAlive => {
                    stream = rest;
                    continue;
                }
                wire::Frame::Pdu(n) => n,
                wire::Frame::Bad => {
                    out.push(Err(WireError::Bad("transport header")));
                    break;
                }
            };
            let Some((pdu, rest)) = rest.split_at_checked(n) else {
                out.push(Err(WireError::Truncated("frame")));
                break;
            };
            let answer = self.0.handle_pdu(pdu);
            let end = answer.is_err();
            out.push(answer);
            self.0.after_pdu();
            if end {
                break;
            }
            stream = rest;
        }
        out
    }

    /// After a NEGOTIATE: a session logged on as `user` (unsigned, as an
    /// SMB 2 session that did not ask for signing) with a tree connected,
    /// as SESSION_SETUP and TREE_CONNECT leave them — so that fuzzed
    /// requests reach the command bodies without an NTLM exchange.
    /// Returns the session and tree ids. It skips authentication, so it
    /// exists only in builds with the `fuzzing` feature (the fuzz crate's).
    #[cfg(feature = "fuzzing")]
    pub fn log_on(&mut self, user: &str) -> (u64, u32) {
        let c = &mut self.0;
        let id = c.sh.next_session.fetch_add(1, Ordering::Relaxed);
        let tree = c.next_tree;
        c.next_tree += 1;
        let mut s = Session::new(c.preauth, None);
        s.user = Some(user.to_owned());
        s.trees.push(tree);
        s.link = Some(c.sh.registry.logged_on(id, user));
        c.sessions.insert(id, s);
        c.sh.notifier
            .logged_on(c.id, (id, user), |s| c.session_lives(s));
        (id, tree)
    }
}

impl Drop for HarnessConnection {
    fn drop(&mut self) {
        self.0.lost();
    }
}

/// Tests only (debug builds): `$RKSMBD_TEST_BINDING_DELAY_MS` holds a
/// binding between its success and [`crate::breaks::Notifier::logged_on`],
/// so that its session can end meanwhile (tests/smb3/binding_ended_meanwhile.py).
fn test_delay_before_a_binding_is_written_down() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::create::test_delay(
        &DELAY,
        "RKSMBD_TEST_BINDING_DELAY_MS",
        "a binding is held before it is written down",
    );
}

/// Fills `buf` from `stream` by `deadline`; None when the peer closed,
/// failed or was too slow. The socket's read timeout is FRAME_TIMEOUT;
/// only after a short read is it cut to what is left (and put back).
fn read_within(mut stream: &TcpStream, buf: &mut [u8], deadline: std::time::Instant) -> Option<()> {
    let mut got = 0;
    let mut cut = false;
    while got < buf.len() {
        match stream.read(buf.get_mut(got..)?) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if got < buf.len() {
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| !d.is_zero())?;
            stream.set_read_timeout(Some(left)).ok()?;
            cut = true;
        }
    }
    if cut {
        let _ = stream.set_read_timeout(Some(FRAME_TIMEOUT));
    }
    Some(())
}

/// Writes one PDU, framed, to a socket shared by several writers (whole
/// frames under its lock); false when it could not, or when the PDU is too
/// long for the 24-bit length of a NetBIOS session message.
pub(crate) fn write_frame(wr: &crate::breaks::ConnWriter, pdu: &[u8]) -> bool {
    let Some(n) = u32::try_from(pdu.len()).ok().filter(|n| *n <= 0x00FF_FFFF) else {
        return false;
    };
    let mut frame = n.to_be_bytes().to_vec();
    frame.extend_from_slice(pdu);
    write_whole(wr, &frame)
}

/// Writes `frame` whole under the writer's lock. A write that fails —
/// [`WRITE_TIMEOUT`] passed with the client not reading — may have sent
/// part of the frame, after which nothing the stream carries parses: the
/// connection is shut down, so its reader ends it (its durable handles
/// wait for a reconnect) and every other writer fails at once instead of
/// waiting out its own timeout behind the stalled client.
/// The timeout bounds the whole frame, not each system call: a client
/// that reads a little now and then (each `write` making progress within
/// the socket's timeout) held the lock — and every writer behind it —
/// for as long as it liked (review B-2).
pub(crate) fn write_whole(wr: &crate::breaks::ConnWriter, frame: &[u8]) -> bool {
    let Ok(mut w) = wr.lock() else {
        return false;
    };
    match write_by(&mut w, frame, Instant::now() + WRITE_TIMEOUT) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "a write failed: shutting the connection down");
            let _ = w.shutdown(std::net::Shutdown::Both);
            false
        }
    }
}

/// Writes `frame` whole before `deadline`: after a partial write the
/// socket's timeout is cut to what is left (and set back after).
fn write_by(w: &mut TcpStream, frame: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut rest = frame;
    let mut shortened = false;
    let result = loop {
        if rest.is_empty() {
            break Ok(());
        }
        match w.write(rest) {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
        if rest.is_empty() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(std::io::ErrorKind::TimedOut.into());
        }
        if w.set_write_timeout(Some(left)).is_err() {
            break Err(std::io::ErrorKind::TimedOut.into());
        }
        shortened = true;
    };
    if shortened {
        let _ = w.set_write_timeout(Some(WRITE_TIMEOUT));
    }
    result
}

/// How long [`linger_close`] reads what a client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Ends a connection so that the replies written reach the client: its
/// end of the stream (FIN) goes after them, then what the client still
/// sends is read and dropped, for at most [`LINGER`]. Shut down at once
/// with the client's next requests unread, the socket was reset, and a
/// reset makes the client drop what it had not read yet: a pipelining
/// client never saw its last STATUS_LOGON_FAILURE (review).
fn linger_close(s: &TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let until = Instant::now()
        .checked_add(LINGER)
        .unwrap_or_else(Instant::now);
    let mut reader = s;
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || reader.set_read_timeout(Some(left)).is_err() {
            break;
        }
        if !matches!(reader.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Read);
}

/// Shuts a connection down (its reader ends it; every writer fails at
/// once), once the write in progress, if any, returned.
pub(crate) fn shut_down(wr: &crate::breaks::ConnWriter) {
    if let Ok(w) = wr.lock() {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

/// What the client said in NEGOTIATE, for FSCTL_VALIDATE_NEGOTIATE_INFO.
#[derive(Debug, Clone, Default)]
pub struct ClientNegotiate {
    capabilities: u32,
    guid: [u8; 16],
    security_mode: u16,
    dialects: Vec<u16>,
}

/// A session on this connection.
pub struct Session {
    /// The logged-on user, once authenticated.
    pub user: Option<String>,
    signing_key: Option<[u8; 16]>,
    signing_required: bool,
    preauth: [u8; 64],
    /// Between CHALLENGE and AUTHENTICATE: the NTLM state (which holds
    /// the client's NEGOTIATE, for the MIC) and the SPNEGO mechTypes of
    /// the first leg (for the mechListMIC) — not the whole first token,
    /// which was a second copy of the NEGOTIATE.
    pending: Option<(ntlm::Pending, Option<Vec<u8>>)>,
    /// Tree ids connected in this session.
    pub trees: Vec<u32>,
    /// Its filterd handles as other connections see them, once logged on.
    pub link: Option<Arc<crate::sessions::Link>>,
    /// On a channel (a connection that bound the session of another,
    /// multichannel): where the session lives; its requests go there.
    bound: Option<Arc<crate::channels::Home>>,
}

impl Session {
    /// A session being set up, its preauth hash starting from the
    /// connection's; `bound` for a channel's binding.
    fn new(preauth: [u8; 64], bound: Option<Arc<crate::channels::Home>>) -> Session {
        Session {
            user: None,
            signing_key: None,
            signing_required: false,
            preauth,
            pending: None,
            trees: Vec::new(),
            link: None,
            bound,
        }
    }
}

/// A handler's success: body and status (which may be a warning such as
/// STATUS_BUFFER_OVERFLOW, or MORE_PROCESSING_REQUIRED).
pub struct Reply {
    /// Status in the header.
    pub status: u32,
    /// The response body after the header.
    pub body: Vec<u8>,
    /// The file a related request after this one refers to (CREATE).
    pub file: Option<u64>,
    /// A session id for the header other than the request's (the first
    /// SESSION_SETUP).
    pub session_id: Option<u64>,
    /// A tree id for the header other than the request's (TREE_CONNECT).
    pub tree_id: Option<u32>,
}

impl Reply {
    /// A success.
    pub fn ok(body: Vec<u8>) -> Reply {
        Reply::with_status(status::SUCCESS, body)
    }
    /// A reply with a (success or warning) status.
    pub fn with_status(status: u32, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            file: None,
            session_id: None,
            tree_id: None,
        }
    }
}

/// A handler's outcome; `Err` holds the NTSTATUS of an error response.
pub type Outcome = Result<Reply, u32>;

impl From<WireError> for u32 {
    fn from(_: WireError) -> u32 {
        status::INVALID_PARAMETER
    }
}

/// One request of a (possibly compound) PDU.
pub struct Request<'a> {
    /// Its header, with related ids already resolved.
    pub hdr: Header,
    /// The whole message, header included (offsets count from its start).
    pub msg: &'a [u8],
    /// The body after the header.
    pub body: &'a [u8],
}

/// A connection's state.
pub struct Connection {
    /// What all connections share.
    pub sh: Arc<Shared>,
    /// The connection's number (for logs and thread names).
    pub id: u64,
    dialect: Option<Dialect>,
    signing: SigningAlgorithm,
    preauth: [u8; 64],
    client: ClientNegotiate,
    security_mode: u16,
    /// Sessions by id.
    pub sessions: HashMap<u64, Session>,
    /// Opens by volatile file id.
    pub opens: HashMap<u64, Open>,
    /// Opens whose CLOSE filterd never answered, by volatile file id: a
    /// retried CLOSE is answered STATUS_FILE_NOT_AVAILABLE again while
    /// the handle settles ([`crate::settle`]), so the client keeps its
    /// open — to reconnect and close it through a replacement rksmbd,
    /// should this one die first (rvchaos 1: it was FILE_CLOSED, the
    /// client forgot the open, and the handle stayed for its timeout).
    pub settling: HashMap<u64, crate::settle::Settling>,
    next_file: u64,
    next_tree: u32,
    /// The client's GUID (from NEGOTIATE), the filterd client identity.
    pub client_guid: uuid::Uuid,
    /// Set when the connection must end after this PDU.
    terminate: bool,
    /// The socket (reader, and the writer shared with lease breaks) while
    /// the connection is served.
    io: Option<(Arc<TcpStream>, crate::breaks::ConnWriter)>,
    /// How deep [`Connection::pump`] calls are nested.
    pump_depth: u8,
    /// A pump found the client gone and told the registry so
    /// ([`crate::sessions::Registry::client_gone`]).
    gone_noted: bool,
    /// The message ids the client may use, and so its credits.
    credits: Credits,
    /// Blocking locks answered STATUS_PENDING, still waiting.
    pub waiting: crate::lock::WaitingLocks,
    /// CREATEs answered STATUS_PENDING, waiting for lease breaks.
    pub pending_creates: crate::create::PendingCreates,
    /// The descriptor slot the CREATE being served took when it was let
    /// past the cap (`create::over_open_caps`), for the open it makes
    /// ([`Connection::add_open`]); given back when that CREATE ends
    /// without one.
    pub open_slot: Option<CreateSlot>,
    /// CHANGE_NOTIFY requests answered STATUS_PENDING.
    pub notify: crate::notify::Watches,
    /// The last AsyncId handed out on this connection.
    next_async: u64,
    /// The AsyncId of a request that went async in the request being
    /// answered, for its interim response.
    queued_async: Option<u64>,
    /// How the response of the request whose command is running is
    /// signed: [`Connection::go_async`] gives it to the final response of
    /// a request that goes async, whatever the command (before, each kind
    /// of waiting request had it set after the fact, and CHANGE_NOTIFY's
    /// never was: its completions went unsigned, review rr38c).
    request_signing: Option<(SigningAlgorithm, [u8; 16])>,
    /// Where channels of this connection's sessions hand their PDUs, and
    /// the end that wakes this thread (none when no socket pair could be
    /// made: the sessions then cannot be bound).
    inbox: Option<(Arc<crate::channels::Inbox>, std::os::unix::net::UnixStream)>,
    /// While a channel's PDU is answered: the channel's connection number,
    /// the session bound there, and the channel's signing algorithm and
    /// key.
    via: Option<ViaNow>,
    /// What [`Connection::serve_forwarded`] swapped out, innermost last:
    /// the entry without `via` is this connection's own state, which a PDU
    /// from its own socket served meanwhile ([`Connection::pump`]) runs
    /// with.
    outer: Vec<PerConn>,
    /// The outboxes of channels whose requests went async here, for their
    /// final responses (weak: the channel's thread owns its outbox).
    channel_writers: HashMap<u64, std::sync::Weak<crate::channels::Outbox>>,
    /// When this connection is a channel: where its home threads queue
    /// the answers for its socket.
    outbox: Option<Arc<crate::channels::Outbox>>,
    /// When this connection is a channel: the credits its homes granted
    /// for its PDUs, not yet added to [`Connection::credits`].
    granted: Arc<AtomicU64>,
    /// PDUs read from the socket in a row while something else was ready
    /// too (see [`SOCKET_TURN`]).
    socket_streak: u32,
    /// Whether channels' PDUs were served after the last poll that found
    /// them and a notification ready (they take turns).
    inbox_went_last: bool,
    /// Whether a wake-up of the inbox was taken since the connection last
    /// settled what other connections released of its sessions
    /// ([`Connection::settle_elsewhere`], in [`Connection::after_pdu`]).
    /// Latched: a wake-up taken by a request that pumps
    /// ([`Connection::pump`]) is settled once that request ends — it
    /// cannot be settled there, under the request, and used up unlatched
    /// it was lost: the connection kept the descriptors of an ended
    /// session's opens, their slots handed over, until its client's next
    /// request (re-review rr48a F1).
    settle_due: bool,
    /// Whether the last poll's turn went to notifications ahead of the
    /// socket (see `poll_inputs`).
    notify_went_first: bool,
    /// Counted among the connections not logged on yet
    /// ([`NotLoggedOn`]).
    not_logged_on: bool,
    /// When the connection is ended unless a session has logged on by
    /// then ([`Config::logon_timeout`]).
    logon_by: Option<Instant>,
    /// The client's address.
    peer: Option<std::net::IpAddr>,
    /// The client's address and port (logged when its socket ends).
    remote: Option<std::net::SocketAddr>,
    /// Logons failed on this connection (passwords checked; refusals
    /// unchecked are not counted): at
    /// [`crate::logons::MAX_FAILURES_PER_CONNECTION`] it is ended, unless
    /// a session is logged on over it (other users' sessions share a
    /// connection: a terminal server's, a cifs `multiuser` mount's).
    logon_failures: u32,
    /// AUTHENTICATE legs waiting for their turns ([`crate::logons`]):
    /// when each is due, and the PDU. They wait here, answered by
    /// [`Connection::next_input`] when due, never in a sleep of this
    /// thread, which serves the connection's other sessions meanwhile.
    deferred_logons: Vec<DeferredLogon>,
    /// Whether the PDU being answered used its message ids already: a
    /// deferred AUTHENTICATE leg's, used when it was deferred.
    ids_taken: bool,
    /// The last request (not a CANCEL, not a SESSION_SETUP) run from each
    /// connection (this one, and each channel whose PDUs it serves), at
    /// most [`LAST_REQUESTS`]: the connection, its session and its
    /// MessageId. A synchronous CANCEL with MessageId 0 may name it (see
    /// [`Connection::cancel_named`]). One slot for all of them let a
    /// channel's request, or the home's, overwrite another connection's
    /// (re-review rr39g A2).
    last_requests: std::collections::VecDeque<(u64, u64, u64)>,
    /// The turn taken for the AUTHENTICATE leg being answered, when it
    /// was taken before the leg ran (a deferred leg: [`Turn::Now`]).
    ///
    /// [`Turn::Now`]: crate::logons::Turn::Now
    logon_turn: Option<crate::logons::Turn>,
    /// The users logged on over this connection, each counted once in
    /// [`PerUser`].
    users_counted: Vec<String>,
}

/// The channel a forwarded PDU came on (see [`crate::channels`]).
#[derive(Debug, Clone, Copy)]
struct ViaNow {
    conn: u64,
    /// The only session its messages may act on.
    session: u64,
    sign: (SigningAlgorithm, [u8; 16]),
}

/// What differs between a connection's own PDUs and a channel's it
/// answers: where they came from, the client's credits on that socket,
/// and what the client said in that socket's NEGOTIATE.
#[derive(Debug, Default)]
struct PerConn {
    via: Option<ViaNow>,
    credits: Credits,
    client: ClientNegotiate,
}

/// What a connection thread serves next.
enum Input {
    /// A PDU from its own socket.
    Pdu(Vec<u8>),
    /// A deferred AUTHENTICATE leg whose turn came.
    Logon(DeferredLogon),
    /// PDUs channels queued in its inbox.
    Inbox,
    /// Its socket is gone.
    Gone,
}

/// An AUTHENTICATE leg waiting for its turn ([`crate::logons`]).
struct DeferredLogon {
    /// Its turn: when it is answered.
    due: Instant,
    pdu: Vec<u8>,
    /// The user it names, whose turn it holds.
    user: String,
}

/// A frame [`Connection::read_frame`] read.
enum Received {
    /// An SMB2 PDU.
    Pdu(Vec<u8>),
    /// A NetBIOS session keep-alive (RFC 1002 4.3.7): nothing to answer.
    KeepAlive,
}

/// What [`Connection::poll_inputs`] found.
enum Ready {
    Socket,
    Inbox,
    /// A directory a CHANGE_NOTIFY waits on changed.
    Notify,
    Nothing,
}

/// What the final response of a request answered STATUS_PENDING repeats
/// of it (MS-SMB2 3.3.4.2): its AsyncId, MessageId, session, credit
/// charge and command, and how to sign it (the interim response never
/// is signed, the final one as its request asked).
#[derive(Debug, Clone, Copy)]
pub struct AsyncHead {
    /// The AsyncId its interim response gave it.
    pub async_id: u64,
    /// The request's MessageId.
    pub message_id: u64,
    /// The request's session.
    pub session_id: u64,
    /// The request's credit charge, repeated in the final response.
    pub credit_charge: u16,
    /// The request's command.
    pub command: u16,
    /// How the final response is signed.
    pub sign: Option<(SigningAlgorithm, [u8; 16])>,
    /// The connection the request came on (a channel's, for a request of a
    /// bound session), where its final response goes.
    pub conn: u64,
}

impl AsyncHead {
    /// Whether this request is the one CANCEL `hdr`, which came on
    /// connection `origin`, names: by AsyncId or MessageId, sent on the
    /// same connection (MessageIds are per connection: a channel's must
    /// not cancel the home's) for the same session.
    pub fn cancelled_by(&self, hdr: &Header, origin: u64) -> bool {
        let named = match hdr.flags & wire::FLAG_ASYNC != 0 {
            true => self.async_id == hdr.async_id,
            false => self.message_id == hdr.message_id,
        };
        named && self.conn == origin && self.session_id == hdr.session_id
    }
}

impl Connection {
    /// A fresh connection.
    pub fn new(sh: Arc<Shared>, id: u64) -> Self {
        Connection {
            sh,
            id,
            dialect: None,
            signing: SigningAlgorithm::AesCmac,
            preauth: [0; 64],
            client: ClientNegotiate::default(),
            security_mode: SIGNING_ENABLED,
            sessions: HashMap::new(),
            opens: HashMap::new(),
            settling: HashMap::new(),
            next_file: 1,
            next_tree: 1,
            client_guid: uuid::Uuid::nil(),
            terminate: false,
            io: None,
            pump_depth: 0,
            gone_noted: false,
            credits: Credits::default(),
            waiting: crate::lock::WaitingLocks::default(),
            pending_creates: crate::create::PendingCreates::default(),
            open_slot: None,
            notify: crate::notify::Watches::default(),
            next_async: 0,
            queued_async: None,
            request_signing: None,
            inbox: crate::channels::Inbox::new().ok(),
            via: None,
            outer: Vec::new(),
            socket_streak: 0,
            inbox_went_last: false,
            settle_due: false,
            notify_went_first: false,
            not_logged_on: false,
            logon_by: None,
            peer: None,
            remote: None,
            logon_failures: 0,
            deferred_logons: Vec::new(),
            ids_taken: false,
            last_requests: std::collections::VecDeque::new(),
            logon_turn: None,
            users_counted: Vec::new(),
            channel_writers: HashMap::new(),
            outbox: None,
            granted: Arc::default(),
        }
    }

    /// Makes request `hdr` async: a fresh AsyncId, given to its interim
    /// response by [`Connection::dispatch`]; its final response is signed
    /// as the request's would have been.
    pub fn go_async(&mut self, hdr: &Header) -> AsyncHead {
        self.next_async += 1;
        self.queued_async = Some(self.next_async);
        AsyncHead {
            async_id: self.next_async,
            message_id: hdr.message_id,
            session_id: hdr.session_id,
            credit_charge: hdr.credit_charge,
            command: hdr.command,
            sign: self.request_signing,
            conn: self.origin(),
        }
    }

    /// The request CANCEL `req` names. A synchronous CANCEL names one by
    /// its MessageId (3.3.5.16), but Samba's client (4.17) sends MessageId
    /// 0 in a CANCEL of a request it has no interim response for yet
    /// whenever the connection signs with anything but AES-GMAC (GMAC's
    /// nonce being the MessageId, it puts the request's own there then).
    /// MessageId 0 is the NEGOTIATE's and never names a pending request,
    /// so such a CANCEL is taken to name the request run just before it
    /// on the same connection for the same session: Samba sends it right
    /// after that request, before the answer came. Before, it named
    /// nothing, the request waited on, and smbtorture hung in every
    /// smb2.notify test that cancels at once under AES-CMAC or SMB 3.0.2
    /// (Samba's own smbd 4.17 hangs the same; docs/smb3.md, Signing).
    ///
    /// Only when that is unambiguous: the request run just before is the
    /// one request of that connection and session still waiting. With two
    /// waiting (the client pipelined a second before it cancelled the
    /// first), the CANCEL names nothing, as before: taking it for the
    /// latter cancelled a request nobody cancelled (re-review rr39g A1).
    fn cancel_named<'a>(&self, req: &Request<'a>) -> Request<'a> {
        let mut hdr = req.hdr.clone();
        if hdr.flags & wire::FLAG_ASYNC == 0 && hdr.message_id == 0 {
            let origin = self.origin();
            let last = self
                .last_requests
                .iter()
                .find(|&&(conn, _, _)| conn == origin)
                .filter(|&&(_, session, _)| session == hdr.session_id)
                .map(|&(_, _, mid)| mid);
            let mut waiting = self
                .waiting
                .heads()
                .chain(self.pending_creates.heads())
                .chain(self.notify.heads())
                .filter(|h| h.conn == origin && h.session_id == hdr.session_id);
            if let (Some(only), None, Some(mid)) = (waiting.next(), waiting.next(), last) {
                if only.message_id == mid {
                    hdr.message_id = mid;
                }
            }
        }
        Request {
            hdr,
            msg: req.msg,
            body: req.body,
        }
    }

    /// Notes the request about to run as the last of its connection
    /// ([`Connection::last_requests`]).
    fn note_last_request(&mut self, session: u64, mid: u64) {
        let origin = self.origin();
        self.last_requests.retain(|&(conn, _, _)| conn != origin);
        if self.last_requests.len() >= LAST_REQUESTS {
            self.last_requests.pop_back();
        }
        self.last_requests.push_front((origin, session, mid));
    }

    /// The connection the request being answered came on: a channel's
    /// (MessageIds and final responses belong to it), or this one.
    pub fn origin(&self) -> u64 {
        self.via.map_or(self.id, |v| v.conn)
    }

    /// Puts `st` in place of the current per-socket state, giving the old
    /// one back.
    fn swap_state(&mut self, st: PerConn) -> PerConn {
        PerConn {
            via: std::mem::replace(&mut self.via, st.via),
            credits: std::mem::replace(&mut self.credits, st.credits),
            client: std::mem::replace(&mut self.client, st.client),
        }
    }

    /// Reads frames and answers them until the client goes away.
    pub fn serve(&mut self, stream: Arc<TcpStream>) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.set_read_timeout(Some(FRAME_TIMEOUT));
        let writer = match stream.try_clone() {
            Ok(w) => Arc::new(Mutex::new(w)),
            Err(e) => {
                tracing::warn!(
                    conn = self.id,
                    "connection dropped, no descriptor for its writer: {e}"
                );
                return;
            }
        };
        // Without its inbox nothing wakes it to settle what another
        // connection ended (PreviousSessionId): a reconnect of the
        // session's durable opens waited for its next request, maybe
        // never (re-review rr48d N3). Dropped as without a writer.
        if self.inbox.is_none() {
            tracing::warn!(
                conn = self.id,
                "connection dropped, no descriptor for its inbox"
            );
            return;
        }
        self.remote = stream.peer_addr().ok();
        let peer = self.remote.map(|a| shimline::peer_key(a.ip()));
        self.peer = peer;
        self.sh.not_logged_on.arrived(self.id, peer, &stream);
        self.not_logged_on = true;
        self.logon_by = Instant::now().checked_add(self.sh.config.logon_timeout);
        self.sh.notifier.connected(self.id, writer.clone());
        self.io = Some((stream, writer));
        loop {
            // A request that pumped (one forwarded by a channel too) may
            // have read the end of the socket: nothing polls it any more,
            // and what is left to serve is the channels' (below). Before,
            // next_input polled the inbox alone forever once the last
            // channel went, and the connection was never lost (re-review
            // rr41h F2).
            if self.io.is_none() {
                break;
            }
            match self.next_input() {
                Input::Pdu(pdu) => {
                    if !self.answer(&pdu) || self.too_many_logon_failures() {
                        break;
                    }
                }
                Input::Logon(leg) => {
                    if !self.answer_deferred(leg) || self.too_many_logon_failures() {
                        break;
                    }
                }
                Input::Inbox => self.serve_inbox(),
                Input::Gone => break,
            }
            if self.not_logged_on && self.sessions.values().any(|s| s.user.is_some()) {
                self.not_logged_on = false;
                self.sh.not_logged_on.left(self.id);
            }
            self.after_pdu();
        }
        // A loop ended by a request that pumped (its answer not sent:
        // the client reset or stopped reading) skipped `after_pdu`: what
        // another connection ended meanwhile is settled now. Left to the
        // channels' loop below, it waited for a channel's PDU, maybe
        // forever, with the ended session's descriptors open (re-review
        // rr48d N2).
        if std::mem::take(&mut self.settle_due) {
            self.settle_elsewhere();
        }
        self.sh.not_logged_on.left(self.id);
        self.not_logged_on = false;
        // Before the socket closes: a client that sees it closed finds the
        // turns given back.
        self.drop_deferred_logons();
        self.end_io();
        if let Some(o) = self.outbox.take() {
            o.end();
        }
        self.sh.notifier.disconnected(self.id, &self.sh.breaking);
        // A session bound to other connections lives until its last
        // channel goes (multichannel): this thread keeps serving them.
        while self.has_channels() {
            match self.next_input() {
                Input::Inbox => self.serve_inbox(),
                Input::Pdu(_) | Input::Logon(_) | Input::Gone => {}
            }
            self.after_pdu();
        }
        if let Some((inbox, _)) = &self.inbox {
            inbox.close();
        }
        for u in self.users_counted.drain(..) {
            self.sh.per_user.remove(&u);
        }
    }

    /// After a PDU: an unlock in it may let a waiting lock in (a close
    /// retries at once, see release_open), a break acknowledged or an open
    /// closed a pending CREATE. And once no request runs, what other
    /// connections released of this one's sessions is settled, when the
    /// inbox was woken since (`settle_due`).
    fn after_pdu(&mut self) {
        if std::mem::take(&mut self.settle_due) {
            self.settle_elsewhere();
        }
        if self.waiting.take_nudged() {
            crate::lock::retry(self);
        }
        if self.pending_creates.take_nudged() {
            crate::create::retry_pending(self, true);
        }
    }

    /// Whether the connection is ended for its failed logons (once the
    /// last one is answered): never while a session is logged on over it,
    /// whose user must not lose it to another user's failures on the same
    /// connection (a terminal server's, a cifs `multiuser` mount's) — the
    /// failing half-made session alone is dropped, and the turns of
    /// [`crate::logons`] still slow its guesses.
    fn too_many_logon_failures(&self) -> bool {
        if self.logon_failures < crate::logons::MAX_FAILURES_PER_CONNECTION
            || self.sessions.values().any(|s| s.user.is_some())
        {
            return false;
        }
        tracing::info!(
            conn = self.id,
            failures = self.logon_failures,
            "ending a connection for its failed logons"
        );
        if let Some((s, _)) = &self.io {
            linger_close(s);
        }
        true
    }

    /// The user an AUTHENTICATE leg names, when `pdu` is one alone (no
    /// compound) for a half-made session of this connection, not a
    /// binding: the leg whose turn [`Connection::defer_logon`] takes.
    fn authenticate_leg_user(&self, pdu: &[u8]) -> Option<String> {
        let hdr = Header::decode(pdu).ok()?;
        if Command::from_code(hdr.command) != Command::SessionSetup || hdr.next_command != 0 {
            return None;
        }
        let s = self.sessions.get(&hdr.session_id)?;
        if s.user.is_some() || s.bound.is_some() || s.pending.is_none() {
            return None;
        }
        let mut r = Reader::new(pdu.get(HEADER_LEN..)?);
        r.skip(12, "session setup fields").ok()?;
        let off = r.u16("blob offset").ok()?;
        let len = r.u16("blob length").ok()?;
        let blob = wire::buffer(pdu, u32::from(off), u32::from(len), "security blob").ok()?;
        let token = spnego::parse_client(blob).ok()?;
        let mut tr = Reader::new(&token.ntlm);
        tr.skip(8, "ntlmssp signature").ok()?;
        (tr.u32("message type").ok()? == 3).then(|| ntlm::user_of(&token.ntlm))
    }

    /// An AUTHENTICATE leg that must wait for its turn after failed logons
    /// of its user and address: kept, to be answered when due
    /// ([`Connection::next_input`]), while the connection serves its other
    /// sessions (true). Otherwise the turn taken is left for the leg
    /// (false).
    fn defer_logon(&mut self, pdu: &[u8]) -> bool {
        if self.logon_turn.is_some() || self.via.is_some() {
            return false;
        }
        let Some(user) = self.authenticate_leg_user(pdu) else {
            return false;
        };
        let room = self.deferred_logons.len() < MAX_HALF_SESSIONS_PER_CONNECTION;
        let turn = self.sh.logon_failures.turn(self.peer, &user, room);
        let crate::logons::Turn::After(due) = turn else {
            self.logon_turn = Some(turn);
            return false;
        };
        // Its message id is used now, as any request's: left unused while
        // the leg waits, it pinned the bottom of the credit window, and
        // the connection's other sessions ran out of credits 16,384 ids
        // above it until the leg was answered (re-review). Its answer
        // grants its credits when it comes.
        let taken = match wire::compound(pdu) {
            Ok(chain) => self.take_message_ids(&chain).is_ok(),
            Err(_) => false,
        };
        if !taken {
            // Answered now: `handle_pdu` ends the connection for it.
            self.sh.logon_failures.give_back(self.peer, &user, due);
            return false;
        }
        self.deferred_logons.push(DeferredLogon {
            due,
            pdu: pdu.to_vec(),
            user,
        });
        true
    }

    /// Drops the AUTHENTICATE legs waiting for their turns (the
    /// connection is gone), giving their turns back unused.
    fn drop_deferred_logons(&mut self) {
        for leg in self.deferred_logons.drain(..) {
            self.sh
                .logon_failures
                .give_back(self.peer, &leg.user, leg.due);
        }
    }

    /// A deferred AUTHENTICATE leg that is due, if any.
    fn due_logon(&mut self) -> Option<DeferredLogon> {
        let now = Instant::now();
        let i = self.deferred_logons.iter().position(|l| l.due <= now)?;
        Some(self.deferred_logons.remove(i))
    }

    /// How long until the next deferred AUTHENTICATE leg is due.
    fn next_logon_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.deferred_logons
            .iter()
            .map(|l| l.due.saturating_duration_since(now))
            .min()
    }

    /// A logon of `user` refused unchecked, its turn not now (too far
    /// off, or a leg that cannot wait: a binding's, one in a compound):
    /// logged within [`crate::logons`]' bound, but counted neither as a
    /// failure of the address and user — a refusal that counted kept one
    /// retrying device behind a shared address (a NAT) ahead of the real
    /// user for ever — nor for this connection: no password was checked,
    /// so it guesses nothing, and counted, three binding legs refused
    /// because the user's turn was not yet (after a failure elsewhere)
    /// ended a fresh channel's connection (re-review).
    fn logon_refused(&mut self, user: &str, why: &dyn std::fmt::Display) -> u32 {
        self.log_refusal(user, why);
        status::LOGON_FAILURE
    }

    /// A logon of `user` failed (`why`): counted for its address and user
    /// and for this connection, logged within [`crate::logons`]' bound.
    fn logon_failed(&mut self, user: &str, why: &dyn std::fmt::Display) -> u32 {
        self.sh.logon_failures.failed(self.peer, user);
        self.logon_failures = self.logon_failures.saturating_add(1);
        self.logon_refused(user, why)
    }

    /// Logs a refused logon, within [`crate::logons`]' bound.
    fn log_refusal(&self, user: &str, why: &dyn std::fmt::Display) {
        if let Some(unlogged) = self.sh.logon_failures.log_refusal() {
            if unlogged > 0 {
                tracing::warn!(unlogged, "more logons were refused than were logged");
            }
            tracing::warn!(conn = self.id, peer = ?self.peer, user = ?user, error = %why, "logon refused");
        }
    }

    /// While no session has logged on: how long it has left to
    /// ([`Config::logon_timeout`]).
    fn logon_left(&self) -> Option<Duration> {
        let by = self.logon_by.filter(|_| self.not_logged_on)?;
        Some(by.saturating_duration_since(Instant::now()))
    }

    /// Whether the connection may start one more half-made session
    /// ([`MAX_HALF_SESSIONS_PER_CONNECTION`]) and hold one more session.
    fn room_for_a_session(&self) -> bool {
        let half = self.sessions.values().filter(|s| s.user.is_none()).count();
        half < MAX_HALF_SESSIONS_PER_CONNECTION && self.sessions.len() < MAX_SESSIONS_PER_CONNECTION
    }

    /// Whether session `id` lives on this connection: logged on here, and
    /// neither ended by another connection (PreviousSessionId) nor, for a
    /// channel, at its home ([`crate::breaks::Notifier::logged_on`]).
    fn session_lives(&self, id: u64) -> bool {
        let Some(s) = self.sessions.get(&id).filter(|s| s.user.is_some()) else {
            return false;
        };
        match &s.bound {
            Some(home) => !home.is_ended() && self.sh.registry.link(id).is_some(),
            None => s.link.as_ref().is_none_or(|l| !l.revoked()),
        }
    }

    /// Whether a session of this connection still has channels.
    fn has_channels(&self) -> bool {
        self.sessions.values().any(|s| {
            s.link
                .as_ref()
                .and_then(|l| l.home.get())
                .is_some_and(|h| h.channels() > 0)
        })
    }

    /// The next thing to serve: a PDU from the socket or PDUs of channels;
    /// while locks wait, they are retried when due ([`crate::lock::RETRY`]),
    /// and pending CREATEs every [`crate::create::RETRY`], quiet client or
    /// busy.
    fn next_input(&mut self) -> Input {
        loop {
            // Woken to settle what another connection ended, not settled
            // yet (a loop left without `after_pdu`): at once, not after
            // the next input, which may never come (re-review rr48d N2).
            if self.settle_due {
                return Input::Inbox;
            }
            let locks = (!self.waiting.is_empty()).then(|| self.waiting.next_retry_in());
            let creates =
                (!self.pending_creates.is_empty()).then(|| self.pending_creates.next_retry_in());
            if locks.is_some_and(|w| w.is_zero()) {
                crate::lock::retry_due(self);
                continue;
            }
            if creates.is_some_and(|w| w.is_zero()) {
                crate::create::retry_pending(self, false);
                continue;
            }
            if let Some(leg) = self.due_logon() {
                return Input::Logon(leg);
            }
            let logons = self.next_logon_in();
            let logon = self.logon_left();
            if logon.is_some_and(|w| w.is_zero()) {
                tracing::info!(
                    conn = self.id,
                    "ending a connection that did not log on in time"
                );
                return Input::Gone;
            }
            let wait = locks
                .into_iter()
                .chain(creates)
                .chain(logon)
                .chain(logons)
                .min();
            match self.poll_inputs(wait) {
                Ready::Socket => match self.read_frame() {
                    Some(Received::Pdu(pdu)) => return Input::Pdu(pdu),
                    Some(Received::KeepAlive) => {}
                    None => return Input::Gone,
                },
                Ready::Inbox => return Input::Inbox,
                Ready::Notify => crate::notify::deliver(self),
                Ready::Nothing if wait.is_none() && self.io.is_none() => return Input::Gone,
                Ready::Nothing => {}
            }
        }
    }

    /// Waits up to `wait` (forever when none) for the socket to be
    /// readable (or gone: the read that follows finds out) or a channel to
    /// queue a PDU. The socket is preferred for [`SOCKET_TURN`] PDUs in a
    /// row, then the inbox and notifications get their turn.
    fn poll_inputs(&mut self, wait: Option<Duration>) -> Ready {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let timeout = match wait {
            Some(w) => PollTimeout::from(u16::try_from(w.as_millis()).unwrap_or(u16::MAX)),
            None => PollTimeout::NONE,
        };
        let mut fds = Vec::with_capacity(2);
        if let Some((s, _)) = &self.io {
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        let inbox_at = fds.len();
        if let Some((_, rx)) = &self.inbox {
            fds.push(PollFd::new(rx.as_fd(), PollFlags::POLLIN));
        }
        let notify_at = fds.len();
        if let Some(fd) = self.notify.fd() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        if fds.is_empty() {
            std::thread::sleep(wait.unwrap_or_default());
            return Ready::Nothing;
        }
        if !poll(&mut fds, timeout).is_ok_and(|n| n > 0) {
            return Ready::Nothing;
        }
        let fired = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let socket = inbox_at == 1 && fds.first().is_some_and(fired);
        let inbox = notify_at > inbox_at && fds.get(inbox_at).is_some_and(fired);
        let notify = fds.get(notify_at).is_some_and(fired);
        // Changes seen before the client's next request are delivered
        // before that request runs: a waiting CHANGE_NOTIFY is answered
        // with the change that came first, as Windows and Samba answer it
        // (smbtorture smb2.notify.valid-req: the ADDED of a create alone,
        // not with the MODIFIED of the WRITE the client sent next; it
        // failed 3 runs in 40 under load). Once in a row only, so a flood
        // of changes never holds the socket back.
        if notify && socket && !self.notify_went_first {
            self.notify_went_first = true;
            return Ready::Notify;
        }
        self.notify_went_first = false;
        // The socket first, but for a bounded turn when channels or
        // notifications wait as well.
        if socket && (self.socket_streak < SOCKET_TURN || !(inbox || notify)) {
            self.socket_streak = if inbox || notify {
                self.socket_streak + 1
            } else {
                0
            };
            return Ready::Socket;
        }
        self.socket_streak = 0;
        // Channels and notifications take turns: a queue of channels'
        // PDUs that never empties must not hold a notification back
        // (adversarial review of issue 14: four channels each keeping
        // READs in flight held a CHANGE_NOTIFY's answer over 20 s).
        if inbox && !(notify && self.inbox_went_last) {
            self.inbox_went_last = true;
            if let Some((_, rx)) = &self.inbox {
                crate::channels::drain_wakeups(rx);
            }
            // The wake-up may be another connection's ending of a session
            // of this one: settled after the request that runs, if any.
            self.settle_due = true;
            return Ready::Inbox;
        }
        self.inbox_went_last = false;
        if notify {
            Ready::Notify
        } else {
            Ready::Nothing
        }
    }

    /// Answers the PDUs channels queued.
    fn serve_inbox(&mut self) {
        let Some(inbox) = self.inbox.as_ref().map(|(i, _)| i.clone()) else {
            return;
        };
        // A bounded turn: channels that queue as fast as they are served
        // must not starve this connection's own socket, its retries and
        // notifications (the adversarial review of issue 14: two channels
        // each keeping a READ in flight held the home's CREATE back for
        // minutes). What is left waits for the next turn, after the socket
        // (`poll_inputs` looks at it first).
        for _ in 0..INBOX_TURN {
            let Some(f) = inbox.take() else {
                return;
            };
            self.serve_forwarded(f);
        }
        if !inbox.is_empty() {
            inbox.nudge();
        }
    }

    /// Answers one PDU of a channel as that channel would: its signing
    /// key, its credits, its socket for final async responses.
    fn serve_forwarded(&mut self, f: crate::channels::Forwarded) {
        let crate::channels::Forwarded { pdu, via, reply } = f;
        self.channel_writers.retain(|_, w| w.strong_count() > 0);
        self.channel_writers
            .insert(via.conn, Arc::downgrade(&via.outbox));
        let sent = via.credits.clone();
        let saved = self.swap_state(PerConn {
            via: Some(ViaNow {
                conn: via.conn,
                session: via.session,
                sign: via.sign,
            }),
            credits: *via.credits,
            client: *via.client,
        });
        self.outer.push(saved);
        // The channel used its message ids before handing it over.
        self.ids_taken = true;
        let out = self.handle_pdu(&pdu);
        self.ids_taken = false;
        let saved = self.outer.pop().unwrap_or_default();
        let credits = self.swap_state(saved).credits;
        // A failed negotiate validation ends the channel, not this one.
        self.terminate = false;
        // The answer is queued for the channel's socket from here, before
        // anything else is served: a request that went async here could
        // otherwise see its final response (queued from here) overtake
        // its interim one. Never written from here: a channel whose client
        // stops reading must not stall this thread (its outbox ends it).
        // Its grants are the channel's before the client can see them: the
        // channel thread reads its socket while it waits for this reply
        // (`await_home`), and the client's next request may use them.
        let out = out.ok().is_some_and(|b| {
            via.granted
                .fetch_add(credits.granted_since(&sent), Ordering::AcqRel);
            if !b.is_empty() && !via.outbox.push(b) {
                tracing::debug!(conn = via.conn, "channel ended");
                return false;
            }
            true
        });
        let _ = reply.send(out);
    }

    /// Sends the final response of a request answered STATUS_PENDING
    /// (MS-SMB2 3.3.4.2): async header with its AsyncId, no credits (the
    /// interim response granted them), signed as its request asked; `body`
    /// on success, an error body otherwise.
    pub fn finish_async(&mut self, a: &AsyncHead, st: u32, body: &[u8]) {
        tracing::debug!(
            conn = self.id,
            async_id = a.async_id,
            message_id = a.message_id,
            command = a.command,
            status = format_args!("{st:#010x}"),
            "async request done"
        );
        let hdr = Header {
            credit_charge: a.credit_charge,
            status: st,
            command: a.command,
            credits: 0,
            flags: wire::FLAG_RESPONSE | wire::FLAG_ASYNC,
            next_command: 0,
            message_id: a.message_id,
            async_id: a.async_id,
            tree_id: 0,
            session_id: a.session_id,
            signature: [0; 16],
        };
        let mut out = Writer::new();
        hdr.encode(&mut out);
        match st {
            status::SUCCESS => out.bytes(body),
            _ => out.bytes(&error_body()),
        };
        let mut bytes = out.0;
        if let Some((alg, key)) = a.sign {
            crypto::sign(alg, &key, &mut bytes);
        }
        if a.conn == self.id {
            if let Some((_, wr)) = &self.io {
                write_frame(wr, &bytes);
            }
        } else if let Some(o) = self
            .channel_writers
            .get(&a.conn)
            .and_then(std::sync::Weak::upgrade)
        {
            o.push(bytes);
        }
    }

    /// Whether the final response of a request that came on connection
    /// `conn` can still reach its client: this connection's socket is
    /// still served, or the channel's outbox has not ended.
    pub fn reaches(&self, conn: u64) -> bool {
        if conn == self.id {
            return self.io.is_some();
        }
        self.channel_writers
            .get(&conn)
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|o| !o.is_ended())
    }

    /// The next frame, once the socket is readable: a PDU, a NetBIOS
    /// keep-alive, or none when the connection is over (closed, broken,
    /// or a frame that is not SMB2 — then it is closed).
    fn read_frame(&mut self) -> Option<Received> {
        let (stream, _) = self.io.as_ref()?;
        // The whole frame within FRAME_TIMEOUT of its first read, not
        // 30 s of silence at a time (second adversarial review: a
        // NEGOTIATE trickled a few bytes every 12 s was answered 60 s
        // later).
        let deadline = std::time::Instant::now() + FRAME_TIMEOUT;
        let mut len = [0u8; 4];
        read_within(stream, &mut len, deadline)?;
        let n = match wire::frame(len, MAX_PDU) {
            // Back to polling: the next frame's deadline starts at its
            // first byte. Reading on from here waited for it as for the
            // rest of a frame — serving nothing else meanwhile (no
            // CHANGE_NOTIFY answer, no lock or CREATE retry) — and a
            // client that then stayed quiet 30 s was disconnected (review).
            wire::Frame::KeepAlive => return Some(Received::KeepAlive),
            wire::Frame::Pdu(n) => n,
            wire::Frame::Bad => {
                tracing::warn!(conn = self.id, header = ?len, "bad NetBIOS frame; closing");
                return None;
            }
        };
        let slack = Duration::from_secs(u64::try_from(n).unwrap_or(u64::MAX) / FRAME_MIN_RATE);
        let mut pdu = vec![0u8; n];
        read_within(stream, &mut pdu, deadline + slack)?;
        Some(Received::Pdu(pdu))
    }

    /// Answers one PDU; false when the connection must end.
    fn answer(&mut self, pdu: &[u8]) -> bool {
        if self.defer_logon(pdu) {
            return true;
        }
        let handled = match self.channel_of(pdu) {
            Some(home) => self.forward(&home, pdu),
            None => self.handle_pdu(pdu),
        };
        // A turn its leg did not use (refused before) is no other leg's.
        self.logon_turn = None;
        self.send_answer(handled)
    }

    /// Answers a deferred AUTHENTICATE leg whose turn came; its message
    /// ids were used when it was deferred. False when the connection must
    /// end.
    fn answer_deferred(&mut self, leg: DeferredLogon) -> bool {
        self.logon_turn = Some(crate::logons::Turn::Now);
        self.ids_taken = true;
        let handled = self.handle_pdu(&leg.pdu);
        self.ids_taken = false;
        if self.logon_turn.take().is_some() {
            // Answered without its password checked (its session went
            // meanwhile): the turn was not used.
            self.sh
                .logon_failures
                .give_back(self.peer, &leg.user, leg.due);
        }
        self.send_answer(handled)
    }

    /// Sends what [`Connection::handle_pdu`] answered; false when the
    /// connection must end.
    fn send_answer(&mut self, handled: Result<Vec<u8>, WireError>) -> bool {
        let out = match handled {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "closing connection");
                if let Some((s, _)) = &self.io {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                return false;
            }
        };
        if out.is_empty() {
            // Nothing to send here (a channel's answer went to its outbox):
            // the connection goes on while its socket does, which a PDU
            // served meanwhile may have found closed.
            return self.io.is_some();
        }
        self.io.as_ref().is_some_and(|(_, w)| write_frame(w, &out))
    }

    /// The home of the session a PDU is for, when this connection is one
    /// of its channels and the binding is done (SESSION_SETUP is answered
    /// here: it is the binding itself, or a re-authentication, refused).
    fn channel_of(&self, pdu: &[u8]) -> Option<Arc<crate::channels::Home>> {
        let hdr = Header::decode(pdu).ok()?;
        if Command::from_code(hdr.command) == Command::SessionSetup {
            return None;
        }
        let s = self.sessions.get(&hdr.session_id)?;
        s.user.as_ref()?;
        s.bound.clone()
    }

    /// Hands a PDU of a bound session to its home thread and waits for the
    /// answer; a session whose home is gone is answered here, as deleted.
    fn forward(
        &mut self,
        home: &Arc<crate::channels::Home>,
        pdu: &[u8],
    ) -> Result<Vec<u8>, WireError> {
        let hdr = Header::decode(pdu)?;
        let session = hdr.session_id;
        let (writer, sign) = match (&self.io, self.sessions.get(&session)) {
            (Some((_, w)), Some(s)) => (w.clone(), s.signing_key),
            _ => return self.handle_pdu(pdu),
        };
        let Some(key) = sign else {
            return self.handle_pdu(pdu);
        };
        let outbox = match &self.outbox {
            Some(o) => o.clone(),
            None => {
                let o = crate::channels::Outbox::start(self.id, writer)
                    .map_err(|_| WireError::Bad("no channel writer"))?;
                self.outbox = Some(o.clone());
                o
            }
        };
        // Nothing more is forwarded while the channel's answers wait
        // unread: the channel waits here (serving what is handed to this
        // connection meanwhile), never the home.
        loop {
            match outbox.room(Duration::from_millis(5)) {
                crate::channels::Room::Free => break,
                crate::channels::Room::Full => self.serve_inbox(),
                crate::channels::Room::Ended => {
                    return Err(WireError::Bad("forwarded PDU, or answers left unread"))
                }
            }
        }
        // Its message ids are used here, on the channel's own thread, before
        // it is handed over: the channel reads and answers its socket while
        // it waits for the home (`await_home`), and the requests it answers
        // meanwhile must find these ids used. The home answers on a copy of
        // the credits and adds what its answer grants to `granted`, which
        // this thread adds to its credits before it uses or grants any
        // (before, the copy came back in place of the credits, which would
        // have undone what was answered meanwhile).
        let chain = wire::compound(pdu)?;
        self.take_message_ids(&chain)?;
        let reserved = answers_bound(&chain);
        outbox.reserve(reserved);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let f = crate::channels::Forwarded {
            pdu: pdu.to_vec(),
            via: crate::channels::Via {
                conn: self.id,
                outbox: outbox.clone(),
                session,
                sign: (self.signing, key),
                credits: Box::new(self.credits.clone()),
                granted: self.granted.clone(),
                client: Box::new(self.client.clone()),
            },
            reply: tx,
        };
        let answer = match home.inbox.send(f) {
            Ok(()) => self.await_home(&rx),
            Err(_) => None,
        };
        // The answers are queued (counted as held), or will never come.
        outbox.release(reserved);
        match answer {
            Some(true) => {
                // Only a LOGOFF that ended the session unbinds: one that
                // failed (a close filterd refused) changed nothing.
                if Command::from_code(hdr.command) == Command::Logoff && home.is_ended() {
                    self.unbind(session);
                }
                Ok(Vec::new())
            }
            Some(false) => Err(WireError::Bad("forwarded PDU, or answers left unread")),
            None => {
                // The home thread is gone, and the session with it.
                self.unbind(session);
                self.ids_taken = true;
                let out = self.handle_pdu(pdu);
                self.ids_taken = false;
                out
            }
        }
    }

    /// Waits for the home's answer to a forwarded PDU, serving meanwhile
    /// what channels hand to this connection (two connections that are
    /// each a channel of the other's session must not wait on each other)
    /// and, as [`Connection::pump`] does, this connection's own socket: the
    /// home may be waiting for what only the client can give — a lease
    /// break acknowledgment, which the client may send on this channel
    /// (MS-SMB2 lets it use any channel of the session). Before, the
    /// acknowledgment lay unread here until filterd's break timeout (35 s)
    /// let the home's request through, and was then refused, and every
    /// other request of the channel (ECHO, CANCEL) waited as long (review
    /// rvpanic; tests/smb3/channel_break_ack.py). Requests read here are
    /// answered as they would be next (forwarded to their home, which
    /// serves its inbox while it waits), nested at most `MAX_PUMP_DEPTH`
    /// deep; beyond that only the inbox is served.
    fn await_home(&mut self, rx: &std::sync::mpsc::Receiver<bool>) -> Option<bool> {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(a) => return Some(a),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) if self.pump_depth < MAX_PUMP_DEPTH => {
                    self.pump(Duration::ZERO)
                }
                Err(RecvTimeoutError::Timeout) => self.serve_inbox(),
            }
        }
    }

    /// This channel leaves session `id` (LOGOFF through it, its home gone).
    fn unbind(&mut self, id: u64) {
        // Its user's breaks no longer come here for it (review rr39k A4:
        // the entry stayed, and such entries filled the connection's).
        self.sh.notifier.session_left(self.id, id);
        if let Some(s) = self.sessions.remove(&id) {
            // Only a finished binding counted itself at the home.
            if let (Some(home), Some(_)) = (s.bound, s.user) {
                home.unbound(self.io.is_some());
            }
        }
    }

    /// The connection's socket is done with: shut down, then let go. Not
    /// only let go: the writer's copies of it (lease breaks, the outbox of
    /// a channel) would hold it open, while the frontend's client gate
    /// knows only this one ([`shimline::ClientGate`], weakly) — a let-go
    /// (filterd stepping down) could not shut it, and the client saw no
    /// end, until the request that was pumping ended (up to a break
    /// timeout; `a_connection_ended_while_a_request_waits_ends_at_once`).
    fn end_io(&mut self) {
        if let Some((s, _)) = self.io.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            // The homes of the sessions bound here no longer count this
            // channel as one the client may answer on (re-review rr41h
            // F1: a home whose request waited for a break acknowledgment
            // waited out the break timeout while this channel, its socket
            // ended too, waited for that request's answer).
            for s in self.sessions.values() {
                if let (Some(home), Some(_)) = (&s.bound, &s.user) {
                    home.socket_ended();
                }
            }
            // Lease breaks go to the client's next live connection from
            // now on, not when the request that read the end returns
            // (re-review rr41o 2: a break routed here meanwhile was lost,
            // and filterd lowered the lease at its timeout untold).
            self.sh.notifier.disconnected(self.id, &self.sh.breaking);
            let remote = self.remote.map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(conn = self.id, %remote, "socket ended");
        }
    }

    /// While a request waits for something only the client can give — an
    /// open waiting for the client to acknowledge a lease break — serves
    /// the client's next PDU, if one arrives within `wait`. Nested at most
    /// `MAX_PUMP_DEPTH` deep; beyond that, or once the connection is
    /// over, it just waits.
    pub fn pump(&mut self, wait: Duration) {
        if self.pump_depth >= MAX_PUMP_DEPTH {
            std::thread::sleep(wait);
            return;
        }
        let ready = self.poll_inputs(Some(wait));
        self.pump_depth += 1;
        // The descriptor slot is the waiting CREATE's: a CREATE served
        // here reserves its own. Left in place, the nested CREATE found it
        // and went past the cap without reserving, its open took it, and
        // the waiting one forced a slot when granted — one open over the
        // cap per such nesting (re-review rr46d F1: 33 opens at a cap of 32).
        let waiting_slot = self.open_slot.take();
        match ready {
            Ready::Socket => match self.read_frame() {
                Some(Received::Pdu(pdu)) => {
                    if !self.answer_own(&pdu) {
                        self.end_io();
                    }
                }
                Some(Received::KeepAlive) => {}
                None => self.end_io(),
            },
            Ready::Inbox => self.serve_inbox(),
            Ready::Notify => crate::notify::deliver(self),
            Ready::Nothing => {}
        }
        self.open_slot = waiting_slot;
        self.pump_depth -= 1;
        if self.gone_noted && !self.client_gone() {
            // A channel bound since: the client is back.
            self.gone_noted = false;
            self.sh.registry.client_back(self.id);
        }
        if self.client_gone() && !self.gone_noted {
            // Its opens are let go once the requests still running here
            // end ([`Connection::lost`]): a reconnect of one waits for
            // that, and at worst is told to retry — counted live, it
            // waited 1 s and was STATUS_OBJECT_NAME_NOT_FOUND, final for
            // the client (re-review rr41b A). The mark goes with the
            // guard `lost` takes.
            self.gone_noted = true;
            self.sh.registry.client_gone(self.id);
        }
    }

    /// Whether nobody is left to answer: this connection's socket ended
    /// (a request waiting here read its end) and no channel of its
    /// sessions is bound elsewhere. A request waiting for the client (a
    /// CREATE for a break acknowledgment) stops waiting then.
    pub fn client_gone(&self) -> bool {
        self.io.is_none() && !self.has_live_channels()
    }

    /// Whether a session of this connection still has a channel whose
    /// socket has not ended (one the client may still answer on).
    fn has_live_channels(&self) -> bool {
        self.sessions.values().any(|s| {
            s.link
                .as_ref()
                .and_then(|l| l.home.get())
                .is_some_and(|h| h.live_channels() > 0)
        })
    }

    /// Answers a PDU of this connection's own socket, also while a
    /// channel's PDU is being answered (a forwarded CREATE waiting for a
    /// lease break ack pumps this socket): with this connection's own
    /// signing keys, credits, negotiate state and socket for async final
    /// responses, never the channel's.
    fn answer_own(&mut self, pdu: &[u8]) -> bool {
        if self.via.is_none() {
            return self.answer(pdu);
        }
        let Some(i) = self.outer.iter().rposition(|o| o.via.is_none()) else {
            return self.answer(pdu);
        };
        let own = self
            .outer
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default();
        let channel = self.swap_state(own);
        let ok = self.answer(pdu);
        let own = self.swap_state(channel);
        if let Some(o) = self.outer.get_mut(i) {
            *o = own;
        }
        ok
    }

    /// The client went away: durable and persistent opens are detached in
    /// filterd (kept for their timeout, for a DH2C), the others closed.
    pub fn lost(&mut self) {
        // Nobody is left to answer: waiting locks and CREATEs are just
        // dropped, a lock that filterd may have granted to nobody once
        // it is settled (one try: the connection is ending).
        for (key, u) in self.waiting.drop_all() {
            self.sh.registry.unlearnt(key, u);
        }
        self.pending_creates.clear();
        self.notify.clear();
        let sh = self.sh.clone();
        let letting_go = sh.registry.letting_go(self.id);
        let mut ids: Vec<u64> = self.opens.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let _ = self.release_open(id, Ending::Lost);
        }
        drop(letting_go);
        if let Some((inbox, _)) = &self.inbox {
            inbox.close();
        }
        for (id, s) in self.sessions.drain() {
            match s.bound {
                // A channel: the session lives on at its home (a binding
                // never finished was not counted there).
                Some(home) => {
                    if s.user.is_some() {
                        home.unbound(self.io.is_some());
                    }
                }
                None => {
                    if let Some(home) = s.link.as_ref().and_then(|l| l.home.get()) {
                        home.end();
                    }
                    self.sh.registry.ended(id);
                    // A channel bound since the last was counted (a
                    // binding racing this end) carries its breaks no more.
                    self.sh.notifier.session_ended(id);
                }
            }
        }
    }

    /// A new open: kept by this connection, its filterd handle known to
    /// its session's link. Handed back, kept nowhere, when another
    /// connection has ended its session (PreviousSessionId) since the
    /// CREATE began — a pending one, or one racing the logon: the ending
    /// released only the handles the session held then, so the caller
    /// releases this one and answers STATUS_USER_SESSION_DELETED.
    pub fn add_open(&mut self, id: u64, mut open: Open) -> Result<(), Box<Open>> {
        // Counted even past the caps: the open is made (a CREATE checks
        // them before making one). The counts its CREATE took are its
        // own: a descriptor slot, and its user's count with one a lost
        // connection handed over. (An open comes here fresh, uncounted;
        // one counted already keeps its counts.)
        let counted = match open.counted.take() {
            Some(c) => c,
            None => {
                let (fd, handed_user) = match self.open_slot.take() {
                    Some(s) => (Some(s.fd), s.user),
                    None => (None, None),
                };
                let user = handed_user.or_else(|| {
                    self.sessions
                        .get(&open.session)
                        .and_then(|s| s.user.as_ref())
                        .map(|u| self.sh.user_opens.count(u))
                });
                OpenSlots {
                    // The slot its CREATE took at the cap's check; forced
                    // only where none was (a move its old connection still
                    // counts, an open resumed at start-up).
                    fd: fd.unwrap_or_else(|| self.sh.fds.force()),
                    user,
                }
            }
        };
        // Held before it is tracked: an ending of the session in between
        // finds the GUID this connection's, and hands the slot over for
        // the open's reconnect. Held after, the ending handed it over and
        // let go, and `held` here took the GUID back and dropped the
        // handed slot: the reconnect found none, refused at a full cap
        // (re-review rr48a F3). Refused, the GUID stays held until the
        // caller has released the handle and lets it go.
        if let Some(g) = open.create_guid {
            self.sh.registry.held(g, self.id);
        }
        let link = self
            .sessions
            .get(&open.session)
            .and_then(|s| s.link.as_ref());
        match (&open.kind, link) {
            // A file's counts go with its filterd handle: given back, or
            // handed over for its reconnect, by whoever releases that
            // ([`crate::sessions::Link`]).
            (crate::files::Kind::File { key, .. }, Some(link)) => {
                // A durable one found again here, should a reattach have
                // found it lost: its slot is left for its reconnect again.
                let tracked = link.track(
                    &self.sh.registry,
                    id,
                    *key,
                    open.durable.then_some(open.durable_ms),
                    open.create_guid,
                    self.id,
                    counted,
                    open.delete_unsure.clone(),
                );
                if let Err(counted) = tracked {
                    open.counted = Some(counted);
                    return Err(Box::new(open));
                }
                if open.durable {
                    crate::create::test_hold_the_first_tracked_durable_open();
                }
            }
            (kind, link) => {
                if let (Some(_), true, crate::files::Kind::File { key, .. }) =
                    (open.create_guid, open.durable, kind)
                {
                    self.sh.registry.found_again(*key);
                }
                open.counted = Some(counted);
                if link.is_some_and(|l| l.revoked()) {
                    return Err(Box::new(open));
                }
            }
        }
        self.opens.insert(id, open);
        Ok(())
    }

    /// Forgets open `id` and releases it in filterd (detach when the
    /// connection is lost and the open durable), unless another
    /// connection already did (an ended session, a replaced app
    /// instance).
    fn release_open(&mut self, id: u64, ending: Ending) -> Result<(), NotClosed> {
        let Some(open) = self.opens.get(&id) else {
            return Ok(());
        };
        let sh = &self.sh;
        let lost = matches!(ending, Ending::Lost | Ending::Logoff);
        let release = || {
            crate::files::release(sh, open, ending)?;
            if let crate::files::Kind::File { key, .. } = &open.kind {
                if !lost {
                    sh.registry.v2_closed(crate::create::persistent_id(*key));
                }
            }
            if let (false, Some(g)) = (lost, open.create_guid) {
                sh.registry.durable_closed(g);
            }
            Ok(())
        };
        // A file's counts, given back with its handle unless handed over
        // below (none when another connection released the handle first:
        // it gave them back or handed them over there).
        let mut counted = None;
        let released = match (
            &open.kind,
            self.sessions
                .get(&open.session)
                .and_then(|s| s.link.as_ref()),
        ) {
            (crate::files::Kind::File { .. }, Some(link)) => {
                let (r, c) = link.release(id, release);
                counted = c;
                r
            }
            _ => release(),
        };
        // A CLOSE filterd refused or undid: the open stays as it was.
        if released.is_err_and(|e| e.kept) {
            return released;
        }
        // A close whose outcome filterd never told (a CLOSE's, a
        // TREE_DISCONNECT's): noted while its handle settles — before the
        // create GUID is let go below, so that a reconnect that finds the
        // open let go finds it settling (re-review rr41b D: noted after,
        // a DH2C in between was STATUS_OBJECT_NAME_NOT_FOUND).
        if released.is_err() {
            self.note_settling(id);
        }
        crate::lock::open_closing(self, id);
        crate::notify::open_closing(self, id);
        crate::create::test_hold_the_first_letting_go();
        // Only now, with the handle detached, may a reconnect stop
        // waiting for this connection.
        if let Some(mut open) = self.opens.remove(&id) {
            // Its counts first: a reconnect that finds it let go must find
            // it no longer counted under its user either. A durable open
            // whose client went away leaves its descriptor slot, and its
            // count under its user, for that client's reconnect: given
            // back to all, another CREATE could take the slot first, and
            // the reconnect was refused at the cap (re-review rr46a F3);
            // the user's count goes with it, so that a user resetting its
            // connections cannot keep slots past its share.
            let key = match &open.kind {
                crate::files::Kind::File { key, .. } => Some(*key),
                _ => None,
            };
            let slots = counted.or(open.counted.take());
            let guid = open.create_guid;
            let handed = open.durable && matches!(ending, Ending::Lost);
            let ms = open.durable_ms;
            // Its descriptor closed first: a slot handed over (or given
            // back) while it was still open let rksmbd hold more
            // descriptors than its cap (re-review rr48d N1).
            drop(open);
            match (slots, guid, key) {
                (Some(slots), Some(g), Some(key)) if handed => {
                    self.sh.registry.hand_over((g, key, ms), self.id, slots);
                }
                (slots, _, _) => drop(slots),
            }
            if let Some(g) = guid {
                self.sh.registry.let_go(g, self.id);
            }
        }
        // Its locks are gone: a lock waiting on another open may be in,
        // and its share mode and lease: a pending CREATE too.
        crate::lock::retry(self);
        self.pending_creates.nudge();
        released
    }

    /// Notes open `id`, whose close filterd never told, while its handle
    /// settles: for its FileId's retried CLOSE, its tree's
    /// TREE_DISCONNECT, its session's LOGOFF ([`Connection::settling`])
    /// and, from any connection, its client's reconnect
    /// ([`crate::settle::SettlingFileIds`]).
    fn note_settling(&mut self, id: u64) {
        let sh = self.sh.clone();
        let Some((n, open)) = self
            .opens
            .get(&id)
            .and_then(|o| Some((crate::settle::Settling::of(o)?, o)))
        else {
            return;
        };
        if !sh.unsettled.contains(n.key) {
            return;
        }
        let client = crate::settle::OpenClient {
            user: self
                .sessions
                .get(&open.session)
                .and_then(|s| s.user.clone())
                .unwrap_or_default(),
            // A leased open is its client GUID's, any other (under an
            // oplock too) its user's, as `client_of` made it in filterd.
            client_guid: (open.lease.is_some() && open.oplock.is_none())
                .then_some(self.client_guid),
        };
        // Those settled go (bounded by the handles settling).
        self.settling.retain(|_, n| sh.unsettled.contains(n.key));
        self.settling.insert(id, n);
        sh.settling_ids.note(&sh.unsettled, &n, client);
    }

    fn let_go(&self, open: &Open) {
        if let Some(g) = open.create_guid {
            self.sh.registry.let_go(g, self.id);
        }
    }

    /// Before a request of session `id`: a session another connection
    /// ended (PreviousSessionId) is gone with its opens — their filterd
    /// handles were released there — and opens another connection closed
    /// (AppInstanceId) are forgotten.
    fn settle_session(&mut self, id: u64) -> Result<(), u32> {
        let Some(link) = self.sessions.get(&id).and_then(|s| s.link.clone()) else {
            return Ok(());
        };
        let revoked = link.revoked();
        if revoked {
            // Its opens are released here, as a lost connection's are:
            // durable ones detached, each descriptor closed before its
            // slot and count are handed over for the open's reconnect
            // (the others' given back), then its create GUID let go
            // (`release_open`). The ending left them to this connection
            // (`Link::revoke`, re-review rr48d N1).
            for k in self.opens_of(id) {
                let _ = self.release_open(k, Ending::Lost);
            }
            // None may leave its handle behind in filterd.
            link.release_rest(&self.sh);
            // Nothing of it is left for a reattach's forgetting
            // (`Registry::forget_lost` reached it until now: rr48f L1).
            self.sh.registry.settled(id);
        }
        let gone = link.take_closed_elsewhere();
        if revoked {
            // A release that kept its open (none expected for a lost
            // one): forgotten all the same with the session.
            for k in self.opens_of(id) {
                crate::notify::open_closing(self, k);
                if let Some(open) = self.opens.remove(&k) {
                    self.let_go(&open);
                }
            }
            self.sessions.remove(&id);
            self.sh.notifier.session_left(self.id, id);
        }
        self.forget_opens(gone);
        match revoked {
            true => Err(status::USER_SESSION_DELETED),
            false => Ok(()),
        }
    }

    /// Releases the sessions another connection ended (PreviousSessionId)
    /// and their opens — durable ones detached, each descriptor closed
    /// before its slot is handed over for the open's reconnect
    /// ([`crate::sessions::Registry::hand_over`]) — and forgets the opens
    /// another connection closed (AppInstanceId) or a reattach lost,
    /// closing their descriptors: woken for it by the ending or closing
    /// (the session's link nudges this connection's inbox), an idle
    /// connection — its client gone unnoticed, the usual reason for a
    /// PreviousSessionId — does not keep them, nor the reconnects
    /// waiting, until its next request. Run between requests only
    /// ([`Connection::after_pdu`], and as the main loop ends): a request
    /// that pumps when woken settles once it ends.
    fn settle_elsewhere(&mut self) {
        let ended: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.link.as_ref().is_some_and(|l| l.revoked()))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            let _ = self.settle_session(id);
        }
        self.forget_closed_elsewhere();
    }

    /// The opens of session `id`, oldest first.
    fn opens_of(&self, id: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .opens
            .iter()
            .filter(|(_, o)| o.session == id)
            .map(|(k, _)| *k)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Forgets opens `gone`, released elsewhere (or lost to a reattach).
    /// Each one's descriptor slot is given back once its descriptor is
    /// closed.
    fn forget_opens(&mut self, gone: Vec<(u64, shimline::descriptors::DescriptorSlot)>) {
        for (k, slot) in gone {
            // Its waiting CHANGE_NOTIFYs end with STATUS_NOTIFY_CLEANUP.
            crate::notify::open_closing(self, k);
            if let Some(open) = self.opens.remove(&k) {
                self.let_go(&open);
                drop(open);
            }
            drop(slot);
        }
    }

    /// Forgets the opens of every session that another connection closed
    /// or a reattach to filterd lost ([`crate::sessions::Registry::forget_lost`]):
    /// run before waiting locks are tried again, so that a LOCK pending on
    /// an open whose handle another rksmbd process reconnected since ends
    /// (STATUS_FILE_CLOSED) instead of being granted through it.
    pub fn forget_closed_elsewhere(&mut self) {
        let links: Vec<_> = self
            .sessions
            .values()
            .filter_map(|s| s.link.clone())
            .collect();
        for link in links {
            let gone = link.take_closed_elsewhere();
            self.forget_opens(gone);
        }
    }

    /// Closes every open `which` selects, as its tree is disconnected.
    /// `Err` when filterd refused or undid some of the closes: those opens
    /// stay (the others are closed).
    fn close_opens_where(&mut self, which: impl Fn(&Open) -> bool) -> Result<(), u32> {
        let mut ids: Vec<u64> = self
            .opens
            .iter()
            .filter(|(_, o)| which(o))
            .map(|(k, _)| *k)
            .collect();
        // Oldest first, as the client opened them: a lock waiting on a
        // later open is granted when an earlier one's locks go (what
        // Windows answers, smbtorture's lock.cancel-tdis).
        ids.sort_unstable();
        self.release_opens(ids, Ending::TreeDisconnect)
    }

    /// Releases opens `ids` in order; the status of a close filterd did not
    /// make (after trying them all).
    fn release_opens(&mut self, ids: Vec<u64>, ending: Ending) -> Result<(), u32> {
        let mut answer = Ok(());
        for id in ids {
            if let Err(e) = self.release_open(id, ending) {
                answer = Err(e.status);
            }
        }
        answer
    }

    /// The client's CLOSE of open `id`. `Err` when filterd did not close
    /// it: with `kept` the open stays, usable and closable again (filterd
    /// still holds the handle); without, it is forgotten all the same.
    /// A close whose outcome filterd never told leaves its FileId noted
    /// while the handle settles ([`Connection::settling`]).
    pub fn close_by_client(&mut self, id: u64) -> Result<(), NotClosed> {
        self.release_open(id, Ending::Close)
    }

    /// A new volatile file id.
    pub fn new_file_id(&mut self) -> u64 {
        let id = self.next_file;
        self.next_file += 1;
        id
    }

    /// Answers one PDU (several messages when compounded). `Err` closes
    /// the connection (what MS-SMB2 asks for a malformed frame or a failed
    /// negotiate validation).
    fn handle_pdu(&mut self, pdu: &[u8]) -> Result<Vec<u8>, WireError> {
        if pdu.starts_with(&[0xFF, b'S', b'M', b'B']) {
            return Err(WireError::Bad("SMB1 is not served"));
        }
        let mut out: Vec<Response> = Vec::new();
        // For related requests: the previous request's session, tree and
        // file, and the status of a failed CREATE they then share.
        let mut prev: Option<(u64, u32, u64, Option<u32>)> = None;
        let mut out_bytes = 0usize;
        // The whole chain is framed, and its message ids used, before any
        // of it runs: a malformed message or an id not granted further on
        // closes the connection with nothing done.
        let chain = wire::compound(pdu)?;
        if !std::mem::take(&mut self.ids_taken) {
            self.take_message_ids(&chain)?;
        }
        for (i, (mut hdr, msg)) in chain.into_iter().enumerate() {
            let mut file_override = None;
            let mut failed_related = None;
            // A chain's first request has nothing to be related to
            // (3.3.5.2.7.2).
            if i == 0 && hdr.flags & wire::FLAG_RELATED != 0 {
                failed_related = Some(status::INVALID_PARAMETER);
            }
            if hdr.flags & wire::FLAG_RELATED != 0 {
                if let Some((s, t, f, failed)) = prev {
                    if hdr.session_id == u64::MAX {
                        hdr.session_id = s;
                    }
                    if hdr.tree_id == u32::MAX {
                        hdr.tree_id = t;
                    }
                    file_override = Some(f);
                    failed_related = failed;
                }
            }
            // Only requests whose responses carry data are turned away: a
            // CLOSE, WRITE, LOCK or SET_INFO answers in a few bytes, and a
            // refused CLOSE or unlock would leave its state behind (a
            // related CREATE…CLOSE compound's open, persistent even).
            let carries_data = matches!(
                Command::from_code(hdr.command),
                Command::Read
                    | Command::QueryDirectory
                    | Command::QueryInfo
                    | Command::Ioctl
                    | Command::ChangeNotify
            );
            if out_bytes > MAX_COMPOUND_OUT && carries_data {
                failed_related = Some(status::INSUFFICIENT_RESOURCES);
            }
            let body = msg.get(HEADER_LEN..).unwrap_or(&[]);
            let req = Request { hdr, msg, body };
            if !matches!(
                Command::from_code(req.hdr.command),
                Command::Cancel | Command::SessionSetup
            ) {
                self.note_last_request(req.hdr.session_id, req.hdr.message_id);
            }
            let (resp, file) = self.dispatch(&req, file_override, failed_related);
            if let Some((st, r)) = resp {
                out_bytes = out_bytes.saturating_add(r.bytes.len());
                let created = Command::from_code(req.hdr.command) == Command::Create;
                let prev_file = prev.map(|p| p.2).unwrap_or(u64::MAX);
                let prev_failed = prev.and_then(|p| p.3);
                prev = Some((
                    r.session_id,
                    r.tree_id,
                    file.unwrap_or(prev_file),
                    match (created, st) {
                        (true, status::SUCCESS) => None,
                        (true, st) => Some(st),
                        (false, _) => prev_failed,
                    },
                ));
                out.push(r);
            }
            if self.terminate {
                return Err(WireError::Bad("negotiate validation failed"));
            }
        }
        // Chain: pad every response but the last to 8 and set NextCommand,
        // then sign each over its own (padded) bytes.
        let count = out.len();
        let mut pdu_out = Vec::new();
        for (i, mut r) in out.into_iter().enumerate() {
            let sign_key = r.pop_sign();
            if i + 1 < count {
                while r.bytes.len() % 8 != 0 {
                    r.bytes.push(0);
                }
                let n = wire::len32(r.bytes.len());
                if let Some(f) = r.bytes.get_mut(20..24) {
                    f.copy_from_slice(&n.to_le_bytes());
                }
            }
            if let Some((alg, key)) = sign_key {
                crypto::sign(alg, &key, &mut r.bytes);
            }
            pdu_out.extend_from_slice(&r.bytes);
        }
        Ok(pdu_out)
    }

    /// Runs one request; returns its status and encoded (unsigned)
    /// response, or none (CANCEL), and the file id a related request
    /// after it may use.
    fn dispatch(
        &mut self,
        req: &Request<'_>,
        file_override: Option<u64>,
        failed_related: Option<u32>,
    ) -> (Option<(u32, Response)>, Option<u64>) {
        let cmd = Command::from_code(req.hdr.command);
        if cmd == Command::Cancel {
            // CANCEL gets no response; a waiting lock or CREATE it names
            // does. Its signature is checked first like any request's
            // (3.3.5.2.4): one that does not verify is dropped unanswered.
            // Before, an unsigned or forged CANCEL ended a signed
            // session's pending LOCK, CREATE or CHANGE_NOTIFY (review).
            if self.check_signature(req, cmd).is_err() {
                return (None, None);
            }
            let named = self.cancel_named(req);
            let req = &named;
            crate::lock::cancel(self, req);
            crate::create::cancel_pending(self, req);
            crate::notify::cancel(self, req);
            return (None, None);
        }
        // A channel's PDU acts on the session bound there only, and never
        // negotiates or sets up a session at the home. On the channel's
        // own thread, a message naming the bound session in a PDU run
        // here (its first message named no bound session: `channel_of`
        // routes by that one) is refused too: run here on the channel's
        // copy of the session, a LOGOFF ended the session in the registry
        // without the home hearing of it, whose thread then waited for
        // that channel for ever and never let go of its opens (review).
        let foreign = match self.via {
            Some(v) => {
                v.session != req.hdr.session_id
                    || matches!(cmd, Command::Negotiate | Command::SessionSetup)
            }
            None => {
                cmd != Command::SessionSetup
                    && self
                        .sessions
                        .get(&req.hdr.session_id)
                        .is_some_and(|s| s.bound.is_some())
            }
        };
        // Signing: the key of the request's session, before the command
        // runs (LOGOFF removes it).
        let mut sign = match foreign {
            true => None,
            false => self.signing_for(req),
        };
        // The signature is checked before any compound handling
        // (3.3.5.2.4 before 3.3.5.2.7): a request that does not verify is
        // ACCESS_DENIED unsigned whatever its place in the chain. Refused
        // for its place first, a forged request got a response signed
        // with the session's key (review).
        let outcome = match (self.check_signature(req, cmd), failed_related) {
            _ if foreign => Err(status::USER_SESSION_DELETED),
            (Err(st), _) => {
                sign = None;
                Err(st)
            }
            (Ok(()), Some(st)) => Err(st),
            (Ok(()), None) => {
                // Saved and put back: a command may serve other requests
                // while it waits (`pump`).
                let outer = std::mem::replace(&mut self.request_signing, sign);
                let r = self.command(cmd, req, file_override);
                self.request_signing = outer;
                r
            }
        };
        let (st, body, file, session_id, tree_id) = match outcome {
            Ok(r) => (
                r.status,
                r.body,
                r.file,
                r.session_id.unwrap_or(req.hdr.session_id),
                r.tree_id.unwrap_or(req.hdr.tree_id),
            ),
            Err(st) => (st, error_body(), None, req.hdr.session_id, req.hdr.tree_id),
        };
        tracing::debug!(
            conn = self.id,
            command = ?cmd,
            message_id = req.hdr.message_id,
            related = req.hdr.flags & wire::FLAG_RELATED != 0,
            status = format_args!("{st:#010x}"),
            "request"
        );
        if cmd == Command::SessionSetup {
            // The final SESSION_SETUP response is signed with the new key.
            sign = match self.sessions.get(&session_id) {
                Some(s) if st == status::SUCCESS => s.signing_key.map(|k| (self.signing, k)),
                // A binding in progress answers signed with the session's
                // key, as it was asked (3.3.5.5.2).
                Some(Session {
                    bound: Some(home),
                    user: None,
                    ..
                }) if st == status::MORE_PROCESSING_REQUIRED => Some(home.sign),
                _ => None,
            };
        }
        // A refused SESSION_SETUP naming a session of another connection
        // (a binding leg, or one without SMB2_SESSION_FLAG_BINDING) is
        // signed with the session's own key when the request was, as the
        // client signed it (3.3.5.5.2; Windows does the same for the one
        // without the flag, smbtorture's bind_negative_* want it). Nothing
        // else naming a session this connection does not hold is: it is
        // STATUS_USER_SESSION_DELETED unsigned (3.3.5.2.4). Signed with
        // the session's key, any signed request of the session replayed
        // on another connection got a second answer under the real
        // answer's AES-GMAC nonce (MessageId, response), which gives
        // away GHASH's key, and made rksmbd a signing oracle for every
        // algorithm (review rvcrypto; tests/smb3/replayed_request.py).
        if sign.is_none()
            && st != status::SUCCESS
            && cmd == Command::SessionSetup
            && req.hdr.flags & wire::FLAG_SIGNED != 0
            && self
                .sessions
                .get(&session_id)
                .is_none_or(|s| s.user.is_none())
        {
            sign = self.foreign_session_key(session_id, req.msg);
        }
        // A request gone async: its interim response has the AsyncId and
        // is never signed (3.3.4.1.1); the final one is, as asked
        // (`go_async` gave it the request's signing).
        let async_id = match (st, self.queued_async.take()) {
            (status::PENDING, Some(a)) => {
                sign = None;
                Some(a)
            }
            _ => None,
        };
        let hdr = Header {
            credit_charge: req.hdr.credit_charge,
            status: st,
            command: req.hdr.command,
            credits: self.grant_credits(&req.hdr),
            flags: wire::FLAG_RESPONSE
                | (req.hdr.flags & wire::FLAG_RELATED)
                | async_id.map_or(0, |_| wire::FLAG_ASYNC),
            next_command: 0,
            message_id: req.hdr.message_id,
            async_id: async_id.unwrap_or(0),
            tree_id,
            session_id,
            signature: [0; 16],
        };
        let mut w = Writer::new();
        hdr.encode(&mut w);
        w.bytes(&body);
        let mut bytes = w.0;
        if cmd == Command::SessionSetup && st == status::MORE_PROCESSING_REQUIRED {
            // A binding leg's signed answer enters the preauth hash as
            // sent (its signature included).
            if let Some((alg, key)) = sign.take() {
                crypto::sign(alg, &key, &mut bytes);
            }
        }
        if cmd == Command::Negotiate && st == status::SUCCESS {
            self.preauth = crypto::preauth_update(&self.preauth, &bytes);
        }
        if cmd == Command::SessionSetup {
            if st == status::MORE_PROCESSING_REQUIRED {
                if let Some(s) = self.sessions.get_mut(&session_id) {
                    s.preauth = crypto::preauth_update(&s.preauth, &bytes);
                }
            } else if st != status::SUCCESS
                && self
                    .sessions
                    .get(&session_id)
                    .is_some_and(|s| s.user.is_none())
            {
                // A failed logon ends the session being set up.
                self.sessions.remove(&session_id);
            }
        }
        (
            Some((
                st,
                Response {
                    bytes,
                    sign,
                    session_id,
                    tree_id,
                },
            )),
            file,
        )
    }

    /// Credits for a response (MS-SMB2 3.3.1.2): what the client asks
    /// for, within [`Credits::grant`]'s bounds.
    fn grant_credits(&mut self, hdr: &Header) -> u16 {
        self.take_channel_grants();
        self.credits.grant(hdr.credits)
    }

    /// Adds to this connection's own credits what homes granted for the
    /// PDUs it forwarded as a channel (see [`Connection::forward`]); a
    /// channel's credits, swapped in while its PDU is answered here, are
    /// left alone.
    fn take_channel_grants(&mut self) {
        if self.via.is_none() {
            let granted = self.granted.swap(0, Ordering::AcqRel);
            self.credits.add_granted(granted);
        }
    }

    /// Uses the message ids of every request of a compound (3.3.5.2.3)
    /// before any of it runs: a CANCEL uses none; a multi-credit request
    /// its CreditCharge (at least one). An id not granted or used
    /// already ends the connection.
    fn take_message_ids(&mut self, chain: &[(Header, &[u8])]) -> Result<(), WireError> {
        // Every dialect served (2.1 and later) is multi-credit; before the
        // NEGOTIATE none is.
        let multi_credit = self.dialect.is_some();
        self.take_channel_grants();
        for (hdr, _) in chain {
            if Command::from_code(hdr.command) == Command::Cancel {
                continue;
            }
            let count = match multi_credit {
                true => u64::from(hdr.credit_charge.max(1)),
                false => 1,
            };
            if !self.credits.take(hdr.message_id, count) {
                tracing::warn!(
                    conn = self.origin(),
                    message_id = hdr.message_id,
                    count,
                    held = self.credits.held(),
                    "a message id that was not granted, or was used already"
                );
                return Err(WireError::Bad("message id outside the granted window"));
            }
        }
        Ok(())
    }

    fn signing_for(&self, req: &Request<'_>) -> Option<(SigningAlgorithm, [u8; 16])> {
        let s = self.sessions.get(&req.hdr.session_id)?;
        let key = s.signing_key?;
        let signed = req.hdr.flags & wire::FLAG_SIGNED != 0;
        // A channel's request is signed with the channel's key.
        let sign = self.via.map_or((self.signing, key), |v| v.sign);
        (signed || s.signing_required).then_some(sign)
    }

    /// A signed request must verify; a session that requires signing
    /// refuses unsigned ones. A NEGOTIATE flagged signed (nothing can
    /// have signed it) is STATUS_INVALID_PARAMETER (MS-SMB2 3.3.5.2.4,
    /// as Samba answers it; before, review rvcrypto, it was served).
    fn check_signature(&self, req: &Request<'_>, cmd: Command) -> Result<(), u32> {
        if matches!(cmd, Command::Negotiate) {
            return match req.hdr.flags & wire::FLAG_SIGNED {
                0 => Ok(()),
                _ => Err(status::INVALID_PARAMETER),
            };
        }
        let Some(s) = self.sessions.get(&req.hdr.session_id) else {
            return Ok(());
        };
        let Some(key) = s.signing_key else {
            return Ok(());
        };
        if req.hdr.flags & wire::FLAG_SIGNED != 0 {
            let (alg, key) = self.via.map_or((self.signing, key), |v| v.sign);
            if crypto::verify(alg, &key, req.msg) {
                Ok(())
            } else {
                tracing::warn!(conn = self.id, "bad signature");
                Err(status::ACCESS_DENIED)
            }
        } else if s.signing_required && cmd != Command::SessionSetup {
            Err(status::ACCESS_DENIED)
        } else {
            Ok(())
        }
    }

    fn command(&mut self, cmd: Command, req: &Request<'_>, file: Option<u64>) -> Outcome {
        if self.dialect.is_none() && cmd != Command::Negotiate {
            return Err(status::INVALID_PARAMETER);
        }
        match cmd {
            Command::Negotiate => self.negotiate(req),
            Command::SessionSetup => self.session_setup(req),
            Command::Echo => Ok(Reply::ok(vec![4, 0, 0, 0])),
            _ => {
                self.settle_session(req.hdr.session_id)?;
                self.logged_on(req)?;
                match cmd {
                    Command::Logoff => self.logoff(req),
                    Command::TreeConnect => self.tree_connect(req),
                    Command::OplockBreak => {
                        // An acknowledged break may let a pending CREATE in.
                        self.pending_creates.nudge();
                        crate::breaks::acknowledge(self, req)
                    }
                    _ => {
                        self.tree_of(req)?;
                        // Every dialect served is multi-credit: a request's
                        // charge must cover its payload (3.3.5.2.5).
                        if let Some(size) = crate::credits::payload_size(cmd, req.body) {
                            if !crate::credits::charge_covers(req.hdr.credit_charge, size) {
                                tracing::debug!(
                                    conn = self.id,
                                    charge = req.hdr.credit_charge,
                                    size,
                                    "credit charge does not cover the payload"
                                );
                                return Err(status::INVALID_PARAMETER);
                            }
                        }
                        match cmd {
                            Command::TreeDisconnect => self.tree_disconnect(req),
                            Command::Ioctl => self.ioctl(req, file),
                            _ => crate::files::command(self, cmd, req, file),
                        }
                    }
                }
            }
        }
    }

    /// Whether the user of session `session` holds its share of the open
    /// cap ([`UserOpens`]).
    pub fn user_opens_full(&self, session: u64) -> bool {
        self.sessions
            .get(&session)
            .and_then(|s| s.user.as_ref())
            .is_some_and(|u| self.sh.user_opens.full(u, self.sh.fds.cap()))
    }

    /// The request's session, which must be logged on.
    pub fn logged_on(&self, req: &Request<'_>) -> Result<&Session, u32> {
        match self.sessions.get(&req.hdr.session_id) {
            Some(s) if s.user.is_some() => Ok(s),
            _ => Err(status::USER_SESSION_DELETED),
        }
    }

    /// The request's tree, which must be connected in its session.
    pub fn tree_of(&self, req: &Request<'_>) -> Result<u32, u32> {
        let s = self.logged_on(req)?;
        if s.trees.contains(&req.hdr.tree_id) {
            Ok(req.hdr.tree_id)
        } else {
            Err(status::NETWORK_NAME_DELETED)
        }
    }

    /// The connection's dialect (after NEGOTIATE).
    pub fn dialect(&self) -> Option<Dialect> {
        self.dialect
    }

    fn negotiate(&mut self, req: &Request<'_>) -> Outcome {
        if self.dialect.is_some() {
            return Err(status::INVALID_PARAMETER);
        }
        let mut r = Reader::new(req.body);
        if r.u16("structure size")? != 36 {
            return Err(status::INVALID_PARAMETER);
        }
        let count = r.u16("dialect count")?;
        let security_mode = r.u16("security mode")?;
        r.u16("reserved")?;
        let capabilities = r.u32("capabilities")?;
        let guid = r.array::<16>("client guid")?;
        let ctx_offset = r.u32("context offset")?;
        let ctx_count = r.u16("context count")?;
        r.u16("reserved2")?;
        let mut dialects = Vec::new();
        for _ in 0..count {
            dialects.push(r.u16("dialect")?);
        }
        let Some(dialect) = dialects.iter().filter_map(|d| Dialect::from_code(*d)).max() else {
            return Err(status::NOT_SUPPORTED);
        };
        self.client = ClientNegotiate {
            capabilities,
            guid,
            security_mode,
            dialects,
        };
        self.client_guid = uuid::Uuid::from_bytes_le(guid);
        self.sh.notifier.negotiated(self.id, self.client_guid);
        let mut contexts = Writer::new();
        let mut ctx_n = 0u16;
        self.signing = if dialect.is_smb3() {
            SigningAlgorithm::AesCmac
        } else {
            SigningAlgorithm::HmacSha256
        };
        if dialect == Dialect::Smb311 {
            let mut offered_sha512 = false;
            let mut signing_offered: Option<Vec<u16>> = None;
            let mut at = usize::try_from(ctx_offset).map_err(|_| status::INVALID_PARAMETER)?;
            for _ in 0..ctx_count {
                let mut cr = Reader::new(wire::slice(req.msg, at, 8, "context")?);
                let kind = cr.u16("context type")?;
                let len = cr.u16("context length")?;
                let data = wire::slice(req.msg, at + 8, usize::from(len), "context data")?;
                let mut d = Reader::new(data);
                match kind {
                    1 => {
                        let n = d.u16("hash count")?;
                        d.u16("salt length")?;
                        for _ in 0..n {
                            offered_sha512 |= d.u16("hash")? == 1;
                        }
                    }
                    8 => {
                        let n = d.u16("algorithm count")?;
                        let mut algs = Vec::new();
                        for _ in 0..n {
                            algs.push(d.u16("algorithm")?);
                        }
                        signing_offered = Some(algs);
                    }
                    _ => {}
                }
                at = (at + 8 + usize::from(len) + 7) & !7;
            }
            if !offered_sha512 {
                return Err(status::INVALID_PARAMETER);
            }
            self.preauth = crypto::preauth_update(&[0; 64], req.msg);
            // Preauth integrity: SHA-512 and a 32-byte salt.
            let salt: [u8; 32] = ntlm::random_bytes();
            let mut c = Writer::new();
            c.u16(1).u16(32).u16(1).bytes(&salt);
            push_context(&mut contexts, 1, &c.0);
            ctx_n += 1;
            if let Some(algs) = signing_offered {
                self.signing = SigningAlgorithm::choose(&algs);
                let mut c = Writer::new();
                c.u16(1).u16(self.signing.id());
                push_context(&mut contexts, 8, &c.0);
                ctx_n += 1;
            }
        }
        self.dialect = Some(dialect);
        let caps = capabilities_of(dialect);
        self.security_mode = SIGNING_ENABLED;
        let blob = spnego::init_hint();
        let now = ntlm::filetime_now();
        let mut w = Writer::new();
        w.u16(65).u16(self.security_mode).u16(dialect.code());
        w.u16(if dialect == Dialect::Smb311 { ctx_n } else { 0 });
        w.bytes(&self.sh.server_guid).u32(caps);
        w.u32(MAX_IO).u32(MAX_IO).u32(MAX_IO);
        w.u64(now).u64(0);
        let blob_at = HEADER_LEN + 64;
        w.u16(wire::len16(blob_at)).u16(wire::len16(blob.len()));
        let ctx_at_pos = w.len();
        w.u32(0);
        w.bytes(&blob);
        if dialect == Dialect::Smb311 {
            while !(HEADER_LEN + w.len()).is_multiple_of(8) {
                w.u8(0);
            }
            let at = wire::len32(HEADER_LEN + w.len());
            w.put_u32(ctx_at_pos, at);
            w.bytes(&contexts.0);
        }
        Ok(Reply::ok(w.0))
    }

    fn session_setup(&mut self, req: &Request<'_>) -> Outcome {
        let mut r = Reader::new(req.body);
        if r.u16("structure size")? != 25 {
            return Err(status::INVALID_PARAMETER);
        }
        let flags = r.u8("flags")?;
        let security_mode = u16::from(r.u8("security mode")?);
        r.u32("capabilities")?;
        r.u32("channel")?;
        let off = r.u16("blob offset")?;
        let len = r.u16("blob length")?;
        let previous = r.u64("previous session")?;
        if usize::from(len) > MAX_SECURITY_BLOB {
            return Err(status::INVALID_PARAMETER);
        }
        let blob = wire::buffer(req.msg, u32::from(off), u32::from(len), "security blob")?;
        let new = req.hdr.session_id == 0;
        let flagged = !new && flags & SESSION_FLAG_BINDING != 0;
        // A binding under way stays one: every later leg must carry the
        // flag and the session's signature, and its success the same-user
        // check (3.3.5.5.2), whatever the leg says.
        let binding_under_way = !new
            && self
                .sessions
                .get(&req.hdr.session_id)
                .is_some_and(|s| s.bound.is_some() && s.user.is_none());
        if binding_under_way && !flagged {
            self.sessions.remove(&req.hdr.session_id);
            return Err(status::INVALID_PARAMETER);
        }
        let binding = flagged;
        let first_bind = binding && !self.sessions.contains_key(&req.hdr.session_id);
        if first_bind {
            self.start_binding(req)?;
        }
        if binding {
            if let Err(st) = self.check_binding(req) {
                if first_bind {
                    self.sessions.remove(&req.hdr.session_id);
                }
                return Err(st);
            }
        }
        let id = if new {
            if !self.room_for_a_session() {
                return Err(status::INSUFFICIENT_RESOURCES);
            }
            let id = self.sh.next_session.fetch_add(1, Ordering::Relaxed);
            self.sessions.insert(id, Session::new(self.preauth, None));
            id
        } else {
            req.hdr.session_id
        };
        let mut out = self.session_setup_leg(req, id, security_mode, blob);
        if out.is_err() && (new || first_bind) {
            // A first leg that fails leaves no half-made session behind.
            self.sessions.remove(&id);
        }
        if binding && matches!(&out, Ok(r) if r.status == status::SUCCESS) {
            if let Err(st) = self.finish_binding(id) {
                out = Err(st);
            } else {
                test_delay_before_a_binding_is_written_down();
            }
        }
        let logged_on = match (&out, self.sessions.get(&id)) {
            (Ok(reply), Some(s)) if reply.status == status::SUCCESS => s.user.clone(),
            _ => None,
        };
        if let Some(user) = logged_on {
            // Lease breaks of this user's opens may come here.
            self.sh
                .notifier
                .logged_on(self.id, (id, &user), |s| self.session_lives(s));
            // A binding whose session ended meanwhile at its home (LOGOFF,
            // PreviousSessionId, the home gone: each ends it before
            // `Notifier::session_ended`) carries no breaks here.
            if binding && !self.session_lives(id) {
                self.sh.notifier.session_left(self.id, id);
            }
        }
        if let (Ok(reply), Some(s)) = (&out, self.sessions.get_mut(&id)) {
            if let (status::SUCCESS, Some(user), None, None) =
                (reply.status, &s.user, &s.link, &s.bound)
            {
                let link = self.sh.registry.logged_on(id, user);
                if let Some((inbox, _)) = &self.inbox {
                    link.owned_by(inbox.clone());
                }
                // An SMB 3.x session may be bound by other connections of
                // its client (multichannel): they find its home here (a
                // 2.1 one too, to refuse the binding as MS-SMB2 says).
                if let (Some(dialect), Some((inbox, _)), Some(key)) =
                    (self.dialect, &self.inbox, s.signing_key)
                {
                    let _ = link.home.set(Arc::new(crate::channels::Home::new(
                        inbox.clone(),
                        self.id,
                        dialect,
                        self.client_guid,
                        (self.signing, key),
                    )));
                }
                s.link = Some(link);
                // PreviousSessionId (3.3.5.5.3): the same user's old
                // session, on whatever connection, ends; its durable
                // handles stay for a reconnect on this one.
                if previous != 0 && previous != id {
                    let user = user.clone();
                    if self.sh.registry.end_previous(previous, &user) {
                        // Its connection, maybe half open, carries no
                        // more of this user's lease breaks (rr39h F1).
                        self.sh.notifier.session_ended(previous);
                        tracing::info!(
                            conn = self.id,
                            session = id,
                            previous,
                            "ended the previous session"
                        );
                        // A previous session of this very connection goes
                        // now, its waiting requests answered (smbtorture
                        // smb2.notify.session-reconnect); another
                        // connection's, before its next request.
                        if self.sessions.contains_key(&previous) {
                            let _ = self.settle_session(previous);
                        }
                    }
                }
            }
        }
        out
    }

    /// The first leg of a binding (MS-SMB2 3.3.5.5.2): the session must be
    /// a logged-on SMB 3.x session of another connection of the same
    /// client, in the same dialect; this connection gets a session entry
    /// that authenticates the binding and then forwards to the home.
    fn start_binding(&mut self, req: &Request<'_>) -> Result<(), u32> {
        let dialect = self.dialect.ok_or(status::INVALID_PARAMETER)?;
        if !dialect.is_smb3() {
            return Err(status::REQUEST_NOT_ACCEPTED);
        }
        let id = req.hdr.session_id;
        let home = self
            .sh
            .registry
            .link(id)
            .and_then(|l| l.home.get().cloned())
            .filter(|h| !h.is_ended())
            .ok_or(status::USER_SESSION_DELETED)?;
        if home.dialect != dialect {
            return Err(status::INVALID_PARAMETER);
        }
        if !home.dialect.is_smb3() {
            return Err(status::REQUEST_NOT_ACCEPTED);
        }
        if home.client_guid != self.client_guid {
            return Err(status::USER_SESSION_DELETED);
        }
        if home.conn == self.id {
            return Err(status::REQUEST_NOT_ACCEPTED);
        }
        if home.channels() >= MAX_CHANNELS_PER_SESSION || !self.room_for_a_session() {
            return Err(status::INSUFFICIENT_RESOURCES);
        }
        self.sessions
            .insert(id, Session::new(self.preauth, Some(home)));
        Ok(())
    }

    /// The signing key of a session that lives on another connection,
    /// when request `msg` (a SESSION_SETUP) was signed with it (never a
    /// signature for whoever merely names the session).
    fn foreign_session_key(&self, id: u64, msg: &[u8]) -> Option<(SigningAlgorithm, [u8; 16])> {
        let home = self.sh.registry.link(id)?.home.get()?.clone();
        let (alg, key) = home.sign;
        (!home.is_ended() && crypto::verify(alg, &key, msg)).then_some(home.sign)
    }

    /// Every binding leg is signed with the session's key (3.3.5.5.2).
    fn check_binding(&self, req: &Request<'_>) -> Result<(), u32> {
        let home = self
            .sessions
            .get(&req.hdr.session_id)
            .and_then(|s| s.bound.as_ref())
            .ok_or(status::REQUEST_NOT_ACCEPTED)?;
        if req.hdr.flags & wire::FLAG_SIGNED == 0 {
            return Err(status::INVALID_PARAMETER);
        }
        let (alg, key) = home.sign;
        if !crypto::verify(alg, &key, req.msg) {
            tracing::warn!(conn = self.id, "bad signature on a session binding");
            return Err(status::ACCESS_DENIED);
        }
        Ok(())
    }

    /// The binding authenticated: the same user as the session's, else it
    /// is refused. The channel's signing key (derived from this binding's
    /// own preauth hash in 3.1.1, 3.3.5.5.3) signs what it answers.
    fn finish_binding(&mut self, id: u64) -> Result<(), u32> {
        let link = self.sh.registry.link(id);
        let Some(s) = self.sessions.get(&id) else {
            return Err(status::USER_SESSION_DELETED);
        };
        let same_user = link.is_some_and(|l| s.user.as_deref() == Some(l.user.as_str()));
        match (same_user, &s.bound) {
            // Not on a connection whose socket already ended (a compound
            // read before the end): it would count as a live channel of
            // the home for good (re-review rr41o 1).
            (true, Some(home)) if !home.is_ended() && self.io.is_some() => {
                home.bound();
                tracing::info!(
                    conn = self.id,
                    session = id,
                    home = home.conn,
                    "channel bound"
                );
                Ok(())
            }
            _ => {
                tracing::info!(conn = self.id, session = id, "binding refused");
                self.sessions.remove(&id);
                Err(status::ACCESS_DENIED)
            }
        }
    }

    /// One SESSION_SETUP leg of session `id`: NEGOTIATE → CHALLENGE, or
    /// AUTHENTICATE → logged on.
    fn session_setup_leg(
        &mut self,
        req: &Request<'_>,
        id: u64,
        security_mode: u16,
        blob: &[u8],
    ) -> Outcome {
        let dialect = self.dialect.unwrap_or(Dialect::Smb210);
        let server_name = self.sh.config.server_name.clone();
        let conn_id = self.id;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(status::USER_SESSION_DELETED)?;
        if s.user.is_some() {
            // Re-authentication is not offered.
            return Err(status::NOT_SUPPORTED);
        }
        if dialect == Dialect::Smb311 {
            s.preauth = crypto::preauth_update(&s.preauth, req.msg);
        }
        s.signing_required |= security_mode & SIGNING_REQUIRED != 0;
        let token = spnego::parse_client(blob)?;
        let mut tr = Reader::new(&token.ntlm);
        tr.skip(8, "ntlmssp signature")?;
        match (tr.u32("message type")?, s.pending.take()) {
            (1, _) => {
                let (pending, chal) = ntlm::challenge(&token.ntlm, &server_name)
                    .map_err(|_| status::INVALID_PARAMETER)?;
                s.pending = Some((pending, token.mech_types));
                let mut reply = Reply::with_status(
                    status::MORE_PROCESSING_REQUIRED,
                    session_setup_body(0, &spnego::challenge_response(&chal)),
                );
                reply.session_id = Some(id);
                Ok(reply)
            }
            (3, Some((pending, first_mechs))) => {
                // After failures of this user from this address, the
                // password is checked in its turn only: a leg that came
                // alone waited for it in `deferred_logons`; one that could
                // not (in a compound, or too many waiting) is refused
                // unchecked, as is one whose turn is too far off.
                let named = ntlm::user_of(&token.ntlm);
                let turn = match self.logon_turn.take() {
                    Some(t) => t,
                    None => self.sh.logon_failures.turn(self.peer, &named, false),
                };
                if turn != crate::logons::Turn::Now {
                    return Err(self.logon_refused(&named, &"too many failed logons"));
                }
                let logged = match ntlm::authenticate(&pending, &token.ntlm, &self.sh.config.users)
                {
                    Ok(l) => l,
                    Err(e) => return Err(self.logon_failed(&named, &e)),
                };
                // SPNEGO mechListMIC: check the client's, answer with ours.
                let mic = match (&first_mechs, &token.mic) {
                    (Some(mechs), Some(got)) => {
                        let want =
                            ntlm::first_signature(&logged, ntlm::Direction::FromClient, mechs);
                        if got.as_slice() != want {
                            return Err(self.logon_failed(&named, &"bad SPNEGO mechListMIC"));
                        }
                        Some(ntlm::first_signature(
                            &logged,
                            ntlm::Direction::FromServer,
                            mechs,
                        ))
                    }
                    _ => None,
                };
                if !self.users_counted.contains(&logged.user) {
                    if !self.sh.per_user.add(&logged.user) {
                        tracing::warn!(conn = conn_id, user = %logged.user, "too many connections of the user");
                        return Err(status::REQUEST_NOT_ACCEPTED);
                    }
                    self.users_counted.push(logged.user.clone());
                }
                s.signing_key = Some(crypto::signing_key(
                    dialect,
                    &logged.session_key,
                    &s.preauth,
                ));
                self.sh.logon_failures.succeeded(self.peer, &named);
                tracing::info!(conn = conn_id, user = %logged.user, session = id, "logged on");
                s.user = Some(logged.user);
                // Out of the not-logged-on table before the reply goes out:
                // once the client has its session, no newcomer may end the
                // connection as one that never logged on.
                if self.not_logged_on {
                    self.not_logged_on = false;
                    self.sh.not_logged_on.left(conn_id);
                }
                let mut reply = Reply::ok(session_setup_body(
                    0,
                    &spnego::accept_completed(mic.as_ref().map(|m| &m[..])),
                ));
                reply.session_id = Some(id);
                Ok(reply)
            }
            _ => Err(status::INVALID_PARAMETER),
        }
    }

    /// LOGOFF (3.3.5.6): the session's opens go as on a lost connection
    /// — durable and persistent ones are detached in filterd, so that a
    /// DHnC / DH2C from a new session reconnects them (smbtorture's
    /// durable-open reopen4), the others closed. The opens its DH2Q
    /// CREATEs answered STATUS_SERVER_UNAVAILABLE may have left, which
    /// the client never learnt of, are closed ([`crate::unanswered`]).
    fn logoff(&mut self, req: &Request<'_>) -> Outcome {
        let id = req.hdr.session_id;
        // Oldest first, as in close_opens_where (lock.cancel-logoff).
        let ids = self.opens_of(id);
        // A close of one of its opens still settling: as for its retried
        // CLOSE, the client is told to retry, nothing done (the session
        // stays, so that it may still name the open).
        crate::settle::still_settling(&self.sh, self.settling.values(), id, None)?;
        // A close filterd did not make keeps its open, and the session
        // with it: the LOGOFF fails, the client may CLOSE it or log off
        // again (or drop the connection, which closes it as any open).
        self.release_opens(ids, Ending::Logoff)?;
        self.settling.retain(|_, n| !n.of_session(id));
        let link = self.sessions.remove(&id).and_then(|s| s.link);
        // Its DH2Q CREATEs answered STATUS_SERVER_UNAVAILABLE and never
        // replayed: their opens are closed, not left to their durable
        // timeout (their client may never replay; the acknowledged
        // durable opens above stay detached for a DH2C).
        let unanswered = self.sh.registry.to_close(|| {
            link.as_ref()
                .map(|l| self.sh.registry.log_off(l))
                .unwrap_or_default()
        });
        if let Some(home) = link.and_then(|l| l.home.get().cloned()) {
            home.end();
        }
        self.sh.registry.ended(id);
        // Once it is ended where a binding looks (its home, the registry):
        // a binding finishing meanwhile either sees it ended or is written
        // down before this takes it off every connection.
        self.sh.notifier.session_ended(id);
        // After the reply, by the closer thread: each close may wait a
        // call timeout while filterd is stalled, and this connection's
        // other requests must not wait behind them (re-review unavail3 2).
        self.sh.closer.push(unanswered);
        Ok(Reply::ok(vec![4, 0, 0, 0]))
    }

    fn tree_connect(&mut self, req: &Request<'_>) -> Outcome {
        let mut r = Reader::new(req.body);
        if r.u16("structure size")? != 9 {
            return Err(status::INVALID_PARAMETER);
        }
        r.u16("flags")?;
        let off = r.u16("path offset")?;
        let len = r.u16("path length")?;
        let path = wire::utf16(
            wire::buffer(req.msg, u32::from(off), u32::from(len), "path")?,
            "path",
        )?;
        let share = path.rsplit('\\').next().unwrap_or("");
        if share.eq_ignore_ascii_case("IPC$") {
            return Err(status::ACCESS_DENIED);
        }
        if !share.eq_ignore_ascii_case(&self.sh.config.share) {
            return Err(status::BAD_NETWORK_NAME);
        }
        let tree = self.next_tree;
        self.next_tree += 1;
        let smb3 = self.dialect.is_some_and(Dialect::is_smb3);
        let s = self
            .sessions
            .get_mut(&req.hdr.session_id)
            .ok_or(status::USER_SESSION_DELETED)?;
        if s.trees.len() >= MAX_TREES_PER_SESSION {
            return Err(status::INSUFFICIENT_RESOURCES);
        }
        s.trees.push(tree);
        let mut w = Writer::new();
        w.u16(16).u8(1).u8(0); // disk share
        w.u32(0); // manual caching
        w.u32(if smb3 {
            SHARE_CAP_CONTINUOUS_AVAILABILITY
        } else {
            0
        });
        w.u32(0x001F_01FF);
        let mut reply = Reply::ok(w.0);
        reply.tree_id = Some(tree);
        Ok(reply)
    }

    fn tree_disconnect(&mut self, req: &Request<'_>) -> Outcome {
        let (sid, tid) = (req.hdr.session_id, req.hdr.tree_id);
        // As for LOGOFF: the tree stays with the opens filterd kept.
        // A close of an open of the tree still settling: as for its
        // retried CLOSE, STATUS_FILE_NOT_AVAILABLE, nothing done, the tree
        // staying (it was a success, and the client, left no tree to name
        // the open by, forgot an open whose close was not made). MS-SMB2
        // 3.3.5.8 has a TREE_DISCONNECT close the tree's opens; this
        // one's close is not made yet, so the tree is not ended either.
        crate::settle::still_settling(&self.sh, self.settling.values(), sid, Some(tid))?;
        self.close_opens_where(|o| o.session == sid && o.tree == tid)?;
        self.settling
            .retain(|_, n| !(n.of_session(sid) && n.tree == tid));
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.trees.retain(|t| *t != tid);
        }
        Ok(Reply::ok(vec![4, 0, 0, 0]))
    }

    fn ioctl(&mut self, req: &Request<'_>, related: Option<u64>) -> Outcome {
        let mut r = Reader::new(req.body);
        if r.u16("structure size")? != 57 {
            return Err(status::INVALID_PARAMETER);
        }
        r.u16("reserved")?;
        let code = r.u32("ctl code")?;
        let file = r.array::<16>("file id")?;
        let in_off = r.u32("input offset")?;
        let in_len = r.u32("input count")?;
        r.u32("max input response")?;
        r.u32("output offset")?;
        r.u32("output count")?;
        let max_output = r.u32("max output response")?;
        match code {
            FSCTL_CREATE_OR_GET_OBJECT_ID => {
                let out = crate::files::object_id(self, req, related, max_output)?;
                Ok(Reply::ok(ioctl_body(code, &file, &out)))
            }
            FSCTL_VALIDATE_NEGOTIATE_INFO => {
                let input = wire::buffer(req.msg, in_off, in_len, "input")?;
                self.validate_negotiate(input, &file)
            }
            FSCTL_QUERY_NETWORK_INTERFACE_INFO => {
                let out = self.network_interfaces();
                if out.len() > usize::try_from(max_output).unwrap_or(usize::MAX) {
                    return Err(status::BUFFER_TOO_SMALL);
                }
                Ok(Reply::ok(ioctl_body(code, &file, &out)))
            }
            FSCTL_LMR_REQUEST_RESILIENCY => {
                let input = wire::buffer(req.msg, in_off, in_len, "input")?;
                crate::files::request_resiliency(self, req, related, input)?;
                Ok(Reply::ok(ioctl_body(code, &file, &[])))
            }
            // No compression ([MS-FSCC] 2.3.20, 2.3.67): a file is
            // COMPRESSION_FORMAT_NONE and may only be set to it.
            FSCTL_GET_COMPRESSION => {
                crate::files::open_id(self, req, 8, related)?;
                if max_output < 2 {
                    return Err(status::INVALID_PARAMETER);
                }
                Ok(Reply::ok(ioctl_body(code, &file, &[0, 0])))
            }
            FSCTL_SET_COMPRESSION => {
                crate::files::open_id(self, req, 8, related)?;
                let input = wire::buffer(req.msg, in_off, in_len, "input")?;
                match Reader::new(input).u16("compression state")? {
                    0 => Ok(Reply::ok(ioctl_body(code, &file, &[]))),
                    _ => Err(status::NOT_SUPPORTED),
                }
            }
            FSCTL_SRV_REQUEST_RESUME_KEY => {
                let id = crate::files::open_id(self, req, 8, related)?;
                let out = crate::copychunk::request_resume_key(self, id, max_output)?;
                Ok(Reply::ok(ioctl_body(code, &file, &out)))
            }
            FSCTL_SRV_COPYCHUNK | FSCTL_SRV_COPYCHUNK_WRITE => {
                let id = crate::files::open_id(self, req, 8, related)?;
                let input = wire::buffer(req.msg, in_off, in_len, "input")?;
                let write_only = code == FSCTL_SRV_COPYCHUNK_WRITE;
                let session = req.hdr.session_id;
                let copied =
                    crate::copychunk::copy_chunk(self, id, session, input, max_output, write_only)?;
                Ok(Reply::with_status(
                    copied.status,
                    ioctl_body(code, &file, &copied.response),
                ))
            }
            FSCTL_DFS_GET_REFERRALS | FSCTL_DFS_GET_REFERRALS_EX => Err(status::FS_DRIVER_REQUIRED),
            _ => Err(status::NOT_SUPPORTED),
        }
    }

    /// FSCTL_QUERY_NETWORK_INTERFACE_INFO (MS-SMB2 3.3.5.15.11): one
    /// NETWORK_INTERFACE_INFO (2.2.32.5) — the address this connection
    /// reached, the only one rksmbd knows it listens on.
    fn network_interfaces(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(0); // Next: the only entry
        w.u32(1); // IfIndex
        w.u32(0); // Capability: neither RSS nor RDMA
        w.u32(0); // Reserved
        w.u64(10_000_000_000); // LinkSpeed: 10 Gbit/s
        let mut addr = Writer::new();
        match self.io.as_ref().and_then(|(s, _)| s.local_addr().ok()) {
            Some(std::net::SocketAddr::V6(a)) => {
                addr.u16(0x17).u16(0).u32(0).bytes(&a.ip().octets()).u32(0);
            }
            Some(std::net::SocketAddr::V4(a)) => {
                addr.u16(0x2).u16(0).bytes(&a.ip().octets());
            }
            None => {
                addr.u16(0x2).u16(0).bytes(&[127, 0, 0, 1]);
            }
        }
        let mut sockaddr = addr.0;
        sockaddr.resize(128, 0);
        w.bytes(&sockaddr);
        w.0
    }

    /// FSCTL_VALIDATE_NEGOTIATE_INFO (MS-SMB2 3.3.5.15.12): what the
    /// client sent must be what NEGOTIATE saw, else the connection ends.
    fn validate_negotiate(&mut self, input: &[u8], file: &[u8; 16]) -> Outcome {
        let mut r = Reader::new(input);
        let caps = r.u32("capabilities")?;
        let guid = r.array::<16>("guid")?;
        let mode = r.u16("security mode")?;
        let n = r.u16("dialect count")?;
        let mut dialects = Vec::new();
        for _ in 0..n {
            dialects.push(r.u16("dialect")?);
        }
        let c = &self.client;
        let Some(dialect) = self.dialect else {
            return Err(status::INVALID_PARAMETER);
        };
        if caps != c.capabilities
            || guid != c.guid
            || mode != c.security_mode
            || dialects != c.dialects
        {
            tracing::warn!(conn = self.id, "VALIDATE_NEGOTIATE_INFO mismatch");
            self.terminate = true;
            return Err(status::ACCESS_DENIED);
        }
        let caps = capabilities_of(dialect);
        let mut out = Writer::new();
        out.u32(caps)
            .bytes(&self.sh.server_guid)
            .u16(self.security_mode)
            .u16(dialect.code());
        Ok(Reply::ok(ioctl_body(
            FSCTL_VALIDATE_NEGOTIATE_INFO,
            file,
            &out.0,
        )))
    }
}

/// An encoded response and how to sign it.
pub struct Response {
    bytes: Vec<u8>,
    sign: Option<(SigningAlgorithm, [u8; 16])>,
    session_id: u64,
    tree_id: u32,
}

impl Response {
    fn pop_sign(&mut self) -> Option<(SigningAlgorithm, [u8; 16])> {
        self.sign.take()
    }
}

/// The capabilities rksmbd offers in a dialect (2.2.4): leasing and large
/// MTU; persistent handles and multichannel in SMB 3.x.
/// Whether NEGOTIATE advertises SMB2_GLOBAL_CAP_MULTI_CHANNEL for
/// `dialect` (then every open's LOCKs check lock sequences, 3.3.5.14).
pub fn advertises_multichannel(dialect: Dialect) -> bool {
    capabilities_of(dialect) & CAP_MULTI_CHANNEL != 0
}

/// Whether a client of `dialect` replays a request answered
/// STATUS_SERVER_UNAVAILABLE with SMB2_FLAGS_REPLAY_OPERATION (MS-SMB2
/// 3.2.5.7: SMB 3.x, the server offering persistent handles or
/// multichannel).
pub fn client_replays_unavailable(dialect: Dialect) -> bool {
    dialect.is_smb3()
        && capabilities_of(dialect) & (CAP_PERSISTENT_HANDLES | CAP_MULTI_CHANNEL) != 0
}

fn capabilities_of(dialect: Dialect) -> u32 {
    if dialect.is_smb3() {
        CAP_LEASING | CAP_LARGE_MTU | CAP_PERSISTENT_HANDLES | CAP_MULTI_CHANNEL
    } else {
        CAP_LEASING | CAP_LARGE_MTU
    }
}

/// The body of an error response (MS-SMB2 2.2.2).
pub fn error_body() -> Vec<u8> {
    vec![9, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// At most how many bytes the answers to a compound `chain` take, for a
/// channel's [`Outbox::reserve`](crate::channels::Outbox::reserve): each
/// message's header and fixed part, plus what it may carry back
/// ([`crate::credits::payload_size`]), together never more than a
/// compound's answers can be (past [`MAX_COMPOUND_OUT`] a data-carrying
/// message is refused).
fn answers_bound(chain: &[(Header, &[u8])]) -> usize {
    const PER_MESSAGE: usize = 256;
    let total = chain.iter().fold(0usize, |sum, (hdr, msg)| {
        let body = msg.get(HEADER_LEN..).unwrap_or(&[]);
        let carried = crate::credits::payload_size(Command::from_code(hdr.command), body)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
            .min(MAX_IO as usize);
        sum.saturating_add(PER_MESSAGE).saturating_add(carried)
    });
    total.min(MAX_COMPOUND_OUT + MAX_IO as usize)
}

fn push_context(w: &mut Writer, kind: u16, data: &[u8]) {
    w.align(8);
    w.u16(kind).u16(wire::len16(data.len())).u32(0).bytes(data);
}

fn session_setup_body(flags: u16, blob: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(9).u16(flags);
    w.u16(wire::len16(HEADER_LEN + 8))
        .u16(wire::len16(blob.len()));
    w.bytes(blob);
    w.0
}

/// An IOCTL response body with `output` (MS-SMB2 2.2.32).
pub fn ioctl_body(code: u32, file: &[u8; 16], output: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    let out_at = wire::len32(HEADER_LEN + 48);
    w.u16(49).u16(0).u32(code).bytes(file);
    w.u32(out_at)
        .u32(0)
        .u32(out_at)
        .u32(wire::len32(output.len()));
    w.u32(0).u32(0).bytes(output);
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// A user's share is a quarter of the cap, at least 64 (the whole
    /// cap if smaller); each user is counted apart, across slots, until
    /// the slots go.
    #[test]
    fn a_compounds_answers_are_bounded_by_what_its_messages_may_carry() {
        // Command codes (MS-SMB2 2.2.1.2): READ 8, ECHO 13.
        let msg = |code: u16, length: u32| {
            let mut m = vec![0u8; HEADER_LEN + 48];
            m[..4].copy_from_slice(&wire::PROTOCOL_ID);
            m[4..6].copy_from_slice(&64u16.to_le_bytes());
            m[12..14].copy_from_slice(&code.to_le_bytes());
            m[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&length.to_le_bytes());
            m
        };
        let one = |m: Vec<u8>| -> (Header, Vec<u8>) { (Header::decode(&m).expect("header"), m) };
        let read = one(msg(8, 1 << 20));
        let echo = one(msg(13, 0));
        let chain = |ms: &[&(Header, Vec<u8>)]| -> usize {
            let v: Vec<(Header, &[u8])> =
                ms.iter().map(|(h, m)| (h.clone(), m.as_slice())).collect();
            answers_bound(&v)
        };
        assert_eq!(chain(&[&echo]), 256);
        assert_eq!(chain(&[&read]), 256 + (1 << 20));
        assert_eq!(
            chain(&[&read, &read, &read, &read, &read]),
            MAX_COMPOUND_OUT + MAX_IO as usize
        );
    }

    #[test]
    fn each_user_holds_its_share_of_the_opens() {
        assert_eq!(UserOpens::share(320), 80);
        assert_eq!(UserOpens::share(100), 64);
        assert_eq!(UserOpens::share(32), 32);
        let opens = Arc::new(UserOpens::default());
        let bob: Vec<UserSlot> = (0..64).map(|_| opens.count("bob")).collect();
        assert!(opens.full("bob", 100));
        assert!(!opens.full("alice", 100));
        drop(bob);
        assert!(!opens.full("bob", 100));
        assert!(opens.lock().is_empty(), "no user left counted");
    }
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// A client that stops reading: the write that times out part way
    /// through a frame shuts the connection down, so the next writer fails
    /// at once, and the client, reading again, finds the end of the stream
    /// after the cut frame — never more frames, mid-frame.
    #[test]
    fn a_write_that_fails_part_way_shuts_the_connection_down() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (server, _) = l.accept().expect("accept");
        server
            .set_write_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let wr: crate::breaks::ConnWriter = Arc::new(Mutex::new(server));
        // More than loopback's socket buffers hold.
        let pdu = vec![0u8; 0x00FF_FFFF];
        assert!(!write_frame(&wr, &pdu), "the write times out");
        let t = Instant::now();
        assert!(!write_frame(&wr, b"next"), "the next writer fails");
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "at once: {:?}",
            t.elapsed()
        );
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (mut n, mut buf) = (0, vec![0u8; 1 << 16]);
        loop {
            match (&client).read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("no end of stream after {n} bytes: {e}"),
            }
        }
        assert!(n < 4 + pdu.len(), "the frame was cut: {n} bytes");
    }

    /// A client that reads a little now and then makes every `write`
    /// progress within the socket's timeout: the frame still fails at its
    /// deadline (review B-2: the lock, and every writer behind it, was
    /// held for as long as the client liked).
    #[test]
    fn a_trickling_reader_cannot_stretch_a_write_past_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut w = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut r, _) = listener.accept().expect("accept");
        w.set_write_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || stopped.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let frame = vec![7u8; 64 << 20];
        let t = Instant::now();
        let e = write_by(&mut w, &frame, t + Duration::from_millis(800))
            .expect_err("64 MiB at 200 KiB/s");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        stop.store(true, Ordering::Relaxed);
        drop(w);
        reader.join().expect("reader");
    }
}
