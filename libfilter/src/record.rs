//! How a stored record value is encoded, in LMDB and in etcd alike.
//!
//! Every value starts with a version byte:
//!
//! | first byte | body |
//! |---|---|
//! | `5` | postcard of the `…V2` mirror, then postcard of the fields added since, version 5's layout ([`StoredRecord::Ext`]) |
//! | `4` | postcard of the `…V2` mirror, then postcard of the fields added in versions 3 and 4 ([`StoredRecord::V4Ext`]) |
//! | `3` | postcard of the `…V2` mirror, then postcard of the fields added in version 3 ([`StoredRecord::V3Ext`]) |
//! | `2` | postcard of the record's `…V2` mirror type |
//! | `1` | JSON of the public model type (written by schema-1 builds) |
//! | `{` | JSON with no version byte at all (the oldest form) |
//!
//! Anything else is [`RecordError::UnknownVersion`]: an error for that one
//! record, never a panic; recovery reports it and serves the others.
//!
//! The binary form is postcard (varint integers, no field names) of
//! dedicated mirror types ([`HandleRecordV2`] and friends), not of the model
//! types: those keep their JSON serde attributes (rights as words, hex
//! kernel handles, internally tagged enums, fields skipped when empty),
//! which are what `filterctl` shows and which postcard cannot carry. The
//! mirror types borrow their strings and bytes, so encoding copies nothing
//! but the record itself and decoding allocates only the model's owned
//! values — which are checked again by the model's constructors (a stored
//! record is no more trusted than a peer: invariant 8). A V2 layout is
//! frozen: fields and enum variants are never reordered or removed (postcard
//! has no names); a change is a new version byte and a new mirror.
//!
//! Version 3 added one field, [`HandleRecord::stat`]: a record is written as
//! version 3 only when a field added since version 2 is not at its default
//! (a stat handle), else as version 2 — so a build that reads versions 1
//! and 2 only still reads every record but a stat handle's, which it reports
//! as of an unknown version rather than taking it for an ordinary reader.
//! Version 4 added [`HandleRecord::share_exempt`] after it, the same way: a
//! record is written as version 4 only when that field is set, else as
//! version 3 or 2, so older builds refuse just those records.
//! Version 5 added [`HandleRecord::attached_by`] after those, the same
//! way: written only when it is known (not 0). filterd stamps every
//! handle a frontend attaches, so a build from before version 5 reads a
//! persistent handle attached since as of an unknown version (it reports
//! it and serves the others); records written before still read here,
//! `attached_by` 0.
//!
//! A [`ReplayRecord`]'s version 3 added [`ReplayRecord::seq`], its place
//! in its scope's recording order (eviction goes by it, not by op id:
//! review rvspec). filterd writes it on every record it records since;
//! a record of an older filterd (version 2, no `seq`) still reads, and
//! orders before every numbered one. A build from before reads such a
//! version-3 record as unreadable (bytes after its end) and reports it.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::lease::{LeaseKey, LeaseState};
use crate::locks::{LockKind, LockRange};
use crate::model::{
    Access, ClientId, ConnState, CreateAction, CreateGuid, Durability, FileId, FileStamp,
    HandleRecord, HeldLease, HeldLock, InstanceName, Intent, IntentChange, IntentId, KernelHandle,
    ModelError, Protocol, RecordSpec, RelPath, ReplayRecord, ReplayScope, ResumeKey, Rights,
    ScopeName,
};

/// The version byte of a JSON record (schema 1).
pub const RECORD_V1_JSON: u8 = 1;
/// The version byte of a postcard record: what this build writes when
/// every field added since is at its default.
pub const RECORD_V2_POSTCARD: u8 = 2;
/// The version byte of a postcard record with the fields added since
/// version 2 after its version-2 mirror.
pub const RECORD_V3_POSTCARD: u8 = 3;
/// The version byte of a postcard record with the fields added since
/// version 2 in version 4's layout after its version-2 mirror.
pub const RECORD_V4_POSTCARD: u8 = 4;
/// The version byte of a postcard record with the fields added since
/// version 2 in version 5's layout after its version-2 mirror.
pub const RECORD_V5_POSTCARD: u8 = 5;
/// Longest kernel handle a record may carry (`MAX_HANDLE_SZ`).
const MAX_KERNEL_HANDLE_BYTES: usize = 128;

/// A stored record that does not decode (or, never in practice, encode).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The value has no byte at all.
    #[error("empty record")]
    Empty,
    /// The first byte names no encoding this build reads.
    #[error("unknown record version {0} (this build reads 1, 2, 3, 4, 5 and unversioned JSON)")]
    UnknownVersion(u8),
    /// A JSON record (version 1 or unversioned) that does not parse.
    #[error("JSON record: {0}")]
    Json(serde_json::Error),
    /// A binary record that does not parse.
    #[error("binary record: {0}")]
    Binary(postcard::Error),
    /// A binary record with bytes after its end.
    #[error("binary record has {0} bytes after its end")]
    Trailing(usize),
    /// A field holds a value the model refuses.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Encoding failed (postcard into a vector only fails on a bug).
    #[error("encoding a record: {0}")]
    Encode(postcard::Error),
}

fn invalid(field: &'static str) -> impl FnOnce(ModelError) -> RecordError {
    move |e| RecordError::Invalid {
        field,
        reason: e.to_string(),
    }
}

fn refused(field: &'static str, reason: &str) -> RecordError {
    RecordError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// A record type the store keeps: its JSON form is the model type itself,
/// its binary form the mirror [`StoredRecord::V2`].
pub trait StoredRecord: Serialize + DeserializeOwned {
    /// The version-2 mirror, borrowing from the record (encoding) or from
    /// the stored bytes (decoding).
    type V2<'a>: Serialize + Deserialize<'a>
    where
        Self: 'a;
    /// The mirror of `self`.
    fn to_v2(&self) -> Self::V2<'_>;
    /// The record a mirror describes, checked as the model checks a peer's.
    fn from_v2(v: Self::V2<'_>) -> Result<Self, RecordError>;
    /// The fields added since version 2, in version 5's layout, stored
    /// after the version-2 mirror.
    type Ext: Serialize + DeserializeOwned;
    /// The fields added in version 3 (a prefix of [`Self::Ext`]'s layout).
    type V3Ext: Serialize + DeserializeOwned + Into<Self::Ext>;
    /// The fields added in versions 3 and 4 (a prefix of [`Self::Ext`]'s
    /// layout).
    type V4Ext: Serialize + DeserializeOwned + Into<Self::Ext>;
    /// Those fields, when one is not at its default (the record is then
    /// written as version 3, 4 or 5; else as version 2).
    fn ext(&self) -> Option<Self::Ext>;
    /// Their version-3 form, when the fields added in versions 4 and 5
    /// are at their defaults (the record is then written as version 3).
    fn ext_as_v3(ext: &Self::Ext) -> Option<Self::V3Ext>;
    /// Their version-4 form, when the fields added in version 5 are at
    /// their defaults (the record is then written as version 4).
    fn ext_as_v4(ext: &Self::Ext) -> Option<Self::V4Ext>;
    /// The record with the fields added since version 2 set.
    fn with_ext(self, ext: Self::Ext) -> Self;
}

/// The added fields of a record kind that added none.
#[derive(Debug, Serialize, Deserialize)]
pub struct NoExt;

/// [`HandleRecord`]'s fields added in version 3. Field order is the
/// layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandleRecordV3Ext {
    stat: bool,
}

/// [`HandleRecord`]'s fields added since version 2, version 4's layout:
/// version 3's, then those added in 4. Field order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandleRecordV4Ext {
    stat: bool,
    share_exempt: bool,
}

