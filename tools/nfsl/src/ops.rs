//! Typed requests: the field forms of nfsl/1 as Rust types ([`Access`],
//! [`Deny`], [`CreateMode`], [`LockType`], [`WantDelegation`], [`OpenArgs`])
//! and one builder per op, returning the request object *without* `xid` and
//! `seq`. [`crate::Session`] adds the `seq` of a slot and sends them (its
//! typed methods wrap these builders); [`Client::call_seq`] sends one with
//! a `seq` the caller chose. The three ops without `seq` (EXCHANGE_ID,
//! CREATE_SESSION, DESTROY_CLIENTID) are methods of [`Client`].

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::{Client, Error, Reply, Seq, StateId};

/// `length` meaning "to the end of the file".
pub const TO_EOF: u64 = u64::MAX;

/// OPEN's `access`: what this open may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read only.
    Read,
    /// Write only.
    Write,
    /// Read and write.
    Both,
}

/// OPEN's `deny`: what others may not do meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Deny {
    /// Others may read and write.
    None,
    /// Others may not read.
    Read,
    /// Others may not write.
    Write,
    /// Others may neither read nor write.
    Both,
}

/// OPEN's `create.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CreateMode {
    /// Create if absent, open if present.
    Unchecked,
    /// Create; `NFS4ERR_EXIST` if present.
    Guarded,
    /// Create, storing the verifier with the file: a re-send with the same
    /// verifier succeeds as if it had created the file.
    Exclusive,
}

/// LOCK's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockType {
    /// Shared.
    Read,
    /// Exclusive.
    Write,
}

/// OPEN's `want_delegation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WantDelegation {
    /// No delegation (the field is then left out of the request).
    #[default]
    None,
    /// A read delegation (lease R).
    Read,
    /// A write delegation (lease RW).
    Write,
}

/// The fields of an OPEN (besides `seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenArgs {
    /// The open-owner.
    pub owner: String,
    /// Relative, `/`-separated.
    pub path: String,
    /// What this open may do.
    pub access: Access,
    /// What others may not do.
    pub deny: Deny,
    /// Create the file: the mode and, for `exclusive`, the verifier (hex).
    pub create: Option<(CreateMode, Option<String>)>,
    /// Truncate to zero length (sent only when true).
    pub truncate: bool,
    /// The delegation asked for (sent only when not `None`).
    pub want_delegation: WantDelegation,
}

impl OpenArgs {
    /// `path` for reading and writing, denying nothing, no create, no
    /// truncate, no delegation.
    pub fn new(owner: impl Into<String>, path: impl Into<String>) -> OpenArgs {
        OpenArgs {
            owner: owner.into(),
            path: path.into(),
            access: Access::Both,
            deny: Deny::None,
            create: None,
            truncate: false,
            want_delegation: WantDelegation::None,
        }
    }

    /// The request object (without `xid` and `seq`).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("op".into(), json!("OPEN"));
        m.insert("owner".into(), json!(self.owner));
        m.insert("path".into(), json!(self.path));
        m.insert("access".into(), json!(self.access));
        m.insert("deny".into(), json!(self.deny));
        if let Some((mode, verifier)) = &self.create {
            let mut c = Map::new();
            c.insert("mode".into(), json!(mode));
            if let Some(v) = verifier {
                c.insert("verifier".into(), json!(v));
            }
            m.insert("create".into(), Value::Object(c));
        }
        if self.truncate {
            m.insert("truncate".into(), json!(true));
        }
        if self.want_delegation != WantDelegation::None {
            m.insert("want_delegation".into(), json!(self.want_delegation));
        }
        Value::Object(m)
    }
}

/// OPEN.
pub fn open(args: &OpenArgs) -> Value {
    args.to_json()
}

/// READ `count` bytes at `offset`.
pub fn read(stateid: &StateId, offset: u64, count: u64) -> Value {
    json!({"op": "READ", "stateid": stateid, "offset": offset, "count": count})
}

/// WRITE `data` at `offset` (sent as base64).
pub fn write(stateid: &StateId, offset: u64, data: &[u8]) -> Value {
    json!({"op": "WRITE", "stateid": stateid, "offset": offset,
           "data": base64::engine::general_purpose::STANDARD.encode(data)})
}

/// COMMIT.
pub fn commit(stateid: &StateId) -> Value {
    json!({"op": "COMMIT", "stateid": stateid})
}

/// LOCK a byte range for `owner` (a lock-owner) under the open `stateid`.
pub fn lock(
    stateid: &StateId,
    owner: &str,
    lock_type: LockType,
    offset: u64,
    length: u64,
) -> Value {
    json!({"op": "LOCK", "stateid": stateid, "owner": owner, "type": lock_type,
           "offset": offset, "length": length})
}

