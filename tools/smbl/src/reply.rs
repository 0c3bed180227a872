//! [`Reply`]: one smbl/1 reply object, with accessors for the fields most
//! callers look at, and [`StatusError`] for callers that want a non-success
//! status as an error ([`Reply::require_success`]).

use base64::Engine as _;
use serde_json::Value;

/// The status of a successful request.
pub const STATUS_SUCCESS: &str = "STATUS_SUCCESS";

/// One reply from the server: a JSON object with `mid` and `status`.
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

    /// Whether the status is `STATUS_SUCCESS`.
    pub fn is_success(&self) -> bool {
        self.status() == STATUS_SUCCESS
    }

    /// A field of the reply.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field)
    }

    /// The reply's `mid` (`None` when null or absent).
    pub fn mid(&self) -> Option<u64> {
        self.0.get("mid").and_then(Value::as_u64)
    }

    /// The server's `error` message, sent with failures.
    pub fn error(&self) -> Option<&str> {
        self.0.get("error").and_then(Value::as_str)
    }

    /// `session_id` (SESSION_SETUP).
    pub fn session_id(&self) -> Option<u64> {
        self.0.get("session_id").and_then(Value::as_u64)
    }

    /// `file_id` (CREATE, RECONNECT).
    pub fn file_id(&self) -> Option<&str> {
        self.0.get("file_id").and_then(Value::as_str)
    }

    /// `data` (READ) decoded from base64; `None` when absent or not base64.
    pub fn data(&self) -> Option<Vec<u8>> {
        let s = self.0.get("data")?.as_str()?;
        base64::engine::general_purpose::STANDARD.decode(s).ok()
    }

    /// The raw JSON object.
    pub fn value(&self) -> &Value {
        &self.0
    }

    /// The raw JSON object, owned.
    pub fn into_value(self) -> Value {
        self.0
    }

    /// `Ok(self)` when the status is `STATUS_SUCCESS`, else the status as an
    /// error — for callers (benchmarks, scripts) to which any failure is
    /// fatal.
    pub fn require_success(self) -> Result<Reply, StatusError> {
        if self.is_success() {
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

/// A reply whose status was not `STATUS_SUCCESS` where success was required.
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
    fn accessors_and_require_success() {
        let ok = Reply::new(json!({"mid": 3, "status": "STATUS_SUCCESS", "data": "aGk=",
                                   "file_id": "f", "session_id": 9}));
        assert!(ok.is_success());
        assert_eq!(ok.mid(), Some(3));
        assert_eq!(ok.data(), Some(b"hi".to_vec()));
        assert_eq!(ok.file_id(), Some("f"));
        assert_eq!(ok.session_id(), Some(9));
        assert!(ok.clone().require_success().is_ok());

        let bad = Reply::new(
            json!({"mid": null, "status": "STATUS_FILE_CLOSED", "error": "gone",
                                    "data": "not base64!"}),
        );
        assert!(!bad.is_success());
        assert_eq!(bad.mid(), None);
        assert_eq!(bad.data(), None);
        let e = bad.require_success().err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("STATUS_FILE_CLOSED: gone")
        );
    }
}