impl From<HandleRecordV3Ext> for HandleRecordV4Ext {
    fn from(v: HandleRecordV3Ext) -> Self {
        HandleRecordV4Ext {
            stat: v.stat,
            share_exempt: false,
        }
    }
}

/// [`HandleRecord`]'s fields added since version 2, version 5's layout:
/// version 4's, then those added in 5. Field order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandleRecordV5Ext {
    stat: bool,
    share_exempt: bool,
    attached_by: u64,
}

impl From<HandleRecordV4Ext> for HandleRecordV5Ext {
    fn from(v: HandleRecordV4Ext) -> Self {
        HandleRecordV5Ext {
            stat: v.stat,
            share_exempt: v.share_exempt,
            attached_by: 0,
        }
    }
}

impl From<HandleRecordV3Ext> for HandleRecordV5Ext {
    fn from(v: HandleRecordV3Ext) -> Self {
        HandleRecordV4Ext::from(v).into()
    }
}

/// Encodes a record as every backend stores it: version 2, postcard — or
/// version 3, 4 or 5 when a field added since is not at its default (the
/// oldest version that holds every such field).
pub fn encode_record<T: StoredRecord>(item: &T) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::with_capacity(128);
    let Some(ext) = item.ext() else {
        out.push(RECORD_V2_POSTCARD);
        return postcard::to_extend(&item.to_v2(), out).map_err(RecordError::Encode);
    };
    if let Some(v3) = T::ext_as_v3(&ext) {
        out.push(RECORD_V3_POSTCARD);
        let out = postcard::to_extend(&item.to_v2(), out).map_err(RecordError::Encode)?;
        return postcard::to_extend(&v3, out).map_err(RecordError::Encode);
    }
    if let Some(v4) = T::ext_as_v4(&ext) {
        out.push(RECORD_V4_POSTCARD);
        let out = postcard::to_extend(&item.to_v2(), out).map_err(RecordError::Encode)?;
        return postcard::to_extend(&v4, out).map_err(RecordError::Encode);
    }
    out.push(RECORD_V5_POSTCARD);
    let out = postcard::to_extend(&item.to_v2(), out).map_err(RecordError::Encode)?;
    postcard::to_extend(&ext, out).map_err(RecordError::Encode)
}

/// Encodes a record in the schema-1 form (version 1, JSON): what older
/// builds wrote, for tests that need a state dir as they left it.
#[doc(hidden)]
pub fn encode_record_v1_json<T: StoredRecord>(item: &T) -> Result<Vec<u8>, RecordError> {
    let mut v = vec![RECORD_V1_JSON];
    serde_json::to_writer(&mut v, item).map_err(RecordError::Json)?;
    Ok(v)
}

/// A version-3, -4 or -5 body: the version-2 mirror, then the added
/// fields in that version's layout `E`, then nothing.
fn decode_extended<T: StoredRecord, E: DeserializeOwned + Into<T::Ext>>(
    body: &[u8],
) -> Result<T, RecordError> {
    let (v2, rest) = postcard::take_from_bytes::<T::V2<'_>>(body).map_err(RecordError::Binary)?;
    let (ext, rest) = postcard::take_from_bytes::<E>(rest).map_err(RecordError::Binary)?;
    if !rest.is_empty() {
        return Err(RecordError::Trailing(rest.len()));
    }
    T::from_v2(v2).map(|r| r.with_ext(ext.into()))
}

/// Decodes a stored record of any version this build reads.
pub fn decode_record<T: StoredRecord>(bytes: &[u8]) -> Result<T, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&RECORD_V2_POSTCARD, body)) => {
            let (v2, rest) =
                postcard::take_from_bytes::<T::V2<'_>>(body).map_err(RecordError::Binary)?;
            if !rest.is_empty() {
                return Err(RecordError::Trailing(rest.len()));
            }
            T::from_v2(v2)
        }
        Some((&RECORD_V3_POSTCARD, body)) => decode_extended::<T, T::V3Ext>(body),
        Some((&RECORD_V4_POSTCARD, body)) => decode_extended::<T, T::V4Ext>(body),
        Some((&RECORD_V5_POSTCARD, body)) => decode_extended::<T, T::Ext>(body),
        Some((&RECORD_V1_JSON, body)) => serde_json::from_slice(body).map_err(RecordError::Json),
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(RecordError::Json),
        Some((&v, _)) => Err(RecordError::UnknownVersion(v)),
    }
}

/// [`HandleRecord`], version 2. Field order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandleRecordV2<'a> {
    key: [u8; 16],
    protocol: &'a str,
    frontend: &'a str,
    client: &'a str,
    create_guid: Option<[u8; 16]>,
    #[serde(borrow)]
    owner: Option<&'a str>,
    path: &'a str,
    file_dev: u64,
    file_ino: u64,
    #[serde(borrow)]
    kernel_handle: Option<KernelHandleV2<'a>>,
    access: u8,
    share: u8,
    durability: DurabilityV2,
    conn: ConnStateV2,
    create_action: CreateActionV2,
    opened_ms: u64,
    locks: Vec<HeldLockV2>,
    lock_sequence: Vec<(u8, u8)>,
    lease: Option<HeldLeaseV2>,
    delete_on_close: bool,
    #[serde(borrow)]
    share_group: Option<&'a str>,
    #[serde(borrow)]
    lock_owner: Option<&'a str>,
}

/// [`KernelHandle`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct KernelHandleV2<'a> {
    handle_type: i32,
    bytes: &'a [u8],
}

