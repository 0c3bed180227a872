//! nfsshim's durable tables, kept as records of its session scopes in
//! filterd (RecordReply / ListRecords / DeleteRecord). Every table belongs
//! to one nfsshim instance: its scope names start with the instance name
//! ([`Tables`]), so two instances never share or overwrite each other's
//! records, and a restore reads (and prunes) only its own.
//!
//! | scope | op id | record |
//! |---|---|---|
//! | `<instance>/clients` | client number | [`ClientRec`] |
//! | `<instance>/sessions/<clientid>` | session number | [`SessionRec`] |
//! | `<instance>/slots/<sessionid>` | slot | [`SlotRec`] (the cached reply of a mutating request) |
//! | `<instance>/states/<clientid>` | state number | [`OpenRec`] |
//! | `<instance>/excl` | hash of the path | exclusive-create verifier |
//! | `<instance>/server` | 0 | [`ServerRec`]: the nfsshim process that read the tables last |
//! | `instances` (shared) | hash of the instance name | the instance name (filterctl finds the tables by it) |
//!
//! filterd keeps at most [`KEEP`] records per scope and evicts the oldest
//! recorded beyond that (before review rvspec: the lowest op ids); nfsshim's
//! named limits (server.rs `Limits`) keep
//! every table but `excl` below it, so no client's record is ever
//! evicted, and nfsshim keeps `excl` (op ids: path hashes) below it
//! itself, oldest first (server/excl.rs).
//! Every write is a filterd commit on stable storage before it returns.

use libfilter::attach::Attachment;
use libfilter::client::ClientError;
use libfilter::lease::LeaseState;
use libfilter::model::{CreateAction, ReplayScope, ResumeKey, ScopeName};
use libfilter::proto::Opened;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

/// Most records a scope keeps (filterd's cap).
pub const KEEP: u32 = 4096;

/// The nfsshim process that last read (restored) the instance's tables:
/// written before it serves when they hold a client, else in the commit
/// of the first client record it writes. A process that finds another's
/// here at a reattach knows another process served the tables meanwhile
/// (the other node's, while it owned the shared table) and reads them
/// again (server.rs `reload`, review rvnfsnode 1). Absent: nobody wrote a
/// client since the tables were empty (or only an nfsshim before it did,
/// which this cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRec {
    /// Drawn once per process, never 0.
    pub process: u64,
}

/// [`ServerRec`]'s op id in its table.
pub const SERVER_OP: u64 = 0;

/// A client incarnation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRec {
    pub clientid: String,
    pub owner: String,
    pub verifier: String,
}

/// A session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRec {
    pub sessionid: String,
    pub clientid: String,
    pub slots: u32,
}

/// A slot's cached reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotRec {
    pub seqid: u64,
    pub reply: Value,
    /// An OPEN's reply written in the filter open's own commit: filterd's
    /// answer to that open ([`OPENED`]), from which the reply's `created`,
    /// `size` and `delegation` are derived ([`SlotRec::settle`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened: Option<Opened>,
    /// The open-state record an OPEN made (op id in the client's
    /// `states`): a re-send after filterd went away mid-OPEN writes the
    /// same records again rather than a second open state, and a different
    /// request at that seqid deletes it (server.rs `abandon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<u64>,
    /// The request's digest (its op and arguments, server.rs
    /// `request_digest`): a request at the same seqid whose answer was
    /// lost (`NFS4ERR_DELAY`) is taken as this one's re-send only when its
    /// digest is the same. Absent in records of an nfsshim before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<u64>,
}

/// The member a record carries (as `null`) for filterd to complete with
/// the open's [`Opened`] in the open's commit (`OpenRequest::put`).
pub const OPENED: &str = "opened";
/// [`OPENED`] as a member's head, `"opened":`.
const OPENED_MEMBER: &str = "\"opened\":";

