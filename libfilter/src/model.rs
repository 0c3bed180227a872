//! The state model: what the filter knows about every open handle.
//!
//! Everything a peer sends is decoded straight into these types ("parse, don't
//! validate"): a [`RelPath`] cannot hold `..`, an [`Access`] cannot be empty, a
//! [`Protocol`] name cannot be garbage. The share-mode algebra over these types
//! lives in [`crate::share`]; the LMDB codecs in [`crate::store`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Longest path a client may name, in bytes (smbl/1 and nfsl/1 agree).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest component of a path, in bytes: Linux's NAME_MAX, which every
/// file system an export root lies on keeps to. A longer one names
/// nothing that can exist: refused as an invalid path (smbl/1
/// `STATUS_OBJECT_NAME_INVALID`, nfsl/1 `NFS4ERR_INVAL`) before filterd
/// opens anything. Before (attack44 F4) it reached `openat2`, whose
/// ENAMETOOLONG was answered as a bad frame.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest client identity or owner string a frontend may send, in bytes.
pub const MAX_IDENT_BYTES: usize = 1024;

/// A model value that a peer sent and that the model refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The path is empty, absolute, has an empty, `.` or `..` component, a NUL,
    /// is longer than [`MAX_PATH_BYTES`] or has a component longer than
    /// [`MAX_NAME_BYTES`].
    #[error("invalid path: {0}")]
    InvalidPath(&'static str),
    /// A protocol or instance name is empty, too long or has characters other
    /// than `[A-Za-z0-9._-]`.
    #[error("invalid name {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidName(String),
    /// A client identity or owner is empty or longer than [`MAX_IDENT_BYTES`].
    #[error("invalid identity: must be 1..={MAX_IDENT_BYTES} bytes")]
    InvalidIdentity,
    /// An access or share word that is not `read`, `write` or `delete`.
    #[error("unknown access right {0:?}")]
    UnknownRight(String),
    /// An access mask with no right at all.
    #[error("access must name at least one right")]
    EmptyAccess,
    /// A resume key that is not a UUID.
    #[error("invalid resume key {0:?}")]
    InvalidResumeKey(String),
}

/// The key of the handle table: names one open for its whole life, across
/// client reconnects, frontend replacement and daemon restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResumeKey(pub Uuid);

impl ResumeKey {
    /// The 64 bits of the key that tell handles apart, for a protocol that
    /// names a handle by 64 bits (rksmbd's persistent FileId, 2.2.14.1;
    /// [`crate::proto::ResumeMatch::short_id`]). Of a time-ordered key
    /// (UUID v7) the low half: its high half is the millisecond and a
    /// counter's top bits, the same for every key minted in one
    /// millisecond, while its low half holds the rest of the counter and
    /// 32 random bits. Of any other key (v4, minted before filterd named
    /// handles in time order) the high half, as rksmbd took it then.
    pub fn short_id(self) -> u64 {
        let (high, low) = self.0.as_u64_pair();
        if self.0.get_version_num() == 7 {
            low
        } else {
            high
        }
    }

    /// A fresh random key (UUID version 4).
    pub fn new_random() -> Self {
        ResumeKey(Uuid::new_v4())
    }
    /// A fresh time-ordered key (UUID version 7: milliseconds since the
    /// epoch, then a counter that keeps one process's keys in creation
    /// order, then random bits). filterd names new handles with these when
    /// its store is LMDB (`StateStore::time_ordered_keys`) and the frontend
    /// asked (`FEATURE_TIME_ORDERED_KEYS`): the
    /// handle and replay tables are ordered by key, so a commit's new
    /// records land on the same few B-tree leaves at the table's end
    /// instead of one leaf each anywhere in it (docs/PERFORMANCE.md, round
    /// 17). Nothing relies on the order: keys stay unique by their counter and random
    /// bits, also across a restart or a clock stepped back.
    ///
    /// A wall clock before 1970 (which uuid's `now_v7` would panic on)
    /// gives a random key instead.
    pub fn new_time_ordered() -> Self {
        /// One counter for the process, as `now_v7`'s own.
        static CONTEXT: std::sync::Mutex<uuid::ContextV7> =
            std::sync::Mutex::new(uuid::ContextV7::new());
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => {
                let context = CONTEXT.lock().unwrap_or_else(|e| e.into_inner());
                let ts =
                    uuid::Timestamp::from_unix(&*context, since.as_secs(), since.subsec_nanos());
                ResumeKey(Uuid::new_v7(ts))
            }
            Err(_) => Self::new_random(),
        }
    }
    /// The 16 bytes used as the LMDB key.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for ResumeKey {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(ResumeKey)
            .map_err(|_| ModelError::InvalidResumeKey(s.chars().take(64).collect()))
    }
}

