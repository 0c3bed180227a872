//! The one safe order, seen from the kernel: every filesystem change a
//! commit records is fsync'd before that commit, and the reply comes after
//! it — change → fsync → LMDB commit (fdatasync) → reply (sendmsg).
//! filterd runs under `strace -f` (installed by `.ci/run`); the test reads
//! the syscalls in the order they completed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use rkfilter_tests::{bin, plain_open, wait_for, Scratch};

/// A program run under `strace -f`. Killing strace alone would leave the
/// traced program running (strace detaches from its tracees when it
/// dies), so the guard kills the tracees first — strace reaps them and
/// exits — then strace, and reaps it: on every path, panics included.
struct Traced {
    child: Child,
}

impl Traced {
    /// The processes strace started (its children, and theirs).
    fn tracees(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut todo = vec![i32::try_from(self.child.id()).unwrap_or(0)];
        while let Some(pid) = todo.pop() {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for k in kids
                    .split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok())
                {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
        out
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        for pid in self.tracees() {
            // SAFETY: kill(2) with a pid read from strace's own children.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // strace exits once its last tracee has gone; do not wait forever.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_traced(s: &Scratch, trace: &Path) -> Traced {
    start_traced_with(
        s,
        trace,
        &["trace=linkat,renameat2,ftruncate,unlinkat,fsync,fdatasync,sendmsg"],
    )
}

/// filterd under `strace -f`, with strace's `-e` expressions `exprs`
/// (which system calls to trace, faults to inject).
fn start_traced_with(s: &Scratch, trace: &Path, exprs: &[&str]) -> Traced {
    let strace = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("strace is not installed: `apt-get install strace` (.ci/run installs it)");
    let child = Command::new(strace)
        .args(["-f", "-qq", "-o"])
        .arg(trace)
        .args(exprs.iter().flat_map(|e| ["-e", e]))
        .arg(bin("filterd"))
        .arg("--root")
        .arg(s.root())
        .arg("--state")
        .arg(s.state())
        .arg("--no-fanotify")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn strace");
    let t = Traced { child };
    wait_for("traced filterd to answer", Duration::from_secs(30), || {
        FilterClient::connect_control(&s.socket()).ok().map(|_| ())
    });
    t
}

/// The syscalls of the trace, by name, in the order they completed.
fn events(trace: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(trace).expect("trace");
    let mut out = Vec::new();
    for line in text.lines() {
        if line.contains("<unfinished ...>") {
            continue;
        }
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let name = match rest.strip_prefix("<... ") {
            Some(r) => r.split_whitespace().next().unwrap_or(""),
            None => rest.split('(').next().unwrap_or(""),
        };
        if !name.is_empty() && !line.contains("= -1") {
            out.push(name.to_owned());
        }
    }
    out
}

/// After the first `change` at or after `from`: an fsync, then an
/// fdatasync (LMDB), then a sendmsg (the reply) — and no sendmsg before
/// that fdatasync. Returns where the reply is.
fn check_order(ev: &[String], from: usize, change: &str) -> usize {
    let at = |name: &str, start: usize| {
        ev.iter()
            .skip(start)
            .position(|e| e == name)
            .map(|p| p + start)
    };
    let c = at(change, from).unwrap_or_else(|| panic!("no {change} after {from}: {ev:?}"));
    let f = at("fsync", c).unwrap_or_else(|| panic!("{change} never fsync'd: {ev:?}"));
    let d = at("fdatasync", f)
        .unwrap_or_else(|| panic!("no LMDB commit after the fsync of {change}: {ev:?}"));
    let r = at("sendmsg", c).unwrap_or_else(|| panic!("no reply after {change}: {ev:?}"));
    assert!(
        r > d,
        "the reply to a {change} went out before the commit recording it: {:?}",
        &ev[c..=d.max(r)]
    );
    let first_sync_after_change = at("fdatasync", c).unwrap_or(usize::MAX);
    assert!(
        f < first_sync_after_change,
        "the commit recording a {change} came before its fsync: {:?}",
        &ev[c..=d]
    );
    r
}

#[test]
fn changes_are_fsynced_before_the_commit_and_replies_come_after() {
    let s = Scratch::new("strace-order");
    let trace = s.dir.join("trace");
    let _t = start_traced(&s, &trace);
    let fe = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .unwrap();
    let h = fe
        .open(OpenRequest {
            access: Access::new(Rights::READ.union(Rights::WRITE).union(Rights::DELETE)).unwrap(),
            disposition: Disposition::Create,
            durability: Durability::Persistent { timeout_ms: 60_000 },
            create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
            ..plain_open("alice", "new")
        })
        .unwrap();
    fe.rename(h.info.key, RelPath::new("moved").unwrap(), false, None)
        .unwrap();
    fe.set_end_of_file(h.info.key, 4096, None).unwrap();
    drop(fe);
    let ev = events(&trace);
    let r = check_order(&ev, 0, "linkat");
    let r = check_order(&ev, r, "renameat2");
    check_order(&ev, r, "ftruncate");
}

/// A WRITE on a persistent smbl/1 handle is on stable storage before its
/// reply (issue: writes on persistent handles were acknowledged from the
/// page cache): pwrite → fdatasync → the reply on the TCP socket.
#[test]
fn a_persistent_write_is_synced_before_its_reply() {
    use rkfilter_tests::{Filterd, LineClient};
    use serde_json::json;
    use std::io::BufRead;
    let s = Scratch::new("strace-write");
    let _d = Filterd::start(&s, &[], &[]);
    let trace = s.dir.join("shim-trace");
    let shim = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args(["-e", "trace=pwrite64,fdatasync,write,sendto,sendmsg,writev"])
        .arg(bin("smbshim"))
        .arg("--filter")
        .arg(s.socket())
        .args(["--listen", "127.0.0.1:0", "--instance", "smb-t"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace smbshim");
    let mut shim = Traced { child: shim };
    let mut line = String::new();
    std::io::BufReader::new(shim.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let mut c = LineClient::connect(&addr);
    let r = c.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "a"}));
    let sid = r["session_id"].as_u64().unwrap();
    let r = c.call(json!({"cmd": "CREATE", "session_id": sid, "path": "p", "access": ["read", "write"],
                          "share": ["read"], "disposition": "open_if",
                          "durable": {"create_guid": uuid::Uuid::new_v4().to_string(), "persistent": true, "timeout_ms": 60000}}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();
    // A payload the trace can recognise.
    let r = c.call(json!({"cmd": "WRITE", "session_id": sid, "file_id": fid, "offset": 0, "data": "TUFSS0VSLU1BUktFUg=="}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    // Stopping the shim ends the trace: everything it did is written.
    drop(shim);
    let text = std::fs::read_to_string(&trace).unwrap();
    // strace prints a call that another thread's call interrupts as
    // `<unfinished ...>` when it starts and `<... resumed>` when it
    // returns: the sync counts where it returned, the reply where its
    // `sendto` started (once the shim is killed, a reply strace had not
    // yet seen return shows only as started).
    let lines: Vec<&str> = text.lines().collect();
    let w = lines
        .iter()
        .position(|l| l.contains("MARKER-MARKER"))
        .unwrap_or_else(|| panic!("the WRITE's pwrite is in the trace: {text}"));
    let sync = lines
        .iter()
        .skip(w)
        .position(|l| l.contains("fdatasync") && !l.contains("<unfinished"))
        .map(|p| p + w)
        .unwrap_or_else(|| panic!("the WRITE was never synced: {:?}", &lines[w..]));
    let reply = lines
        .iter()
        .skip(w + 1)
        .position(|l| l.contains("count") && !l.contains("pwrite64"))
        .map(|p| p + w + 1)
        .unwrap_or_else(|| panic!("no reply after the WRITE: {:?}", &lines[w..]));
    assert!(
        sync < reply,
        "replied before the data was synced: {:?}",
        &lines[w..=reply]
    );
}

/// A non-durable read-write `open_if` of `name` by client alice.
fn open_if(name: String) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        disposition: Disposition::OpenIf,
        ..plain_open("alice", &name)
    }
}

/// A lone request costs filterd one receive call (issue 16): the engine
/// reads a connection's packets in batches (`recvmmsg`), and a batch with
/// room to spare means the socket is drained, so it makes no second call
/// that finds the socket empty. Counted with strace over a run of
/// non-durable opens and closes, each sent after the previous reply.
#[test]
fn a_lone_request_costs_one_receive_call() {
    let s = Scratch::new("strace-recv");
    let trace = s.dir.join("trace");
    let t = start_traced_with(&s, &trace, &["trace=recvmsg,recvmmsg"]);
    let fe = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .unwrap();
    const PAIRS: usize = 50;
    for i in 0..PAIRS {
        let h = fe.open(open_if(format!("f{i}"))).unwrap();
        fe.close(h.info.key).unwrap();
    }
    drop(fe);
    // Stopping filterd ends the trace: every call it made is written.
    drop(t);
    let text = std::fs::read_to_string(&trace).expect("trace");
    // Each call appears once as `name(` (a resumed one as `<... name`).
    let calls = text
        .lines()
        .filter(|l| l.contains("recvmsg(") || l.contains("recvmmsg("))
        .count();
    // The requests, plus the hellos and closes of this connection and of
    // the probe that waited for filterd to answer.
    let bound = 2 * PAIRS + 12;
    assert!(
        calls <= bound,
        "{calls} receive calls for {} requests (at most {bound} expected)",
        2 * PAIRS
    );
}

#[test]
fn an_open_if_of_an_existing_file_costs_one_openat2() {
    // issue #16: create-if-absent opened what exists first; it used to try
    // an O_CREAT|O_EXCL openat2 that failed with EEXIST (and took the
    // directory's lock) before every open of an existing file.
    let s = Scratch::new("strace-open-if");
    const FILES: usize = 20;
    for i in 0..FILES {
        std::fs::write(s.root().join(format!("old{i}")), b"x").unwrap();
    }
    let trace = s.dir.join("trace");
    let t = start_traced_with(&s, &trace, &["trace=openat2"]);
    let fe = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .unwrap();
    let open_once = |name: String| {
        let h = fe.open(open_if(name)).unwrap();
        let action = h.info.create_action;
        fe.close(h.info.key).unwrap();
        action
    };
    for i in 0..FILES {
        assert_eq!(open_once(format!("old{i}")), CreateAction::Opened);
    }
    // Absent files are still created, and say so.
    for i in 0..3 {
        assert_eq!(open_once(format!("new{i}")), CreateAction::Created);
    }
    drop(fe);
    drop(t);
    let text = std::fs::read_to_string(&trace).expect("trace");
    let calls = |name: &str| {
        text.lines()
            .filter(|l| l.contains("openat2(") && l.contains(&format!("\"{name}\"")))
            .count()
    };
    for i in 0..FILES {
        let n = calls(&format!("old{i}"));
        assert_eq!(
            n, 1,
            "open_if of existing old{i} made {n} openat2 calls:\n{text}"
        );
    }
    assert!(s.root().join("new0").exists());
}

/// An `accept4` that fails for want of memory (ENOMEM, as the kernel may
/// answer under pressure) passes: filterd waits and accepts the waiting
/// connection. Before (review rvx), it ended the listener while the
/// daemon lived on holding the state dir: no frontend could attach again,
/// filterctl was refused, and no standby took over.
#[test]
fn an_accept_failing_for_want_of_memory_does_not_end_the_listener() {
    let s = Scratch::new("strace-accept");
    let trace = s.dir.join("trace");
    // The readiness poll's connection is the first accept; the next three
    // fail.
    let _t = start_traced_with(
        &s,
        &trace,
        &["trace=accept4", "inject=accept4:error=ENOMEM:when=2..4"],
    );
    wait_for(
        "filterd to serve a connection after its failed accepts",
        Duration::from_secs(30),
        || FilterClient::connect_control(&s.socket()).ok(),
    );
    let text = std::fs::read_to_string(&trace).expect("trace");
    assert!(
        text.contains("ENOMEM") && text.contains("INJECTED"),
        "no accept failed: {text}"
    );
}