/// A record `rec` as text, marked for filterd to complete with `"opened"`.
/// The member goes last (`,"opened":null}`), which filterd fills without
/// parsing the record again (any other place it parses the record).
pub fn encode_for_open<T: Serialize>(rec: &T) -> Result<String, ClientError> {
    let mut text = encode(rec)?;
    if text.ends_with('}') && !text.contains(OPENED_MEMBER) {
        // Appended in place: no `format!` per record (issue #16, uF).
        text.pop();
        if text != "{" {
            text.push(',');
        }
        text.push_str(OPENED_MEMBER);
        text.push_str("null}");
        return Ok(text);
    }
    let mut v = serde_json::to_value(rec)
        .map_err(|e| ClientError::Unexpected(format!("encoding a record: {e}")))?;
    if let Value::Object(m) = &mut v {
        m.insert(OPENED.into(), Value::Null);
    }
    Ok(v.to_string())
}

/// Whether filterd granted a delegation (a lease with R) with an open.
pub fn delegation_granted(o: &Opened) -> Option<bool> {
    o.lease
        .filter(|l| l.state.contains(LeaseState::R))
        .map(|l| l.state.contains(LeaseState::W))
}

impl SlotRec {
    /// Derives an OPEN's reply from filterd's answer, as nfsshim made it
    /// when it answered: whether it created the file, its size, and the
    /// delegation only if granted.
    pub fn settle(&mut self) {
        let Some(o) = self.opened.take() else {
            return;
        };
        if let Value::Object(m) = &mut self.reply {
            m.insert(
                "created".into(),
                Value::Bool(o.create_action == CreateAction::Created),
            );
            m.insert("size".into(), Value::from(o.size));
            let d = m.get_mut("delegation");
            match (d, delegation_granted(&o)) {
                (Some(Value::Object(d)), Some(write)) => {
                    d.insert(
                        "type".into(),
                        Value::from(if write { "write" } else { "read" }),
                    );
                }
                (Some(d), None) => *d = Value::Null,
                _ => {}
            }
        }
    }
}

/// An open state (with its lock state and delegation, if any).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenRec {
    pub other: String,
    pub seqid: u32,
    pub owner: String,
    pub path: String,
    pub key: ResumeKey,
    pub access: String,
    pub deny: String,
    /// Lock states, one per lock-owner.
    #[serde(default)]
    pub locks: Vec<LockRec>,
    #[serde(default)]
    pub deleg: Option<DelegRec>,
    /// The access of the open's own handle (`key`) when later OPENs widened
    /// `access` beyond it; absent, it is `access`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_access: Option<String>,
    /// Further filter handles of this open state, one per OPEN that widened
    /// its access or deny mode. The open's own handle holds the locks, so an
    /// upgrade never replaces it; the filter counts all of them as one share
    /// reservation (their share group is the open-owner), and they close
    /// with the open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<ExtraHandle>,
    /// Written in the filter open's own commit: filterd's answer to the
    /// open, which holds the handle's resume key (`key` is nil until
    /// [`OpenRec::settle`]) and whether the delegation was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened: Option<Opened>,
    /// CLOSEd by its client while it held a delegation that may outlive
    /// the open ([`DelegRec::survives_close`]): the state is kept only for
    /// that delegation (RFC 8881 §10.4), its one handle `key` the one
    /// carrying the delegation's lease. The open's stateid is gone
    /// (`NFS4ERR_BAD_STATEID`); the state goes with the delegation
    /// (DELEGRETURN, revocation, the client released). Absent in records
    /// of an nfsshim before it: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// The share group `key` was opened in when it is not `owner`'s: a
    /// CLOSEd state's handle reopened in the group of another open-owner of
    /// the client whose OPEN it would have denied (a delegation does not
    /// deny its own client's opens). Absent: `owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Gone: one of its handles went away (expired, purged, or lost from
    /// nfsshim's attachment) and its client is told `NFS4ERR_EXPIRED`;
    /// written before its handles' closes and its delete, so that a
    /// restore that finds the record drops the open whole — closing what
    /// is left of it — however its handles resume (re-review rr42g R4: a
    /// handle lost only from the attachment stays disconnected in filterd,
    /// and a restore within its timeout resumed it and brought the open
    /// back). Absent in records of an nfsshim before it: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

