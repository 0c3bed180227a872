//! Cross-protocol: persistent handles a real SMB 3 client (smbprotocol)
//! opened through rksmbd hold against an nfsl/1 client of nfsshim on the
//! same filterd and against local processes (fanotify on, the export its
//! own tmpfs mount; root only — CI is root), and a local open breaks a
//! lease the SMB client holds: the client sees the LEASE_BREAK, and the
//! local open goes on once it acknowledges.

use std::time::Duration;

use rkfilter_tests::smb3::Dialogue;
use rkfilter_tests::{Filterd, Nfs, RkSmbd, Scratch, Shim};
use serde_json::json;

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
    let d = Filterd::start_mediated(&s, &[]);
    let srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "pw")]);
    let nfsshim = Shim::start("nfsshim", &s.socket(), "nfs-1");
    let mut script = Dialogue::start(&srv, "cross_protocol.py", Duration::from_secs(120));
    script.expect("opened");
    let root = s.root();

    // locked.txt (shared with nobody): an NFS client's OPEN is refused,
    // for writing and for reading; so is a local writer (and any local
    // open: a local process counts as a reader).
    let mut nfs = Nfs::connect(&nfsshim.addr, "host-b", "00000000000000bb");
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "write"),
        "NFS4ERR_SHARE_DENIED",
        "{}",
        script.log
    );
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "read"),
        "NFS4ERR_SHARE_DENIED",
        "{}",
        script.log
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
        let l = script.expect("break ");
        if l.starts_with("break shared.txt") {
            break l;
        }
    };
    assert!(
        brk.ends_with(" RWH RH"),
        "write caching broken, read and handle caching kept: {brk}\n{}",
        script.log
    );
    script.expect("acked shared.txt");
    let read = local
        .recv_timeout(Duration::from_secs(30))
        .expect("the local reader goes on after the acknowledgement")
        .expect("the local reader is let in");
    assert_eq!(read, "shared.txt written through rksmbd\n");
    // An NFS writer of it is refused (after its handle caching is broken).
    assert_eq!(
        nfs_open(&mut nfs, "b", "shared.txt", "write"),
        "NFS4ERR_SHARE_DENIED",
        "{}",
        script.log
    );
    assert!(
        !script.log.contains("FAILED"),
        "the script reported a failure:\n{}",
        script.log
    );

    // The client closes its handles: the files are everyone's again.
    script.say("done");
    script.finish();
    rkfilter_tests::smb3::no_handles_left(&d);
    assert_eq!(
        std::fs::read_to_string(root.join("locked.txt")).unwrap(),
        "locked.txt written through rksmbd\n"
    );
    assert_eq!(
        nfs_open(&mut nfs, "b", "locked.txt", "write"),
        "NFS4_OK",
        "{}",
        script.log
    );
}
