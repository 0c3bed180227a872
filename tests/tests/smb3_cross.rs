//! Cross-protocol: persistent handles a real SMB 3 client (smbprotocol)
//! opened through rksmbd hold against an nfsl/1 client of nfsshim on the
//! same filterd and against local processes (fanotify on, the export its
//! own tmpfs mount; root only — CI is root), and a local open breaks a
//! lease the SMB client holds: the client sees the LEASE_BREAK, and the
//! local open goes on once it acknowledges.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rkfilter_tests::smb3::{script, smbprotocol_python};
use rkfilter_tests::{Filterd, Nfs, RkSmbd, Scratch, Shim};
use serde_json::json;

/// The script's stdout lines, from a reader thread.
fn lines(out: std::process::ChildStdout) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line starting with `prefix`, returning it and everything
/// the script printed so far (for failure messages).
fn expect_line(rx: &Receiver<String>, log: &mut String, prefix: &str) -> String {
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.starts_with(prefix) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("no {prefix:?} line in 30 s:\n{log}"),
            Err(RecvTimeoutError::Disconnected) => panic!("script ended before {prefix:?}:\n{log}"),
        }
    }
}

/// An nfsl/1 OPEN, re-sent while nfsshim answers NFS4ERR_DELAY (as while
/// the SMB client's lease is being broken).
fn nfs_open(c: &mut Nfs, owner: &str, path: &str, access: &str) -> String {
    let r = c.call_patiently(json!({
        "op": "OPEN", "owner": owner, "path": path, "access": access, "deny": "none"
    }));
    r["status"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn persistent_smb3_handles_hold_against_nfs_and_local_processes() {
    let Some(s) = Scratch::with_tmpfs("smb3-cross") else {
        return;
    };
    let python = smbprotocol_python();
    let d = Filterd::start_mediated(&s, &[]);
    let srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "pw")]);
    let nfsshim = Shim::start("nfsshim", &s.socket(), "nfs-1");
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(&python)
        .arg(script("cross_protocol.py"))
        .args(["127.0.0.1", &srv.port(), "data", "alice", "pw"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the smbprotocol script");
    let rx = lines(child.stdout.take().expect("stdout"));
    let mut log = String::new();
    expect_line(&rx, &mut log, "opened");
    let root = s.root();

    // locked.txt (shared with nobody): an NFS client's OPEN is refused,
    // for writing and for reading; so is a local writer (and any local
    // open: a local process counts as a reader).
    let mut nfs = Nfs::connect(&nfsshim.addr, "host-b", "00000000000000bb");
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "write"),
        "NFS4ERR_SHARE_DENIED",
        "{log}"
    );
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "read"),
        "NFS4ERR_SHARE_DENIED",
        "{log}"
    );
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("locked.txt"))
        .expect_err("a local writer of locked.txt is refused");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");

    // shared.txt (shared for reading): a local reader breaks the lease's
    // write caching — the SMB client sees the LEASE_BREAK and
    // acknowledges — then reads what the client wrote.
    let (tx, local) = crossbeam_channel::bounded(1);
    let path = root.join("shared.txt");
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(path));
    });
    let brk = loop {
        let l = expect_line(&rx, &mut log, "break ");
        if l.starts_with("break shared.txt") {
            break l;
        }
    };
    assert!(
        brk.ends_with(" RWH RH"),
        "write caching broken, read and handle caching kept: {brk}\n{log}"
    );
    expect_line(&rx, &mut log, "acked shared.txt");
    let read = local
        .recv_timeout(Duration::from_secs(30))
        .expect("the local reader goes on after the acknowledgement")
        .expect("the local reader is let in");
    assert_eq!(read, "shared.txt written through rksmbd\n");
    // An NFS writer of it is refused (after its handle caching is broken).
    assert_eq!(
        nfs_open(&mut nfs, "b", "shared.txt", "write"),
        "NFS4ERR_SHARE_DENIED",
        "{log}"
    );
    assert!(
        !log.contains("FAILED"),
        "the script reported a failure:\n{log}"
    );

    // The client closes its handles: the files are everyone's again.
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "done").expect("tell the script to finish");
    drop(stdin);
    expect_line(&rx, &mut log, "PASS");
    let o = child.wait_with_output().expect("script exit");
    assert!(
        o.status.success(),
        "{log}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    rkfilter_tests::smb3::no_handles_left(&d);
    assert_eq!(
        std::fs::read_to_string(root.join("locked.txt")).unwrap(),
        "locked.txt written through rksmbd\n"
    );
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "write"),
        "NFS4_OK",
        "{log}"
    );
}
