//! The state store: one LMDB environment in the state directory, through heed.
//!
//! Each table is a typed database whose codecs are declared here, beside it.
//! Records carry a version byte ([`crate::record`]: version 2 is postcard,
//! version 1 JSON); decoding an unknown version or a corrupt record gives a
//! [`StoreError`], never a panic. `meta` holds the schema
//! version (with a migration path), the daemon epoch and the clean-shutdown
//! flag.
//!
//! One writer: filterd, which holds the state dir's lock (on the directory
//! itself). Any process may open the environment read-only (filterctl's
//! post-mortem view).
//!
//! Commits are durable: the environment is opened without `NO_SYNC`, so
//! `commit` returns only after LMDB has fsync'd. Only persistent state is
//! written here; non-persistent handles live in daemon memory and therefore
//! never wait on an fsync (invariant 1).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str};
use heed::{BoxedError, BytesDecode, BytesEncode, Database, Env, EnvFlags};

use crate::model::{HandleRecord, Intent, IntentId, ReplayRecord, ReplayScope, ResumeKey};
use crate::record::{decode_handle_record, SharedNames};
pub use crate::record::{decode_record, encode_record, RecordError, StoredRecord};

/// The schema this build writes. Bump it together with a step in [`migrate`].
/// 2: record values are written as version 2 (postcard, [`crate::record`]);
/// version-1 (JSON) values are still read.
/// 3: replay records carry their place in their scope's recording order
/// (`ReplayRecord::seq`, record version 3), which a schema-2 build cannot
/// read.
pub const SCHEMA_VERSION: u32 = 3;
/// Default LMDB map size (sparse; grows the file only as used).
pub const DEFAULT_MAP_SIZE: usize = 4 << 30;

/// The pages kept free at the top of a map of `max_pages` (the largest it
/// may grow to) for commits that do not grow the tables: a sixteenth, and
/// never fewer than [`MIN_RESERVE_PAGES`].
///
/// Without it, commits that add records used the map to its last page, and
/// then some deletes could never commit: LMDB frees no page by deleting a
/// record from a leaf that keeps others, yet copies the pages it changes
/// (copy-on-write), so a delete needs a few pages that no earlier commit
/// freed for it — more when the leaf falls under a quarter full and LMDB
/// moves a record over from its neighbour (the neighbour and their parent
/// are copied too) — and the pages the last commit freed are reusable only
/// after the next one. Filled with time-ordered keys, a 1 MiB map refused
/// the last nine deletes of every leaf for good (review: 711 of 2371
/// CLOSEs, `tests::deletes_commit_in_a_map_filled_to_its_maximum`).
///
/// What a delete-only commit needs grows with the map only slowly (two
/// pages a tree level, the main and free-page trees' leaves, the free-page
/// list's own pages, at most one in 512 of the free pages), so a sixteenth
/// leaves room for that, for what the previous commit freed and cannot yet
/// be reused, and for a reader's pinned pages; the floor covers one
/// request's delete in the smallest maps.
pub fn delete_reserve(max_pages: usize) -> usize {
    (max_pages / 16).max(MIN_RESERVE_PAGES)
}

/// The bytes of the state filesystem kept allocated to `data.mdb` past
/// the map's last used page (`fallocate`, `FALLOC_FL_KEEP_SIZE`) for
/// commits that only remove or complete ([`Reserve`]): a sixteenth of the
/// filesystem, at least 256 KiB and at most 16 MiB. On a full filesystem,
/// LMDB's copy-on-write pages of a delete or an intent's completion need
/// new blocks too (attack45 F1: the completion failed with ENOSPC and
/// filterd stopped, and stopped again at every restart). A commit that
/// adds state is refused ([`StoreError::Full`]) once less than half of it
/// is left and the filesystem has no room to make it whole again.
pub fn block_reserve(fs_bytes: u64) -> u64 {
    (fs_bytes / 16).clamp(256 << 10, 16 << 20)
}

/// The fewest pages [`delete_reserve`] keeps (64 KiB of 4 KiB pages: a
/// delete's path and its neighbours' at depth 5, the main and free-page
/// trees' pages, with room to spare).
pub const MIN_RESERVE_PAGES: usize = 16;

/// Commits between two clearings of the reader slots of dead processes
/// ([`clear_stale_readers`]): a slot left by a killed reader pins
/// its snapshot, so every commit meanwhile (a few pages) grows the file
/// instead of reusing pages; this bounds that to a megabyte or so, at the
/// cost of one scan of the reader table (no I/O) per that many fsyncs.
const READER_CHECK_EVERY: u64 = 64;

/// Store failures, one variant per cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB returned an error (in the message and not also a `source`, so
    /// a printed chain says it once).
    #[error("lmdb: {0}")]
    Lmdb(heed::Error),
    /// The state dir could not be prepared.
    #[error("state directory {path}")]
    Dir {
        /// The directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state dir was written by a newer build.
    #[error(
        "state directory has schema version {found}; this build understands up to {SCHEMA_VERSION}"
    )]
    SchemaTooNew {
        /// The version found.
        found: u32,
    },
    /// Another process has this LMDB environment open for writing (a second
    /// filterd on the same store, through whatever path).
    #[error("the state store {path} is in use by another filterd")]
    InUse {
        /// The LMDB directory.
        path: String,
    },
    /// The store's directory, or something in it, is not what only this
    /// process's user could have made (`why`: what it is, and what to do).
    #[error("{path} cannot be trusted: {why}")]
    Untrusted {
        /// The directory or file.
        path: String,
        /// What is wrong with it, and the remedy.
        why: String,
    },
    /// The environment has no rkfilter schema (read-only open of an empty dir).
    #[error("no rkfilter state found (missing database {0})")]
    Missing(&'static str),
    /// A stored record could not be decoded.
    #[error("corrupt record in {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The disk holding the state dir is full.
    #[error("state store is full (no space left on its filesystem)")]
    Full,
    /// The LMDB map is full (and could not grow further).
    #[error("state store map is full (restart filterd with a larger --max-map-size-mib)")]
    MapFull,
    /// A commit would have grown the tables into the reserve kept at the
    /// top of the largest map for commits that do not grow them (closes,
    /// expiries, purges): refused, nothing written ([`delete_reserve`]).
    #[error("state store is full: the tables would take {pages} of the {max_pages} pages of the largest map, {reserve} of which are kept for deletes (restart filterd with a larger --max-map-size-mib)")]
    Reserved {
        /// The pages the tables would have taken.
        pages: usize,
        /// The pages of the largest map.
        max_pages: usize,
        /// The pages kept for deletes.
        reserve: usize,
    },
    /// Another daemon claimed the table since this one did: this one may
    /// no longer change anything (nothing was written).
    #[error(
        "another filterd owns this state now (epoch {now}; this daemon claimed {mine}): fenced"
    )]
    Fenced {
        /// The epoch this daemon claimed.
        mine: u64,
        /// The epoch the table carries now.
        now: u64,
    },
    /// The remote store (etcd) failed the request.
    #[error("etcd: {0}")]
    Etcd(String),
    /// No etcd endpoint answered a read-only open in time.
    #[error("etcd at {endpoints} is not reachable: {cause} (tried for {waited_s} s)")]
    Unreachable {
        /// `HOST:PORT, …`.
        endpoints: String,
        /// The innermost cause of the last try ("connection refused").
        cause: String,
        /// How long it was retried.
        waited_s: u64,
    },
    /// This daemon's etcd lease may have run out (it could not be renewed
    /// in time, or a commit could not be confirmed before it might): it may
    /// no longer act as owner.
    #[error("the etcd lease of fencing revision {fence} may have expired: this daemon no longer owns the table")]
    LeaseLost {
        /// Our fencing revision.
        fence: u64,
    },
    /// Another daemon owns the table (etcd): start with --standby to take
    /// over when it goes.
    #[error("the state table is owned by {by}; start with --standby to take over when it goes")]
    Owned {
        /// Who owns it.
        by: String,
    },
}

impl From<heed::Error> for StoreError {
    /// Every LMDB error, `?` included, tells a full map or disk apart.
    fn from(e: heed::Error) -> StoreError {
        StoreError::from_heed(e)
    }
}

impl From<RecordError> for StoreError {
    /// A record that does not encode (decoding errors name their table
    /// through [`corrupt`] instead).
    fn from(e: RecordError) -> StoreError {
        StoreError::Corrupt {
            table: "encode",
            reason: e.to_string(),
        }
    }
}

impl StoreError {
    fn from_heed(e: heed::Error) -> StoreError {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::MapFull,
            heed::Error::Io(ref io) if io.raw_os_error() == Some(libc::ENOSPC) => StoreError::Full,
            heed::Error::Mdb(heed::MdbError::Other(c)) if c == libc::ENOSPC => StoreError::Full,
            heed::Error::Mdb(heed::MdbError::Other(c)) if c == libc::EDQUOT => StoreError::Full,
            e => StoreError::Lmdb(e),
        }
    }
}

/// Codec: a resume key as its 16 bytes.
pub enum ResumeKeyCodec {}

impl<'a> BytesEncode<'a> for ResumeKeyCodec {
    type EItem = ResumeKey;
    fn bytes_encode(item: &'a ResumeKey) -> Result<Cow<'a, [u8]>, BoxedError> {
        Ok(Cow::Borrowed(item.as_bytes()))
    }
}

impl<'a> BytesDecode<'a> for ResumeKeyCodec {
    type DItem = ResumeKey;
    fn bytes_decode(bytes: &'a [u8]) -> Result<ResumeKey, BoxedError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| "resume key is not 16 bytes")?;
        Ok(ResumeKey(uuid::Uuid::from_bytes(arr)))
    }
}

/// Codec: a versioned record ([`crate::record`]): written as version 2
/// (postcard), read in every version this build knows.
pub struct Versioned<T>(std::marker::PhantomData<T>);

impl<'a, T: StoredRecord + 'a> BytesEncode<'a> for Versioned<T> {
    type EItem = T;
    fn bytes_encode(item: &'a T) -> Result<Cow<'a, [u8]>, BoxedError> {
        Ok(Cow::Owned(encode_record(item)?))
    }
}

impl<'a, T: StoredRecord + 'a> BytesDecode<'a> for Versioned<T> {
    type DItem = T;
    fn bytes_decode(bytes: &'a [u8]) -> Result<T, BoxedError> {
        decode_record(bytes).map_err(Into::into)
    }
}

/// A record of `table` that does not decode, as a store error.
pub(crate) fn corrupt(table: &'static str) -> impl Fn(RecordError) -> StoreError {
    move |e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    }
}

#[cfg(test)]
thread_local! {
    /// Keys the replay trims of this thread's commits looked at.
    static TRIM_VISITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
thread_local! {
    /// The last [`growth_bound`] this thread's commits checked, in bytes.
    static GROWTH_BOUND: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Notes the [`growth_bound`] a commit checked (tests only).
fn note_growth_bound(bytes: u64) {
    #[cfg(test)]
    GROWTH_BOUND.with(|v| v.set(Some(bytes)));
    #[cfg(not(test))]
    let _ = bytes;
}

/// Puts `item` under `key` in `db`, encoded once by the table's declared
/// codec ([`Versioned`]), its pages counted in `written`: the bytes are
/// written as they are, not encoded again.
fn put_written<K, T, E>(
    db: &Database<K, Versioned<T>>,
    txn: &mut heed::RwTxn<'_>,
    key: &E,
    item: &T,
    written: &mut Written,
) -> Result<(), StoreError>
where
    K: for<'a> BytesEncode<'a, EItem = E>,
    E: ?Sized,
    T: StoredRecord,
{
    let value = Versioned::<T>::bytes_encode(item).map_err(heed::Error::Encoding)?;
    let key_len = K::bytes_encode(key).map_or(0, |k| k.len());
    written.put(key_len, value.len());
    db.remap_data_type::<Bytes>()
        .put(txn, key, &value)
        .map_err(StoreError::from_heed)
}

/// Counts `n` keys a replay trim looked at (tests only: the work per put).
fn trim_visited(n: usize) {
    #[cfg(test)]
    TRIM_VISITS.with(|v| v.set(v.get() + n));
    #[cfg(not(test))]
    let _ = n;
}

/// Key prefix of a replay scope in the `replay` table.
pub fn replay_prefix(scope: &ReplayScope) -> Vec<u8> {
    match scope {
        ReplayScope::Handle(k) => {
            let mut v = Vec::with_capacity(17);
            v.push(b'h');
            v.extend_from_slice(k.as_bytes());
            v
        }
        ReplayScope::Session(s) => {
            let b = s.as_str().as_bytes();
            let mut v = Vec::with_capacity(b.len() + 3);
            v.push(b's');
            v.extend_from_slice(&u16::try_from(b.len()).unwrap_or(u16::MAX).to_be_bytes());
            v.extend_from_slice(b);
            v
        }
    }
}

/// Splits a `replay` table key back into its scope and op id.
pub fn parse_replay_key(k: &[u8]) -> Option<(ReplayScope, u64)> {
    let (tag, rest) = k.split_first()?;
    let split = rest.len().checked_sub(8)?;
    let (body, op) = rest.split_at(split);
    let op_id = u64::from_be_bytes(op.try_into().ok()?);
    let scope = match tag {
        b'h' => ReplayScope::Handle(ResumeKey(uuid::Uuid::from_bytes(body.try_into().ok()?))),
        b's' => {
            let (len, name) = body.split_at_checked(2)?;
            let len = usize::from(u16::from_be_bytes(len.try_into().ok()?));
            if name.len() != len {
                return None;
            }
            ReplayScope::Session(
                crate::model::ScopeName::new(std::str::from_utf8(name).ok()?).ok()?,
            )
        }
        _ => return None,
    };
    Some((scope, op_id))
}

/// Key of one replay record: scope prefix then the op id, big-endian, so a
/// scope's records are contiguous and ordered.
pub fn replay_key(scope: &ReplayScope, op_id: u64) -> Vec<u8> {
    let mut k = replay_prefix(scope);
    k.extend_from_slice(&op_id.to_be_bytes());
    k
}

/// A raw key and value of a table, as stored.
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// A `replay` table entry: its raw key (see [`parse_replay_key`]) and record.
pub type RawReplay = (Vec<u8>, Result<ReplayRecord, StoreError>);

/// One change to persistent state. A batch of them commits in one transaction.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Insert or replace a handle record and its index entries.
    PutHandle(Box<HandleRecord>),
    /// Replace the record of a handle whose client or frontend went away
    /// (a detach: the handle becomes disconnected). Written as
    /// [`StoreOp::PutHandle`]; a commit of detaches (and removals) may use
    /// an eighth of the delete reserve ([`Reserve::Detaches`]): it adds no
    /// key, only lengthens a record a little, and a frontend that lost
    /// its connection must be able to let its handles go — refused at the
    /// reserve, the frontend was told DISK_FULL while filterd held the
    /// handle disconnected, and the stored record said attached
    /// (re-review rr47e F5).
    DetachHandle(Box<HandleRecord>),
    /// Remove a handle record, its index entries and its replay records.
    DeleteHandle(Box<HandleRecord>),
    /// Record the reply of a mutating request, and drop the scope's older
    /// records `trim` says (the oldest recorded go first, whatever their
    /// op ids).
    PutReplay {
        /// Where the op id lives.
        scope: ReplayScope,
        /// The op id.
        op_id: u64,
        /// The recorded reply.
        record: ReplayRecord,
        /// Which of the scope's records go with it.
        trim: ReplayTrim,
    },
    /// Drop one replay record.
    DeleteReplay {
        /// Where the op id lives.
        scope: ReplayScope,
        /// The op id.
        op_id: u64,
    },
    /// Drop every replay record of a scope (a session destroyed).
    DeleteReplayScope(ReplayScope),
    /// Record a non-idempotent filesystem change about to happen.
    PutIntent(Box<Intent>),
    /// The change an intent announced is done (or was abandoned).
    DeleteIntent(IntentId),
}

/// Which of its scope's records a [`StoreOp::PutReplay`] drops: those
/// its writer names ([`ReplayTrim::Evicted`]), or the oldest beyond a
/// count ([`ReplayTrim::Keep`]). Oldest is by recording order
/// ([`ReplayRecord::seq`]), never by op id: an smbl/1 client chooses its
/// op ids, in no order, and a record that went by its low op id while its
/// request was still in flight had a replay of it run again (review
/// rvspec: a low op id after 1024 high ones was dropped in its own commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayTrim {
    /// These op ids: the records its writer evicted. filterd holds every
    /// persistent scope whole in memory (loaded at start, put back from
    /// the store when a commit fails), evicts the oldest recorded from it
    /// when a record goes over the scope's `keep`, and names them: the
    /// store deletes just those keys — a key per record dropped, however
    /// many the scope keeps. The record put carries its own `seq` (one
    /// past the scope's newest in memory). Counting the scope on every
    /// put walked and copied all its keys (a full scope: 4096 of up to
    /// ~270 bytes) on the committer thread, which every durable reply
    /// waits for (review rvcx).
    Evicted(Vec<u64>),
    /// All but the newest this many, counted, the record put placed after
    /// the scope's newest (the store sets its `seq`: [`counted_trim`]): for
    /// a writer that does not hold the scope (recovery writes records
    /// before it loads them). Reads the whole scope.
    Keep(u32),
}