impl OpenRec {
    /// Takes the resume key and the delegation from filterd's answer to
    /// the open, if the record was written with it.
    pub fn settle(&mut self) {
        let Some(o) = self.opened.take() else {
            return;
        };
        self.key = o.key;
        match delegation_granted(&o) {
            Some(write) => {
                if let Some(d) = &mut self.deleg {
                    d.write = write;
                }
            }
            None => self.deleg = None,
        }
    }

    /// Every filter handle the record names: the open's own, the further
    /// ones an upgrade added, and its further lock-owners'.
    pub fn keys(&self) -> Vec<ResumeKey> {
        std::iter::once(self.key)
            .chain(self.extra.iter().map(|e| e.key))
            .chain(self.locks.iter().filter_map(|l| l.key))
            .collect()
    }
}

/// A further filter handle of an open state (see [`OpenRec::extra`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtraHandle {
    pub key: ResumeKey,
    pub access: String,
    /// Added by an OPEN that widened no mode but got a delegation: it
    /// carries that delegation and closes with its DELEGRETURN.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub for_deleg: bool,
}

/// A lock-owner's lock state under an open. The first lock-owner of an
/// open locks through the open's own filter handle; every further one has
/// a handle of its own (`key`), since the filter's lock owner is a handle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRec {
    pub other: String,
    pub seqid: u32,
    pub owner: String,
    /// The lock-owner's own filter handle, if not the open's.
    #[serde(default)]
    pub key: Option<ResumeKey>,
    /// Locks held: (offset, length, write).
    #[serde(default)]
    pub held: Vec<(u64, u64, bool)>,
}

/// A delegation (a filter lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelegRec {
    pub other: String,
    pub lease_key: uuid::Uuid,
    pub write: bool,
    /// Written (in the record only) by a DELEGRETURN before it gives the
    /// lease up: that request's name. A restore that finds the lease gone
    /// answers that very request's re-send NFS4_OK — its records may not
    /// have reached filterd — where a delegation revoked while nfsshim was
    /// down is NFS4ERR_EXPIRED (review N3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returning: Option<String>,
    /// The handle carrying the delegation's lease denies nothing (the
    /// OPEN that was granted it had deny `none`), so a CLOSE of the open
    /// keeps that handle, and the delegation, until DELEGRETURN or
    /// revocation ([`OpenRec::closed`]). False (records of an nfsshim
    /// before it, or a granting OPEN that denied something): a CLOSE
    /// gives the delegation up with the open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub survives_close: bool,
    /// The further handle ([`OpenRec::extra`]) carrying the delegation's
    /// lease, when an OPEN that upgraded the open state was granted it;
    /// absent, the open's own handle (`key`) carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<ResumeKey>,
}

/// One instance's table names.
#[derive(Debug, Clone)]
pub struct Tables {
    instance: String,
}

