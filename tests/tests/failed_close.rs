//! A CLOSE whose commit fails (failpoint `commit.before:N:fail`) is
//! undone in filterd: the handle is back, attached to smbshim. smbshim must
//! keep the open too, so the client, told the CLOSE failed, can close it
//! again (or go on using it). Before the fix smbshim had forgotten the open
//! when it sent the close: a retried CLOSE got STATUS_FILE_CLOSED (a client
//! takes that as closed) while filterd still held the handle, its share
//! mode and its record, for as long as smbshim stayed attached.

use rkfilter_tests::{handle_paths, smb_persistent_create, smb_session, Filterd, Scratch, Shim};
use serde_json::json;

#[test]
fn a_close_whose_commit_fails_leaves_the_open_usable_and_closable() {
    let s = Scratch::new("failed-close");
    // Commit 1 records the create; commit 2 is the close's.
    let d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "commit.before:2:fail")]);
    let smb = Shim::start("smbshim", d.socket(), "smb-fc");
    let (mut c, sid) = smb_session(&smb.addr);
    let r = smb_persistent_create(&mut c, sid, "f");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let fid = r["file_id"].clone();

    let r = c.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_ne!(
        r["status"], "STATUS_SUCCESS",
        "the close's commit failed: {r}"
    );
    assert_eq!(handle_paths(d.socket()), ["f"], "filterd undid the close");

    // The open is still the client's: it writes through it, and a second
    // CLOSE closes it for good.
    let r = c.call(
        json!({"cmd": "WRITE", "session_id": sid, "file_id": fid, "offset": 0,
                          "data": "ZGF0YQ==", "op_id": 1}),
    );
    assert_eq!(
        r["status"], "STATUS_SUCCESS",
        "a write after the failed close: {r}"
    );
    let r = c.call(json!({"cmd": "CLOSE", "session_id": sid, "file_id": fid}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "the retried close: {r}");
    assert!(handle_paths(d.socket()).is_empty(), "closed in filterd too");
    assert_eq!(std::fs::read(s.root().join("f")).expect("f"), b"data");
}