/// A client-chosen id for a durable open (SMB durable v2 create GUID, or any
/// frontend's equivalent): identifies the open for reconnect and create replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CreateGuid(pub Uuid);

impl fmt::Display for CreateGuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Identity of a file: device and inode number, as `fstat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Shared text (`Arc<str>`): the handles of one name share one copy,
        /// and a clone (an index key) allocates nothing.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Checks and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
                let s = s.into();
                if valid_name(&s) {
                    Ok($name(s.into()))
                } else {
                    Err(ModelError::InvalidName(s.chars().take(80).collect()))
                }
            }
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The protocol a frontend speaks (`smb`, `nfs`, or a third party's own). A
    /// handle can only be resumed through a frontend of its own protocol.
    Protocol
);
name_type!(
    /// The name of a frontend instance. A new process that says hello with the
    /// name of a dead instance takes over its handles.
    InstanceName
);

/// Who owns a handle at the protocol level: an SMB-like client GUID plus user,
/// an NFS-like client id, ... Opaque to the filter, compared for equality on
/// resume (invariant 6).
///
/// Shared text (`Arc<str>`): the handles of one client share one copy, and a
/// clone (an index key) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(std::sync::Arc<str>);

impl ClientId {
    /// Checks and wraps a client identity.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_IDENT_BYTES {
            return Err(ModelError::InvalidIdentity);
        }
        Ok(ClientId(s.into()))
    }
    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ClientId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClientId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ClientId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A client path: relative, `/`-separated, no empty, `.` or `..` component, no
/// NUL, at most [`MAX_PATH_BYTES`], no component over [`MAX_NAME_BYTES`]. It is only ever handed to `openat2` with
/// `RESOLVE_BENEATH` — never joined onto a host path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RelPath(String);

impl RelPath {
    /// Checks and wraps a client path.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        if s.is_empty() {
            return Err(ModelError::InvalidPath("empty"));
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(ModelError::InvalidPath("longer than 4096 bytes"));
        }
        if s.contains('\0') {
            return Err(ModelError::InvalidPath("contains NUL"));
        }
        if s.starts_with('/') {
            return Err(ModelError::InvalidPath("absolute"));
        }
        for comp in s.split('/') {
            match comp {
                "" => return Err(ModelError::InvalidPath("empty component")),
                "." | ".." => return Err(ModelError::InvalidPath("`.` or `..` component")),
                c if c.len() > MAX_NAME_BYTES => {
                    return Err(ModelError::InvalidPath("a component longer than 255 bytes"))
                }
                _ => {}
            }
        }
        Ok(RelPath(s))
    }
    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The parent directory, if the path has more than one component.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_owned()))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RelPath::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A set of the three rights of the share model: read, write, delete.
/// Used both for what an open does ([`Access`]) and what it lets others do
/// ([`ShareAccess`]). Serialized as a list of words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    /// Read data.
    pub const READ: Rights = Rights(1);
    /// Write data (includes truncate and extend).
    pub const WRITE: Rights = Rights(2);
    /// Delete or rename the file.
    pub const DELETE: Rights = Rights(4);
    /// No right.
    pub const NONE: Rights = Rights(0);
    /// All three rights.
    pub const ALL: Rights = Rights(7);

    /// Builds a set from the low three bits; higher bits are dropped.
    pub fn from_bits_truncate(b: u8) -> Rights {
        Rights(b & 7)
    }
    /// The raw bits.
    pub fn bits(self) -> u8 {
        self.0
    }
    /// The set of `bits`, if no bit above the three rights is set.
    pub fn from_bits(bits: u8) -> Option<Rights> {
        (bits & !7 == 0).then_some(Rights(bits))
    }
    /// Whether every right in `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether `self` has no right.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Union.
    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }
    fn words(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.contains(Rights::READ) {
            v.push("read");
        }
        if self.contains(Rights::WRITE) {
            v.push("write");
        }
        if self.contains(Rights::DELETE) {
            v.push("delete");
        }
        v
    }
    /// Parses `read`, `write`, `delete` words.
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Rights, ModelError> {
        let mut r = Rights::NONE;
        for w in words {
            r = r.union(match w {
                "read" => Rights::READ,
                "write" => Rights::WRITE,
                "delete" => Rights::DELETE,
                other => return Err(ModelError::UnknownRight(other.chars().take(32).collect())),
            });
        }
        Ok(r)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: String = [
            (Rights::READ, 'R'),
            (Rights::WRITE, 'W'),
            (Rights::DELETE, 'D'),
        ]
        .iter()
        .map(|(r, c)| if self.contains(*r) { *c } else { '-' })
        .collect();
        f.write_str(&s)
    }
}