impl<'a> KernelHandleV2<'a> {
    fn of(k: &'a KernelHandle) -> Self {
        KernelHandleV2 {
            handle_type: k.handle_type,
            bytes: &k.bytes,
        }
    }
    fn into_model(self) -> Result<KernelHandle, RecordError> {
        if self.bytes.len() > MAX_KERNEL_HANDLE_BYTES {
            return Err(refused("kernel_handle", "longer than 128 bytes"));
        }
        Ok(KernelHandle {
            handle_type: self.handle_type,
            bytes: self.bytes.to_vec(),
        })
    }
}

/// [`Durability`], version 2. Variant order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub enum DurabilityV2 {
    /// [`Durability::None`].
    None,
    /// [`Durability::Durable`]: the timeout in ms.
    Durable(u32),
    /// [`Durability::Persistent`]: the timeout in ms.
    Persistent(u32),
}

/// [`ConnState`], version 2. Variant order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub enum ConnStateV2 {
    /// [`ConnState::Connected`].
    Connected,
    /// [`ConnState::Disconnected`]: since, expires (Unix ms).
    Disconnected(u64, u64),
    /// [`ConnState::Lost`].
    Lost,
}

/// [`CreateAction`], version 2. Variant order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub enum CreateActionV2 {
    /// [`CreateAction::Opened`].
    Opened,
    /// [`CreateAction::Created`].
    Created,
    /// [`CreateAction::Overwritten`].
    Overwritten,
    /// [`CreateAction::Superseded`].
    Superseded,
}

/// [`HeldLock`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldLockV2 {
    offset: u64,
    length: u64,
    exclusive: bool,
}

/// [`HeldLease`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldLeaseV2 {
    key: [u8; 16],
    state: u8,
    epoch: u16,
}

fn rights(field: &'static str, bits: u8) -> Result<Rights, RecordError> {
    Rights::from_bits(bits).ok_or_else(|| refused(field, "unknown right bits"))
}

impl StoredRecord for HandleRecord {
    type V2<'a> = HandleRecordV2<'a>;
    type Ext = HandleRecordV5Ext;
    type V3Ext = HandleRecordV3Ext;
    type V4Ext = HandleRecordV4Ext;

    fn ext(&self) -> Option<HandleRecordV5Ext> {
        (self.stat || self.share_exempt || self.attached_by != 0).then_some(HandleRecordV5Ext {
            stat: self.stat,
            share_exempt: self.share_exempt,
            attached_by: self.attached_by,
        })
    }

    fn ext_as_v3(ext: &HandleRecordV5Ext) -> Option<HandleRecordV3Ext> {
        (!ext.share_exempt && ext.attached_by == 0).then_some(HandleRecordV3Ext { stat: ext.stat })
    }

    fn ext_as_v4(ext: &HandleRecordV5Ext) -> Option<HandleRecordV4Ext> {
        (ext.attached_by == 0).then_some(HandleRecordV4Ext {
            stat: ext.stat,
            share_exempt: ext.share_exempt,
        })
    }

    fn with_ext(self, ext: HandleRecordV5Ext) -> HandleRecord {
        HandleRecord {
            stat: ext.stat,
            share_exempt: ext.share_exempt,
            attached_by: ext.attached_by,
            ..self
        }
    }

    fn to_v2(&self) -> HandleRecordV2<'_> {
        HandleRecordV2 {
            key: *self.key.as_bytes(),
            protocol: self.protocol.as_str(),
            frontend: self.frontend.as_str(),
            client: self.client.as_str(),
            create_guid: self.create_guid.map(|g| g.0.into_bytes()),
            owner: self.owner.as_deref(),
            path: self.path.as_str(),
            file_dev: self.file.dev,
            file_ino: self.file.ino,
            kernel_handle: self.kernel_handle.as_ref().map(KernelHandleV2::of),
            access: self.access.rights().bits(),
            share: self.share.bits(),
            durability: match self.durability {
                Durability::None => DurabilityV2::None,
                Durability::Durable { timeout_ms } => DurabilityV2::Durable(timeout_ms),
                Durability::Persistent { timeout_ms } => DurabilityV2::Persistent(timeout_ms),
            },
            conn: match self.conn {
                ConnState::Connected => ConnStateV2::Connected,
                ConnState::Disconnected {
                    since_ms,
                    expires_ms,
                } => ConnStateV2::Disconnected(since_ms, expires_ms),
                ConnState::Lost => ConnStateV2::Lost,
            },
            create_action: match self.create_action {
                CreateAction::Opened => CreateActionV2::Opened,
                CreateAction::Created => CreateActionV2::Created,
                CreateAction::Overwritten => CreateActionV2::Overwritten,
                CreateAction::Superseded => CreateActionV2::Superseded,
            },
            opened_ms: self.opened_ms,
            locks: self
                .locks
                .iter()
                .map(|l| HeldLockV2 {
                    offset: l.range.offset,
                    length: l.range.length,
                    exclusive: l.kind == LockKind::Exclusive,
                })
                .collect(),
            lock_sequence: self.lock_sequence.clone(),
            lease: self.lease.map(|l| HeldLeaseV2 {
                key: l.key.0.into_bytes(),
                state: l.state.bits(),
                epoch: l.epoch,
            }),
            delete_on_close: self.delete_on_close,
            share_group: self.share_group.as_deref(),
            lock_owner: self.lock_owner.as_deref(),
        }
    }

    fn from_v2(v: HandleRecordV2<'_>) -> Result<HandleRecord, RecordError> {
        handle_from_v2(v, None)
    }
}

/// The protocol, frontend and client names decoded so far, so that the
/// records of one name share one copy (`Arc<str>`) from their decode on:
/// a full read (restart recovery) then allocates no name per record — it
/// looks the borrowed text up instead — and the engine's counts, whose
/// keys are these same copies, share them too. Keyed by the stored text
/// with the standard (randomly keyed) hasher: a client's name is chosen by
/// a peer.
#[derive(Debug, Default)]
pub struct SharedNames {
    protocols: HashMap<Box<str>, Protocol>,
    frontends: HashMap<Box<str>, InstanceName>,
    clients: HashMap<Box<str>, ClientId>,
}

/// The shared copy of `s` in `names`, made (checked by `make`) on its
/// first use; without `names` (one record alone), a copy of its own.
fn shared<T: Clone>(
    names: Option<&mut HashMap<Box<str>, T>>,
    s: &str,
    make: impl FnOnce(&str) -> Result<T, ModelError>,
    field: &'static str,
) -> Result<T, RecordError> {
    let Some(names) = names else {
        return make(s).map_err(invalid(field));
    };
    if let Some(n) = names.get(s) {
        return Ok(n.clone());
    }
    let n = make(s).map_err(invalid(field))?;
    names.insert(s.into(), n.clone());
    Ok(n)
}

