//! `nfsshim client`: a person (or a script) drives nfsl/1 from stdin,
//! through the real nfsshim and filterd.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use crossbeam_channel::Receiver;
use rkfilter_tests::{Filterd, Scratch, Shim};
use serde_json::Value;

/// How long one reply may take to appear on the client's stdout.
const REPLY_LIMIT: Duration = Duration::from_secs(30);

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// An `nfsshim client ADDR` process fed one line at a time.
struct CliProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl CliProcess {
    fn start(addr: &str) -> CliProcess {
        let mut child = Command::new(rkfilter_tests::bin("nfsshim"))
            .args(["client", addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nfsshim client");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        // Lines go over a channel so each wait has a limit.
        let (tx, lines) = crossbeam_channel::bounded(64);
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        CliProcess {
            child,
            stdin,
            lines,
        }
    }

    /// Sends one command line and returns the JSON line it printed.
    fn run(&mut self, line: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the client");
        stdin.flush().expect("flush");
        let out = self
            .lines
            .recv_timeout(REPLY_LIMIT)
            .unwrap_or_else(|e| panic!("no output for {line:?}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
    }

    /// Sends the last lines, closes stdin and returns the exit status.
    fn finish(mut self, last: &str) -> std::process::ExitStatus {
        if let Some(mut stdin) = self.stdin.take() {
            stdin
                .write_all(last.as_bytes())
                .expect("write to the client");
        }
        self.child.wait().expect("wait for the client")
    }
}

fn without_xid(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("xid");
    }
    v
}

/// A session by short forms: every reply is `NFS4_OK`, the read returns
/// what was written, and `resend` gets WRITE's cached reply without
/// writing again (the file, changed locally in between, keeps the change).
#[test]
fn the_scriptable_client_drives_a_session() {
    let s = Scratch::new("nfs-cli");
    let _d = Filterd::start(&s, &[], &[]);
    let shim = Shim::start("nfsshim", &s.socket(), "nfs-cli");
    let mut cli = CliProcess::start(&shim.addr);

    let id = cli.run("exchange alice@host1");
    assert_eq!(id["status"], "NFS4_OK", "{id}");
    assert!(id["clientid"].is_string(), "{id}");
    let session = cli.run("session");
    assert_eq!(session["status"], "NFS4_OK", "{session}");
    let open = cli.run("open notes.txt create=unchecked access=both deny=write");
    assert_eq!(open["status"], "NFS4_OK", "{open}");
    assert_eq!(open["created"], true, "{open}");
    let write = cli.run("write . 0 hello");
    assert_eq!(write["status"], "NFS4_OK", "{write}");
    assert_eq!(write["count"], 5, "{write}");

    // Change the bytes behind nfsshim's back: a WRITE that ran again
    // would put "hello" back.
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.root().join("notes.txt"))
        .and_then(|mut f| f.write_all(b"HELLO"))
        .expect("local overwrite");
    let resent = cli.run("resend");
    assert_eq!(resent["status"], "NFS4_OK", "{resent}");
    assert_eq!(
        without_xid(&resent),
        without_xid(&write),
        "resend answers from the slot cache"
    );
    assert_ne!(
        resent["xid"], write["xid"],
        "under the re-sent request's xid"
    );

    let read = cli.run("read . 0 100");
    assert_eq!(read["status"], "NFS4_OK", "{read}");
    assert_eq!(read["data"], b64("HELLO"), "the WRITE ran once: {read}");
    // Raw JSON: the sequenced op gets its seq filled in.
    let reclaim = cli.run(r#"{"op": "RECLAIM_COMPLETE"}"#);
    assert_eq!(reclaim["status"], "NFS4_OK", "{reclaim}");
    let close = cli.run("close .");
    assert_eq!(close["status"], "NFS4_OK", "{close}");
    let st = cli.finish("quit\n");
    assert!(st.success(), "{st}");
    assert_eq!(
        std::fs::read(s.root().join("notes.txt")).expect("read back"),
        b"HELLO"
    );

    // A line that gets no reply (not understood, or no session) makes the
    // exit status 1.
    let cli = CliProcess::start(&shim.addr);
    let st = cli.finish("read . 0 5\nquit\n");
    assert_eq!(st.code(), Some(1), "{st}");
}