impl Serialize for Rights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.words().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Rights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let words = Vec::<String>::deserialize(d)?;
        Rights::from_words(words.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

/// What an open does to the file: a non-empty [`Rights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Access(Rights);

impl Access {
    /// Checks that at least one right is asked for.
    pub fn new(r: Rights) -> Result<Access, ModelError> {
        if r.is_empty() {
            Err(ModelError::EmptyAccess)
        } else {
            Ok(Access(r))
        }
    }
    /// The rights.
    pub fn rights(self) -> Rights {
        self.0
    }
}

impl<'de> Deserialize<'de> for Access {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Access::new(Rights::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What an open lets other opens do meanwhile (may be empty: share none).
pub type ShareAccess = Rights;

/// How an open treats an existing or missing file (smbl/1 dispositions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Must exist.
    Open,
    /// Must not exist.
    Create,
    /// Open, or create if missing.
    OpenIf,
    /// Must exist; truncated.
    Overwrite,
    /// Truncated if it exists, else created.
    OverwriteIf,
    /// Replaced if it exists (here: truncated), else created.
    Supersede,
}

/// What an open did to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateAction {
    /// An existing file was opened unchanged.
    Opened,
    /// A new file was created.
    Created,
    /// An existing file was truncated.
    Overwritten,
    /// An existing file was replaced.
    Superseded,
}

impl fmt::Display for CreateAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CreateAction::Opened => "opened",
            CreateAction::Created => "created",
            CreateAction::Overwritten => "overwritten",
            CreateAction::Superseded => "superseded",
        })
    }
}

/// Default durable timeout when a frontend asks for 0, in milliseconds.
pub const DEFAULT_DURABLE_TIMEOUT_MS: u32 = 60_000;

/// How long a handle outlives the loss of its client or frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Durability {
    /// Closed when its client or frontend goes away. Never waits on an fsync.
    None,
    /// Kept disconnected for `timeout_ms` after its client or frontend goes away;
    /// lives in daemon memory, so it does not survive a daemon crash.
    Durable {
        /// Disconnected lifetime.
        timeout_ms: u32,
    },
    /// Like durable, and also survives a daemon crash: its record is on stable
    /// storage before the open is acknowledged.
    Persistent {
        /// Disconnected lifetime.
        timeout_ms: u32,
    },
}

impl Durability {
    /// The disconnected lifetime, if the handle has one.
    pub fn timeout_ms(self) -> Option<u32> {
        match self {
            Durability::None => None,
            Durability::Durable { timeout_ms } | Durability::Persistent { timeout_ms } => {
                Some(timeout_ms)
            }
        }
    }
    /// Whether the handle's record must be on stable storage.
    pub fn is_persistent(self) -> bool {
        matches!(self, Durability::Persistent { .. })
    }
    /// Short word for tables.
    pub fn word(self) -> &'static str {
        match self {
            Durability::None => "none",
            Durability::Durable { .. } => "durable",
            Durability::Persistent { .. } => "persistent",
        }
    }
    /// Replaces a zero timeout by the default and caps it at `max_ms`.
    pub fn normalized(self, max_ms: u32) -> Durability {
        let fix = |t: u32| {
            let t = if t == 0 {
                DEFAULT_DURABLE_TIMEOUT_MS
            } else {
                t
            };
            t.min(max_ms)
        };
        match self {
            Durability::None => Durability::None,
            Durability::Durable { timeout_ms } => Durability::Durable {
                timeout_ms: fix(timeout_ms),
            },
            Durability::Persistent { timeout_ms } => Durability::Persistent {
                timeout_ms: fix(timeout_ms),
            },
        }
    }
}