/// Decodes a stored handle record (any version) as [`decode_record`] does,
/// its names shared through `names` with the records decoded before it.
pub fn decode_handle_record(
    bytes: &[u8],
    names: &mut SharedNames,
) -> Result<HandleRecord, RecordError> {
    match bytes.split_first() {
        Some((&RECORD_V2_POSTCARD, body)) => {
            let (v2, rest) = postcard::take_from_bytes::<HandleRecordV2<'_>>(body)
                .map_err(RecordError::Binary)?;
            if !rest.is_empty() {
                return Err(RecordError::Trailing(rest.len()));
            }
            handle_from_v2(v2, Some(names))
        }
        Some((&RECORD_V3_POSTCARD, body)) => {
            extended_handle_record::<HandleRecordV3Ext>(body, names)
        }
        Some((&RECORD_V4_POSTCARD, body)) => {
            extended_handle_record::<HandleRecordV4Ext>(body, names)
        }
        Some((&RECORD_V5_POSTCARD, body)) => {
            extended_handle_record::<HandleRecordV5Ext>(body, names)
        }
        // JSON (schema 1) and unknown versions: as any record.
        _ => decode_record(bytes),
    }
}

/// A version-3, -4 or -5 handle record's body (its added fields in
/// layout `E`), its names shared through `names`.
fn extended_handle_record<E: DeserializeOwned + Into<HandleRecordV5Ext>>(
    body: &[u8],
    names: &mut SharedNames,
) -> Result<HandleRecord, RecordError> {
    let (v2, rest) =
        postcard::take_from_bytes::<HandleRecordV2<'_>>(body).map_err(RecordError::Binary)?;
    let (ext, rest) = postcard::take_from_bytes::<E>(rest).map_err(RecordError::Binary)?;
    if !rest.is_empty() {
        return Err(RecordError::Trailing(rest.len()));
    }
    handle_from_v2(v2, Some(names)).map(|r| r.with_ext(ext.into()))
}

/// [`StoredRecord::from_v2`] of a handle record, its names from `names`
/// when given.
fn handle_from_v2(
    v: HandleRecordV2<'_>,
    mut names: Option<&mut SharedNames>,
) -> Result<HandleRecord, RecordError> {
    let lease = match v.lease {
        None => None,
        Some(l) => Some(HeldLease {
            key: LeaseKey(Uuid::from_bytes(l.key)),
            state: LeaseState::from_bits(l.state)
                .ok_or_else(|| refused("lease", "invalid lease state bits"))?,
            epoch: l.epoch,
        }),
    };
    Ok(HandleRecord {
        key: ResumeKey(Uuid::from_bytes(v.key)),
        protocol: shared(
            names.as_mut().map(|n| &mut n.protocols),
            v.protocol,
            |s| Protocol::new(s),
            "protocol",
        )?,
        frontend: shared(
            names.as_mut().map(|n| &mut n.frontends),
            v.frontend,
            |s| InstanceName::new(s),
            "frontend",
        )?,
        client: shared(
            names.as_mut().map(|n| &mut n.clients),
            v.client,
            |s| ClientId::new(s),
            "client",
        )?,
        create_guid: v.create_guid.map(|g| CreateGuid(Uuid::from_bytes(g))),
        owner: v.owner.map(str::to_owned),
        path: RelPath::new(v.path).map_err(invalid("path"))?,
        file: FileId {
            dev: v.file_dev,
            ino: v.file_ino,
        },
        kernel_handle: v
            .kernel_handle
            .map(KernelHandleV2::into_model)
            .transpose()?,
        access: Access::new(rights("access", v.access)?).map_err(invalid("access"))?,
        share: rights("share", v.share)?,
        durability: match v.durability {
            DurabilityV2::None => Durability::None,
            DurabilityV2::Durable(timeout_ms) => Durability::Durable { timeout_ms },
            DurabilityV2::Persistent(timeout_ms) => Durability::Persistent { timeout_ms },
        },
        conn: match v.conn {
            ConnStateV2::Connected => ConnState::Connected,
            ConnStateV2::Disconnected(since_ms, expires_ms) => ConnState::Disconnected {
                since_ms,
                expires_ms,
            },
            ConnStateV2::Lost => ConnState::Lost,
        },
        create_action: match v.create_action {
            CreateActionV2::Opened => CreateAction::Opened,
            CreateActionV2::Created => CreateAction::Created,
            CreateActionV2::Overwritten => CreateAction::Overwritten,
            CreateActionV2::Superseded => CreateAction::Superseded,
        },
        opened_ms: v.opened_ms,
        locks: v
            .locks
            .into_iter()
            .map(|l| HeldLock {
                range: LockRange {
                    offset: l.offset,
                    length: l.length,
                },
                kind: if l.exclusive {
                    LockKind::Exclusive
                } else {
                    LockKind::Shared
                },
            })
            .collect(),
        lock_sequence: v.lock_sequence,
        lease,
        delete_on_close: v.delete_on_close,
        share_group: v.share_group.map(str::to_owned),
        lock_owner: v.lock_owner.map(str::to_owned),
        // Added in versions 3, 4 and 5 (`with_ext`).
        stat: false,
        share_exempt: false,
        attached_by: 0,
        // Not stored: found again after a restart (`Engine::learn_links_step`).
        through_link: false,
    })
}

/// [`ReplayRecord`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayRecordV2<'a> {
    reply: &'a str,
    recorded_ms: u64,
}

/// [`ReplayRecord`]'s fields added in version 3 (version 4 added none:
/// its layout is the same). Field order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayRecordV3Ext {
    seq: u64,
}

impl StoredRecord for ReplayRecord {
    type V2<'a> = ReplayRecordV2<'a>;
    type Ext = ReplayRecordV3Ext;
    type V3Ext = ReplayRecordV3Ext;
    type V4Ext = ReplayRecordV3Ext;

    fn ext(&self) -> Option<ReplayRecordV3Ext> {
        self.seq.map(|seq| ReplayRecordV3Ext { seq })
    }

    fn ext_as_v3(ext: &ReplayRecordV3Ext) -> Option<ReplayRecordV3Ext> {
        Some(ReplayRecordV3Ext { seq: ext.seq })
    }

    fn ext_as_v4(ext: &ReplayRecordV3Ext) -> Option<ReplayRecordV3Ext> {
        Some(ReplayRecordV3Ext { seq: ext.seq })
    }