impl Tables {
    /// The tables of instance `instance` (an instance name has no `/`).
    pub fn new(instance: &libfilter::model::InstanceName) -> Tables {
        Tables {
            instance: instance.to_string(),
        }
    }
    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }
    /// `{instance}/{what}{id}`, built without `format!` (a pair of OPEN
    /// and CLOSE names four tables; issue #16, uF).
    fn table(&self, what: &str, id: &str) -> String {
        let mut t = String::with_capacity(self.instance.len() + 1 + what.len() + id.len());
        t.push_str(&self.instance);
        t.push('/');
        t.push_str(what);
        t.push_str(id);
        t
    }
    /// The client records.
    pub fn clients(&self) -> String {
        self.table("clients", "")
    }
    /// A client's sessions.
    pub fn sessions(&self, clientid: &str) -> String {
        self.table("sessions/", clientid)
    }
    /// A session's slot replies.
    pub fn slots(&self, sessionid: &str) -> String {
        self.table("slots/", sessionid)
    }
    /// A client's open states.
    pub fn states(&self, clientid: &str) -> String {
        self.table("states/", clientid)
    }
    /// Exclusive-create verifiers.
    pub fn excl(&self) -> String {
        self.table("excl", "")
    }
    /// The process that read the tables last ([`ServerRec`]).
    pub fn server(&self) -> String {
        self.table("server", "")
    }
    /// Whether this instance is in the shared `instances` registry (which
    /// filterctl reads to find its tables). Refuses when another instance
    /// name holds the same record id.
    pub fn registered(&self, f: &Attachment) -> Result<bool, ClientError> {
        let Some(r) = f
            .client()
            .lookup_reply(scope(REGISTRY)?, self.registry_id())?
        else {
            return Ok(false);
        };
        match serde_json::from_str::<String>(&r.reply) {
            Ok(name) if name == self.instance => Ok(true),
            _ => Err(ClientError::Unexpected(format!(
                "instance {} collides with {} in the registry",
                self.instance, r.reply
            ))),
        }
    }
    /// Adds the registry record to `p` (written with the first client).
    pub fn register(&self, p: &mut Pending) -> Result<(), ClientError> {
        p.put(REGISTRY, self.registry_id(), &self.instance)
    }
    fn registry_id(&self) -> u64 {
        fnv64(&self.instance)
    }
}

/// The shared scope naming every nfsshim instance that has tables.
pub const REGISTRY: &str = "instances";

/// FNV-1a, 64 bits.
pub fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A scope of nfsshim's (names are built from ids nfsshim minted).
pub fn scope(name: &str) -> Result<ReplayScope, ClientError> {
    ScopeName::new(name)
        .map(ReplayScope::Session)
        .map_err(|e| ClientError::Unexpected(format!("scope {name}: {e}")))
}

/// Writes a record (durable when this returns).
pub fn put<T: Serialize>(
    f: &Attachment,
    scope_name: &str,
    op: u64,
    rec: &T,
) -> Result<(), ClientError> {
    put_encoded(f, scope_name, op, encode(rec)?)
}

/// Writes record `op` of `scope_name` as `text`, encoded already
/// ([`encode`]).
pub fn put_encoded(
    f: &Attachment,
    scope_name: &str,
    op: u64,
    text: String,
) -> Result<(), ClientError> {
    f.client().record_reply(scope(scope_name)?, op, text, KEEP)
}

pub fn encode<T: Serialize>(rec: &T) -> Result<String, ClientError> {
    serde_json::to_string(rec)
        .map_err(|e| ClientError::Unexpected(format!("encoding a record: {e}")))
}

/// Table changes a request makes, written together with its slot reply in
/// one filterd commit ([`Pending::flush`]).
#[derive(Default)]
pub struct Pending {
    put: Vec<(String, u64, String)>,
    delete: Vec<(String, u64)>,
}

impl Pending {
    /// A record to write.
    pub fn put<T: Serialize>(
        &mut self,
        scope_name: &str,
        op: u64,
        rec: &T,
    ) -> Result<(), ClientError> {
        self.put_within(scope_name, op, rec, usize::MAX).map(|_| ())
    }

    /// A record to write if its text takes at most `max` bytes (filterd
    /// refuses a longer one, `MAX_REPLY_BYTES`); false, and nothing
    /// queued, if not.
    pub fn put_within<T: Serialize>(
        &mut self,
        scope_name: &str,
        op: u64,
        rec: &T,
        max: usize,
    ) -> Result<bool, ClientError> {
        let text = encode(rec)?;
        if text.len() > max {
            return Ok(false);
        }
        self.delete.retain(|(s, o)| !(s == scope_name && *o == op));
        self.put.retain(|(s, o, _)| !(s == scope_name && *o == op));
        self.put.push((scope_name.to_owned(), op, text));
        Ok(true)
    }

    /// Forgets the records to write (the deletions stay).
    pub fn forget_puts(&mut self) {
        self.put.clear();
    }

    /// A record to delete.
    pub fn delete(&mut self, scope_name: &str, op: u64) {
        self.put.retain(|(s, o, _)| !(s == scope_name && *o == op));
        self.delete.push((scope_name.to_owned(), op));
    }