/// Whether a handle's client is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ConnState {
    /// Attached to a live frontend connection.
    Connected,
    /// Its client or frontend went away at `since_ms` (Unix ms); it keeps its
    /// share modes until `expires_ms`, when it is closed for good.
    Disconnected {
        /// When it was disconnected, Unix ms.
        since_ms: u64,
        /// When it expires, Unix ms.
        expires_ms: u64,
    },
    /// After a daemon restart its file could not be reopened (deleted
    /// meanwhile). Kept for the operator to see; holds no share mode.
    Lost,
}

impl ConnState {
    /// Short word for tables.
    pub fn word(self) -> &'static str {
        match self {
            ConnState::Connected => "connected",
            ConnState::Disconnected { .. } => "disconnected",
            ConnState::Lost => "lost",
        }
    }
}

/// A kernel file handle from `name_to_handle_at`: reopens the file after a
/// daemon restart even if it was renamed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelHandle {
    /// `handle_type` from `struct file_handle`.
    pub handle_type: i32,
    /// `f_handle` bytes, hex-encoded in JSON.
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 || s.len() > 256 {
            return Err(serde::de::Error::custom("bad hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| serde::de::Error::custom("bad hex digit"))
            })
            .collect()
    }
}

/// Everything the filter keeps about one open handle. Persistent handles'
/// records live in LMDB (`handles` db); others only in daemon memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleRecord {
    /// The handle's resume key.
    pub key: ResumeKey,
    /// Protocol of the frontend that opened it.
    pub protocol: Protocol,
    /// Frontend instance that holds (or last held) it.
    pub frontend: InstanceName,
    /// Protocol client that owns it.
    pub client: ClientId,
    /// Client-chosen id of a durable open, if any.
    pub create_guid: Option<CreateGuid>,
    /// Protocol-level owner (NFS-like open-owner), if any.
    pub owner: Option<String>,
    /// The path it was opened by (the file may have been renamed since).
    pub path: RelPath,
    /// The file's identity.
    pub file: FileId,
    /// Kernel file handle, for durable and persistent handles.
    pub kernel_handle: Option<KernelHandle>,
    /// What the open does.
    pub access: Access,
    /// What it lets others do.
    pub share: ShareAccess,
    /// How long it outlives its client.
    pub durability: Durability,
    /// Attached or not.
    pub conn: ConnState,
    /// What the open did to the file.
    pub create_action: CreateAction,
    /// When it was opened, Unix ms.
    pub opened_ms: u64,
    /// Byte-range locks it holds (restored after a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<HeldLock>,
    /// Lock-sequence entries (index 1..=64 → number), durable and persistent
    /// handles only (spec/smb-like.md "Lock sequence replay").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lock_sequence: Vec<(u8, u8)>,
    /// The lease this open belongs to, if any (shared by the opens of one
    /// lease key on the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<HeldLease>,
    /// Delete pending (smbl/1 `delete_on_close`): the file is removed when
    /// the last open of it goes away.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delete_on_close: bool,
    /// The share reservation it belongs to with this client's other handles
    /// of the same group (`OpenRequest::share_group`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_group: Option<String>,
    /// The lock-owner its locks belong to, when the frontend names one
    /// (`Request::Lock::lock_owner`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_owner: Option<String>,
    /// An attribute-only open (`OpenRequest::stat`, honoured): no part in
    /// sharing, lease breaks or lease grants, and its descriptor is
    /// `O_PATH`. Stored (record version 3), so a recovered one stays one.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stat: bool,
    /// An open without data access (`OpenRequest::share_exempt`,
    /// honoured): no part in sharing and an `O_PATH` descriptor, but
    /// otherwise an ordinary open. Stored (record version 4).
    #[serde(default, skip_serializing_if = "is_false")]
    pub share_exempt: bool,
    /// Its path passes through a symbolic link inside the export (when it
    /// was opened, or when its file was last renamed): where the file lies
    /// in the tree is then not what the path says, and a directory rename
    /// asks the file itself whether it lies below (review A3). Not stored
    /// (a build that does not know it reads every record): after a
    /// restart filterd finds it again from the path, in its first steps
    /// (until then it reads false). Shown by filterctl when set.
    #[serde(default, skip_serializing_if = "is_false")]
    pub through_link: bool,
    /// The frontend process that attached it last (its hello's
    /// [`crate::proto::Role::Frontend`] `incarnation`; filterd draws one
    /// for a hello without): an open, a resume or a replayed open that
    /// reattaches it writes it. A frontend's automatic reattach after its
    /// filterd connection came back (`crate::attach`) is refused when
    /// another process attached the handle since
    /// ([`crate::proto::ResumeRequest::if_last_held`]): on a fail-back
    /// between nodes the frontend of the node that owns the table again
    /// must not take back a handle the other node's frontend reconnected
    /// since. 0: not known (a record of a build from before; such a
    /// record is reattached by anyone, as before). Stored (record
    /// version 5), shown by filterctl.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attached_by: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A frontend process's `incarnation` ([`crate::proto::Role::Frontend`]):