    fn with_ext(self, ext: ReplayRecordV3Ext) -> ReplayRecord {
        ReplayRecord {
            seq: Some(ext.seq),
            ..self
        }
    }

    fn to_v2(&self) -> ReplayRecordV2<'_> {
        ReplayRecordV2 {
            reply: &self.reply,
            recorded_ms: self.recorded_ms,
        }
    }

    fn from_v2(v: ReplayRecordV2<'_>) -> Result<ReplayRecord, RecordError> {
        Ok(ReplayRecord {
            reply: v.reply.to_owned(),
            recorded_ms: v.recorded_ms,
            // Added in version 3 (`with_ext`).
            seq: None,
        })
    }
}

/// [`ReplayScope`], version 2. Variant order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReplayScopeV2<'a> {
    /// [`ReplayScope::Handle`]: the resume key.
    Handle([u8; 16]),
    /// [`ReplayScope::Session`]: the scope name.
    Session(&'a str),
}

/// [`RecordSpec`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordSpecV2<'a> {
    #[serde(borrow)]
    scope: ReplayScopeV2<'a>,
    op_id: u64,
    reply: &'a str,
    keep: u32,
}

impl<'a> RecordSpecV2<'a> {
    fn of(r: &'a RecordSpec) -> Self {
        RecordSpecV2 {
            scope: match &r.scope {
                ReplayScope::Handle(k) => ReplayScopeV2::Handle(*k.as_bytes()),
                ReplayScope::Session(s) => ReplayScopeV2::Session(s.as_str()),
            },
            op_id: r.op_id,
            reply: &r.reply,
            keep: r.keep,
        }
    }
    fn into_model(self) -> Result<RecordSpec, RecordError> {
        Ok(RecordSpec {
            scope: match self.scope {
                ReplayScopeV2::Handle(k) => ReplayScope::Handle(ResumeKey(Uuid::from_bytes(k))),
                ReplayScopeV2::Session(s) => {
                    ReplayScope::Session(ScopeName::new(s).map_err(invalid("scope"))?)
                }
            },
            op_id: self.op_id,
            reply: self.reply.to_owned(),
            keep: self.keep,
        })
    }
}

/// [`Intent`], version 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct IntentV2<'a> {
    id: [u8; 16],
    #[serde(borrow)]
    change: IntentChangeV2<'a>,
    recorded_ms: u64,
}

/// [`IntentChange`], version 2. Variant order is the layout: frozen.
#[derive(Debug, Serialize, Deserialize)]
pub enum IntentChangeV2<'a> {
    /// [`IntentChange::Rename`].
    Rename {
        /// The handle.
        key: [u8; 16],
        /// Current path.
        from: &'a str,
        /// New path.
        to: &'a str,
        /// The file's device.
        file_dev: u64,
        /// The file's inode.
        file_ino: u64,
        /// Replace an existing target.
        replace: bool,
        /// The reply to record.
        #[serde(borrow)]
        record: Option<RecordSpecV2<'a>>,
        /// The file's kernel handle.
        #[serde(borrow)]
        kernel_handle: Option<KernelHandleV2<'a>>,
    },
    /// [`IntentChange::SetSize`].
    SetSize {
        /// The handle.
        key: [u8; 16],
        /// The file's kernel handle.
        #[serde(borrow)]
        kernel_handle: KernelHandleV2<'a>,
        /// The new size.
        size: u64,
        /// The reply to record.
        #[serde(borrow)]
        record: Option<RecordSpecV2<'a>>,
        /// The file before the change.
        before: Option<FileStamp>,
    },
    /// [`IntentChange::Remove`].
    Remove {
        /// The path.
        path: &'a str,
        /// The file's device.
        file_dev: u64,
        /// The file's inode.
        file_ino: u64,
        /// The reply to record.
        #[serde(borrow)]
        record: Option<RecordSpecV2<'a>>,
        /// The file's kernel handle.
        #[serde(borrow)]
        kernel_handle: Option<KernelHandleV2<'a>>,
        /// A delete-on-close.
        on_close: bool,
    },
    /// [`IntentChange::TruncatingOpen`].
    TruncatingOpen {
        /// The handle record to install.
        #[serde(borrow)]
        record: HandleRecordV2<'a>,
        /// The file before the truncate.
        before: Option<FileStamp>,
    },
}

impl StoredRecord for Intent {
    type V2<'a> = IntentV2<'a>;
    /// A truncating open's handle record's added fields (a stat open never
    /// truncates, but a record decodes as it was written).
    type Ext = HandleRecordV5Ext;
    type V3Ext = HandleRecordV3Ext;
    type V4Ext = HandleRecordV4Ext;

    fn ext(&self) -> Option<HandleRecordV5Ext> {
        match &self.change {
            IntentChange::TruncatingOpen { record, .. } => record.ext(),
            _ => None,
        }
    }

    fn ext_as_v3(ext: &HandleRecordV5Ext) -> Option<HandleRecordV3Ext> {
        HandleRecord::ext_as_v3(ext)
    }

    fn ext_as_v4(ext: &HandleRecordV5Ext) -> Option<HandleRecordV4Ext> {
        HandleRecord::ext_as_v4(ext)
    }

    fn with_ext(mut self, ext: HandleRecordV5Ext) -> Intent {
        if let IntentChange::TruncatingOpen { record, .. } = &mut self.change {
            record.stat = ext.stat;
            record.share_exempt = ext.share_exempt;
            record.attached_by = ext.attached_by;
        }
        self
    }

