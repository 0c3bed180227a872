//! smbl/1 requests through smbshim's real request handling (against a live
//! filterd): any line gets one reply object with a status, never a panic.
//! Lines that are JSON objects are pointed at a live session, so the
//! per-command field parsing behind the session check is reached. Half the
//! inputs go to the connection reader's fast path first.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[path = "live_filterd.rs"]
mod live_filterd;

struct Live {
    shim: smbshim::server::Harness,
    session: u64,
}

static LIVE: OnceLock<Live> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let live = LIVE.get_or_init(|| {
        let sock = live_filterd::start("smb");
        let shim = smbshim::server::Harness::attach(&sock, "smb-fuzz").expect("attach");
        let r = shim.handle(
            br#"{"cmd":"SESSION_SETUP","mid":1,"client_guid":"6f1e0e9a-3c1b-4e0f-9a55-0b3e3a8f6f11","user":"fuzz"}"#,
        );
        let session = r["session_id"].as_u64().expect("a session");
        Live { shim, session }
    });
    let line = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(mut m)) if m.get("cmd") != Some(&json!("LOGOFF")) => {
            if m.contains_key("session_id") {
                m.insert("session_id".into(), json!(live.session));
            }
            Value::Object(m).to_string().into_bytes()
        }
        Ok(Value::Object(_)) => return,
        _ => data.to_vec(),
    };
    // The reader's own fast path (typed CREATE/CLOSE/ECHO lines) first,
    // for every other input, then the worker's.
    let inline = if data.len() % 2 == 0 {
        live.shim.handle_inline(&line)
    } else {
        None
    };
    let reply = inline.unwrap_or_else(|| live.shim.handle(&line));
    assert!(reply["status"].is_string(), "{reply}");
    assert_ne!(reply["status"], "UNSERIALIZABLE", "{reply}");
});
