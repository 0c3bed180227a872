//! The CREATE and CLOSE of a loop of opens (benchmarks, load) without a
//! JSON tree: the request written with serde's writer straight from
//! [`CreateArgs`], the reply's few fields the loop looks at read borrowed
//! from its line ([`Outcome`]). The lines are byte for byte those of
//! [`Client::create`] and [`Client::close`] (keys in the order a `Value`
//! map writes them; `typed_lines_are_the_maps_bytes`), so the server sees
//! no difference. Issue #16: building and parsing `Value`s was most of the
//! bench clients' own CPU per pair.

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::reply::STATUS_SUCCESS;
use crate::{Client, CreateArgs, Error, Reply, StatusError};

/// CREATE's line; fields in a `Value` map's (sorted) order.
#[derive(Serialize)]
struct CreateLine<'a> {
    access: &'a [String],
    cmd: &'static str,
    disposition: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    durable: Option<DurableLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseLine<'a>>,
    mid: u64,
    path: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replay: bool,
    session_id: u64,
    share: &'a [String],
}

#[derive(Serialize)]
struct DurableLine {
    create_guid: Uuid,
    persistent: bool,
    timeout_ms: u32,
}

#[derive(Serialize)]
struct LeaseLine<'a> {
    key: Uuid,
    state: &'a str,
}

/// CLOSE's line; fields in a `Value` map's (sorted) order.
#[derive(Serialize)]
struct CloseLine<'a> {
    cmd: &'static str,
    file_id: &'a str,
    mid: u64,
    session_id: u64,
}

/// The fields of a reply [`Outcome`] reads, borrowed from the line. A line
/// that does not fit (an escaped string, a repeated key) is read through a
/// `Value` instead.
#[derive(serde::Deserialize)]
struct OutcomeLine<'a> {
    status: Option<&'a str>,
    file_id: Option<&'a str>,
    durable: Option<serde::de::IgnoredAny>,
}

/// A CREATE's or CLOSE's reply, read without a JSON tree: its status, the
/// `file_id`, whether a durable handle was granted, and the line itself
/// for anything else ([`Outcome::reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    status: String,
    file_id: Option<String>,
    durable: bool,
    line: Vec<u8>,
}

impl Outcome {
    fn of(c: &Client, line: Vec<u8>) -> Result<Outcome, Error> {
        let (status, file_id, durable) = match serde_json::from_slice::<OutcomeLine>(&line) {
            Ok(o) => (
                o.status.unwrap_or("").to_owned(),
                o.file_id.map(str::to_owned),
                o.durable.is_some(),
            ),
            Err(_) => {
                let v = c.value_of(&line)?;
                let s = |f: &str| v.get(f).and_then(Value::as_str).map(str::to_owned);
                (
                    s("status").unwrap_or_default(),
                    s("file_id"),
                    v.get("durable").is_some_and(|d| !d.is_null()),
                )
            }
        };
        Ok(Outcome {
            status,
            file_id,
            durable,
            line,
        })
    }

    /// The `status` field (`""` when the server sent none).
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Whether the status is `STATUS_SUCCESS`.
    pub fn is_success(&self) -> bool {
        self.status == STATUS_SUCCESS
    }

    /// `file_id` (a CREATE's).
    pub fn file_id(&self) -> Option<&str> {
        self.file_id.as_deref()
    }

    /// Whether `durable` is there and not null (a CREATE granted a durable
    /// or persistent handle).
    pub fn durable_granted(&self) -> bool {
        self.durable
    }

    /// The reply line as received (without its `\n`).
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// The whole reply, parsed.
    pub fn reply(&self) -> Reply {
        Reply::new(serde_json::from_slice(&self.line).unwrap_or(Value::Null))
    }

    /// `Ok(self)` when the status is `STATUS_SUCCESS`, else the status as
    /// an error ([`Reply::require_success`]'s).
    pub fn require_success(self) -> Result<Outcome, StatusError> {
        if self.is_success() {
            return Ok(self);
        }
        match self.reply().require_success() {
            Err(e) => Err(e),
            // The tree disagrees with the fields read (cannot happen for a
            // line both read): still a failure.
            Ok(r) => Err(StatusError {
                status: self.status,
                error: None,
                reply: r.into_value(),
            }),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.line))
    }
}