/// What a counted put ([`ReplayTrim::Keep`]) of `record` does to its
/// scope, given what the scope holds under its op id (`held`) and the ages
/// ([`ReplayRecord::age`]) of the scope's other records (an unreadable
/// one's: [`stored_age`]): the record to store, placed one past the
/// scope's newest, and the op ids that go, oldest first, so that the scope
/// keeps `keep` with it (always kept: it is the newest). The same put
/// applied again (a retried request: the record held, same reply and
/// time) keeps the place it took, so that it changes nothing again.
pub fn counted_trim(
    record: &ReplayRecord,
    held: Option<ReplayRecord>,
    mut others: Vec<(u64, u64)>,
    keep: u32,
) -> (ReplayRecord, Vec<u64>) {
    let newest = others.iter().map(|&(seq, _)| seq).max().unwrap_or(0);
    let again = held
        .filter(|h| (&h.reply, h.recorded_ms) == (&record.reply, record.recorded_ms))
        .and_then(|h| h.seq);
    let record = ReplayRecord {
        seq: Some(again.unwrap_or(newest.saturating_add(1))),
        ..record.clone()
    };
    others.sort_unstable();
    let keep = usize::try_from(keep).unwrap_or(usize::MAX).max(1);
    let excess = (others.len() + 1).saturating_sub(keep);
    let dropped = others.into_iter().take(excess).map(|(_, op)| op).collect();
    (record, dropped)
}

/// The age of a stored replay record of op `op_id` ([`ReplayRecord::age`]);
/// one that does not decode counts as the oldest, by its op id.
pub fn stored_age(op_id: u64, value: &[u8]) -> (u64, u64) {
    decode_record::<ReplayRecord>(value).map_or((0, op_id), |r| r.age(op_id))
}

/// What `meta` says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetaInfo {
    /// Schema version.
    pub schema_version: u32,
    /// Epoch of the last daemon start.
    pub epoch: u64,
    /// Whether the last daemon stopped cleanly.
    pub clean_shutdown: bool,
}

/// The LMDB environment and its typed tables (replaced together: a table
/// handle belongs to the environment that opened it).
struct Tables {
    env: Env,
    meta: Database<Str, Bytes>,
    handles: Database<ResumeKeyCodec, Versioned<HandleRecord>>,
    /// (resume key or session, op id) → recorded reply.
    replay: Database<Bytes, Versioned<ReplayRecord>>,
    /// intent id → a non-idempotent filesystem change in flight.
    intents: Database<Bytes, Versioned<Intent>>,
    /// Protocol client records.
    #[allow(dead_code)]
    clients: Database<Bytes, Bytes>,
}

/// The LMDB environment and its typed tables.
pub struct Store {
    /// The tables, behind the transaction gate: held shared by every
    /// method while its transaction is open, and exclusively to grow the
    /// map (LMDB allows that only with no transaction open in the process)
    /// or to reopen the environment after LMDB declared it broken
    /// ([`Store::reopen_if_broken`]; `None` only if that reopen failed).
    gate: std::sync::RwLock<Option<Tables>>,
    /// The map grows (doubling) up to this many bytes when it fills.
    max_map: std::sync::atomic::AtomicUsize,
    /// The epoch this handle claimed ([`Store::begin_epoch`]); every later
    /// commit is conditional on the table still carrying it (0: unclaimed,
    /// unconditional — tools and tests).
    fence: std::sync::atomic::AtomicU64,
    /// An exclusive flock on the LMDB directory itself, held while this
    /// store is open for writing: however the state dir's files are moved,
    /// renamed or linked, a second writer of the same environment is refused.
    _writer: Option<nix::fcntl::Flock<std::fs::File>>,
    /// Commits since the reader slots were last cleared
    /// ([`READER_CHECK_EVERY`]).
    commits_since_reader_check: std::sync::atomic::AtomicU64,
    /// The filesystem blocks kept for removals and completions (`None`:
    /// read-only, or the filesystem cannot preallocate).
    blocks: Option<BlockReserve>,
}

/// btrfs and ZFS: whatever they report, the reserve cannot be kept there.
/// Both copy on write below the map's last page too (a completion's
/// rewritten pages need new extents, not the preallocated ones), and ZFS
/// emulates `fallocate` without showing it in `st_blocks` (and lags
/// `st_blocks` behind compression), so the reserve would look low for
/// good and refuse all new state on an empty disk (review rr45h F4).
fn reserve_unsupported_fs(fs_type: libc::c_long) -> bool {
    const ZFS_SUPER_MAGIC: libc::c_long = 0x2fc1_2fc1;
    fs_type == libc::BTRFS_SUPER_MAGIC || fs_type == ZFS_SUPER_MAGIC
}

/// Why the state dir's filesystem cannot keep a [`BlockReserve`], given
/// how allocating it went and the slack `data.mdb` then shows (`None`:
/// it can). Refused where preallocating is not supported, and where it
/// "succeeded" but the file's blocks do not show it (the reserve would
/// look low for good); kept when the filesystem is full now (`ENOSPC`,
/// topped up once there is room).
fn reserve_unusable(allocated: nix::Result<()>, slack: u64, bytes: u64) -> Option<&'static str> {
    match allocated {
        Err(nix::errno::Errno::EOPNOTSUPP) => Some("cannot preallocate (or copies on write)"),
        Ok(()) if slack < bytes / 2 => Some("does not show preallocated blocks in st_blocks"),
        _ => None,
    }
}

/// `data.mdb`, and the bytes of its filesystem kept allocated to it past
/// the map's last used page ([`block_reserve`]).
struct BlockReserve {
    data: std::fs::File,
    bytes: u64,
}

impl BlockReserve {
    /// Opens `data.mdb` in `db_dir` to keep its reserve; `None` where the
    /// filesystem cannot preallocate (the reserve is then the map's alone).
    fn open(db_dir: &Path, used: u64) -> Option<BlockReserve> {
        use std::os::unix::fs::OpenOptionsExt;
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(db_dir.join("data.mdb"))
            .ok()?;
        let v = nix::sys::statvfs::fstatvfs(&data).ok()?;
        let r = BlockReserve {
            bytes: block_reserve(v.blocks().saturating_mul(v.fragment_size())),
            data,
        };
        let fs_type = nix::sys::statfs::fstatfs(&r.data)
            .map(|f| f.filesystem_type().0)
            .unwrap_or(0);
        let allocated = if reserve_unsupported_fs(fs_type) {
            Err(nix::errno::Errno::EOPNOTSUPP)
        } else {
            r.allocate(used, r.bytes)
        };
        match reserve_unusable(allocated, r.slack(used), r.bytes) {
            Some(why) => {
                tracing::warn!("no block reserve for deletes and completions on a full disk: the state dir's filesystem {why}");
                None
            }
            None => Some(r),
        }
    }

    /// Bytes allocated to `data.mdb` past its first `used` (LMDB writes
    /// every page up to the last used one, so none of those is a hole).
    fn slack(&self, used: u64) -> u64 {
        match nix::sys::stat::fstat(&self.data) {
            Ok(st) => u64::try_from(st.st_blocks)
                .unwrap_or(0)
                .saturating_mul(512)
                .saturating_sub(used),
            Err(_) => 0,
        }
    }

    fn allocate(&self, used: u64, len: u64) -> nix::Result<()> {
        let off = i64::try_from(used).unwrap_or(i64::MAX);
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        nix::fcntl::fallocate(
            &self.data,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }

    /// Makes the reserve whole again where the filesystem has room, once
    /// it is down by a quarter ([`top_up_range`]); returns what is left of
    /// it.
    fn top_up(&self, used: u64) -> u64 {
        let slack = self.slack(used);
        let Some((off, len)) = top_up_range(used, slack, self.bytes) else {
            return slack;
        };
        if self.fs_free() < len || self.allocate(off, len).is_err() {
            return slack;
        }
        self.slack(used)
    }

    /// The bytes of the state filesystem free for filterd.
    fn fs_free(&self) -> u64 {
        nix::sys::statvfs::fstatvfs(&self.data)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
            .unwrap_or(0)
    }

    /// Whether a commit that grows the tables and may take up to `growth`
    /// bytes past the map's last page leaves half of the reserve: of the
    /// `slack` kept, or of it and the filesystem's free blocks (asked
    /// only when the slack alone is not enough).
    fn admits(&self, slack: u64, growth: u64) -> bool {
        leaves_half(self.bytes, slack, growth, || self.fs_free())
    }

    /// The bytes commits may take past the map's first `used`: the
    /// slack and the filesystem's free blocks.
    fn room(&self, used: u64) -> u64 {
        self.slack(used).saturating_add(self.fs_free())
    }
}

/// Whether a commit taking up to `growth` bytes past the map's last page
/// leaves half of a block reserve of `bytes` in the `slack` kept and the
/// filesystem's free bytes (`fs_free`, asked only when the slack alone is
/// short).
fn leaves_half(bytes: u64, slack: u64, growth: u64, fs_free: impl FnOnce() -> u64) -> bool {
    let need = (bytes / 2).saturating_add(growth);
    slack >= need || slack.saturating_add(fs_free()) >= need
}

/// The most pages a commit that adds `added` pages to the tables and
/// writes `written` ([`Written`]) may take past the map's last page: its
/// new pages, what its writes take anew, and a few for the free-page tree
/// and the trees' roots. Freed pages LMDB reuses make it take less.
fn growth_bound(written: u64, added: usize) -> u64 {
    u64::try_from(added)
        .unwrap_or(u64::MAX)
        .saturating_add(written)
        .saturating_add(8)
}

/// The pages a commit's writes take anew, counted as it makes them, for
/// [`growth_bound`]: a copy of the leaf and of a branch page for every
/// key put or deleted (those above are shared with the others), and the
/// overflow pages of every value put ([`overflow_pages`]), which LMDB
/// writes anew whenever the value is, even in place of one as large
/// (re-review rr46c F3: counting two pages an operation, a group
/// rewriting replay records of up to 16 KiB — five overflow pages each —
/// or deleting a scope of many records took several times its bound, and
/// a dozen such operations could go below half the block reserve).
/// Deletes are over-counted: LMDB reuses within the commit the pages it
/// copied and then emptied.
struct Written {
    page: usize,
    pages: u64,
}

impl Written {
    fn new(page: usize) -> Written {
        Written { page, pages: 0 }
    }

    /// A value of `len` bytes put under a key of `key` bytes.
    fn put(&mut self, key: usize, len: usize) {
        let value = u64::try_from(overflow_pages(key, len, self.page)).unwrap_or(u64::MAX);
        self.pages = self.pages.saturating_add(2).saturating_add(value);
    }