/// random, never 0 (0 is "not known" in [`HandleRecord::attached_by`]).
pub fn new_incarnation() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0.max(1)
}

/// A lease as granted and held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    /// The client's lease key.
    pub key: crate::lease::LeaseKey,
    /// The granted state.
    pub state: crate::lease::LeaseState,
    /// Grows at every change of state.
    pub epoch: u16,
}

/// A lease asked for with an open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The client's lease key.
    pub key: crate::lease::LeaseKey,
    /// The state wanted.
    pub state: crate::lease::LeaseState,
    /// The epoch the client last saw for this key (an SMB 3 lease v2
    /// request's; 0 otherwise): a new lease starts one above it (MS-SMB2
    /// 3.3.5.9.11).
    #[serde(default)]
    pub epoch: u16,
}

/// A byte-range lock as a handle record stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The range.
    #[serde(flatten)]
    pub range: crate::locks::LockRange,
    /// Shared or exclusive.
    pub kind: crate::locks::LockKind,
}

/// MS-SMB2 LockSequence: `index` 1..=64 names an entry, `number` 0..=15 the
/// request; index 0 means "no replay check".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSequence {
    /// 0..=15.
    pub number: u8,
    /// 0..=64.
    pub index: u8,
}

/// Longest replay-scope name (a frontend session id), in bytes.
pub const MAX_SCOPE_BYTES: usize = 256;
/// Longest recorded reply, in bytes.
pub const MAX_REPLY_BYTES: usize = 16 * 1024;

/// Where op ids live: one handle (smbl/1 WRITE / SET_INFO op ids), or a
/// frontend-named session (nfsl/1 session slots).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayScope {
    /// Records dropped when the handle closes.
    Handle(ResumeKey),
    /// Records dropped when the frontend deletes the scope.
    Session(ScopeName),
}

/// A frontend's name for a replay scope: 1..=256 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ScopeName(String);

impl ScopeName {
    /// Checks and wraps a scope name.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_SCOPE_BYTES {
            return Err(ModelError::InvalidIdentity);
        }
        Ok(ScopeName(s))
    }
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ScopeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ScopeName::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The reply recovery records for a request whose outcome it cannot know:
/// filterd stopped after the request's intent committed, and the file's
/// content moved meanwhile with no mark proving the change was made (a
/// local write while filterd was down looks the same). A lookup of such a
/// record is answered with an error, never as a success; frontends may not
/// record this reply themselves.
pub const OUTCOME_UNKNOWN: &str = "\u{0}rkfilter: outcome unknown";

/// A recorded reply: opaque to the filter (the frontend's own encoding),
/// except [`OUTCOME_UNKNOWN`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// The reply, at most [`MAX_REPLY_BYTES`].
    pub reply: String,
    /// When it was recorded, Unix ms.
    pub recorded_ms: u64,
    /// Its place in its scope's recording order: one past the scope's
    /// newest when it was recorded (a record put again moves to the
    /// newest). A scope over its `keep` loses its oldest first, whatever
    /// their op ids. `None` in a record an older filterd wrote: those
    /// order before every numbered one, by op id, as they went then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl ReplayRecord {
    /// Where it stands in its scope's recording order (oldest first):
    /// its [`seq`](Self::seq) (an older filterd's record, none, before
    /// every numbered one), then its op id.
    pub fn age(&self, op_id: u64) -> (u64, u64) {
        (self.seq.unwrap_or(0), op_id)
    }
}

