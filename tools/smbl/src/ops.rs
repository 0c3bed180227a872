//! Typed conveniences: one method per smbl/1 command, building the request
//! object from typed arguments and returning the [`Reply`] as it came.
//! Anything they do not cover goes through [`Client::call`] with a
//! hand-built object.

use base64::Engine as _;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{Client, Error, Reply};

/// A durable (v2) request: `durable` in CREATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// Chosen by the client; names the open for reconnect and replay.
    pub create_guid: Uuid,
    /// Persistent (survives a filter daemon crash) rather than durable.
    pub persistent: bool,
    /// Requested timeout; 0 asks for the server default.
    pub timeout_ms: u32,
}

impl Durable {
    /// A persistent open with the server's default timeout.
    pub fn persistent(create_guid: Uuid) -> Durable {
        Durable {
            create_guid,
            persistent: true,
            timeout_ms: 0,
        }
    }

    /// A durable, non-persistent open with the server's default timeout
    /// (granted only together with a lease that includes H).
    pub fn non_persistent(create_guid: Uuid) -> Durable {
        Durable {
            create_guid,
            persistent: false,
            timeout_ms: 0,
        }
    }

    fn to_json(self) -> Value {
        json!({"create_guid": self.create_guid, "persistent": self.persistent,
               "timeout_ms": self.timeout_ms})
    }
}

/// The fields of a CREATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateArgs {
    /// From SESSION_SETUP.
    pub session_id: u64,
    /// Relative, `/`-separated.
    pub path: String,
    /// Subset of `read`, `write`, `delete`; non-empty.
    pub access: Vec<String>,
    /// What others may do meanwhile: subset of `read`, `write`, `delete`.
    pub share: Vec<String>,
    /// `open`, `create`, `open_if`, `overwrite`, `overwrite_if` or `supersede`.
    pub disposition: String,
    /// A durable or persistent open, when set.
    pub durable: Option<Durable>,
    /// A lease request: its key and state (`R`, `RH`, `RW` or `RWH`).
    pub lease: Option<(Uuid, String)>,
    /// Sent as a replay of an earlier CREATE.
    pub replay: bool,
}

impl CreateArgs {
    /// `path` with read and write access, sharing read, `open_if`, not
    /// durable, no lease.
    pub fn new(session_id: u64, path: impl Into<String>) -> CreateArgs {
        CreateArgs {
            session_id,
            path: path.into(),
            access: vec!["read".into(), "write".into()],
            share: vec!["read".into()],
            disposition: "open_if".into(),
            durable: None,
            lease: None,
            replay: false,
        }
    }

    /// The request object (without `mid`).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("cmd".into(), json!("CREATE"));
        m.insert("session_id".into(), json!(self.session_id));
        m.insert("path".into(), json!(self.path));
        m.insert("access".into(), json!(self.access));
        m.insert("share".into(), json!(self.share));
        m.insert("disposition".into(), json!(self.disposition));
        if let Some(d) = self.durable {
            m.insert("durable".into(), d.to_json());
        }
        if let Some((key, state)) = &self.lease {
            m.insert("lease".into(), json!({"key": key, "state": state}));
        }
        if self.replay {
            m.insert("replay".into(), json!(true));
        }
        Value::Object(m)
    }
}

/// One entry of LOCK's `locks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSpec {
    /// First byte.
    pub offset: u64,
    /// Bytes covered.
    pub length: u64,
    /// Exclusive rather than shared.
    pub exclusive: bool,
    /// Unlock this range rather than lock it.
    pub unlock: bool,
}

impl LockSpec {
    fn to_json(self) -> Value {
        json!({"offset": self.offset, "length": self.length,
               "exclusive": self.exclusive, "unlock": self.unlock})
    }
}

/// Adds `op_id` and `replay` when given.
fn with_replay(mut v: Value, op_id: Option<u64>, replay: bool) -> Value {
    if let Some(m) = v.as_object_mut() {
        if let Some(op) = op_id {
            m.insert("op_id".into(), json!(op));
        }
        if replay {
            m.insert("replay".into(), json!(true));
        }
    }
    v
}

impl Client {
    /// SESSION_SETUP. `previous_session_id` tears down an earlier session of
    /// the same client and user.
    pub fn session_setup(
        &self,
        client_guid: Uuid,
        user: &str,
        previous_session_id: Option<u64>,
    ) -> Result<Reply, Error> {
        let mut req = json!({"cmd": "SESSION_SETUP", "client_guid": client_guid, "user": user});
        if let (Some(p), Some(m)) = (previous_session_id, req.as_object_mut()) {
            m.insert("previous_session_id".into(), json!(p));
        }
        self.call(req)
    }

    /// CREATE.
    pub fn create(&self, args: &CreateArgs) -> Result<Reply, Error> {
        self.call(args.to_json())
    }

    /// RECONNECT a disconnected durable or persistent open.
    pub fn reconnect(
        &self,
        session_id: u64,
        file_id: &str,
        create_guid: Uuid,
        lease_key: Option<Uuid>,
    ) -> Result<Reply, Error> {
        let mut req = json!({"cmd": "RECONNECT", "session_id": session_id, "file_id": file_id,
                             "create_guid": create_guid});
        if let (Some(k), Some(m)) = (lease_key, req.as_object_mut()) {
            m.insert("lease_key".into(), json!(k));
        }
        self.call(req)
    }

