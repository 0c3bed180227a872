//! nfsshim's durable tables, kept as records of its session scopes in
//! filterd (RecordReply / ListRecords / DeleteRecord):
//!
//! | scope | op id | record |
//! |---|---|---|
//! | `clients` | client number | [`ClientRec`] |
//! | `sessions` | session number | [`SessionRec`] |
//! | `slots/<sessionid>` | slot | [`SlotRec`] (the cached reply of a mutating request) |
//! | `states/<clientid>` | state number | [`OpenRec`] |
//!
//! Every write is a filterd commit on stable storage before it returns.

use libfilter::attach::Attachment;
use libfilter::client::ClientError;
use libfilter::model::{ReplayScope, ResumeKey, ScopeName};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

/// Most records a scope keeps (filterd's cap).
pub const KEEP: u32 = 4096;

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
    f.client()
        .record_reply(scope(scope_name)?, op, encode(rec)?, KEEP)
}

fn encode<T: Serialize>(rec: &T) -> Result<String, ClientError> {
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
        let text = encode(rec)?;
        self.delete.retain(|(s, o)| !(s == scope_name && *o == op));
        self.put.retain(|(s, o, _)| !(s == scope_name && *o == op));
        self.put.push((scope_name.to_owned(), op, text));
        Ok(())
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