/// Names one intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IntentId(pub Uuid);

/// A non-idempotent filesystem change that is about to happen, recorded
/// durably first so recovery can finish it (roll forward) after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Its id.
    pub id: IntentId,
    /// What is about to happen.
    pub change: IntentChange,
    /// When it was recorded, Unix ms.
    pub recorded_ms: u64,
}

/// A reply the filter records for the frontend when a change it executes
/// succeeds — in the same commit, so a replay after any crash finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSpec {
    /// Where the op id lives.
    pub scope: ReplayScope,
    /// The op id.
    pub op_id: u64,
    /// The frontend's encoded success reply.
    pub reply: String,
    /// Most records kept in the scope.
    pub keep: u32,
}

/// The changes intents bracket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum IntentChange {
    /// Rename the file of handle `key` from `from` to `to`. Recovery: if
    /// `to` names the file, it happened (the handle's path is updated and the
    /// reply recorded); if `from` still does, it did not (the replay runs it).
    Rename {
        /// The handle.
        key: ResumeKey,
        /// Current path.
        from: RelPath,
        /// New path.
        to: RelPath,
        /// The file.
        file: FileId,
        /// Replace an existing target.
        replace: bool,
        /// The reply to record on success.
        record: Option<RecordSpec>,
        /// The file's kernel handle, when known: identity beyond the inode
        /// number (which the filesystem reuses).
        #[serde(default)]
        kernel_handle: Option<KernelHandle>,
    },
    /// Set the size of handle `key`'s file (truncate or extend). Recovery
    /// sets it again only if the file is still as `before` says (else the
    /// change happened, and writes may have come after it), and records the
    /// reply.
    SetSize {
        /// The handle.
        key: ResumeKey,
        /// The file's kernel handle.
        kernel_handle: KernelHandle,
        /// The new size.
        size: u64,
        /// The reply to record on success.
        record: Option<RecordSpec>,
        /// The file before the change (none in intents recorded before
        /// stamps existed: recovery then redoes the change as it did).
        #[serde(default)]
        before: Option<FileStamp>,
    },
    /// Remove the file at `path`. Recovery: if `path` no longer names the
    /// file, it happened (the reply is recorded); else it did not — and a
    /// delete-on-close (`on_close`) is then finished.
    Remove {
        /// The path.
        path: RelPath,
        /// The file.
        file: FileId,
        /// The reply to record on success.
        record: Option<RecordSpec>,
        /// The file's kernel handle, when known: identity beyond the inode
        /// number (which the filesystem reuses).
        #[serde(default)]
        kernel_handle: Option<KernelHandle>,
        /// A delete-on-close: its handle's deletion committed with this
        /// intent, so recovery finishes the unlink (nobody replays it).
        #[serde(default)]
        on_close: bool,
    },
    /// A persistent open that overwrites or supersedes: the file (named by
    /// the record's kernel handle) is truncated, then the record installed.
    /// Recovery truncates again only if the file is still as `before` says
    /// (else the truncate happened, and writes may have come after it), and
    /// installs the record, disconnected.
    TruncatingOpen {
        /// The handle record to install.
        record: Box<HandleRecord>,
        /// The file before the truncate (none in older intents: recovery
        /// then truncates again as it did).
        #[serde(default)]
        before: Option<FileStamp>,
    },
}

/// What a file looked like at one moment — size, modification and change
/// times — to tell at recovery whether anything touched it since: every
/// write and size change moves its ctime (and a truncate its size), so a
/// file that still matches was not changed since the stamp was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Status change time, seconds and nanoseconds.
    pub ctime: (i64, i64),
}

impl FileStamp {
    /// Whether the file's content is as it was at `before`: same size and
    /// modification time. Only metadata (mode, owner, xattrs: the status
    /// change time) may have moved — a chmod or an xattr removed is no sign
    /// that a size change happened.
    pub fn same_content_as(&self, before: &FileStamp) -> bool {
        self.size == before.size && self.mtime == before.mtime
    }
}