    /// `keys` keys deleted.
    fn deleted(&mut self, keys: usize) {
        let keys = u64::try_from(keys).unwrap_or(u64::MAX);
        self.pages = self.pages.saturating_add(keys.saturating_mul(2));
    }
}

/// The overflow pages LMDB stores a value of `len` bytes under a key of
/// `key` bytes on: none while its leaf node (an 8-byte header, the key,
/// the value) fits half of a page's room (LMDB's `me_nodemax`), else
/// whole pages of its own after a 16-byte page header.
fn overflow_pages(key: usize, len: usize, page: usize) -> usize {
    const PAGE_HEADER: usize = 16;
    let node_max = ((page.saturating_sub(PAGE_HEADER) / 2) & !1).saturating_sub(2);
    if key.saturating_add(len).saturating_add(8) <= node_max {
        return 0;
    }
    len.saturating_add(PAGE_HEADER).div_ceil(page.max(1))
}

/// The most store operations per commit in a long series of them
/// ([`StateStore::commit_step_ops`]) when `room_pages` pages are left for
/// it, each weighed by [`step_weight`]: each commit copies up to four
/// pages per unit of weight (a leaf and the branch pages above, up to a
/// depth of four, in each tree an operation touches; a large value's
/// overflow pages), and the pages one commit frees are reused only two
/// commits later (those of the last are still the previous state), so
/// the file grows by two commits' copies at most before it recycles —
/// kept within half of the room and a few pages (at the worst: branch
/// pages are mostly shared). While a reader pins a snapshot (a
/// `filterctl --state` reading, or a dead reader's slot not cleared yet)
/// nothing freed since is reused, and the steps together take as much as
/// one commit of them all. At least one.
pub fn step_ops(room_pages: u64) -> usize {
    usize::try_from(room_pages / 16)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// What `op` counts towards a step of [`step_ops`]: one for each tree it
/// touches — a persistent handle's delete touches two, its record and its
/// replay scope, whose records are contiguous keys (re-review rr46c F4: at
/// one an operation, a step of such deletes copied up to twice the pages
/// it was sized for, and two steps in flight took about the whole room);
/// another handle's one, as its replay scope is never stored (filterd
/// records replies only for persistent handles' scopes; re-review rr47a
/// F5: weighed two, a start's steps deleting stale records of
/// non-persistent handles were half the size they could be); a
/// replay record's trims, scattered by recording order, one each — and
/// one for every four overflow pages of a value it puts (a handle record
/// with a long path and many locks takes two). Sized for pages of 4 KiB:
/// larger pages hold more, so this over-counts there.
pub fn step_weight(op: &StoreOp) -> usize {
    const PAGE: usize = 4096;
    let value = |key: usize, bytes: Result<Vec<u8>, RecordError>| {
        // A record that does not encode is refused by the commit: no pages.
        let len = bytes.map_or(0, |v| v.len());
        overflow_pages(key, len, PAGE).div_ceil(4)
    };
    match op {
        StoreOp::PutHandle(rec) | StoreOp::DetachHandle(rec) => {
            1 + value(16, encode_record(rec.as_ref()))
        }
        StoreOp::DeleteHandle(rec) if rec.durability.is_persistent() => 2,
        StoreOp::DeleteHandle(_) => 1,
        StoreOp::PutReplay {
            scope,
            op_id,
            record,
            trim,
        } => {
            let key = replay_key(scope, *op_id).len();
            let trims = match trim {
                ReplayTrim::Evicted(dropped) => dropped.len(),
                // The oldest beyond the count: one, as a scope is kept.
                ReplayTrim::Keep(_) => 1,
            };
            1 + value(key, encode_record(record)) + trims
        }
        StoreOp::DeleteReplay { .. } | StoreOp::DeleteReplayScope(_) | StoreOp::DeleteIntent(_) => {
            1
        }
        StoreOp::PutIntent(intent) => 1 + value(16, encode_record(intent.as_ref())),
    }
}

/// The range of `data.mdb` to preallocate so that `slack` bytes past its
/// first `used` become `bytes` again: only the missing tail, and only once
/// a quarter of the reserve is gone (`None`: leave it). Every commit that
/// moves the map's last page shrinks the slack; allocating the whole
/// reserve range at each one cost a `fallocate` walking all its pages
/// (0.7–0.8 ms on tmpfs with 16 MiB, review rr45h F3), so most commits now
/// pay one `fstat`.
fn top_up_range(used: u64, slack: u64, bytes: u64) -> Option<(u64, u64)> {
    (slack < bytes - bytes / 4).then(|| (used.saturating_add(slack), bytes - slack))
}

/// A commit packed by [`StateStore::prepare`], not yet sent (what it holds
/// is the store's own).
pub struct Prepared(pub Box<dyn std::any::Any + Send>);

/// The durable resume-key table as filterd uses it: what any backend must
/// provide — the embedded LMDB [`Store`] here, a remote replicated one
/// (etcd) next. Shaped after what a remote store can do cheaply: commits
/// are batched transactions with an ascending sequence number, recovery
/// reads by key prefix, and every commit is conditional on this daemon
/// still owning the table, so a stale daemon is fenced and writes nothing.
pub trait StateStore: Send + Sync {
    /// A short name for status output (`lmdb`, `etcd`).
    fn kind(&self) -> &'static str;
    /// What status output shows of the store: its kind, and for a shared
    /// store where it is, who owns it and the fencing revision.
    fn describe(&self) -> String {
        self.kind().to_owned()
    }
    /// How long this daemon's claim on a shared store is proven to stand
    /// from now (etcd: its lease, as the keepalive last proved it; zero
    /// once lost). Reads what the keepalive keeps: never asks the store,
    /// never blocks. `None`: a store without a lease (LMDB).
    fn lease_left(&self) -> Option<std::time::Duration> {
        None
    }
    /// Whether this daemon may still act as the table's owner (change the
    /// filesystem, acknowledge anything). An embedded store always may; a
    /// shared one may not once its lease may have run out.
    fn owner_check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Claims the table for this daemon (a new epoch: every earlier
    /// claimant is fenced from now on). Returns the epoch and whether the
    /// last owner stopped cleanly.
    fn claim(&self) -> Result<(u64, bool), StoreError>;
    /// Applies `batches`, in order, in one transaction, durably — only
    /// while this daemon's claim stands ([`StoreError::Fenced`] otherwise,
    /// with nothing written). Returns the commit's sequence number.
    fn commit(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError>;
    /// [`StateStore::commit`] of an intent's completion and the groups it
    /// builds on, which must not fail for want of room a delete could use:
    /// it may use the delete reserve the embedded store keeps (a store
    /// without one commits as usual).
    fn commit_completion(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        self.commit(batches)
    }
    /// The most store operations each of a long series of commits should
    /// hold (restart recovery's, which may rewrite every handle): the
    /// embedded store keeps bounded room for commits on a full disk or
    /// map (its block and delete reserves), and copy-on-write takes a new
    /// page for every page a commit changes, so one commit of every handle
    /// could need more than all of it (review rr45h F1: a restart on a
    /// full state filesystem failed, and every restart after it).
    /// Successive smaller commits reuse the pages those before them freed.
    /// Operations count by their [`step_weight`] (the trees they touch,
    /// their large values). `usize::MAX`: no bound.
    fn commit_step_ops(&self) -> usize {
        usize::MAX
    }
    /// Whether new handles get time-ordered resume keys
    /// ([`ResumeKey::new_time_ordered`]) rather than random ones (for
    /// frontends that were granted [`crate::proto::FEATURE_TIME_ORDERED_KEYS`]):
    /// an ordered store (LMDB's B-tree) writes a commit's new records on a
    /// few leaves instead of one each (docs/PERFORMANCE.md, round 17). No by
    /// default: a store that reads its table in key ranges would find
    /// every new key in one.
    fn time_ordered_keys(&self) -> bool {
        false
    }
    /// Whether commits may overlap ([`StateStore::prepare`]): a later
    /// commit's transaction goes out while an earlier one is in flight.
    /// An embedded store commits one at a time.
    fn pipelines(&self) -> bool {
        false
    }
    /// How many store operations make a commit worth sending while another
    /// is still in flight: fewer wait for the one in flight and join the
    /// next (fuller) commit instead. Only asked when [`StateStore::pipelines`].
    fn overlap_at_ops(&self) -> usize {
        1
    }
    /// The first half of a commit that may overlap earlier ones still in
    /// flight: packs `batches` and reserves what they read and write.
    /// `Ok(None)`: they read or write something a commit in flight
    /// changes (or the store cannot overlap them); commit them with
    /// [`StateStore::commit`] once nothing is in flight. Nothing is sent
    /// before [`StateStore::run_prepared`].
    fn prepare(&self, batches: &[&[StoreOp]]) -> Result<Option<Prepared>, StoreError> {
        let _ = batches;
        Ok(None)
    }
    /// Sends a prepared commit and waits for it (what [`StateStore::commit`]
    /// does after packing); releases its reservation however it ends.
    fn run_prepared(&self, prepared: Prepared) -> Result<u64, StoreError> {
        let _ = prepared;
        Err(StoreError::Etcd(
            "this store does not prepare commits".into(),
        ))
    }
    /// One handle record.
    fn handle(&self, key: ResumeKey) -> Result<Option<HandleRecord>, StoreError>;
    /// Every handle record (a record that does not decode is an error in
    /// its place).
    fn all_handles(&self) -> Result<Vec<Result<HandleRecord, StoreError>>, StoreError>;
    /// Hands every handle record to `each`, in key order, as
    /// [`StateStore::all_handles`] would list them — without a vector of
    /// them all when the store can (LMDB decodes straight from its cursor,
    /// the names of its records shared: restart recovery boxes each record
    /// as it comes).
    fn each_handle(
        &self,
        each: &mut dyn FnMut(Result<HandleRecord, StoreError>),
    ) -> Result<(), StoreError> {
        self.all_handles()?.into_iter().for_each(each);
        Ok(())
    }
    /// The replay records of one scope, by op id.
    fn scope_records(&self, scope: &ReplayScope) -> Result<Vec<(u64, ReplayRecord)>, StoreError>;
    /// Every replay record, by raw key (a prefix scan of the table).
    fn all_replays(&self) -> Result<Vec<RawReplay>, StoreError>;
    /// Every intent still in the table.
    fn all_intents(&self) -> Result<Vec<Result<Intent, StoreError>>, StoreError>;
    /// Records a clean shutdown.
    fn clean_shutdown(&self) -> Result<(), StoreError>;
    /// The identity of the export root the table was bound to
    /// ([`StateStore::bind_root`]), if any. A table holds kernel handles
    /// and paths of one filesystem: recovered against another (the export
    /// not mounted yet, a mistyped `--root`), every handle would be found
    /// missing and marked lost, durably. Stores without a binding (test
    /// stores) say none.
    fn bound_root(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Binds the table to an export root (durable when this returns).
    fn bind_root(&self, _identity: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether other machines recover this table (etcd): the root's
    /// identity then leaves out what differs from machine to machine.
    fn shared(&self) -> bool {
        false
    }
    /// Lets go of what reading the whole table left resident (restart
    /// recovery calls it once done). Best effort; nothing for a store that
    /// keeps nothing mapped.
    fn release_read_pages(&self) {}
}

/// Whether a commit may grow the tables into the delete reserve
/// ([`delete_reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Only when every batch of it removes a handle or an intent.
    IfEveryBatchRemoves,
    /// A quarter of it: an intent's completion and what it builds on,
    /// which must not fail (the rest stays for closes and other
    /// completions; the reserve counts the tables' pages only, and a
    /// store at half of it already ran out of map in a test).
    Usable,
    /// An eighth of it: a commit of detaches (and removals), chosen by
    /// the store for [`Reserve::IfEveryBatchRemoves`] when some batch only
    /// detaches (re-review rr47e F5: a detach lengthens its record, and
    /// refused at the reserve the frontend was told DISK_FULL while
    /// filterd held the handle disconnected). Less than completions may
    /// use, so detaches never starve them; not all of it: a detach splits
    /// every full leaf it rewrites, and detaching all of a full 1 MiB
    /// map's 6,525 handles so took the map to its last page, after which
    /// 1,882 of their deletes failed.
    Detaches,
}

impl StateStore for Store {
    fn kind(&self) -> &'static str {
        "lmdb"
    }
    /// A B-tree: a commit's new records share its last leaves.
    fn time_ordered_keys(&self) -> bool {
        true
    }
    fn claim(&self) -> Result<(u64, bool), StoreError> {
        self.begin_epoch()
    }
    fn commit(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        self.apply_all(batches)
    }
    fn commit_completion(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        self.apply_all_with(batches, Reserve::Usable)
    }
    fn commit_step_ops(&self) -> usize {
        self.step_ops()
    }
    fn handle(&self, key: ResumeKey) -> Result<Option<HandleRecord>, StoreError> {
        Store::handle(self, key)
    }
    fn all_handles(&self) -> Result<Vec<Result<HandleRecord, StoreError>>, StoreError> {
        self.handles()
    }
    fn each_handle(
        &self,
        each: &mut dyn FnMut(Result<HandleRecord, StoreError>),
    ) -> Result<(), StoreError> {
        self.for_each_handle(each)
    }
    fn scope_records(&self, scope: &ReplayScope) -> Result<Vec<(u64, ReplayRecord)>, StoreError> {
        self.replays_in(scope)
    }
    fn all_replays(&self) -> Result<Vec<RawReplay>, StoreError> {
        self.replays()
    }
    fn all_intents(&self) -> Result<Vec<Result<Intent, StoreError>>, StoreError> {
        self.intents()
    }
    fn clean_shutdown(&self) -> Result<(), StoreError> {
        self.mark_clean_shutdown()
    }
    fn bound_root(&self) -> Result<Option<String>, StoreError> {
        self.export_root()
    }
    fn bind_root(&self, identity: &str) -> Result<(), StoreError> {
        self.bind_export_root(identity)
    }
    fn release_read_pages(&self) {
        self.release_mapped_pages();
    }
}

const META_SCHEMA: &str = "schema_version";
const META_EPOCH: &str = "epoch";
const META_CLEAN: &str = "clean_shutdown";
/// The export root the table belongs to ([`StateStore::bound_root`]).
const META_ROOT: &str = "export_root";

/// Upgrades a store from an older schema, one step at a time, inside the
/// caller's transaction.
///
/// 1 → 2 (records as postcard) rewrites nothing: every reader of this
/// build decodes version-1 (JSON) values as well, and a record becomes
/// version 2 when it is next written. The schema number still moves, so
/// that a schema-1 build, which cannot read version-2 values, refuses the
/// state dir ([`StoreError::SchemaTooNew`]) instead of calling its records
/// corrupt.
///
/// 2 → 3 (replay records with `seq`, evicted oldest-recorded first) moves
/// only the number too, for the same reason: a schema-2 build would call
/// every replay record written since corrupt and serve on without them —
/// smbl/1 op-id replays run again, nfsshim's clients, sessions, slots and
/// states gone (re-review rr38g) — and its trim by op id would then delete
/// records below the lowest it could read.
fn migrate(_txn: &mut heed::RwTxn<'_>, from: u32) -> Result<(), StoreError> {
    if from > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: from });
    }
    Ok(())
}

/// Frees the reader slots of processes that died inside a read transaction
/// (`mdb_reader_check`). Best effort: a failure is logged, and the next
/// check tries again.
fn clear_stale_readers(env: &Env) {
    match env.clear_stale_readers() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            slots = n,
            "cleared the state store reader slots of dead processes (a killed filterctl?)"
        ),
        Err(e) => tracing::warn!(error = %e, "checking the state store's reader slots failed"),
    }
}

/// Whether every batch removes a handle or an intent (a close, an expiry,
/// an intent's completion): such a commit may use the reserves.
fn every_batch_removes(batches: &[&[StoreOp]]) -> bool {
    !batches.is_empty()
        && batches.iter().all(|b| {
            b.iter()
                .any(|op| matches!(op, StoreOp::DeleteHandle(_) | StoreOp::DeleteIntent(_)))
        })
}

/// Whether every batch removes something or detaches a handle
/// ([`StoreOp::DetachHandle`]): such a commit may use an eighth of the
/// delete reserve ([`Reserve::Detaches`]).
fn every_batch_lets_go(batches: &[&[StoreOp]]) -> bool {
    !batches.is_empty()
        && batches.iter().all(|b| {
            b.iter().any(|op| {
                matches!(
                    op,
                    StoreOp::DeleteHandle(_) | StoreOp::DeleteIntent(_) | StoreOp::DetachHandle(_)
                )
            })
        })
}

/// The bytes of `data.mdb` up to the map's last used page.
fn used_bytes(t: &Tables) -> u64 {
    let page = u64::from(t.env.stat().page_size).max(1);
    let pages = u64::try_from(t.env.info().last_page_number).unwrap_or(u64::MAX);
    pages.saturating_add(1).saturating_mul(page)
}