    /// READ; [`Reply::data`] decodes the bytes.
    pub fn read(
        &self,
        session_id: u64,
        file_id: &str,
        offset: u64,
        length: u64,
    ) -> Result<Reply, Error> {
        self.call(
            json!({"cmd": "READ", "session_id": session_id, "file_id": file_id,
                         "offset": offset, "length": length}),
        )
    }

    /// WRITE `data` at `offset`.
    pub fn write(
        &self,
        session_id: u64,
        file_id: &str,
        offset: u64,
        data: &[u8],
        op_id: Option<u64>,
        replay: bool,
    ) -> Result<Reply, Error> {
        let req = json!({"cmd": "WRITE", "session_id": session_id, "file_id": file_id,
                         "offset": offset,
                         "data": base64::engine::general_purpose::STANDARD.encode(data)});
        self.call(with_replay(req, op_id, replay))
    }

    /// FLUSH.
    pub fn flush(&self, session_id: u64, file_id: &str) -> Result<Reply, Error> {
        self.call(json!({"cmd": "FLUSH", "session_id": session_id, "file_id": file_id}))
    }

    /// LOCK (or unlock) ranges, all or nothing. `lock_sequence` is
    /// `(number 0..15, index 1..64)`.
    pub fn lock(
        &self,
        session_id: u64,
        file_id: &str,
        locks: &[LockSpec],
        lock_sequence: Option<(u8, u8)>,
        replay: bool,
    ) -> Result<Reply, Error> {
        let locks: Vec<Value> = locks.iter().map(|l| l.to_json()).collect();
        let mut req = json!({"cmd": "LOCK", "session_id": session_id, "file_id": file_id,
                             "locks": locks});
        if let (Some((number, index)), Some(m)) = (lock_sequence, req.as_object_mut()) {
            m.insert(
                "lock_sequence".into(),
                json!({"number": number, "index": index}),
            );
        }
        self.call(with_replay(req, None, replay))
    }

    /// SET_INFO `rename` to `to`.
    pub fn set_info_rename(
        &self,
        session_id: u64,
        file_id: &str,
        to: &str,
        replace: bool,
        op_id: Option<u64>,
        replay: bool,
    ) -> Result<Reply, Error> {
        let req = json!({"cmd": "SET_INFO", "session_id": session_id, "file_id": file_id,
                         "rename": {"to": to, "replace": replace}});
        self.call(with_replay(req, op_id, replay))
    }

    /// SET_INFO `end_of_file` (truncate or extend).
    pub fn set_info_eof(
        &self,
        session_id: u64,
        file_id: &str,
        end_of_file: u64,
        op_id: Option<u64>,
        replay: bool,
    ) -> Result<Reply, Error> {
        let req = json!({"cmd": "SET_INFO", "session_id": session_id, "file_id": file_id,
                         "end_of_file": end_of_file});
        self.call(with_replay(req, op_id, replay))
    }

    /// SET_INFO `delete_on_close`.
    pub fn set_info_delete_on_close(
        &self,
        session_id: u64,
        file_id: &str,
        delete_on_close: bool,
        op_id: Option<u64>,
        replay: bool,
    ) -> Result<Reply, Error> {
        let req = json!({"cmd": "SET_INFO", "session_id": session_id, "file_id": file_id,
                         "delete_on_close": delete_on_close});
        self.call(with_replay(req, op_id, replay))
    }

    /// LEASE_BREAK_ACK: the holder of `lease_key` now holds `state`.
    pub fn lease_break_ack(
        &self,
        session_id: u64,
        lease_key: Uuid,
        state: &str,
    ) -> Result<Reply, Error> {
        self.call(json!({"cmd": "LEASE_BREAK_ACK", "session_id": session_id,
                         "lease_key": lease_key, "state": state}))
    }

    /// CLOSE.
    pub fn close(&self, session_id: u64, file_id: &str) -> Result<Reply, Error> {
        self.call(json!({"cmd": "CLOSE", "session_id": session_id, "file_id": file_id}))
    }

    /// LOGOFF: closes every open of the session, durable ones too.
    pub fn logoff(&self, session_id: u64) -> Result<Reply, Error> {
        self.call(json!({"cmd": "LOGOFF", "session_id": session_id}))
    }

    /// ECHO.
    pub fn echo(&self) -> Result<Reply, Error> {
        self.call(json!({"cmd": "ECHO"}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_shape() {
        let g = Uuid::nil();
        let mut a = CreateArgs::new(7, "d/f");
        a.durable = Some(Durable::persistent(g));
        a.lease = Some((g, "RWH".into()));
        a.replay = true;
        assert_eq!(
            a.to_json(),
            json!({"cmd": "CREATE", "session_id": 7, "path": "d/f", "access": ["read", "write"],
                   "share": ["read"], "disposition": "open_if",
                   "durable": {"create_guid": g, "persistent": true, "timeout_ms": 0},
                   "lease": {"key": g, "state": "RWH"}, "replay": true})
        );
        let plain = CreateArgs::new(1, "x").to_json();
        assert!(plain.get("durable").is_none() && plain.get("replay").is_none());
    }

    #[test]
    fn replay_fields_only_when_given() {
        let v = with_replay(json!({"cmd": "WRITE"}), Some(5), true);
        assert_eq!(v, json!({"cmd": "WRITE", "op_id": 5, "replay": true}));
        let v = with_replay(json!({"cmd": "WRITE"}), None, false);
        assert_eq!(v, json!({"cmd": "WRITE"}));
    }
}