/// Current wall-clock time in Unix milliseconds. Persisted times use the wall
/// clock because they must mean something after a restart.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Time-ordered keys ascend in the order they were made, also many in
    /// one millisecond, and are unique.
    #[test]
    fn time_ordered_keys_ascend() {
        let keys: Vec<ResumeKey> = (0..10_000).map(|_| ResumeKey::new_time_ordered()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(keys.iter().all(|k| k.0.get_version_num() == 7));
    }

    /// A size-change intent stored before stamps existed still decodes
    /// (recovery then redoes it as it did); a stamped one round-trips.
    #[test]
    fn size_change_intents_without_a_stamp_decode() {
        let old = r#"{"kind":"set_size","key":"00000000-0000-0000-0000-000000000001","kernel_handle":{"handle_type":1,"bytes":"0102"},"size":10,"record":null}"#;
        let IntentChange::SetSize {
            before,
            size,
            kernel_handle,
            ..
        } = serde_json::from_str::<IntentChange>(old).unwrap()
        else {
            panic!("not a size change");
        };
        assert_eq!((before, size), (None, 10));
        let stamped = IntentChange::SetSize {
            key: ResumeKey(uuid::Uuid::nil()),
            kernel_handle,
            size: 10,
            record: None,
            before: Some(FileStamp {
                size: 54,
                mtime: (1, 2),
                ctime: (3, 4),
            }),
        };
        let back: IntentChange =
            serde_json::from_str(&serde_json::to_string(&stamped).unwrap()).unwrap();
        assert_eq!(back, stamped);
    }

    #[test]
    fn relpath_refuses_escapes() {
        for bad in ["", "/etc/passwd", "a/../b", "..", ".", "a//b", "a/", "a\0b"] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::new("x".repeat(4097)).is_err());
        // 4096 bytes in components of at most 255 is fine; one component
        // of 256 bytes is not, at the start, middle or end.
        let long = format!(
            "{}/{}/{}",
            vec!["x".repeat(255); 15].join("/"),
            "y".repeat(127),
            "z".repeat(128)
        );
        assert_eq!(long.len(), 4096);
        assert!(RelPath::new(long).is_ok());
        let name = "x".repeat(256);
        for bad in [
            name.clone(),
            format!("a/{name}"),
            format!("{name}/a"),
            format!("a/{name}/b"),
        ] {
            assert_eq!(
                RelPath::new(bad),
                Err(ModelError::InvalidPath("a component longer than 255 bytes"))
            );
        }
        assert!(RelPath::new("é".repeat(127)).is_ok(), "254 bytes");
        assert!(RelPath::new("é".repeat(128)).is_err(), "256 bytes");
        for good in ["a", "a/b/c", "..a", "a..", ".hidden/x"] {
            assert!(RelPath::new(good).is_ok(), "{good:?} refused");
        }
        assert_eq!(
            RelPath::new("a/b/c").unwrap().parent().unwrap().as_str(),
            "a/b"
        );
        assert!(RelPath::new("a").unwrap().parent().is_none());
    }

    #[test]
    fn rights_roundtrip_json() {
        let r: Rights = serde_json::from_str(r#"["read","delete"]"#).unwrap();
        assert_eq!(r, Rights::READ.union(Rights::DELETE));
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"["read","delete"]"#);
        assert!(serde_json::from_str::<Rights>(r#"["exec"]"#).is_err());
        assert!(serde_json::from_str::<Access>(r#"[]"#).is_err());
        assert_eq!(r.to_string(), "R-D");
    }

    #[test]
    fn durability_normalizes() {
        assert_eq!(
            Durability::Durable { timeout_ms: 0 }.normalized(300_000),
            Durability::Durable { timeout_ms: 60_000 }
        );
        assert_eq!(
            Durability::Persistent {
                timeout_ms: 999_999
            }
            .normalized(300_000),
            Durability::Persistent {
                timeout_ms: 300_000
            }
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(Protocol::new("smb").is_ok());
        assert!(Protocol::new("").is_err());
        assert!(InstanceName::new("a b").is_err());
        assert!(ClientId::new("").is_err());
    }
}