fn read_u64(b: Option<&[u8]>) -> u64 {
    b.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn read_u32(b: Option<&[u8]>) -> Option<u32> {
    b.and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
}

/// The store's directory in a state dir: the LMDB environment, and its
/// writer's lock (a `flock` on the directory).
pub const STORE_DIR: &str = "lmdb";

/// Opens the store's directory `db_dir` (`STATE/lmdb/`) as it is, never
/// through a symbolic link, and checks that it is a directory of this
/// process's user: its `flock` is the writer's lock, which a filterd
/// judging whether another one serves probes (filterd `statedir`), and
/// what it holds is the state. Before, a link there was followed by the
/// store but not by that probe, which always found it free (review rr49a
/// F6), and a directory of another user — one planted in a state dir
/// others could write — was used as found (F2).
pub fn open_store_dir(db_dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = || db_dir.display().to_string();
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(db_dir)
        .map_err(|source| match std::fs::symlink_metadata(db_dir) {
            Ok(m) if m.is_symlink() => StoreError::Untrusted {
                path: path(),
                why: "it is a symbolic link; make it a directory (mount the other filesystem there, or give --state a directory on it)".into(),
            },
            Ok(m) if !m.is_dir() => StoreError::Untrusted {
                path: path(),
                why: "it is not a directory; remove it".into(),
            },
            _ => StoreError::Dir {
                path: path(),
                source,
            },
        })?;
    let owner = dir
        .metadata()
        .map_err(|source| StoreError::Dir {
            path: path(),
            source,
        })?
        .uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != me {
        return Err(StoreError::Untrusted {
            path: path(),
            why: format!("it belongs to uid {owner}, not to filterd's user (uid {me}). If it is this state dir's store from when filterd ran as that user, give it to this one (chown -R {me} on the state dir), or run filterd as its owner; never remove it, it holds every client's handles and replay records. Otherwise another user put it there while the state dir was open to them"),
        });
    }
    Ok(dir)
}

/// Takes every permission of other users off the store's directory
/// `STATE/lmdb/` if there is one (before it is used, at every start:
/// [`make_store_dir_private`]). Before (review rr49d L9) only
/// [`Store::open`] did, which a `--standby` reaches only once the filterd
/// it waits for is gone: while it waited, a store's directory made before
/// review rvacl stayed open to every member of the state dir's group.
pub fn narrow_store_dir(state: &Path) -> Result<(), StoreError> {
    let db_dir = state.join(STORE_DIR);
    match open_store_dir(&db_dir) {
        Ok(dir) => make_store_dir_private(&db_dir, &dir),
        Err(StoreError::Dir { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Takes every permission of other users off the store's directory
/// `dir` (of this process's user, [`open_store_dir`]), which filterd
/// makes 0700 but stores made before review rvacl have 0755 or 0775:
/// anyone who could open it could hold its writer lock to keep filterd
/// from starting (review rr49a F2). A process that opened it before
/// keeps its descriptor, and so what `flock` it holds; once it is 0700
/// nobody else can put anything in it. Then refuses a `data.mdb` or
/// `lock.mdb` — what LMDB opens there, by path — that is not a regular
/// file of this process's user with no other name: another user may have
/// put it there meanwhile, or made it a hard link to a file of ours that
/// LMDB would overwrite (`lock.mdb` is rewritten at every open; review
/// rr49j L2, with `fs.protected_hardlinks=0`). Nothing else there is opened, so nothing else matters
/// (review rr49d L3: before, any entry of another user refused the
/// start, the `lost+found` of a filesystem mounted at `lmdb/` too).
/// Whether a read-only open ([`Store::open_read_only`]) may use `lmdb/`'s
/// lock file: LMDB opens it read-write (creating it, and writing its
/// header when it is the first opener) even for a read-only environment,
/// following links, with no owner check — so an operator's `filterctl
/// --state` run as root on a store whose `lmdb/` others could write (one
/// left group-writable from before it was narrowed) would write through a
/// planted link to any file (rr49l N3). Used only when `lmdb/` is a
/// directory of the calling user that only it may write and `lock.mdb` a
/// regular file of that user with one link — root reading a service
/// user's store reads without it, as that user could swap in a link
/// between this look and LMDB's open (attack50 M1); otherwise the store
/// is read without a lock (with a warning: fine when no filterd runs,
/// what `--state` is for). `data.mdb` must be a regular file of `lmdb/`'s
/// owner (LMDB only reads it here).
///
/// LMDB (through heed) opens the lock file by a path it resolves anew, so
/// a directory on the way to `lmdb/` that another user may write lets
/// that user swap the whole path, between these looks and that open, for
/// one to a directory of theirs whose `lock.mdb` links to any file
/// (attack50c N1, N2). So the lock file is used only through `lmdb/`'s
/// resolved path — returned, for LMDB to open — when every directory
/// above it is root's or the caller's and neither its group nor others
/// may write it, or it is sticky (only an entry's owner may rename it
/// there): nobody else can change that path.
fn lock_file_trusted(db_dir: &Path) -> Result<Option<PathBuf>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let untrusted = |path: &Path, why: &str| StoreError::Untrusted {
        path: path.display().to_string(),
        why: why.to_owned(),
    };
    let meta = |p: &Path| {
        std::fs::symlink_metadata(p).map_err(|source| StoreError::Dir {
            path: p.display().to_string(),
            source,
        })
    };
    let dir = meta(db_dir)?;
    if !dir.is_dir() {
        return Err(untrusted(
            db_dir,
            "not a directory (a link?): read the store it names directly",
        ));
    }
    let resolved = db_dir.canonicalize().map_err(|source| StoreError::Dir {
        path: db_dir.display().to_string(),
        source,
    })?;
    let db_dir = resolved.as_path();
    let dir = meta(db_dir)?;
    let data = db_dir.join("data.mdb");
    let data_meta = meta(&data)?;
    if !data_meta.is_file() {
        return Err(untrusted(&data, "not a regular file (a link?)"));
    }
    if data_meta.uid() != dir.uid() {
        // Not what filterd (lmdb/'s owner) wrote: one planted by another
        // user who could write lmdb/ would be shown as the store (attack50
        // L1).
        return Err(untrusted(
            &data,
            "not owned by lmdb/'s owner, so not the store filterd wrote: give it back to that user (chown) if it is",
        ));
    }
    let lock = db_dir.join("lock.mdb");
    let lock_meta = match std::fs::symlink_metadata(&lock) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Dir {
                path: lock.display().to_string(),
                source,
            })
        }
    };
    // lmdb/ must be the caller's own too: its owner may swap lock.mdb for
    // a link between this look and LMDB's open (by path, read-write, no
    // O_NOFOLLOW), so root reading a service user's store would write
    // where that user points (attack50 M1).
    let me = nix::unistd::geteuid().as_raw();
    let trusted = dir.uid() == me
        && dir.mode() & 0o022 == 0
        && lock_meta.is_file()
        && lock_meta.nlink() == 1
        && lock_meta.uid() == dir.uid();
    let fixed_path = owners_are_local(db_dir)
        && db_dir.ancestors().skip(1).all(|a| {
            owners_are_local(a)
                && std::fs::symlink_metadata(a).is_ok_and(|m| {
                    m.is_dir()
                        && (m.uid() == me || m.uid() == 0)
                        && (m.mode() & 0o022 == 0 || m.mode() & 0o1000 != 0)
                })
        });
    if !trusted {
        tracing::warn!(
            lock = %lock.display(),
            "reading the store without its lock file (right only while no filterd serves it): lmdb/ is another user's or others may write it, or lock.mdb is not a regular file of lmdb/'s owner with one link"
        );
    } else if !fixed_path {
        tracing::warn!(
            lock = %lock.display(),
            "reading the store without its lock file (right only while no filterd serves it): a directory above lmdb/ is another user's or others may write it, or lmdb/ or one above it is on FUSE, NFS or SMB, so its path could be changed under the read; read it as filterd's user from a local path only that user or root may change for a locked read"
        );
    }
    Ok((trusted && fixed_path).then_some(resolved))
}

/// Whether the owners and modes the filesystem holding `dir` reports are
/// this kernel's to enforce: not on FUSE (a user's daemon with
/// `allow_other` may report root as the owner of what it changes at
/// will), NFS or SMB/CIFS (other hosts' users write there) — attack51a's
/// residual assumption. Unknown (statfs failed): not.
fn owners_are_local(dir: &Path) -> bool {
    use nix::sys::statfs::{FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC, SMB_SUPER_MAGIC};
    const CIFS_MAGIC: i64 = 0xFF53_4D42;
    const SMB2_MAGIC: i64 = 0xFE53_4D42;
    nix::sys::statfs::statfs(dir).is_ok_and(|fs| {
        let t = fs.filesystem_type();
        #[allow(clippy::useless_conversion)]
        let raw = i64::from(t.0);
        ![FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC, SMB_SUPER_MAGIC].contains(&t)
            && raw != CIFS_MAGIC
            && raw != SMB2_MAGIC
    })
}

fn make_store_dir_private(db_dir: &Path, dir: &std::fs::File) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |source| StoreError::Dir {
        path: db_dir.display().to_string(),
        source,
    };
    let mode = dir.metadata().map_err(io)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        dir.set_permissions(std::fs::Permissions::from_mode(mode & !0o077))
            .map_err(io)?;
        tracing::warn!(
            dir = %db_dir.display(),
            was = format!("{mode:04o}"),
            now = format!("{:04o}", mode & !0o077),
            "the state store's directory was open to other users (made before filterd made it 0700): made private; a process that opened it before keeps its descriptor and any flock on it"
        );
    }
    let me = nix::unistd::geteuid().as_raw();
    for (name, remedy) in [
        ("data.mdb", "never remove it, it holds the state"),
        (
            "lock.mdb",
            "or remove it while no filterd or filterctl uses the store (LMDB makes it anew)",
        ),
    ] {
        let path = db_dir.join(name);
        let m = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r.map_err(io)?,
        };
        let why = if m.uid() != me {
            format!(
                "it belongs to uid {}, not to filterd's user (uid {me}). If it is this store's from when filterd ran as that user, give it to this one (chown -R {me} on the state dir); {remedy}. Otherwise another user put it there while the store's directory was open to them",
                m.uid()
            )
        } else if !m.file_type().is_file() {
            "it is not a regular file as LMDB makes it (a symbolic link?); put the file itself there".into()
        } else if m.nlink() != 1 {
            format!(
                "it has {} hard links, LMDB's own file has one: another name may be another file of filterd's user that LMDB would overwrite; put the file itself there, with no other name (for data.mdb, with no filterd running: `cp --sparse=always data.mdb data.new && mv data.new data.mdb`; never delete it: it holds the store)",
                m.nlink()
            )
        } else {
            continue;
        };
        return Err(StoreError::Untrusted {
            path: path.display().to_string(),
            why,
        });
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store in `dir` for writing.
    pub fn open(dir: &Path, map_size: usize) -> Result<Store, StoreError> {
        let db_dir = dir.join(STORE_DIR);
        // Mode 0700 whatever the umask (before: `create_dir_all`, 0777
        // under umask 000, review rvacl): its `flock` is the writer's
        // lock, which nobody else may hold.
        if std::fs::symlink_metadata(&db_dir).is_err() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&db_dir)
                .map_err(|source| StoreError::Dir {
                    path: db_dir.display().to_string(),
                    source,
                })?;
        }
        let dirf = open_store_dir(&db_dir)?;
        make_store_dir_private(&db_dir, &dirf)?;
        let writer = nix::fcntl::Flock::lock(dirf, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::InUse {
                path: db_dir.display().to_string(),
            })?;
        let tables = Self::open_tables(&db_dir, map_size)?;
        let blocks = BlockReserve::open(&db_dir, used_bytes(&tables));
        Ok(Store {
            gate: std::sync::RwLock::new(Some(tables)),
            max_map: std::sync::atomic::AtomicUsize::new(0),
            fence: std::sync::atomic::AtomicU64::new(0),
            _writer: Some(writer),
            commits_since_reader_check: std::sync::atomic::AtomicU64::new(0),
            blocks,
        })
    }

    /// Opens the environment in `db_dir` for writing and its tables,
    /// creating or migrating them as needed.
    fn open_tables(db_dir: &Path, map_size: usize) -> Result<Tables, StoreError> {
        let env = crate::sys::open_lmdb(db_dir, 8, map_size, EnvFlags::empty())
            .map_err(StoreError::from_heed)?;
        // LMDB resets the reader table only when no other process has the
        // environment open: one killed in a read (a filterctl) while
        // another (a second filterctl) kept it open left its slot behind.
        clear_stale_readers(&env);
        let mut txn = env.write_txn()?;
        let meta: Database<Str, Bytes> = env.create_database(&mut txn, Some("meta"))?;
        let found = read_u32(meta.get(&txn, META_SCHEMA)?);
        match found {
            None => meta.put(&mut txn, META_SCHEMA, &SCHEMA_VERSION.to_le_bytes())?,
            Some(v) if v > SCHEMA_VERSION => return Err(StoreError::SchemaTooNew { found: v }),
            Some(v) if v < SCHEMA_VERSION => {
                migrate(&mut txn, v)?;
                meta.put(&mut txn, META_SCHEMA, &SCHEMA_VERSION.to_le_bytes())?;
            }
            Some(_) => {}
        }
        let tables = Tables {
            meta,
            handles: env.create_database(&mut txn, Some("handles"))?,
            replay: env.create_database(&mut txn, Some("replay"))?,
            intents: env.create_database(&mut txn, Some("intents"))?,
            clients: env.create_database(&mut txn, Some("clients"))?,
            env: env.clone(),
        };
        txn.commit().map_err(StoreError::from_heed)?;
        Ok(tables)
    }

    /// After a failed commit: if LMDB now refuses the environment for good
    /// (`MDB_PANIC`: its meta page write failed, and it marks the
    /// environment broken rather than trust what the page cache holds),
    /// closes it and opens it again, which reads back what is on disk — the
    /// state before the failed commit, which it wrote back over its meta
    /// page. Without this every later transaction, the rollback's reads of
    /// what the failed commit replaced included, fails until a restart.
    fn reopen_if_broken(&self) {
        let mut gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let broken = match gate.as_ref() {
            Some(t) => matches!(
                t.env.read_txn(),
                Err(heed::Error::Mdb(heed::MdbError::Panic))
            ),
            None => true,
        };
        if !broken || self._writer.is_none() {
            return;
        }
        let Some(old) = gate.take() else {
            return;
        };
        let path = old.env.path().to_path_buf();
        let map_size = old.env.info().map_size;
        // The tables hold the only handle of the environment (no
        // transaction is open: the gate is held exclusively), so dropping
        // them closes it.
        let closing = old.env.clone().prepare_for_closing();
        drop(old);
        if !closing.wait_timeout(std::time::Duration::from_secs(5)) {
            tracing::error!("the broken state store environment did not close; not reopened");
            return;
        }
        match Self::open_tables(&path, map_size) {
            Ok(t) => {
                tracing::warn!("the state store was reopened after LMDB declared it broken (a meta page write failed)");
                *gate = Some(t);
            }
            Err(e) => tracing::error!(error = %e, "the state store could not be reopened"),
        }
    }

    /// Opens the store in `dir` read-only (filterctl post-mortem, when no
    /// filterd holds the state dir), writing nothing into it.
    ///
    /// A read-only LMDB environment still creates `lock.mdb` when there is
    /// none — next to a `data.mdb` that is not LMDB at all, or in a copy of
    /// a store taken for a post-mortem. Without a lock file no process has
    /// the environment open (every writer creates one), so the reader then
    /// goes without (`MDB_NOLOCK`); with one, it takes a reader slot there,
    /// which keeps a filterd that starts meanwhile from reusing the pages
    /// it reads. A lock file it may not write (a read-only copy) is read
    /// around in the same way.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        let db_dir = dir.join(STORE_DIR);
        if !db_dir.join("data.mdb").exists() {
            return Err(StoreError::Missing("data.mdb"));
        }
        let unlocked = EnvFlags::READ_ONLY | EnvFlags::NO_LOCK;
        let env = if let Some(resolved) = lock_file_trusted(&db_dir)? {
            match crate::sys::open_lmdb(&resolved, 8, DEFAULT_MAP_SIZE, EnvFlags::READ_ONLY) {
                Err(heed::Error::Mdb(heed::MdbError::Other(libc::EACCES | libc::EPERM))) => {
                    crate::sys::open_lmdb(&db_dir, 8, DEFAULT_MAP_SIZE, unlocked)?
                }
                r => r?,
            }
        } else {
            crate::sys::open_lmdb(&db_dir, 8, DEFAULT_MAP_SIZE, unlocked)?
        };
        let txn = env.read_txn()?;
        let meta: Database<Str, Bytes> = env
            .open_database(&txn, Some("meta"))?
            .ok_or(StoreError::Missing("meta"))?;
        let found =
            read_u32(meta.get(&txn, META_SCHEMA)?).ok_or(StoreError::Missing("schema_version"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found });
        }
        let tables = Tables {
            meta,
            handles: env
                .open_database(&txn, Some("handles"))?
                .ok_or(StoreError::Missing("handles"))?,
            replay: env
                .open_database(&txn, Some("replay"))?
                .ok_or(StoreError::Missing("replay"))?,
            intents: env
                .open_database(&txn, Some("intents"))?
                .ok_or(StoreError::Missing("intents"))?,
            clients: env
                .open_database(&txn, Some("clients"))?
                .ok_or(StoreError::Missing("clients"))?,
            env: env.clone(),
        };
        txn.commit()?;
        Ok(Store {
            gate: std::sync::RwLock::new(Some(tables)),
            max_map: std::sync::atomic::AtomicUsize::new(0),
            fence: std::sync::atomic::AtomicU64::new(0),
            _writer: None,
            commits_since_reader_check: std::sync::atomic::AtomicU64::new(0),
            blocks: None,
        })
    }

    /// Starts a daemon epoch: increments the epoch and clears the clean flag,
    /// durably. Returns the new epoch and whether the last run stopped cleanly.
    pub fn begin_epoch(&self) -> Result<(u64, bool), StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let mut txn = t.env.write_txn()?;
        let epoch = read_u64(t.meta.get(&txn, META_EPOCH)?) + 1;
        let was_clean = t
            .meta
            .get(&txn, META_CLEAN)?
            .map(|b| b == [1])
            .unwrap_or(true);
        t.meta.put(&mut txn, META_EPOCH, &epoch.to_le_bytes())?;
        t.meta.put(&mut txn, META_CLEAN, &[0])?;
        txn.commit().map_err(StoreError::from_heed)?;
        self.fence
            .store(epoch, std::sync::atomic::Ordering::Release);
        Ok((epoch, was_clean))
    }

    /// Records a clean shutdown.
    pub fn mark_clean_shutdown(&self) -> Result<(), StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let mut txn = t.env.write_txn()?;
        t.meta.put(&mut txn, META_CLEAN, &[1])?;
        txn.commit().map_err(StoreError::from_heed)
    }

    /// The export root the table was bound to, if any.
    pub fn export_root(&self) -> Result<Option<String>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        Ok(t.meta
            .get(&txn, META_ROOT)?
            .map(|b| String::from_utf8_lossy(b).into_owned()))
    }

    /// Binds the table to an export root, durably.
    pub fn bind_export_root(&self, identity: &str) -> Result<(), StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let mut txn = t.env.write_txn()?;
        t.meta.put(&mut txn, META_ROOT, identity.as_bytes())?;
        txn.commit().map_err(StoreError::from_heed)
    }

    /// Reads `meta`.
    pub fn meta(&self) -> Result<MetaInfo, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        Ok(MetaInfo {
            schema_version: read_u32(t.meta.get(&txn, META_SCHEMA)?).unwrap_or(0),
            epoch: read_u64(t.meta.get(&txn, META_EPOCH)?),
            clean_shutdown: t
                .meta
                .get(&txn, META_CLEAN)?
                .map(|b| b == [1])
                .unwrap_or(false),
        })
    }

    /// Applies a batch in one write transaction and commits it durably.
    pub fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        self.apply_all(&[ops]).map(|_| ())
    }

    /// Applies several batches, in order, in one write transaction and
    /// commits it durably (group commit without copying the operations).
    /// Conditional on this handle's claim ([`Store::begin_epoch`]) still
    /// standing. Returns the transaction's id (ascending).
    pub fn apply_all(&self, batches: &[&[StoreOp]]) -> Result<u64, StoreError> {
        self.apply_all_with(batches, Reserve::IfEveryBatchRemoves)
    }

    /// [`Store::apply_all`], the delete reserve usable as `reserve` says.
    pub fn apply_all_with(
        &self,
        batches: &[&[StoreOp]],
        reserve: Reserve,
    ) -> Result<u64, StoreError> {
        self.clear_stale_readers_now_and_then();
        let slack = self.block_slack()?;
        let r = self.apply_gated(batches, reserve, slack);
        let r = match r {
            Err(StoreError::MapFull) if self.grow_map()? => {
                self.apply_gated(batches, reserve, slack)
            }
            r => r,
        };
        if r.is_err() {
            self.reopen_if_broken();
        }
        r
    }

    /// [`StateStore::commit_step_ops`]: [`step_ops`] of the smaller room
    /// of the map's delete reserve and of the state filesystem (its block
    /// reserve and free blocks; unbounded without a block reserve).
    pub fn step_ops(&self) -> usize {
        let gate = self.gate();
        let Ok(t) = tables(&gate) else {
            return 1;
        };
        let page = usize::try_from(t.env.stat().page_size)
            .unwrap_or(4096)
            .max(1);
        let max = self
            .max_map
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(t.env.info().map_size);
        // The map's free pages, and at least what it keeps for deletes.
        let max_pages = max / page;
        let last = t.env.info().last_page_number;
        let map_room = max_pages
            .saturating_sub(last.saturating_add(1))
            .max(delete_reserve(max_pages));
        let map_room = u64::try_from(map_room).unwrap_or(u64::MAX);
        let fs_room = self.blocks.as_ref().map_or(u64::MAX, |b| {
            b.room(used_bytes(t)) / u64::try_from(page).unwrap_or(4096)
        });
        step_ops(map_room.min(fs_room))
    }

    /// Makes the [`block_reserve`] whole again where there is room;
    /// returns what is left of it (`None`: no block reserve), for
    /// [`BlockReserve::admits`] to judge a commit that grows the tables.
    fn block_slack(&self) -> Result<Option<u64>, StoreError> {
        let Some(b) = &self.blocks else {
            return Ok(None);
        };
        let used = {
            let gate = self.gate();
            used_bytes(tables(&gate)?)
        };
        Ok(Some(b.top_up(used)))
    }

    fn apply_gated(
        &self,
        batches: &[&[StoreOp]],
        reserve: Reserve,
        slack: Option<u64>,
    ) -> Result<u64, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        self.apply_ops(t, batches, reserve, slack)
            .map_err(|e| Self::explain(t, e))
    }

    /// Lets the map grow, doubling, up to `max_bytes` when it fills (0: it
    /// never grows).
    pub fn set_max_map_size(&self, max_bytes: usize) {
        self.max_map
            .store(max_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current map size.
    pub fn map_size(&self) -> usize {
        self.gate().as_ref().map_or(0, |t| t.env.info().map_size)
    }

    fn gate(&self) -> std::sync::RwLockReadGuard<'_, Option<Tables>> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Doubles the map (up to the maximum); false when it may not grow.
    fn grow_map(&self) -> Result<bool, StoreError> {
        let max = self.max_map.load(std::sync::atomic::Ordering::Relaxed);
        let now = self.map_size();
        if now >= max {
            return Ok(false);
        }
        let next = now.saturating_mul(2).min(max);
        // No transaction of this store is open while the write guard is held.
        let guard = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let Some(t) = guard.as_ref() else {
            return Ok(false);
        };
        crate::sys::resize_lmdb(&t.env, next, &guard)?;
        tracing::info!(from = now, to = next, "state store map grown");
        Ok(true)
    }

    /// LMDB reports a short write on a full filesystem as EIO: when the
    /// state dir has (next to) no room left, that is a full disk.
    fn explain(t: &Tables, e: StoreError) -> StoreError {
        let eio = match &e {
            StoreError::Lmdb(heed::Error::Io(io)) => io.raw_os_error() == Some(libc::EIO),
            StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::Other(c))) => *c == libc::EIO,
            _ => false,
        };
        if !eio {
            return e;
        }
        match nix::sys::statvfs::statvfs(t.env.path()) {
            Ok(v) if v.blocks_available().saturating_mul(v.fragment_size()) < 1 << 20 => {
                StoreError::Full
            }
            _ => e,
        }
    }

    fn apply_ops(
        &self,
        t: &Tables,
        batches: &[&[StoreOp]],
        reserve: Reserve,
        slack: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut txn = t.env.write_txn().map_err(StoreError::from_heed)?;
        let mine = self.fence.load(std::sync::atomic::Ordering::Acquire);
        if mine != 0 {
            let now = read_u64(
                t.meta
                    .get(&txn, META_EPOCH)
                    .map_err(StoreError::from_heed)?,
            );
            if now != mine {
                return Err(StoreError::Fenced { mine, now });
            }
        }
        let id = u64::try_from(txn.id()).unwrap_or(u64::MAX);
        let before = table_pages(t, &txn)?;
        let page = u64::from(t.env.stat().page_size).max(1);
        let mut written = Written::new(usize::try_from(page).unwrap_or(4096));
        for op in batches.iter().flat_map(|b| b.iter()) {
            match op {
                StoreOp::PutHandle(rec) | StoreOp::DetachHandle(rec) => {
                    put_written(&t.handles, &mut txn, &rec.key, rec.as_ref(), &mut written)?;
                }
                StoreOp::DeleteHandle(rec) => {
                    Self::delete_scope(t, &mut txn, &ReplayScope::Handle(rec.key), &mut written)?;
                    t.handles.delete(&mut txn, &rec.key)?;
                    written.deleted(1);
                }
                StoreOp::PutReplay {
                    scope,
                    op_id,
                    record,
                    trim,
                } => match trim {
                    ReplayTrim::Evicted(dropped) => {
                        let key = replay_key(scope, *op_id);
                        put_written(&t.replay, &mut txn, &key, record, &mut written)?;
                        trim_visited(dropped.len());
                        for op in dropped {
                            t.replay.delete(&mut txn, &replay_key(scope, *op))?;
                        }
                        written.deleted(dropped.len());
                    }
                    ReplayTrim::Keep(keep) => {
                        Self::put_counted(t, &mut txn, scope, *op_id, record, *keep, &mut written)?;
                    }
                },
                StoreOp::DeleteReplayScope(scope) => {
                    Self::delete_scope(t, &mut txn, scope, &mut written)?;
                }
                StoreOp::DeleteReplay { scope, op_id } => {
                    t.replay.delete(&mut txn, &replay_key(scope, *op_id))?;
                    written.deleted(1);
                }
                StoreOp::PutIntent(intent) => {
                    let key = intent.id.0.as_bytes();
                    put_written(&t.intents, &mut txn, key, intent.as_ref(), &mut written)?;
                }
                StoreOp::DeleteIntent(id) => {
                    t.intents.delete(&mut txn, id.0.as_bytes())?;
                    written.deleted(1);
                }
            }
        }
        // Dropping the transaction aborts it: a refused commit writes
        // nothing. One that removes a handle or completes an intent may
        // grow the tables into the reserve by a page or two (a close with
        // delete on close parks a Remove intent; an intent's completion
        // rewrites its handle): refused there, a persistent close stayed
        // DISK_FULL for good, and a completion, which must not fail,
        // stopped filterd (re-review rr-map36).
        // Every group of it: one growing group merged with a close used
        // the reserve too, and under load opens riding with closes filled
        // the map to the last page, where a completion failed and stopped
        // filterd (re-review rr-last36). A merged commit refused so is
        // retried group by group, and the removing groups commit alone.
        // An intent's completion and the groups it builds on may use a
        // quarter of it (`Reserve::Usable`, re-review rr37; the rest stays
        // for closes and later completions, rr37b).
        let removes = reserve == Reserve::IfEveryBatchRemoves && every_batch_removes(batches);
        if !removes {
            let reserve = match reserve {
                Reserve::IfEveryBatchRemoves if every_batch_lets_go(batches) => Reserve::Detaches,
                r => r,
            };
            let after = table_pages(t, &txn)?;
            // The same for the filesystem's blocks kept past the map's
            // last page (attack45 F1): a commit that grows the tables is
            // refused unless half of them is left after it, counting what
            // it may take at most ([`growth_bound`]; review rr45h F2: a
            // test of the slack before it alone let a large merged group
            // admitted just above half take the rest); removals,
            // completions and updates that grow nothing go on.
            if reserve != Reserve::Usable && after > before {
                let growth = growth_bound(written.pages, after - before).saturating_mul(page);
                note_growth_bound(growth);
                if let (Some(b), Some(slack)) = (&self.blocks, slack) {
                    if !b.admits(slack, growth) {
                        return Err(StoreError::Full);
                    }
                }
            }
            self.keep_delete_reserve(t, before, after, reserve)?;
        }
        txn.commit().map_err(StoreError::from_heed)?;
        Ok(id)
    }

    /// Refuses a commit that would grow the tables from `before` to
    /// `after` pages into the [`delete_reserve`] of the largest map; one
    /// that does not grow them (a close, an expiry, a purge, and a mixed
    /// group that frees as much as it adds) may use the reserve.
    ///
    /// [`Reserve::Usable`] keeps three quarters of it,
    /// [`Reserve::Detaches`] seven eighths.
    fn keep_delete_reserve(
        &self,
        t: &Tables,
        before: usize,
        after: usize,
        usable: Reserve,
    ) -> Result<(), StoreError> {
        if after <= before {
            return Ok(());
        }
        let info = t.env.info();
        let max = self
            .max_map
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(info.map_size);
        let page = usize::try_from(t.env.stat().page_size)
            .unwrap_or(4096)
            .max(1);
        let max_pages = max / page;
        let reserve = match usable {
            Reserve::IfEveryBatchRemoves => delete_reserve(max_pages),
            Reserve::Usable => delete_reserve(max_pages) - delete_reserve(max_pages) / 4,
            Reserve::Detaches => delete_reserve(max_pages) - delete_reserve(max_pages) / 8,
        };
        if after.saturating_add(reserve) > max_pages {
            return Err(StoreError::Reserved {
                pages: after,
                max_pages,
                reserve,
            });
        }
        Ok(())
    }

    /// Makes the table carry another epoch, as a second daemon's claim
    /// would: for tests of fencing.
    #[doc(hidden)]
    pub fn claim_behind_our_back(&self) -> Result<u64, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let mut txn = t.env.write_txn()?;
        let epoch = read_u64(t.meta.get(&txn, META_EPOCH)?) + 1;
        t.meta.put(&mut txn, META_EPOCH, &epoch.to_le_bytes())?;
        txn.commit().map_err(StoreError::from_heed)?;
        Ok(epoch)
    }

    fn scope_keys(
        t: &Tables,
        txn: &heed::RwTxn<'_>,
        scope: &ReplayScope,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = replay_prefix(scope);
        let raw = t.replay.remap_data_type::<Bytes>();
        let mut keys = Vec::new();
        for item in raw.prefix_iter(txn, &prefix)? {
            keys.push(item?.0.to_vec());
        }
        Ok(keys)
    }

    fn delete_scope(
        t: &Tables,
        txn: &mut heed::RwTxn<'_>,
        scope: &ReplayScope,
        written: &mut Written,
    ) -> Result<(), StoreError> {
        let keys = Self::scope_keys(t, txn, scope)?;
        for k in &keys {
            t.replay.delete(txn, k)?;
        }
        written.deleted(keys.len());
        Ok(())
    }

    /// Puts `record` as its scope's newest and keeps the scope's newest
    /// `keep`, counted ([`ReplayTrim::Keep`], [`counted_trim`]): reads
    /// every record of the scope for its place.
    fn put_counted(
        t: &Tables,
        txn: &mut heed::RwTxn<'_>,
        scope: &ReplayScope,
        op_id: u64,
        record: &ReplayRecord,
        keep: u32,
        written: &mut Written,
    ) -> Result<(), StoreError> {
        let raw = t.replay.remap_types::<Bytes, Bytes>();
        let mut others = Vec::new();
        let mut held = None;
        for item in raw.prefix_iter(txn, &replay_prefix(scope))? {
            let (k, v) = item?;
            match parse_replay_key(k) {
                Some((_, op)) if op == op_id => held = decode_record::<ReplayRecord>(v).ok(),
                Some((_, op)) => others.push(stored_age(op, v)),
                None => {}
            }
        }
        trim_visited(others.len());
        let (record, dropped) = counted_trim(record, held, others, keep);
        put_written(&t.replay, txn, &replay_key(scope, op_id), &record, written)?;
        for op in &dropped {
            t.replay.delete(txn, &replay_key(scope, *op))?;
        }
        written.deleted(dropped.len());
        Ok(())
    }

    /// The recorded reply of `op_id` in `scope`, if any.
    pub fn replay(
        &self,
        scope: &ReplayScope,
        op_id: u64,
    ) -> Result<Option<ReplayRecord>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.replay.remap_data_type::<Bytes>();
        match raw.get(&txn, &replay_key(scope, op_id))? {
            None => Ok(None),
            Some(v) => decode_record(v).map(Some).map_err(corrupt("replay")),
        }
    }

    /// Every replay record (loaded into daemon memory at start).
    pub fn replays(&self) -> Result<Vec<RawReplay>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.replay.remap_data_type::<Bytes>();
        let mut out = Vec::new();
        for item in raw.iter(&txn)? {
            let (k, v) = item?;
            let rec = decode_record::<ReplayRecord>(v).map_err(corrupt("replay"));
            out.push((k.to_vec(), rec));
        }
        Ok(out)
    }

    /// The replay records of one scope, by op id (what is durable of it).
    pub fn replays_in(&self, scope: &ReplayScope) -> Result<Vec<(u64, ReplayRecord)>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.replay.remap_types::<Bytes, Bytes>();
        let mut out = Vec::new();
        for item in raw.prefix_iter(&txn, &replay_prefix(scope))? {
            let (k, v) = item?;
            let Some((_, op_id)) = parse_replay_key(k) else {
                continue;
            };
            let rec = decode_record::<ReplayRecord>(v).map_err(corrupt("replay"))?;
            out.push((op_id, rec));
        }
        Ok(out)
    }

    /// Every intent still in the table (dangling after a crash).
    pub fn intents(&self) -> Result<Vec<Result<Intent, StoreError>>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.intents.remap_data_type::<Bytes>();
        let mut out = Vec::new();
        for item in raw.iter(&txn)? {
            let (_, v) = item?;
            out.push(decode_record::<Intent>(v).map_err(corrupt("intents")));
        }
        Ok(out)
    }

    /// Every handle record; a record that does not decode is reported as an
    /// error in its place (with its key when the key decodes), not skipped.
    pub fn handles(&self) -> Result<Vec<Result<HandleRecord, StoreError>>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.handles.remap_types::<Bytes, Bytes>();
        // Sized once from the tree's own count (no per-record regrowth, each
        // of which copied every record read so far).
        let count = raw.stat(&txn).map_or(0, |s| s.entries);
        drop(txn);
        drop(gate);
        let mut out = Vec::with_capacity(count);
        self.for_each_handle(&mut |rec| out.push(rec))?;
        Ok(out)
    }

    /// Every handle record, decoded straight from the cursor and handed to
    /// `each` (no vector of them all), the names of the records shared
    /// ([`SharedNames`]). `each` runs inside the read transaction: it must
    /// not call the store.
    pub fn for_each_handle(
        &self,
        each: &mut dyn FnMut(Result<HandleRecord, StoreError>),
    ) -> Result<(), StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.handles.remap_types::<Bytes, Bytes>();
        let mut names = SharedNames::default();
        for item in raw.iter(&txn)? {
            let (k, v) = item?;
            each(
                decode_handle_record(v, &mut names).map_err(|reason| StoreError::Corrupt {
                    table: "handles",
                    reason: format!("key {}: {reason}", hex(k)),
                }),
            );
        }
        Ok(())
    }

    /// Every [`READER_CHECK_EVERY`]th commit, clears the reader slots of
    /// dead processes. A reader killed inside its read transaction (a
    /// `filterctl --state` run over a live store, killed) leaves its slot
    /// holding its snapshot, and LMDB reuses no page freed since: without
    /// this, the data file grew by every commit's pages for good (review).
    fn clear_stale_readers_now_and_then(&self) {
        let n = self
            .commits_since_reader_check
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % READER_CHECK_EVERY == READER_CHECK_EVERY - 1 {
            let gate = self.gate();
            if let Ok(t) = tables(&gate) {
                clear_stale_readers(&t.env);
            }
        }
    }

    /// Drops the map pages this process has resident (a full scan — restart
    /// recovery — maps the whole data file through fault-around): they stay
    /// in the page cache and are mapped again when read. Best effort.
    pub fn release_mapped_pages(&self) {
        // The gate keeps a resize from replacing the map meanwhile.
        let gate = self.gate();
        let Ok(t) = tables(&gate) else {
            return;
        };
        let data = t.env.path().join("data.mdb");
        if let Err(e) = crate::sys::release_file_pages(&data) {
            tracing::debug!(error = %e, "LMDB map pages not released");
        }
    }

    /// One handle record.
    pub fn handle(&self, key: ResumeKey) -> Result<Option<HandleRecord>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let txn = t.env.read_txn()?;
        let raw = t.handles.remap_types::<ResumeKeyCodec, Bytes>();
        match raw.get(&txn, &key)? {
            None => Ok(None),
            Some(v) => decode_record(v).map(Some).map_err(corrupt("handles")),
        }
    }

    /// A table by name, keys and values as raw bytes.
    fn raw_table(t: &Tables, table: &str) -> Result<Database<Bytes, Bytes>, StoreError> {
        Ok(match table {
            "meta" => t.meta.remap_types(),
            "handles" => t.handles.remap_types(),
            "replay" => t.replay.remap_types(),
            "intents" => t.intents.remap_types(),
            _ => return Err(StoreError::Missing("a table of that name")),
        })
    }

    /// Writes raw bytes into `table` (`meta`, `handles`, `replay`,
    /// `intents`): for tests of corrupt, old-format and old-schema records.
    #[doc(hidden)]
    pub fn put_raw(&self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let db = Self::raw_table(t, table)?;
        let mut txn = t.env.write_txn()?;
        db.put(&mut txn, key, value)?;
        txn.commit().map_err(StoreError::from_heed)
    }

    /// Every raw value of `table`, by key: for tests of the stored form.
    #[doc(hidden)]
    pub fn raw_values(&self, table: &str) -> Result<Vec<RawEntry>, StoreError> {
        let gate = self.gate();
        let t = tables(&gate)?;
        let db = Self::raw_table(t, table)?;
        let txn = t.env.read_txn()?;
        let mut out = Vec::new();
        for item in db.iter(&txn)? {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// The pages the tables take in `txn`: every page of every table's B-tree,
/// the main tree's that names them, and the two meta pages. (Not the
/// free-page tree's, which heed does not show: it takes at most one page in
/// 512 of the free ones, inside the reserve.)
fn table_pages(t: &Tables, txn: &heed::RoTxn<'_>) -> Result<usize, StoreError> {
    let pages = |s: heed::DatabaseStat| s.branch_pages + s.leaf_pages + s.overflow_pages;
    let main = t.env.stat();
    Ok(2 + main.branch_pages
        + main.leaf_pages
        + main.overflow_pages
        + pages(t.meta.stat(txn)?)
        + pages(t.handles.stat(txn)?)
        + pages(t.replay.stat(txn)?)
        + pages(t.intents.stat(txn)?)
        + pages(t.clients.stat(txn)?))
}

/// The tables behind a held gate; an error if the environment is closed
/// (its reopen after LMDB declared it broken failed).
fn tables<'a>(
    gate: &'a std::sync::RwLockReadGuard<'_, Option<Tables>>,
) -> Result<&'a Tables, StoreError> {
    gate.as_ref()
        .ok_or(StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::Panic)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A small intent with this id, for store tests.
#[cfg(test)]
pub(crate) fn sample_intent(id: [u8; 16]) -> StoreOp {
    StoreOp::PutIntent(Box::new(crate::model::Intent {
        id: crate::model::IntentId(uuid::Uuid::from_bytes(id)),
        change: crate::model::IntentChange::Remove {
            path: crate::model::RelPath::new("f").unwrap(),
            file: crate::model::FileId { dev: 1, ino: 2 },
            record: None,
            kernel_handle: None,
            on_close: false,
        },
        recorded_ms: 0,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    /// Topping the block reserve up allocates only its missing tail, and
    /// only once a quarter of it is gone (review rr45h F3).
    #[test]
    fn the_block_reserve_is_topped_up_by_its_tail_past_a_quarter() {
        let (used, bytes) = (1 << 20, 1 << 20);
        assert_eq!(top_up_range(used, bytes, bytes), None);
        assert_eq!(top_up_range(used, bytes - 1, bytes), None);
        assert_eq!(top_up_range(used, bytes - bytes / 4, bytes), None);
        assert_eq!(
            top_up_range(used, bytes / 2, bytes),
            Some((used + bytes / 2, bytes / 2))
        );
        assert_eq!(top_up_range(used, 0, bytes), Some((used, bytes)));
        assert_eq!(top_up_range(used, 2 * bytes, bytes), None);
    }

    /// A commit that grows the tables is admitted only if half of the
    /// block reserve is left after the most it can take (review rr45h F2).
    #[test]
    fn a_growing_commit_must_leave_half_the_block_reserve_after_it() {
        let (bytes, page) = (256 << 10, 4096);
        let slack = bytes / 2 + 16 * page;
        // Review rr45h F2: just above half, a merged group of 64 opens
        // (an open and its reply each) could take the rest; one open
        // fits.
        let group = growth_bound(2 * 128, 4) * page;
        assert!(!leaves_half(bytes, slack, group, || 0));
        assert!(leaves_half(bytes, slack, group, || group));
        let one = growth_bound(2 * 2, 1) * page;
        assert!(leaves_half(bytes, slack, one, || 0));
        assert!(!leaves_half(bytes, bytes / 2, one, || 0));
        assert!(leaves_half(bytes, bytes, one, || unreachable!(
            "slack enough"
        )));
    }

    /// Recovery's steps leave two commits' copies within half the room
    /// (review rr45h F1).
    #[test]
    fn recovery_steps_keep_two_commits_within_half_the_room() {
        for room in [16, 64, 128, 4096] {
            let ops = step_ops(room);
            // Two commits' copies in flight, at four pages an operation.
            let ops = u64::try_from(ops).unwrap();
            assert!(2 * (4 * ops + 8) <= room / 2 + 16, "{room}");
        }
        assert_eq!(step_ops(0), 1);
    }

    /// A step's operations count the trees they touch and their large
    /// values (re-review rr46c F4: a handle's delete touches its record
    /// and its replay scope, and was counted one).
    #[test]
    fn step_weights_count_trees_and_large_values() {
        let small = rec("a");
        assert_eq!(step_weight(&StoreOp::PutHandle(Box::new(small.clone()))), 1);
        assert_eq!(
            step_weight(&StoreOp::DeleteHandle(Box::new(small.clone()))),
            2
        );
        // A non-persistent handle's replay scope is never stored.
        let durable = HandleRecord {
            durability: Durability::Durable { timeout_ms: 1000 },
            ..small
        };
        assert_eq!(step_weight(&StoreOp::DeleteHandle(Box::new(durable))), 1);
        // A 4 KiB path and 64 locks: two overflow pages.
        let mut large = rec(&vec!["p".repeat(200); 20].join("/"));
        large.locks = (0..64)
            .map(|i| HeldLock {
                range: crate::locks::LockRange {
                    offset: i * 100,
                    length: 10,
                },
                kind: crate::locks::LockKind::Exclusive,
            })
            .collect();
        assert_eq!(step_weight(&StoreOp::PutHandle(Box::new(large))), 2);
        let replay = |trim| StoreOp::PutReplay {
            scope: ReplayScope::Handle(ResumeKey::new_random()),
            op_id: 1,
            record: ReplayRecord {
                reply: "x".repeat(MAX_REPLY_BYTES),
                recorded_ms: 1,
                seq: Some(1),
            },
            trim,
        };
        // Five overflow pages (two units), and a unit for each trim.
        assert_eq!(step_weight(&replay(ReplayTrim::Evicted(Vec::new()))), 3);
        assert_eq!(step_weight(&replay(ReplayTrim::Evicted(vec![2, 3]))), 5);
        assert_eq!(step_weight(&replay(ReplayTrim::Keep(8))), 4);
        assert_eq!(step_weight(&sample_intent([1; 16])), 1);
    }

    /// A growing group that rewrites replay records of up to 16 KiB takes
    /// no more pages past the map's last page than its [`growth_bound`]
    /// (re-review rr46c F3: at two pages an operation, 64 such rewrites
    /// and an open were bounded at about 140 pages and took over 320).
    /// A reader holds the snapshot from before the group, so no page
    /// freed since is reused: every page it takes is past the last.
    #[test]
    fn a_group_of_large_replay_records_stays_within_its_growth_bound() {
        let dir = std::env::temp_dir().join(format!("rk-growth-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, 1 << 28).unwrap();
        let keys: Vec<ResumeKey> = (0..64).map(|_| ResumeKey::new_random()).collect();
        let puts = |at: u64| -> Vec<StoreOp> {
            keys.iter()
                .map(|k| StoreOp::PutReplay {
                    scope: ReplayScope::Handle(*k),
                    op_id: 1,
                    record: ReplayRecord {
                        reply: "x".repeat(MAX_REPLY_BYTES),
                        recorded_ms: at,
                        seq: Some(1),
                    },
                    trim: ReplayTrim::Evicted(Vec::new()),
                })
                .collect()
        };
        s.apply(&puts(1)).unwrap();
        let last_page = || {
            let g = s.gate();
            tables(&g).unwrap().env.info().last_page_number
        };
        let page = usize::try_from(s.gate().as_ref().unwrap().env.stat().page_size).unwrap();
        let (pinned, unpin) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let g = s.gate();
                let _txn = tables(&g).unwrap().env.read_txn().unwrap();
                pinned.wait();
                unpin.wait();
            });
            pinned.wait();
            let before = last_page();
            let mut group = puts(2);
            group.push(StoreOp::PutHandle(Box::new(rec("new"))));
            GROWTH_BOUND.with(|b| b.set(None));
            s.apply(&group).unwrap();
            let taken = u64::try_from((last_page() - before) * page).unwrap();
            let bound = GROWTH_BOUND
                .with(|b| b.get())
                .expect("a growing group is checked");
            unpin.wait();
            eprintln!("took {taken} B past the last page, bounded at {bound} B");
            assert!(
                taken >= 64 * 4 * 4096,
                "the rewrites took new pages: {taken}"
            );
            assert!(taken <= bound, "took {taken} B, bounded at {bound} B");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A filesystem whose blocks do not show a preallocation that
    /// "succeeded" (ZFS), or that cannot keep one (btrfs), runs without
    /// the reserve rather than refusing all new state on an empty disk;
    /// one that is full now keeps it (review rr45h F4).
    #[test]
    fn a_block_reserve_the_file_does_not_show_is_not_kept() {
        use nix::errno::Errno;
        let bytes = 1 << 20;
        assert!(reserve_unusable(Ok(()), bytes, bytes).is_none());
        assert!(reserve_unusable(Ok(()), bytes / 2, bytes).is_none());
        assert!(reserve_unusable(Ok(()), 4096, bytes).is_some());
        assert!(reserve_unusable(Err(Errno::EOPNOTSUPP), bytes, bytes).is_some());
        assert!(reserve_unusable(Err(Errno::ENOSPC), 0, bytes).is_none());
        assert!(reserve_unsupported_fs(libc::BTRFS_SUPER_MAGIC));
        assert!(reserve_unsupported_fs(0x2fc1_2fc1));
        assert!(!reserve_unsupported_fs(libc::TMPFS_MAGIC));
        assert!(!reserve_unsupported_fs(libc::EXT4_SUPER_MAGIC));
        assert!(!reserve_unsupported_fs(libc::XFS_SUPER_MAGIC));
    }

    /// `lmdb/` is made 0700 whatever the umask (review rvacl: it was
    /// `create_dir_all`'s 0777 less the umask), so nobody else can open
    /// it, nor hold the writer's lock on it.
    #[test]
    fn the_lmdb_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rkf-private-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, 1 << 24).unwrap();
        let mode = std::fs::metadata(dir.join("lmdb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "lmdb/ mode {mode:o}");
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store's directory made before it was made 0700 (review rvacl:
    /// 0755, 0775) is made 0700 when the store is opened, so no other user
    /// can hold its writer lock (review rr49a F2). One of another user,
    /// or with another user's file in it, is refused: `lifecycle.rs`
    /// `another_users_store_or_entries_in_the_state_dir_are_refused` (root).
    #[test]
    fn an_old_store_directory_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rkf-ours-{}", uuid::Uuid::new_v4()));
        let db_dir = dir.join(STORE_DIR);
        std::fs::create_dir_all(&db_dir).unwrap();
        std::fs::set_permissions(&db_dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        drop(Store::open(&dir, 1 << 24).unwrap());
        let mode = std::fs::metadata(&db_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700, "lmdb/ mode {mode:o}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// In the store's directory only `data.mdb` and `lock.mdb`, what LMDB
    /// opens there, must be regular files of filterd's user: anything else
    /// is never opened, so the `lost+found` (root's) of a filesystem
    /// mounted at `lmdb/` — the remedy for a link there — is let be
    /// (review rr49d L3: before, any entry of another user refused the
    /// start). A `data.mdb` or `lock.mdb` of another user is refused with
    /// `chown -R` as the remedy, never "remove" for the state (rr49d L4);
    /// as is a symbolic link there. The parts that need another user run
    /// as root only.
    #[test]
    fn only_what_lmdb_opens_in_the_store_directory_must_be_ours() {
        let dir = std::env::temp_dir().join(format!("rkf-entries-{}", uuid::Uuid::new_v4()));
        drop(Store::open(&dir, 1 << 24).unwrap());
        let db_dir = dir.join(STORE_DIR);
        let refused = |says: &[&str]| match Store::open(&dir, 1 << 24) {
            Err(e @ StoreError::Untrusted { .. }) => {
                let e = e.to_string();
                for s in says {
                    assert!(e.contains(s), "{e}");
                }
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened"),
        };
        let data = db_dir.join("data.mdb");
        let moved = db_dir.join("data.elsewhere");
        std::fs::rename(&data, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &data).unwrap();
        refused(&["data.mdb cannot be trusted", "not a regular file"]);
        std::fs::remove_file(&data).unwrap();
        std::fs::rename(&moved, &data).unwrap();
        drop(Store::open(&dir, 1 << 24).unwrap());
        // A hard link: another name of a file LMDB would overwrite
        // (review rr49j L2).
        for name in ["lock.mdb", "data.mdb"] {
            let other = dir.join("victim");
            std::fs::hard_link(db_dir.join(name), &other).unwrap();
            refused(&[&format!("{name} cannot be trusted"), "2 hard links"]);
            std::fs::remove_file(&other).unwrap();
        }
        drop(Store::open(&dir, 1 << 24).unwrap());
        if nix::unistd::geteuid().is_root() {
            let me = Some(nix::unistd::geteuid());
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            let lost = db_dir.join("lost+found");
            std::fs::create_dir(&lost).unwrap();
            nix::unistd::chown(&lost, nobody, None).unwrap();
            drop(Store::open(&dir, 1 << 24).unwrap());
            nix::unistd::chown(&data, nobody, None).unwrap();
            refused(&["data.mdb cannot be trusted", "chown -R", "never remove it"]);
            nix::unistd::chown(&data, me, None).unwrap();
            nix::unistd::chown(&db_dir, nobody, None).unwrap();
            refused(&["lmdb cannot be trusted", "chown -R", "never remove it"]);
            nix::unistd::chown(&db_dir, me, None).unwrap();
            drop(Store::open(&dir, 1 << 24).unwrap());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A symbolic link at `lmdb` is refused, never followed: the writer
    /// lock filterd probes there is taken `O_NOFOLLOW` (review rr49a F6).
    #[test]
    fn a_link_at_the_store_directory_is_refused() {
        let dir = std::env::temp_dir().join(format!("rkf-link-{}", uuid::Uuid::new_v4()));
        let elsewhere = dir.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join(STORE_DIR)).unwrap();
        match Store::open(&dir, 1 << 24) {
            Err(e @ StoreError::Untrusted { .. }) => {
                assert!(e.to_string().contains("symbolic link"), "{e}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a store opened through a symbolic link"),
        }
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fenced_claimant_writes_nothing() {
        let dir = std::env::temp_dir().join(format!("rkf-fence-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, 1 << 24).unwrap();
        let (mine, _) = StateStore::claim(&s).unwrap();
        let rec = |n: u8| sample_intent([n; 16]);
        let first = StateStore::commit(&s, &[&[rec(1)]]).unwrap();
        let second = StateStore::commit(&s, &[&[rec(2)]]).unwrap();
        assert!(second > first, "commit sequence numbers ascend");
        let now = s.claim_behind_our_back().unwrap();
        match StateStore::commit(&s, &[&[rec(3)]]) {
            Err(StoreError::Fenced { mine: m, now: n }) => assert_eq!((m, n), (mine, now)),
            other => panic!("a stale claimant committed: {other:?}"),
        }
        assert_eq!(
            s.intents().unwrap().len(),
            2,
            "the fenced commit wrote nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Resident bytes of this process's mappings of `file` (`Rss:` lines
    /// of `/proc/self/smaps` under its mapping header).
    fn resident_of(file: &std::path::Path) -> u64 {
        let name = file.canonicalize().unwrap().display().to_string();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            // A mapping's header starts with its address range.
            let header = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(a, b)| {
                    u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
                });
            if header {
                ours = line.ends_with(&name);
            } else if let Some(v) = line.strip_prefix("Rss:").filter(|_| ours) {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib * 1024
    }

    #[test]
    fn a_full_scan_leaves_no_map_page_resident() {
        let dir = std::env::temp_dir().join(format!("rkf-pages-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, 1 << 26).unwrap();
        let ops: Vec<StoreOp> = (0..4000)
            .map(|i| StoreOp::PutHandle(Box::new(rec(&format!("f{i}")))))
            .collect();
        s.apply(&ops).unwrap();
        let data = dir.join("lmdb/data.mdb");
        assert_eq!(s.handles().unwrap().len(), 4000);
        let scanned = resident_of(&data);
        assert!(
            scanned >= 100 * 1024,
            "the scan mapped the table: {scanned} bytes"
        );
        StateStore::release_read_pages(&s);
        let released = resident_of(&data);
        assert!(
            released < scanned / 10,
            "the map pages stayed resident: {released} of {scanned} bytes"
        );
        // And the records still read (the pages fault back in).
        assert_eq!(s.handles().unwrap().len(), 4000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;
    use crate::model::*;

    /// Review: a reader (`filterctl --state`) killed inside its read
    /// transaction while filterd serves leaves its reader slot, pinning its
    /// snapshot; nothing cleared it, so no page freed since was reused and
    /// the data file grew by every commit's pages for good. The store
    /// clears such slots every [`READER_CHECK_EVERY`] commits: with one,
    /// the file stays within that many commits' pages of a store without.
    #[test]
    fn a_killed_readers_slot_is_cleared_and_the_file_stays_bounded() {
        const CHILD: &str = "RKFILTER_TEST_STALE_READER_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            let s = Store::open_read_only(Path::new(&dir)).unwrap();
            let g = s.gate();
            let t = tables(&g).unwrap();
            let _txn = t.env.read_txn().unwrap();
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
            unreachable!("killed");
        }
        let size_after = |stale: bool| -> u64 {
            let dir =
                std::env::temp_dir().join(format!("rk-stale-reader-{}", uuid::Uuid::new_v4()));
            let s = Store::open(&dir, 1 << 28).unwrap();
            for n in 0..50u8 {
                s.apply(&[sample_intent([n; 16])]).unwrap();
            }
            if stale {
                let status = std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "--exact",
                        "store::tests::a_killed_readers_slot_is_cleared_and_the_file_stays_bounded",
                    ])
                    .env(CHILD, &dir)
                    .status()
                    .unwrap();
                assert!(!status.success(), "the reader was killed in its read");
            }
            for i in 0..1000u32 {
                let n = u8::try_from(i % 50).unwrap();
                s.apply(&[sample_intent([n; 16])]).unwrap();
            }
            let len = std::fs::metadata(dir.join("lmdb/data.mdb")).unwrap().len();
            let _ = std::fs::remove_dir_all(&dir);
            len
        };
        let clean = size_after(false);
        let stale = size_after(true);
        eprintln!(
            "data.mdb after 1000 commits: {clean} B without a dead reader, {stale} B with one"
        );
        // Unchecked, each commit here grew it by 16 KiB (four pages).
        assert!(
            stale <= clean + READER_CHECK_EVERY * (16 << 10),
            "a dead reader's slot pinned every page since: {stale} B against {clean} B"
        );
    }

    /// A persistent handle record of `path`, unlocked, delete on close unset.
    pub(crate) fn rec(path: &str) -> HandleRecord {
        crate::testing::persistent_record(path)
    }

    #[test]
    fn put_list_delete_and_reopen() {
        let dir = std::env::temp_dir().join(format!("rkf-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = rec("a");
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            assert_eq!(s.begin_epoch().unwrap(), (1, true));
            s.apply(&[StoreOp::PutHandle(Box::new(r.clone()))]).unwrap();
            s.put_raw("handles", &[9; 16], b"\x07junk").unwrap();
        }
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            assert_eq!(s.begin_epoch().unwrap(), (2, false));
            let hs = s.handles().unwrap();
            assert_eq!(hs.len(), 2);
            assert!(hs.iter().any(|h| h.as_ref().ok() == Some(&r)));
            assert!(hs
                .iter()
                .any(|h| matches!(h, Err(StoreError::Corrupt { .. }))));
            s.apply(&[StoreOp::DeleteHandle(Box::new(r.clone()))])
                .unwrap();
            assert_eq!(s.handle(r.key).unwrap(), None);
            s.mark_clean_shutdown().unwrap();
        }
        let s = Store::open_read_only(&dir).unwrap();
        assert!(s.meta().unwrap().clean_shutdown);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// rr49l N3: a read-only open (`filterctl --state`) whose `lmdb/` others
    /// could write never opens a lock file planted there as a link: LMDB
    /// opens `lock.mdb` read-write and writes its header into it as the
    /// first opener. It reads without the lock instead; a link at
    /// `data.mdb` is refused.
    #[test]
    fn a_read_only_open_writes_through_no_planted_lock_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rkf-ro-link-{}", uuid::Uuid::new_v4()));
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            s.apply(&[StoreOp::PutHandle(Box::new(rec("a")))]).unwrap();
        }
        let db = dir.join(STORE_DIR);
        let victim = dir.join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::fs::remove_file(db.join("lock.mdb")).unwrap();
        std::os::unix::fs::symlink(&victim, db.join("lock.mdb")).unwrap();
        // As left group-writable from before lmdb/ was narrowed.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o775)).unwrap();
        let s = Store::open_read_only(&dir).unwrap();
        assert_eq!(s.handles().unwrap().len(), 1, "read all the same");
        drop(s);
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"untouched",
            "the read wrote through the planted lock.mdb"
        );
        std::fs::rename(db.join("data.mdb"), dir.join("data.real")).unwrap();
        std::os::unix::fs::symlink(dir.join("data.real"), db.join("data.mdb")).unwrap();
        assert!(matches!(
            Store::open_read_only(&dir),
            Err(StoreError::Untrusted { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// attack50 M1 and L1: root reading a store another user owns never
    /// opens its lock file (that user could swap it for a link between
    /// the check and LMDB's open), and a `data.mdb` not of `lmdb/`'s owner
    /// is refused. Root only (chown).
    #[test]
    fn a_read_only_open_of_another_users_store_leaves_its_lock_file_alone() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("rkf-ro-other-{}", uuid::Uuid::new_v4()));
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            s.apply(&[StoreOp::PutHandle(Box::new(rec("a")))]).unwrap();
        }
        let db = dir.join(STORE_DIR);
        // A regular lock.mdb of the store's owner, as it could be swapped
        // for a link a moment later: LMDB as first opener rewrites it.
        std::fs::write(db.join("lock.mdb"), b"untouched").unwrap();
        let other = Some(nix::unistd::Uid::from_raw(65534));
        for f in ["", "data.mdb", "lock.mdb"] {
            nix::unistd::chown(&db.join(f), other, None).unwrap();
        }
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Store::open_read_only(&dir).unwrap();
        assert_eq!(s.handles().unwrap().len(), 1, "read all the same");
        drop(s);
        assert_eq!(
            std::fs::read(db.join("lock.mdb")).unwrap(),
            b"untouched",
            "root opened another user's lock.mdb"
        );
        nix::unistd::chown(
            &db.join("data.mdb"),
            Some(nix::unistd::Uid::from_raw(0)),
            None,
        )
        .unwrap();
        assert!(matches!(
            Store::open_read_only(&dir),
            Err(StoreError::Untrusted { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// attack50c N1/N2: a read-only open uses the lock file only through a
    /// path nobody else can change. Under a directory others may write
    /// (not sticky) another user could swap the path between the checks
    /// and LMDB's open for one to their own `lock.mdb`, a link to any
    /// file; so `lock.mdb` is left alone there (LMDB, as first opener,
    /// rewrites it), and used once that directory is closed to them.
    #[test]
    fn a_read_only_open_uses_the_lock_file_only_through_a_path_nobody_else_can_change() {
        use std::os::unix::fs::PermissionsExt;
        let top = std::env::temp_dir().join(format!("rkf-ro-path-{}", uuid::Uuid::new_v4()));
        let dir = top.join("state");
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            s.apply(&[StoreOp::PutHandle(Box::new(rec("a")))]).unwrap();
        }
        let lock = dir.join(STORE_DIR).join("lock.mdb");
        let read_leaves_lock_file = |mode: u32| {
            std::fs::set_permissions(&top, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::write(&lock, b"untouched").unwrap();
            // Through a link too: the path checked is the resolved one.
            let link = std::env::temp_dir().join(format!("rkf-ro-link-{}", uuid::Uuid::new_v4()));
            std::os::unix::fs::symlink(&dir, &link).unwrap();
            let s = Store::open_read_only(&link).unwrap();
            assert_eq!(s.handles().unwrap().len(), 1, "read all the same");
            drop(s);
            std::fs::remove_file(&link).unwrap();
            std::fs::read(&lock).unwrap() == b"untouched"
        };
        assert!(
            read_leaves_lock_file(0o777),
            "the read used a lock file whose path others could change"
        );
        assert!(
            !read_leaves_lock_file(0o1777),
            "a sticky directory keeps our entries ours: the lock file is used"
        );
        assert!(
            !read_leaves_lock_file(0o755),
            "a path only we may change: the lock file is used"
        );
        std::fs::remove_dir_all(&top).unwrap();
    }

    /// A store of `map` bytes that may not grow, claimed.
    fn capped(name: &str, map: usize) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("rkf-{name}-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, map).unwrap();
        s.set_max_map_size(map);
        s.begin_epoch().unwrap();
        (dir, s)
    }

    /// Persistent handle records with time-ordered keys (filterd's), one
    /// commit each, until the store refuses one: the records it took, and
    /// why it refused.
    fn fill(s: &Store) -> (Vec<HandleRecord>, StoreError) {
        let mut taken = Vec::new();
        loop {
            let mut r = rec("some/directory/of/the/export/a-file-name.txt");
            r.key = ResumeKey::new_time_ordered();
            match s.apply(&[StoreOp::PutHandle(Box::new(r.clone()))]) {
                Ok(()) => taken.push(r),
                Err(e) => return (taken, e),
            }
        }
    }

    /// Re-review rr-map36: at the reserve, a close that parks a Remove
    /// intent (a persistent handle with delete on close) and an intent's
    /// completion that rewrites its handle grow the tables by a page or
    /// two; refused there, the close stayed DISK_FULL for good and the
    /// completion, which must not fail, stopped filterd. A commit that
    /// removes a handle or an intent may use the reserve.
    #[test]
    fn a_close_parking_an_intent_and_a_completion_commit_at_the_reserve() {
        let (dir, s) = capped("mapfull-intent", 1 << 20);
        let intent_id = |n: u8| {
            let mut id = [0u8; 16];
            id[0] = 1;
            id[1] = n;
            id
        };
        let (taken, refused) = fill(&s);
        assert!(matches!(refused, StoreError::Reserved { .. }), "{refused}");
        // Closes with delete on close, each parking its Remove intent and
        // then completing it, as filterd does.
        for (i, r) in taken.iter().take(40).enumerate() {
            let id = intent_id(u8::try_from(i).unwrap());
            s.apply(&[
                StoreOp::DeleteHandle(Box::new(r.clone())),
                sample_intent(id),
            ])
            .unwrap_or_else(|e| panic!("close {i} parking its Remove: {e}"));
            s.apply(&[StoreOp::DeleteIntent(crate::model::IntentId(
                uuid::Uuid::from_bytes(id),
            ))])
            .unwrap_or_else(|e| panic!("close {i} completing its Remove: {e}"));
        }
        // Two intents parked, then the tables back at the reserve: the
        // first completion rewrites its handle (a new leaf, maybe).
        for r in taken.iter().skip(40).take(200) {
            s.apply(&[StoreOp::DeleteHandle(Box::new(r.clone()))])
                .unwrap();
        }
        s.apply(&[sample_intent(intent_id(200))]).unwrap();
        s.apply(&[sample_intent(intent_id(201))]).unwrap();
        let (_, refused) = fill(&s);
        assert!(matches!(refused, StoreError::Reserved { .. }), "{refused}");
        for n in [200, 201] {
            let mut r = rec("some/directory/of/the/export/a-completed-one.txt");
            r.key = ResumeKey::new_time_ordered();
            s.apply(&[
                StoreOp::PutHandle(Box::new(r)),
                StoreOp::DeleteIntent(crate::model::IntentId(uuid::Uuid::from_bytes(intent_id(n)))),
            ])
            .unwrap_or_else(|e| panic!("completion {n}: {e}"));
        }
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Re-review rr-last36: a growing group merged into a commit with a
    /// close used the reserve too, and under load the map filled to its
    /// last page (`MapFull` after two merged commits). Only a commit whose
    /// every group removes something may use the reserve; a merged one
    /// refused so is retried group by group by the committer.
    #[test]
    fn growing_groups_merged_with_a_close_do_not_use_the_reserve() {
        let (dir, s) = capped("mapfull-merged", 1 << 20);
        let (taken, refused) = fill(&s);
        assert!(matches!(refused, StoreError::Reserved { .. }), "{refused}");
        for r in taken.iter().take(30) {
            let close = [StoreOp::DeleteHandle(Box::new(r.clone()))];
            let opens: Vec<Vec<StoreOp>> = (0..3)
                .map(|_| {
                    let mut n = rec("some/directory/of/the/export/a-file-name.txt");
                    n.key = ResumeKey::new_time_ordered();
                    vec![StoreOp::PutHandle(Box::new(n))]
                })
                .collect();
            let mut batches: Vec<&[StoreOp]> = vec![&close];
            batches.extend(opens.iter().map(Vec::as_slice));
            match s.apply_all(&batches) {
                Ok(_) | Err(StoreError::Reserved { .. }) => {}
                Err(e) => panic!("a merged commit at the reserve: {e}"),
            }
            s.apply(&close)
                .unwrap_or_else(|e| panic!("the close alone: {e}"));
        }
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Re-review rr37b: a completion's commit with the groups it builds on
    /// (`Reserve::Usable`) may use a quarter of the reserve and no more, so
    /// closes and later completions keep the rest: at the reserve a few
    /// opens go with it, a run of them that would take more is refused
    /// (not `MapFull`), and closes still commit after.
    #[test]
    fn a_completions_commit_uses_a_quarter_of_the_reserve_at_most() {
        let (dir, s) = capped("mapfull-usable", 1 << 20);
        let (taken, refused) = fill(&s);
        let StoreError::Reserved { reserve, .. } = refused else {
            panic!("{refused}");
        };
        let opens = |n: usize| -> Vec<StoreOp> {
            (0..n)
                .map(|_| {
                    let mut r = rec("some/directory/of/the/export/a-file-name.txt");
                    r.key = ResumeKey::new_time_ordered();
                    StoreOp::PutHandle(Box::new(r))
                })
                .collect()
        };
        s.apply_all_with(&[&opens(2)], Reserve::Usable)
            .unwrap_or_else(|e| panic!("two opens with a completion: {e}"));
        // More, a few at a time: refused with three quarters of the
        // reserve left, never
        // taking the map to its last page.
        let mut went = 2;
        let e = loop {
            match s.apply_all_with(&[&opens(4)], Reserve::Usable) {
                Ok(_) => went += 4,
                Err(e) => break e,
            }
        };
        match e {
            StoreError::Reserved { reserve: kept, .. } => {
                assert_eq!(kept, reserve - reserve / 4)
            }
            e => panic!("after {went} opens: {e}"),
        }
        for r in taken.iter().take(10) {
            s.apply(&[StoreOp::DeleteHandle(Box::new(r.clone()))])
                .unwrap_or_else(|e| panic!("a close after: {e}"));
        }
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Review (rvx): filled to its largest map, a store refused some
    /// deletes for good — a delete copies the pages it changes and frees
    /// none while its leaf keeps records, and a leaf falling under a
    /// quarter full borrows from its neighbour (more pages); with no page
    /// left, the last deletes of every leaf failed (1,896 of 6,637 here),
    /// again on every retry. Adds now stop at the reserve, and every
    /// delete commits.
    #[test]
    fn deletes_commit_in_a_map_filled_to_its_maximum() {
        let (dir, s) = capped("mapfull", 1 << 20);
        let (taken, refused) = fill(&s);
        assert!(taken.len() > 1000, "a 1 MiB map holds thousands of records");
        let failed: Vec<_> = taken
            .iter()
            .filter(|r| {
                s.apply(&[StoreOp::DeleteHandle(Box::new((*r).clone()))])
                    .is_err()
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} deletes failed in a full map",
            failed.len(),
            taken.len()
        );
        assert_eq!(s.handles().unwrap().len(), 0);
        assert!(
            matches!(refused, StoreError::Reserved { .. }),
            "an add is refused at the reserve, before the map is full: {refused}"
        );
        // Emptied, the store takes as many again.
        let (again, _) = fill(&s);
        assert!(
            again.len() + 100 > taken.len(),
            "{} records after emptying, {} before",
            again.len(),
            taken.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Re-review rr47e F5: a frontend's detaches rewrite its persistent
    /// handles' records as disconnected, a little longer (the time of
    /// the disconnect and of the expiry): at the reserve, written as any
    /// rewrite, they split a leaf and were refused (`Reserved`, and on a
    /// full filesystem `Full`), the frontend told DISK_FULL while filterd
    /// held the handles disconnected. A detach may use the reserves, as a
    /// removal does.
    #[test]
    fn detaches_commit_at_the_reserve() {
        let (dir, s) = capped("detach-reserve", 1 << 20);
        let (taken, refused) = fill(&s);
        assert!(matches!(refused, StoreError::Reserved { .. }), "{refused}");
        let detached: Vec<HandleRecord> = taken[taken.len() - 60..]
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.conn = ConnState::Disconnected {
                    since_ms: 1_765_000_000_000,
                    expires_ms: 1_765_000_060_000,
                };
                r
            })
            .collect();
        // Written as plain rewrites, one a commit as a frontend's detaches
        // come, one of them splits its leaf into the reserve: refused.
        let refused = detached
            .iter()
            .find_map(|r| s.apply(&[StoreOp::PutHandle(Box::new(r.clone()))]).err());
        assert!(
            matches!(refused, Some(StoreError::Reserved { .. })),
            "{refused:?}"
        );
        for (i, r) in detached.iter().enumerate() {
            if let Err(e) = s.apply(&[StoreOp::DetachHandle(Box::new(r.clone()))]) {
                panic!("detach {i}: {e}");
            }
            assert_eq!(s.handle(r.key).unwrap().as_ref(), Some(r));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A detach splits every full leaf it rewrites: detaching all of a
    /// full map's handles, one commit each, with the whole reserve open
    /// to them took the map to its last page (`MapFull`), after which
    /// 1,882 of the 6,525 handles' deletes failed (the bug review rvx
    /// fixed for adds). Detaches use an eighth of the reserve: refused
    /// past it (`Reserved`), and every delete commits after.
    #[test]
    fn detaches_leave_the_deletes_their_reserve() {
        let (dir, s) = capped("detach-all", 1 << 20);
        let (taken, _) = fill(&s);
        let mut refused = None;
        for r in &taken {
            let mut r = r.clone();
            r.conn = ConnState::Disconnected {
                since_ms: 1_765_000_000_000,
                expires_ms: 1_765_000_060_000,
            };
            if let Err(e) = s.apply(&[StoreOp::DetachHandle(Box::new(r))]) {
                refused.get_or_insert(e);
            }
        }
        assert!(
            matches!(refused, Some(StoreError::Reserved { .. })),
            "{refused:?}"
        );
        let failed = taken
            .iter()
            .filter(|r| {
                s.apply(&[StoreOp::DeleteHandle(Box::new((*r).clone()))])
                    .is_err()
            })
            .count();
        assert_eq!(failed, 0, "of {} deletes", taken.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// At the reserve, a commit that does not grow the tables — deletes
    /// with an add beside them (a merged commit, or a CLOSE that records
    /// its reply) — still commits; one that grows them is refused whole.
    #[test]
    fn at_the_reserve_only_what_grows_the_tables_is_refused() {
        let (dir, s) = capped("reserve", 1 << 20);
        let (taken, _) = fill(&s);
        let mut newer = rec("another-file");
        newer.key = ResumeKey::new_time_ordered();
        // The two newest go, a newer one takes their leaf.
        let swap = [
            StoreOp::DeleteHandle(Box::new(taken[taken.len() - 1].clone())),
            StoreOp::DeleteHandle(Box::new(taken[taken.len() - 2].clone())),
            StoreOp::PutHandle(Box::new(newer.clone())),
        ];
        s.apply(&swap).unwrap();
        assert_eq!(s.handle(newer.key).unwrap().as_ref(), Some(&newer));
        // Many adds with one delete grow them (past the reserve, or even
        // the map, before the check): nothing of it is written.
        let mut ops = vec![StoreOp::DeleteHandle(Box::new(taken[1].clone()))];
        let added: Vec<HandleRecord> = (0..200)
            .map(|_| {
                let mut r = rec("grown");
                r.key = ResumeKey::new_time_ordered();
                r
            })
            .collect();
        ops.extend(
            added
                .iter()
                .map(|r| StoreOp::PutHandle(Box::new(r.clone()))),
        );
        let r = s.apply(&ops);
        assert!(
            matches!(r, Err(StoreError::Reserved { .. } | StoreError::MapFull)),
            "{r:?}"
        );
        assert!(s.handle(taken[1].key).unwrap().is_some());
        assert!(s.handle(added[0].key).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rvcx: every replay put counted its scope, walking and
    /// copying every key (4096 of ~270 bytes in a full scope) on the
    /// committer thread. A put that names what its writer evicted
    /// (`ReplayTrim::Evicted`, filterd's) looks at the records it drops
    /// and no other, whatever the scope holds; and a full scope still
    /// keeps exactly its newest `keep`. `ReplayTrim::Keep` (recovery's)
    /// keeps counting, also over a scope stored with a larger keep.
    #[test]
    fn a_replay_put_looks_at_what_it_drops_not_at_what_the_scope_keeps() {
        const KEEP: u64 = 4096;
        let dir = std::env::temp_dir().join(format!("rkf-trim-{}", uuid::Uuid::new_v4()));
        let s = Store::open(&dir, 1 << 28).unwrap();
        let long = ReplayScope::Session(ScopeName::new("s".repeat(246)).unwrap());
        let other = ReplayScope::Session(ScopeName::new("other").unwrap());
        let put = |scope: &ReplayScope, op_id: u64, seq: Option<u64>, trim| StoreOp::PutReplay {
            scope: scope.clone(),
            op_id,
            record: ReplayRecord {
                reply: "r".repeat(200),
                recorded_ms: 0,
                seq,
            },
            trim,
        };
        // As filterd puts (op ids in recording order here): the one op
        // id memory evicted past `KEEP`, if any.
        let engine_put = |scope: &ReplayScope, op_id: u64| {
            let dropped = op_id.checked_sub(KEEP).into_iter().collect();
            put(scope, op_id, Some(op_id + 1), ReplayTrim::Evicted(dropped))
        };
        let visits = || TRIM_VISITS.with(|v| v.replace(0));
        let ops: Vec<StoreOp> = (0..KEEP).map(|op| engine_put(&long, op)).collect();
        s.apply(&ops).unwrap();
        s.apply(&[engine_put(&other, 0)]).unwrap();
        visits();
        // 64 puts into the empty scope, then 64 into the full one, each
        // its own commit as filterd's committer makes them.
        for op in 1..=64 {
            s.apply(&[engine_put(&other, op)]).unwrap();
        }
        let empty = visits();
        for op in KEEP..KEEP + 64 {
            s.apply(&[engine_put(&long, op)]).unwrap();
        }
        let full = visits();
        assert_eq!(empty, 0, "a put that drops nothing looks at no key");
        assert_eq!(
            full, 64,
            "a put into a full scope looks at the one it drops"
        );
        let ids = |scope: &ReplayScope| -> Vec<u64> {
            s.replays_in(scope)
                .unwrap()
                .into_iter()
                .map(|(op, _)| op)
                .collect()
        };
        assert_eq!(
            ids(&long),
            (64..KEEP + 64).collect::<Vec<_>>(),
            "the newest 4096"
        );
        assert_eq!(
            ids(&other),
            (0..=64).collect::<Vec<_>>(),
            "nothing else goes"
        );
        // Several evicted at once (a smaller keep): just those go,
        // neighbours untouched.
        s.apply(&[put(
            &long,
            KEEP + 64,
            Some(KEEP + 65),
            ReplayTrim::Evicted(vec![64, 65, 66, 67]),
        )])
        .unwrap();
        assert_eq!(visits(), 4);
        assert_eq!(ids(&long), (68..=KEEP + 64).collect::<Vec<_>>());
        assert_eq!(ids(&other).len(), 65);
        // Counting (recovery's) keeps the newest `keep` of what is
        // stored, the record put after the scope's newest.
        s.apply(&[put(&other, 100, None, ReplayTrim::Keep(3))])
            .unwrap();
        assert_eq!(ids(&other), vec![63, 64, 100]);
        let stored = s.replay(&other, 100).unwrap().unwrap();
        assert_eq!(stored.seq, Some(66), "one past the newest (64's, 65)");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rvspec: a scope over its `keep` lost its lowest op ids, so
    /// an smbl/1 client's low op id recorded after 1024 high ones went in
    /// its own commit, and a replay of it ran again. The oldest recorded
    /// goes, whatever the op ids: counted (recovery's `ReplayTrim::Keep`)
    /// as filterd's memory does; records an older filterd wrote (no
    /// `seq`) are older than every numbered one and go first, by op id as
    /// then; the order is the stored one, so it survives a reopen.
    #[test]
    fn a_replay_put_drops_the_oldest_recorded_not_the_lowest_op_id() {
        let dir = std::env::temp_dir().join(format!("rkf-trim-{}", uuid::Uuid::new_v4()));
        let scope = ReplayScope::Session(ScopeName::new("smb/open").unwrap());
        let put = |op_id: u64, seq: Option<u64>, trim| StoreOp::PutReplay {
            scope: scope.clone(),
            op_id,
            record: ReplayRecord {
                reply: format!("reply {op_id}"),
                recorded_ms: 0,
                seq,
            },
            trim,
        };
        let ids = |s: &Store| -> Vec<u64> {
            s.replays_in(&scope)
                .unwrap()
                .into_iter()
                .map(|(op, _)| op)
                .collect()
        };
        let high = 1_000_000_000;
        {
            let s = Store::open(&dir, 1 << 24).unwrap();
            // An older filterd's records (written as they were: no `seq`).
            for op in [high + 9, high + 3, high + 7] {
                s.apply(&[put(op, None, ReplayTrim::Evicted(vec![]))])
                    .unwrap();
            }
            // The lowest op id, recorded last: the oldest (op id order
            // among the unnumbered) goes, not it.
            s.apply(&[put(5, None, ReplayTrim::Keep(3))]).unwrap();
            assert_eq!(ids(&s), vec![5, high + 7, high + 9]);
            assert_eq!(s.replay(&scope, 5).unwrap().unwrap().seq, Some(1));
        }
        let s = Store::open(&dir, 1 << 24).unwrap();
        s.apply(&[put(high + 1, None, ReplayTrim::Keep(3))])
            .unwrap();
        assert_eq!(ids(&s), vec![5, high + 1, high + 9]);
        s.apply(&[put(4, None, ReplayTrim::Keep(3))]).unwrap();
        assert_eq!(ids(&s), vec![4, 5, high + 1], "5 stays: recorded after 9");
        s.apply(&[put(2, None, ReplayTrim::Keep(3))]).unwrap();
        assert_eq!(ids(&s), vec![2, 4, high + 1], "5, the oldest, goes");
        // The same put again (a retried request) changes nothing; a new
        // reply recorded again moves the record to the newest.
        let before = s.replays_in(&scope).unwrap();
        s.apply(&[put(2, None, ReplayTrim::Keep(3))]).unwrap();
        assert_eq!(s.replays_in(&scope).unwrap(), before, "applied again");
        let mut again = put(high + 1, None, ReplayTrim::Keep(3));
        if let StoreOp::PutReplay { record, .. } = &mut again {
            record.reply = "another".into();
        }
        s.apply(&[again]).unwrap();
        s.apply(&[put(1, None, ReplayTrim::Keep(3))]).unwrap();
        assert_eq!(ids(&s), vec![1, 2, high + 1]);
        let seqs: Vec<Option<u64>> = s
            .replays_in(&scope)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.seq)
            .collect();
        assert_eq!(seqs, vec![Some(6), Some(4), Some(5)]);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn replay_keys_roundtrip() {
        let scopes = [
            ReplayScope::Handle(ResumeKey::new_random()),
            ReplayScope::Session(crate::model::ScopeName::new("nfs/s1/slot3").unwrap()),
        ];
        for s in scopes {
            for op in [0, 1, u64::MAX] {
                assert_eq!(parse_replay_key(&replay_key(&s, op)), Some((s.clone(), op)));
            }
        }
        assert_eq!(parse_replay_key(b""), None);
        assert_eq!(parse_replay_key(b"x12345678"), None);
        assert_eq!(parse_replay_key(b"s\x00\x09abc12345678"), None);
    }

    #[test]
    fn record_decoder_rejects_garbage() {
        assert!(decode_record::<HandleRecord>(b"").is_err());
        assert!(decode_record::<HandleRecord>(b"\x02{}").is_err());
        assert!(decode_record::<HandleRecord>(b"\x03{}").is_err());
        assert!(decode_record::<HandleRecord>(b"{}").is_err());
        assert!(decode_record::<HandleRecord>(b"\x01{}").is_err());
        assert!(decode_record::<HandleRecord>(b"\x01{\"key\":1}").is_err());
    }
}
