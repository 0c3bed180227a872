//! testfront — a scriptable frontend over libfilter, for end-to-end tests.
//!
//! `testfront SOCKET PROTOCOL INSTANCE` attaches to filterd, prints
//! `{"ready":true,"epoch":N}`, then reads one JSON command per stdin line and
//! prints one JSON result per line. It keeps the descriptors it is handed, so
//! a test can SIGKILL it with handles open, exactly like a crashing protocol
//! server. Commands:
//! `{"cmd":"open", ...OpenRequest}`, `{"cmd":"resume","client":C,"key":K}`,
//! `{"cmd":"resume","client":C,"create_guid":G}`, `{"cmd":"close","key":K}`,
//! `{"cmd":"detach","key":K}`, `{"cmd":"write","key":K,"offset":N,"data":S}`,
//! `{"cmd":"read","key":K,"offset":N,"len":N}`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;

use libfilter::client::{ClientError, FilterClient, OpenedHandle};
use libfilter::model::{ClientId, CreateGuid, InstanceName, Protocol, ResumeKey};
use libfilter::proto::OpenRequest;
use serde_json::{json, Value};

fn err_json(e: &ClientError) -> Value {
    json!({"ok": false, "code": e.code().map(|c| format!("{c:?}")), "error": e.to_string()})
}

fn opened_json(h: &OpenedHandle) -> Value {
    json!({"ok": true, "key": h.info.key, "create_action": h.info.create_action, "size": h.info.size,
           "durability": h.info.durability})
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, proto, inst] = args.as_slice() else {
        anyhow::bail!("usage: testfront SOCKET PROTOCOL INSTANCE");
    };
    let client = FilterClient::connect_frontend(
        sock.as_ref(),
        Protocol::new(proto.as_str())?,
        InstanceName::new(inst.as_str())?,
    );
    let out = std::io::stdout();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            writeln!(out.lock(), "{}", err_json(&e))?;
            std::process::exit(1);
        }
    };
    writeln!(
        out.lock(),
        "{}",
        json!({"ready": true, "epoch": client.hello().epoch})
    )?;
    let mut fds: HashMap<ResumeKey, std::fs::File> = HashMap::new();
    let keep = |fds: &mut HashMap<ResumeKey, std::fs::File>, h: OpenedHandle| {
        let v = opened_json(&h);
        fds.insert(h.info.key, std::fs::File::from(h.fd));
        v
    };
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                writeln!(
                    out.lock(),
                    "{}",
                    json!({"ok": false, "error": e.to_string()})
                )?;
                continue;
            }
        };
        let key = || -> anyhow::Result<ResumeKey> { Ok(serde_json::from_value(v["key"].clone())?) };
        let client_id =
            || -> anyhow::Result<ClientId> { Ok(serde_json::from_value(v["client"].clone())?) };
        let result: anyhow::Result<Value> = (|| {
            Ok(match v["cmd"].as_str().unwrap_or("") {
                "open" => {
                    let req: OpenRequest = serde_json::from_value(v.clone())?;
                    match client.open(req) {
                        Ok(h) => keep(&mut fds, h),
                        Err(e) => err_json(&e),
                    }
                }
                "resume" => {
                    let r = if v.get("create_guid").is_some() {
                        let g: CreateGuid = serde_json::from_value(v["create_guid"].clone())?;
                        client.resume_by_guid(client_id()?, g)
                    } else {
                        client.resume(client_id()?, key()?)
                    };
                    match r {
                        Ok(h) => keep(&mut fds, h),
                        Err(e) => err_json(&e),
                    }
                }
                "close" => {
                    let k = key()?;
                    fds.remove(&k);
                    match client.close(k) {
                        Ok(()) => json!({"ok": true}),
                        Err(e) => err_json(&e),
                    }
                }
                "detach" => match client.detach(key()?) {
                    Ok(()) => json!({"ok": true}),
                    Err(e) => err_json(&e),
                },
                "write" => {
                    let f = fds.get(&key()?).ok_or_else(|| anyhow::anyhow!("no fd"))?;
                    let data = v["data"].as_str().unwrap_or("");
                    f.write_all_at(data.as_bytes(), v["offset"].as_u64().unwrap_or(0))?;
                    json!({"ok": true, "count": data.len()})
                }
                "read" => {
                    let f = fds.get(&key()?).ok_or_else(|| anyhow::anyhow!("no fd"))?;
                    let mut buf = vec![0u8; usize::try_from(v["len"].as_u64().unwrap_or(0))?];
                    let n = f.read_at(&mut buf, v["offset"].as_u64().unwrap_or(0))?;
                    buf.truncate(n);
                    json!({"ok": true, "data": String::from_utf8_lossy(&buf)})
                }
                other => json!({"ok": false, "error": format!("unknown cmd {other:?}")}),
            })
        })();
        let r = result.unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}));
        writeln!(out.lock(), "{r}")?;
    }
    Ok(())
}