impl CreateArgs {
    fn write_line(&self, mid: u64, out: &mut Vec<u8>) {
        let line = CreateLine {
            access: &self.access,
            cmd: "CREATE",
            disposition: &self.disposition,
            durable: self.durable.map(|d| DurableLine {
                create_guid: d.create_guid,
                persistent: d.persistent,
                timeout_ms: d.timeout_ms,
            }),
            lease: self
                .lease
                .as_ref()
                .map(|(key, state)| LeaseLine { key: *key, state }),
            mid,
            path: &self.path,
            replay: self.replay,
            session_id: self.session_id,
            share: &self.share,
        };
        // Writing these types into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &line);
    }
}

fn write_close(session_id: u64, file_id: &str, mid: u64, out: &mut Vec<u8>) {
    let line = CloseLine {
        cmd: "CLOSE",
        file_id,
        mid,
        session_id,
    };
    // Writing these types into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &line);
}

impl Client {
    /// [`Client::create`] without a JSON tree: the same request line, the
    /// reply as an [`Outcome`].
    pub fn create_outcome(&self, args: &CreateArgs) -> Result<Outcome, Error> {
        let line = self.call_line(|mid, out| args.write_line(mid, out))?;
        Outcome::of(self, line)
    }

    /// [`Client::close`] without a JSON tree: the same request line, the
    /// reply as an [`Outcome`].
    pub fn close_outcome(&self, session_id: u64, file_id: &str) -> Result<Outcome, Error> {
        let line = self.call_line(|mid, out| write_close(session_id, file_id, mid, out))?;
        Outcome::of(self, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Durable;
    use serde_json::json;

    fn with_mid(mut v: Value, mid: u64) -> Vec<u8> {
        if let Some(m) = v.as_object_mut() {
            m.insert("mid".into(), json!(mid));
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The typed lines are the bytes the `Value` requests write.
    #[test]
    fn typed_lines_are_the_maps_bytes() {
        let g = Uuid::new_v4();
        let mut a = CreateArgs::new(7, "d/\"f\"\u{e9}");
        for (durable, lease, replay) in [
            (None, None, false),
            (Some(Durable::persistent(g)), None, false),
            (
                Some(Durable::non_persistent(g)),
                Some((g, "RWH".to_owned())),
                true,
            ),
        ] {
            a.durable = durable;
            a.lease = lease;
            a.replay = replay;
            let mut typed = Vec::new();
            a.write_line(u64::MAX, &mut typed);
            assert_eq!(
                String::from_utf8_lossy(&typed),
                String::from_utf8_lossy(&with_mid(a.to_json(), u64::MAX))
            );
        }
        let mut typed = Vec::new();
        write_close(3, "f-1\\", 9, &mut typed);
        let v = json!({"cmd": "CLOSE", "session_id": 3, "file_id": "f-1\\"});
        assert_eq!(typed, with_mid(v, 9));
    }

    #[test]
    fn outcome_reads_borrowed_and_escaped_lines() {
        let line = br#"{"mid":1,"status":"STATUS_SUCCESS","file_id":"f-2","durable":{"persistent":true},"lease":null}"#;
        let o: OutcomeLine = serde_json::from_slice(line).expect("fits");
        assert_eq!(
            (o.status, o.file_id, o.durable.is_some()),
            (Some("STATUS_SUCCESS"), Some("f-2"), true)
        );
        let o: OutcomeLine = serde_json::from_slice(br#"{"durable":null}"#).expect("fits");
        assert!(o.durable.is_none());
        // An escape does not borrow: the caller falls back to a Value.
        assert!(
            serde_json::from_slice::<OutcomeLine>(br#"{"error":"x","status":"A\u0042"}"#).is_err()
        );
    }
}
