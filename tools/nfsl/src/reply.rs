//! [`Reply`]: one nfsl/1 reply object, with accessors for the fields most
//! callers look at; [`StateId`], the typed form of a `stateid`; and
//! [`StatusError`] for callers that want a status other than `NFS4_OK` as
//! an error ([`Reply::require_ok`]).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The status of a successful request.
pub const NFS4_OK: &str = "NFS4_OK";

/// Statuses after which the slot did not advance: the client re-sends with
/// the same seqid. nfsshim leaves the slot where it was for every
/// `NFS4ERR_DELAY` (filterd unreachable, or a delegation being recalled),
/// so a re-send runs the request again.
pub const SEQ_REJECTIONS: [&str; 4] = [
    "NFS4ERR_BADSESSION",
    "NFS4ERR_BADSLOT",
    "NFS4ERR_SEQ_MISORDERED",
    "NFS4ERR_DELAY",
];

/// A `stateid`: `other` names an open, lock or delegation state; `seqid`
/// grows by one on every change of that state (0 in a request means
/// "current").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateId {
    /// Opaque name of the state, chosen by the server.
    pub other: String,
    /// Version of the state.
    pub seqid: u32,
}

impl StateId {
    /// Reads a stateid object; `None` unless `v` is `{"other": string,
    /// "seqid": u32}` (extra fields are ignored).
    pub fn from_json(v: &Value) -> Option<StateId> {
        Some(StateId {
            other: v.get("other")?.as_str()?.to_owned(),
            seqid: u32::try_from(v.get("seqid")?.as_u64()?).ok()?,
        })
    }

    /// The same state with seqid 0: "whatever is current".
    pub fn current(&self) -> StateId {
        StateId {
            other: self.other.clone(),
            seqid: 0,
        }
    }
}

/// One reply from the server: a JSON object with `xid` and `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply(Value);

impl Reply {
    /// Wraps a reply object as received.
    pub fn new(v: Value) -> Reply {
        Reply(v)
    }

    /// The `status` field (`""` when the server sent none).
    pub fn status(&self) -> &str {
        self.0.get("status").and_then(Value::as_str).unwrap_or("")
    }

    /// Whether the status is `NFS4_OK`.
    pub fn is_ok(&self) -> bool {
        self.status() == NFS4_OK
    }

    /// Whether the status rejects the request's `seq` itself
    /// ([`SEQ_REJECTIONS`]): the slot did not advance.
    pub fn rejects_seq(&self) -> bool {
        SEQ_REJECTIONS.contains(&self.status())
    }

    /// A field of the reply.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field)
    }

    /// The reply's `xid` (`None` when null or absent).
    pub fn xid(&self) -> Option<u64> {
        self.0.get("xid").and_then(Value::as_u64)
    }

    /// The server's `error` message, sent with some failures.
    pub fn error(&self) -> Option<&str> {
        self.0.get("error").and_then(Value::as_str)
    }

    /// `clientid` (EXCHANGE_ID).
    pub fn clientid(&self) -> Option<&str> {
        self.0.get("clientid").and_then(Value::as_str)
    }

    /// `sessionid` (CREATE_SESSION).
    pub fn sessionid(&self) -> Option<&str> {
        self.0.get("sessionid").and_then(Value::as_str)
    }

    /// `stateid` (OPEN).
    pub fn stateid(&self) -> Option<StateId> {
        StateId::from_json(self.0.get("stateid")?)
    }

    /// `lock_stateid` (LOCK, LOCKU).
    pub fn lock_stateid(&self) -> Option<StateId> {
        StateId::from_json(self.0.get("lock_stateid")?)
    }

    /// `delegation` (OPEN), `None` when absent or null. Its shape is the
    /// server's (the spec does not fix it), hence raw JSON.
    pub fn delegation(&self) -> Option<&Value> {
        self.0.get("delegation").filter(|d| !d.is_null())
    }

    /// `denied` (LOCK failing with `NFS4ERR_DENIED`): `{offset, length,
    /// type, owner}` of the conflicting lock.
    pub fn denied(&self) -> Option<&Value> {
        self.0.get("denied").filter(|d| !d.is_null())
    }

    /// `data` (READ) decoded from base64; `None` when absent or not base64.
    pub fn data(&self) -> Option<Vec<u8>> {
        let s = self.0.get("data")?.as_str()?;
        base64::engine::general_purpose::STANDARD.decode(s).ok()
    }

    /// `eof` (READ).
    pub fn eof(&self) -> Option<bool> {
        self.0.get("eof").and_then(Value::as_bool)
    }

    /// `count` (WRITE).
    pub fn count(&self) -> Option<u64> {
        self.0.get("count").and_then(Value::as_u64)
    }

    /// The raw JSON object.
    pub fn value(&self) -> &Value {
        &self.0
    }

    /// The raw JSON object, owned.
    pub fn into_value(self) -> Value {
        self.0
    }

    /// `Ok(self)` when the status is `NFS4_OK`, else the status as an error
    /// — for callers (benchmarks, scripts) to which any failure is fatal.
    pub fn require_ok(self) -> Result<Reply, StatusError> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(StatusError {
                status: self.status().to_owned(),
                error: self.error().map(str::to_owned),
                reply: self.0,
            })
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A reply whose status was not `NFS4_OK` where success was required.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}{}", .error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct StatusError {
    /// The status.
    pub status: String,
    /// The server's `error` message, if any.
    pub error: Option<String>,
    /// The whole reply.
    pub reply: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accessors_and_require_ok() {
        let ok = Reply::new(
            json!({"xid": 3, "status": "NFS4_OK", "data": "aGk=", "eof": true,
                                   "stateid": {"other": "o1", "seqid": 2},
                                   "delegation": null}),
        );
        assert!(ok.is_ok() && !ok.rejects_seq());
        assert_eq!(ok.xid(), Some(3));
        assert_eq!(ok.data(), Some(b"hi".to_vec()));
        assert_eq!(ok.eof(), Some(true));
        let sid = ok.stateid().unwrap();
        assert_eq!(
            sid,
            StateId {
                other: "o1".into(),
                seqid: 2
            }
        );
        assert_eq!(sid.current().seqid, 0);
        assert_eq!(
            serde_json::to_value(&sid).unwrap(),
            json!({"other": "o1", "seqid": 2})
        );
        assert_eq!(ok.delegation(), None);
        assert!(ok.clone().require_ok().is_ok());

        let bad = Reply::new(json!({"xid": null, "status": "NFS4ERR_SEQ_MISORDERED",
                                    "error": "seqid 5, expected 2", "data": "not base64!",
                                    "stateid": {"other": "o", "seqid": 1_u64 << 40}}));
        assert!(!bad.is_ok() && bad.rejects_seq());
        assert_eq!(bad.xid(), None);
        assert_eq!(bad.data(), None);
        assert_eq!(bad.stateid(), None, "seqid beyond u32");
        let e = bad.require_ok().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("NFS4ERR_SEQ_MISORDERED: seqid 5, expected 2")
        );
    }
}