    /// Writes everything in one commit (durable when this returns).
    pub fn flush(self, f: &Attachment) -> Result<(), ClientError> {
        if self.put.is_empty() && self.delete.is_empty() {
            return Ok(());
        }
        let put = self
            .put
            .into_iter()
            .map(|(s, op, reply)| {
                Ok(libfilter::model::RecordSpec {
                    scope: scope(&s)?,
                    op_id: op,
                    reply,
                    keep: KEEP,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let delete = self
            .delete
            .into_iter()
            .map(|(s, op)| Ok((scope(&s)?, op)))
            .collect::<Result<Vec<_>, ClientError>>()?;
        f.client().write_records(put, delete)
    }
}

/// One record of a scope: None when there is none or it does not decode.
pub fn get<T: DeserializeOwned>(
    f: &Attachment,
    scope_name: &str,
    op: u64,
) -> Result<Option<T>, ClientError> {
    Ok(f.client()
        .lookup_reply(scope(scope_name)?, op)?
        .and_then(|r| serde_json::from_str(&r.reply).ok()))
}

/// Deletes a record.
pub fn delete(f: &Attachment, scope_name: &str, op: u64) -> Result<(), ClientError> {
    f.client().delete_record(scope(scope_name)?, op)
}

/// Every record of a scope that decodes; the others are logged and skipped.
pub fn list<T: DeserializeOwned>(
    f: &Attachment,
    scope_name: &str,
) -> Result<Vec<(u64, T)>, ClientError> {
    let recs = f.client().list_records(scope(scope_name)?)?;
    Ok(recs
        .into_iter()
        .filter_map(|(op, text)| match serde_json::from_str(&text) {
            Ok(v) => Some((op, v)),
            Err(e) => {
                eprintln!("nfsshim: skipping an unreadable record {scope_name}/{op}: {e}");
                None
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_for_an_open_ends_with_the_marked_member() {
        let rec = SlotRec {
            seqid: 7,
            reply: serde_json::json!({"status": "NFS4_OK", "path": "a\"opened\":null}"}),
            opened: None,
            state: Some(3),
            digest: Some(9),
        };
        let text = encode_for_open(&rec).expect("encode");
        assert!(text.ends_with(",\"opened\":null}"), "{text}");
        let mut want = serde_json::to_value(&rec).expect("value");
        if let Value::Object(m) = &mut want {
            m.insert(OPENED.into(), Value::Null);
        }
        assert_eq!(serde_json::from_str::<Value>(&text).expect("json"), want);
        assert_eq!(OPENED_MEMBER, format!("\"{OPENED}\":"));
        #[derive(Serialize)]
        struct Empty {}
        assert_eq!(
            encode_for_open(&Empty {}).expect("encode"),
            "{\"opened\":null}"
        );
    }

    #[test]
    fn a_slot_record_of_an_nfsshim_before_digests_still_reads() {
        let old = r#"{"seqid":5,"reply":{"status":"NFS4_OK"},"state":3}"#;
        let rec: SlotRec = serde_json::from_str(old).expect("an old record reads");
        assert_eq!((rec.seqid, rec.state, rec.digest), (5, Some(3), None));
        let new = SlotRec {
            digest: Some(u64::MAX),
            ..rec
        };
        let text = encode(&new).expect("encode");
        let back: SlotRec = serde_json::from_str(&text).expect("decode");
        assert_eq!(back.digest, Some(u64::MAX));
    }

    #[test]
    fn table_names() {
        let t = Tables {
            instance: "i-1".into(),
        };
        assert_eq!(
            [
                t.clients(),
                t.sessions("c"),
                t.slots("s"),
                t.states("c"),
                t.excl(),
                t.server()
            ],
            [
                "i-1/clients",
                "i-1/sessions/c",
                "i-1/slots/s",
                "i-1/states/c",
                "i-1/excl",
                "i-1/server"
            ]
        );
    }
}
