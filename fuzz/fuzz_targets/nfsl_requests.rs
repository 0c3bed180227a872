//! nfsl/1 requests through nfsshim's real request handling (against a live
//! filterd): any line gets one reply object with a status, never a panic.
//! Lines that are JSON objects with a `seq` are pointed at a live session's
//! slot 0 with its next seqid, so the per-operation field parsing behind
//! the slot table is reached.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[path = "live_filterd.rs"]
mod live_filterd;

struct Live {
    shim: nfsshim::server::Harness,
    session: String,
    seqid: AtomicU64,
}

static LIVE: OnceLock<Live> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let live = LIVE.get_or_init(|| {
        let sock = live_filterd::start("nfs");
        let shim = nfsshim::server::Harness::attach(&sock, "nfs-fuzz").expect("attach");
        let r = shim.handle(
            br#"{"op":"EXCHANGE_ID","xid":1,"owner":"fuzz","verifier":"0123456789abcdef"}"#,
        );
        let cid = r["clientid"].clone();
        let r = shim.handle(
            json!({"op": "CREATE_SESSION", "xid": 2, "clientid": cid})
                .to_string()
                .as_bytes(),
        );
        let session = r["sessionid"].as_str().expect("a session").to_owned();
        Live {
            shim,
            session,
            seqid: AtomicU64::new(0),
        }
    });
    let mut pointed = false;
    let line = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(mut m)) => {
            let op = m.get("op").and_then(Value::as_str).unwrap_or("");
            if matches!(op, "DESTROY_SESSION" | "DESTROY_CLIENTID" | "EXCHANGE_ID") {
                return; // they would end the live session
            }
            if m.get("seq").is_some_and(Value::is_object) {
                let next = live.seqid.load(Ordering::Relaxed) + 1;
                m.insert(
                    "seq".into(),
                    json!({"sessionid": live.session, "slot": 0, "seqid": next}),
                );
                pointed = true;
            }
            Value::Object(m).to_string().into_bytes()
        }
        _ => data.to_vec(),
    };
    let reply = live.shim.handle(&line);
    let status = reply["status"].as_str();
    assert!(status.is_some(), "{reply}");
    let rejected = matches!(
        status,
        Some(
            "NFS4ERR_BADSESSION"
                | "NFS4ERR_BADSLOT"
                | "NFS4ERR_SEQ_MISORDERED"
                | "NFS4ERR_DELAY"
                | "NFS4ERR_INVAL"
        )
    );
    if pointed && !rejected {
        live.seqid.fetch_add(1, Ordering::Relaxed);
    }
});