    fn to_v2(&self) -> IntentV2<'_> {
        let change = match &self.change {
            IntentChange::Rename {
                key,
                from,
                to,
                file,
                replace,
                record,
                kernel_handle,
            } => IntentChangeV2::Rename {
                key: *key.as_bytes(),
                from: from.as_str(),
                to: to.as_str(),
                file_dev: file.dev,
                file_ino: file.ino,
                replace: *replace,
                record: record.as_ref().map(RecordSpecV2::of),
                kernel_handle: kernel_handle.as_ref().map(KernelHandleV2::of),
            },
            IntentChange::SetSize {
                key,
                kernel_handle,
                size,
                record,
                before,
            } => IntentChangeV2::SetSize {
                key: *key.as_bytes(),
                kernel_handle: KernelHandleV2::of(kernel_handle),
                size: *size,
                record: record.as_ref().map(RecordSpecV2::of),
                before: *before,
            },
            IntentChange::Remove {
                path,
                file,
                record,
                kernel_handle,
                on_close,
            } => IntentChangeV2::Remove {
                path: path.as_str(),
                file_dev: file.dev,
                file_ino: file.ino,
                record: record.as_ref().map(RecordSpecV2::of),
                kernel_handle: kernel_handle.as_ref().map(KernelHandleV2::of),
                on_close: *on_close,
            },
            IntentChange::TruncatingOpen { record, before } => IntentChangeV2::TruncatingOpen {
                record: record.to_v2(),
                before: *before,
            },
        };
        IntentV2 {
            id: self.id.0.into_bytes(),
            change,
            recorded_ms: self.recorded_ms,
        }
    }

    fn from_v2(v: IntentV2<'_>) -> Result<Intent, RecordError> {
        let spec = |r: Option<RecordSpecV2<'_>>| r.map(RecordSpecV2::into_model).transpose();
        let change = match v.change {
            IntentChangeV2::Rename {
                key,
                from,
                to,
                file_dev,
                file_ino,
                replace,
                record,
                kernel_handle,
            } => IntentChange::Rename {
                key: ResumeKey(Uuid::from_bytes(key)),
                from: RelPath::new(from).map_err(invalid("from"))?,
                to: RelPath::new(to).map_err(invalid("to"))?,
                file: FileId {
                    dev: file_dev,
                    ino: file_ino,
                },
                replace,
                record: spec(record)?,
                kernel_handle: kernel_handle.map(KernelHandleV2::into_model).transpose()?,
            },
            IntentChangeV2::SetSize {
                key,
                kernel_handle,
                size,
                record,
                before,
            } => IntentChange::SetSize {
                key: ResumeKey(Uuid::from_bytes(key)),
                kernel_handle: kernel_handle.into_model()?,
                size,
                record: spec(record)?,
                before,
            },
            IntentChangeV2::Remove {
                path,
                file_dev,
                file_ino,
                record,
                kernel_handle,
                on_close,
            } => IntentChange::Remove {
                path: RelPath::new(path).map_err(invalid("path"))?,
                file: FileId {
                    dev: file_dev,
                    ino: file_ino,
                },
                record: spec(record)?,
                kernel_handle: kernel_handle.map(KernelHandleV2::into_model).transpose()?,
                on_close,
            },
            IntentChangeV2::TruncatingOpen { record, before } => IntentChange::TruncatingOpen {
                record: Box::new(HandleRecord::from_v2(record)?),
                before,
            },
        };
        Ok(Intent {
            id: IntentId(Uuid::from_bytes(v.id)),
            change,
            recorded_ms: v.recorded_ms,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn uuid() -> impl Strategy<Value = Uuid> {
        any::<[u8; 16]>().prop_map(Uuid::from_bytes)
    }

    pub(crate) fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    pub(crate) fn path() -> impl Strategy<Value = RelPath> {
        "[a-z0-9é ._-]{0,8}[a-z]{1,4}(/[a-z0-9._-]{0,5}[a-z]{1,3}){0,3}"
            .prop_map(|s| RelPath::new(s).expect("the pattern makes valid paths"))
    }

    pub(crate) fn text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn kernel_handle() -> impl Strategy<Value = KernelHandle> {
        (
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 0..=128),
        )
            .prop_map(|(handle_type, bytes)| KernelHandle { handle_type, bytes })
    }

    pub(crate) fn file() -> impl Strategy<Value = FileId> {
        (any::<u64>(), any::<u64>()).prop_map(|(dev, ino)| FileId { dev, ino })
    }

    pub(crate) fn lease_state() -> impl Strategy<Value = LeaseState> {
        prop::sample::select(vec!["", "R", "RH", "RW", "RWH", "H"])
            .prop_map(|s| LeaseState::parse(s).expect("a valid lease state"))
    }

    pub(crate) fn durability() -> impl Strategy<Value = Durability> {
        prop_oneof![
            Just(Durability::None),
            any::<u32>().prop_map(|timeout_ms| Durability::Durable { timeout_ms }),
            any::<u32>().prop_map(|timeout_ms| Durability::Persistent { timeout_ms }),
        ]
    }

    pub(crate) fn conn() -> impl Strategy<Value = ConnState> {
        prop_oneof![
            Just(ConnState::Connected),
            (any::<u64>(), any::<u64>()).prop_map(|(since_ms, expires_ms)| {
                ConnState::Disconnected {
                    since_ms,
                    expires_ms,
                }
            }),
            Just(ConnState::Lost),
        ]
    }

    fn held_lock() -> impl Strategy<Value = HeldLock> {
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(offset, length, exclusive)| {
            HeldLock {
                range: LockRange { offset, length },
                kind: if exclusive {
                    LockKind::Exclusive
                } else {
                    LockKind::Shared
                },
            }
        })
    }

    prop_compose! {
        pub(crate) fn handle_record()(
            key in uuid(),
            (protocol, frontend) in (name(), name()),
            client in "[^\u{0}]{1,30}",
            create_guid in proptest::option::of(uuid()),
            owner in proptest::option::of(text()),
            path in path(),
            file in file(),
            kernel_handle in proptest::option::of(kernel_handle()),
            access in 1u8..=7,
            share in 0u8..=7,
            durability in durability(),
            conn in conn(),
            create_action in prop::sample::select(vec![
                CreateAction::Opened,
                CreateAction::Created,
                CreateAction::Overwritten,
                CreateAction::Superseded,
            ]),
            opened_ms in any::<u64>(),
            locks in proptest::collection::vec(held_lock(), 0..4),
            lock_sequence in proptest::collection::vec(any::<(u8, u8)>(), 0..4),
            lease in proptest::option::of((uuid(), lease_state(), any::<u16>())),
            delete_on_close in any::<bool>(),
            share_group in proptest::option::of(text()),
            lock_owner in proptest::option::of(text()),
            stat in any::<bool>(),
            share_exempt in any::<bool>(),
            attached_by in prop_oneof![Just(0u64), any::<u64>()],
        ) -> HandleRecord {
            HandleRecord {
                key: ResumeKey(key),
                protocol: Protocol::new(protocol).expect("valid name"),
                frontend: InstanceName::new(frontend).expect("valid name"),
                client: ClientId::new(client).expect("valid identity"),
                create_guid: create_guid.map(CreateGuid),
                owner,
                path,
                file,
                kernel_handle,
                access: Access::new(Rights::from_bits_truncate(access)).expect("non-empty"),
                share: Rights::from_bits_truncate(share),
                durability,
                conn,
                create_action,
                opened_ms,
                locks,
                lock_sequence,
                lease: lease.map(|(k, state, epoch)| HeldLease {
                    key: LeaseKey(k),
                    state,
                    epoch,
                }),
                delete_on_close,
                share_group,
                lock_owner,
                stat,
                share_exempt,
                // Not stored (found again after a restart).
                through_link: false,
                attached_by,
            }
        }
    }

    pub(crate) fn scope() -> impl Strategy<Value = ReplayScope> {
        prop_oneof![
            uuid().prop_map(|k| ReplayScope::Handle(ResumeKey(k))),
            ".{1,20}".prop_map(|s| ReplayScope::Session(ScopeName::new(s).expect("valid scope"))),
        ]
    }

    pub(crate) fn record_spec() -> impl Strategy<Value = Option<RecordSpec>> {
        proptest::option::of((scope(), any::<u64>(), text(), any::<u32>()).prop_map(
            |(scope, op_id, reply, keep)| RecordSpec {
                scope,
                op_id,
                reply,
                keep,
            },
        ))
    }

    fn intent_change() -> impl Strategy<Value = IntentChange> {
        prop_oneof![
            (
                uuid(),
                path(),
                path(),
                file(),
                any::<bool>(),
                record_spec(),
                proptest::option::of(kernel_handle())
            )
                .prop_map(|(key, from, to, file, replace, record, kernel_handle)| {
                    IntentChange::Rename {
                        key: ResumeKey(key),
                        from,
                        to,
                        file,
                        replace,
                        record,
                        kernel_handle,
                    }
                }),
            (
                uuid(),
                kernel_handle(),
                any::<u64>(),
                record_spec(),
                proptest::option::of(stamp())
            )
                .prop_map(|(key, kernel_handle, size, record, before)| {
                    IntentChange::SetSize {
                        key: ResumeKey(key),
                        kernel_handle,
                        size,
                        record,
                        before,
                    }
                }),
            (
                path(),
                file(),
                record_spec(),
                proptest::option::of(kernel_handle()),
                any::<bool>()
            )
                .prop_map(|(path, file, record, kernel_handle, on_close)| {
                    IntentChange::Remove {
                        path,
                        file,
                        record,
                        kernel_handle,
                        on_close,
                    }
                }),
            (handle_record(), proptest::option::of(stamp())).prop_map(|(r, before)| {
                IntentChange::TruncatingOpen {
                    record: Box::new(r),
                    before,
                }
            }),
        ]
    }

    fn stamp() -> impl Strategy<Value = FileStamp> {
        (any::<u64>(), any::<(i64, i64)>(), any::<(i64, i64)>())
            .prop_map(|(size, mtime, ctime)| FileStamp { size, mtime, ctime })
    }

    fn intent() -> impl Strategy<Value = Intent> {
        (uuid(), intent_change(), any::<u64>()).prop_map(|(id, change, recorded_ms)| Intent {
            id: IntentId(id),
            change,
            recorded_ms,
        })
    }

    fn replay_record() -> impl Strategy<Value = ReplayRecord> {
        (".{0,200}", any::<u64>(), proptest::option::of(any::<u64>())).prop_map(
            |(reply, recorded_ms, seq)| ReplayRecord {
                reply,
                recorded_ms,
                seq,
            },
        )
    }

    /// Every form a record may be stored in gives the record back; the
    /// written form is version 2 (version 3 when a field added since is
    /// set) and never longer than the JSON one.
    fn roundtrips<T: StoredRecord + PartialEq + std::fmt::Debug>(r: &T) {
        let v2 = encode_record(r).expect("encodes");
        let version = match r.ext() {
            None => RECORD_V2_POSTCARD,
            Some(e) if T::ext_as_v3(&e).is_some() => RECORD_V3_POSTCARD,
            Some(e) if T::ext_as_v4(&e).is_some() => RECORD_V4_POSTCARD,
            Some(_) => RECORD_V5_POSTCARD,
        };
        assert_eq!(v2.first(), Some(&version));
        assert_eq!(&decode_record::<T>(&v2).expect("v2 decodes"), r);
        let v1 = encode_record_v1_json(r).expect("JSON encodes");
        assert_eq!(&decode_record::<T>(&v1).expect("v1 decodes"), r);
        let bare = v1.get(1..).expect("a version byte");
        assert_eq!(&decode_record::<T>(bare).expect("bare JSON decodes"), r);
        assert!(v2.len() <= v1.len(), "{} > {} bytes", v2.len(), v1.len());
        // A cut or extended binary record is an error, never a panic or
        // a different record.
        for cut in 1..v2.len() {
            assert!(decode_record::<T>(&v2[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = v2.clone();
        long.push(0);
        assert!(matches!(
            decode_record::<T>(&long),
            Err(RecordError::Trailing(1))
        ));
    }

    proptest! {
        #[test]
        fn handle_records_roundtrip(r in handle_record()) {
            roundtrips(&r);
        }

        /// A full read's decode (names shared) gives what the plain decode
        /// gives, and a second record of the same names holds the first's
        /// copies instead of its own.
        #[test]
        fn shared_names_decode_as_plain_and_share(r in handle_record()) {
            let bytes = encode_record(&r).unwrap();
            let mut names = SharedNames::default();
            let a = decode_handle_record(&bytes, &mut names).unwrap();
            let b = decode_handle_record(&bytes, &mut names).unwrap();
            prop_assert_eq!(&a, &decode_record::<HandleRecord>(&bytes).unwrap());
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.protocol.as_str().as_ptr(), b.protocol.as_str().as_ptr());
            prop_assert_eq!(a.frontend.as_str().as_ptr(), b.frontend.as_str().as_ptr());
            prop_assert_eq!(a.client.as_str().as_ptr(), b.client.as_str().as_ptr());
        }

        #[test]
        fn replay_records_roundtrip(r in replay_record()) {
            roundtrips(&r);
        }

        #[test]
        fn intents_roundtrip(i in intent()) {
            roundtrips(&i);
        }

        #[test]
        fn arbitrary_bytes_never_panic(v in 0u8..=255, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = vec![v];
            b.extend(body);
            let _ = decode_handle_record(&b, &mut SharedNames::default());
            let _ = decode_record::<HandleRecord>(&b);
            let _ = decode_record::<Intent>(&b);
            let _ = decode_record::<ReplayRecord>(&b);
        }
    }

    /// The version-2 layout is frozen: a record encodes to exactly these
    /// bytes (written out by hand from postcard's rules; also the fuzz
    /// seed), and they decode back to it.
    #[test]
    fn the_v2_layout_is_frozen() {
        let golden = include_bytes!("../../fuzz/corpus/store_records/handle-v2");
        let rec = HandleRecord {
            key: ResumeKey(Uuid::from_bytes([0x11; 16])),
            protocol: Protocol::new("smb").expect("valid"),
            frontend: InstanceName::new("smb-a").expect("valid"),
            client: ClientId::new("alice").expect("valid"),
            create_guid: Some(CreateGuid(Uuid::from_bytes([0x22; 16]))),
            owner: None,
            path: RelPath::new("dir/f").expect("valid"),
            file: FileId { dev: 1, ino: 300 },
            kernel_handle: Some(KernelHandle {
                handle_type: 1,
                bytes: (1..=8).collect(),
            }),
            access: Access::new(Rights::READ.union(Rights::WRITE)).expect("non-empty"),
            share: Rights::READ,
            durability: Durability::Persistent { timeout_ms: 60_000 },
            conn: ConnState::Disconnected {
                since_ms: 5,
                expires_ms: 6,
            },
            create_action: CreateAction::Created,
            opened_ms: 1_700_000_000_000,
            locks: vec![HeldLock {
                range: LockRange {
                    offset: 0,
                    length: 4,
                },
                kind: LockKind::Exclusive,
            }],
            lock_sequence: vec![(3, 1)],
            lease: Some(HeldLease {
                key: LeaseKey(Uuid::from_bytes([0x33; 16])),
                state: LeaseState::R.with(LeaseState::H),
                epoch: 2,
            }),
            delete_on_close: false,
            share_group: Some("g".into()),
            lock_owner: None,
            stat: false,
            share_exempt: false,
            through_link: false,
            attached_by: 0,
        };
        assert_eq!(encode_record(&rec).expect("encodes"), golden);
        // `through_link` is a hint filterd finds again, never stored: a
        // build that does not know it reads every record (a downgrade keeps
        // every handle, the session-26 review).
        let linked = HandleRecord {
            through_link: true,
            ..rec.clone()
        };
        assert_eq!(encode_record(&linked).expect("encodes"), golden);
        assert_eq!(decode_record::<HandleRecord>(golden).expect("decodes"), rec);
        // Version 3: the same bytes after its own version byte, then the
        // fields added since (`stat`: one byte, 1).
        let mut v3 = vec![RECORD_V3_POSTCARD];
        v3.extend_from_slice(golden.get(1..).expect("a version byte"));
        v3.push(1);
        let golden_v3 = include_bytes!("../../fuzz/corpus/store_records/handle-v3");
        assert_eq!(v3, golden_v3);
        let stat = HandleRecord {
            stat: true,
            ..rec.clone()
        };
        assert_eq!(encode_record(&stat).expect("encodes"), v3);
        assert_eq!(decode_record::<HandleRecord>(&v3).expect("decodes"), stat);
        // Version 4: the same bytes after its own version byte, then
        // version 3's field and `share_exempt` (one byte each).
        let mut v4 = vec![RECORD_V4_POSTCARD];
        v4.extend_from_slice(golden.get(1..).expect("a version byte"));
        v4.extend_from_slice(&[0, 1]);
        let golden_v4 = include_bytes!("../../fuzz/corpus/store_records/handle-v4");
        assert_eq!(v4, golden_v4);
        let exempt = HandleRecord {
            share_exempt: true,
            ..rec.clone()
        };
        assert_eq!(encode_record(&exempt).expect("encodes"), v4);
        assert_eq!(decode_record::<HandleRecord>(&v4).expect("decodes"), exempt);
        let mut names = SharedNames::default();
        assert_eq!(
            decode_handle_record(&v4, &mut names).expect("decodes"),
            exempt
        );
        // Version 5: the same bytes after its own version byte, then
        // version 4's fields (one byte each) and `attached_by` (a varint:
        // 300 is ac 02).
        let mut v5 = vec![RECORD_V5_POSTCARD];
        v5.extend_from_slice(golden.get(1..).expect("a version byte"));
        v5.extend_from_slice(&[0, 0, 0xac, 0x02]);
        let golden_v5 = include_bytes!("../../fuzz/corpus/store_records/handle-v5");
        assert_eq!(v5, golden_v5);
        let stamped = HandleRecord {
            attached_by: 300,
            ..rec
        };
        assert_eq!(encode_record(&stamped).expect("encodes"), v5);
        assert_eq!(
            decode_record::<HandleRecord>(&v5).expect("decodes"),
            stamped
        );
        assert_eq!(
            decode_handle_record(&v5, &mut names).expect("decodes"),
            stamped
        );
        let replay = include_bytes!("../../fuzz/corpus/store_records/replay-v2");
        let r = decode_record::<ReplayRecord>(replay).expect("decodes");
        assert_eq!((r.reply.as_str(), r.recorded_ms, r.seq), ("done", 1, None));
        assert_eq!(encode_record(&r).expect("encodes"), replay);
        // A replay record's version 3: version 2's bytes, then its place
        // in its scope's recording order (`seq`, a varint).
        let golden_v3 = include_bytes!("../../fuzz/corpus/store_records/replay-v3");
        let mut v3 = vec![RECORD_V3_POSTCARD];
        v3.extend_from_slice(replay.get(1..).expect("a version byte"));
        v3.push(7);
        assert_eq!(v3, golden_v3);
        let seq = ReplayRecord { seq: Some(7), ..r };
        assert_eq!(encode_record(&seq).expect("encodes"), v3);
        assert_eq!(decode_record::<ReplayRecord>(&v3).expect("decodes"), seq);
    }

    #[test]
    fn unknown_versions_and_invalid_values_are_errors() {
        for v in [0u8, 6, 9, 255] {
            assert!(matches!(
                decode_record::<ReplayRecord>(&[v, 0, 0]),
                Err(RecordError::UnknownVersion(x)) if x == v
            ));
        }
        assert!(matches!(
            decode_record::<ReplayRecord>(b""),
            Err(RecordError::Empty)
        ));
        // A binary record whose path escapes is refused like a peer's.
        let i = Intent {
            id: IntentId(Uuid::nil()),
            change: IntentChange::Remove {
                path: RelPath::new("ab").expect("valid"),
                file: FileId { dev: 1, ino: 2 },
                record: None,
                kernel_handle: None,
                on_close: false,
            },
            recorded_ms: 0,
        };
        let mut b = encode_record(&i).expect("encodes");
        let at = b.windows(2).position(|w| w == b"ab").expect("the path");
        b[at..at + 2].copy_from_slice(b"..");
        assert!(matches!(
            decode_record::<Intent>(&b),
            Err(RecordError::Invalid { field: "path", .. })
        ));
    }
}