/// LOCKU: unlock a byte range of a lock state.
pub fn locku(lock_stateid: &StateId, offset: u64, length: u64) -> Value {
    json!({"op": "LOCKU", "lock_stateid": lock_stateid, "offset": offset, "length": length})
}

/// CLOSE an open.
pub fn close(stateid: &StateId) -> Value {
    json!({"op": "CLOSE", "stateid": stateid})
}

/// DELEGRETURN a delegation.
pub fn delegreturn(stateid: &StateId) -> Value {
    json!({"op": "DELEGRETURN", "stateid": stateid})
}

/// REMOVE a file.
pub fn remove(path: &str) -> Value {
    json!({"op": "REMOVE", "path": path})
}

/// RENAME `from` to `to`.
pub fn rename(from: &str, to: &str) -> Value {
    json!({"op": "RENAME", "from": from, "to": to})
}

/// RECLAIM_COMPLETE.
pub fn reclaim_complete() -> Value {
    json!({"op": "RECLAIM_COMPLETE"})
}

/// DESTROY_SESSION (of the session named by the `seq`).
pub fn destroy_session() -> Value {
    json!({"op": "DESTROY_SESSION"})
}

impl Client {
    /// EXCHANGE_ID: registers the client `owner` with its boot `verifier`
    /// (16 hex digits); the reply carries `clientid` and `confirmed`.
    pub fn exchange_id(&self, owner: &str, verifier_hex: &str) -> Result<Reply, Error> {
        self.call(json!({"op": "EXCHANGE_ID", "owner": owner, "verifier": verifier_hex}))
    }

    /// CREATE_SESSION; the reply carries `sessionid`, `slots` and
    /// `lease_ms` ([`crate::Session::from_reply`] reads them).
    pub fn create_session(&self, clientid: &str) -> Result<Reply, Error> {
        self.call(json!({"op": "CREATE_SESSION", "clientid": clientid}))
    }

    /// DESTROY_CLIENTID.
    pub fn destroy_clientid(&self, clientid: &str) -> Result<Reply, Error> {
        self.call(json!({"op": "DESTROY_CLIENTID", "clientid": clientid}))
    }

    /// Sends `req` (built by this module or by hand) with `seq` as its
    /// `seq`, replacing any it had: for tests that choose the slot and
    /// seqid themselves (`NFS4ERR_BADSLOT`, `NFS4ERR_SEQ_MISORDERED`).
    /// No [`crate::Session`]'s slot table is touched.
    pub fn call_seq(&self, seq: &Seq, mut req: Value) -> Result<Reply, Error> {
        let obj = req.as_object_mut().ok_or(Error::NotAnObject)?;
        obj.insert("seq".into(), seq.to_json());
        self.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_request_shape() {
        let mut a = OpenArgs::new("o1", "d/f");
        assert_eq!(
            a.to_json(),
            json!({"op": "OPEN", "owner": "o1", "path": "d/f", "access": "both", "deny": "none"})
        );
        a.access = Access::Read;
        a.deny = Deny::Write;
        a.create = Some((CreateMode::Exclusive, Some("00112233aabbccdd".into())));
        a.truncate = true;
        a.want_delegation = WantDelegation::Read;
        assert_eq!(
            open(&a),
            json!({"op": "OPEN", "owner": "o1", "path": "d/f", "access": "read", "deny": "write",
                   "create": {"mode": "exclusive", "verifier": "00112233aabbccdd"},
                   "truncate": true, "want_delegation": "read"})
        );
        a.create = Some((CreateMode::Guarded, None));
        assert_eq!(a.to_json()["create"], json!({"mode": "guarded"}));
    }

    #[test]
    fn other_request_shapes() {
        let s = StateId {
            other: "x".into(),
            seqid: 3,
        };
        assert_eq!(
            write(&s, 4, b"hi"),
            json!({"op": "WRITE", "stateid": {"other": "x", "seqid": 3}, "offset": 4,
                   "data": "aGk="})
        );
        assert_eq!(
            lock(&s, "lo", LockType::Write, 0, TO_EOF),
            json!({"op": "LOCK", "stateid": {"other": "x", "seqid": 3}, "owner": "lo",
                   "type": "write", "offset": 0, "length": 18_446_744_073_709_551_615_u64})
        );
        assert_eq!(
            locku(&s, 1, 2),
            json!({"op": "LOCKU", "lock_stateid": {"other": "x", "seqid": 3}, "offset": 1,
                   "length": 2})
        );
        assert_eq!(
            rename("a", "b"),
            json!({"op": "RENAME", "from": "a", "to": "b"})
        );
    }
}
