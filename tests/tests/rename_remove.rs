//! Rename and remove: share-mode rules, and exactly once across a crash at
//! every step (intent, filesystem change, commit, reply). The "client" in
//! these tests behaves as a frontend replaying a request does: it looks up
//! the recorded reply first and executes again only when there is none.

use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};
use rkfilter_tests::{plain_open, Filterd, Scratch};

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-a").unwrap(),
    )
    .unwrap()
}

fn open_req(
    path: &str,
    access: Rights,
    share: Rights,
    dur: Durability,
    guid: Option<CreateGuid>,
) -> OpenRequest {
    OpenRequest {
        access: Access::new(access).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability: dur,
        create_guid: guid,
        ..plain_open("alice", path)
    }
}

const RWD: Rights = Rights::ALL;

#[test]
fn rename_and_remove_follow_share_modes() {
    let s = Scratch::new("rn-share");
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s);
    let a = fe
        .open(open_req("a", RWD, Rights::READ, Durability::None, None))
        .unwrap();
    // Needs delete access.
    let r = fe
        .open(open_req(
            "r",
            Rights::READ,
            Rights::ALL,
            Durability::None,
            None,
        ))
        .unwrap();
    assert_eq!(
        fe.rename(r.info.key, RelPath::new("r2").unwrap(), false, None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::AccessDenied)
    );
    // An open that does not share delete keeps a file in place: a remove
    // by path fails. (A rename by a delete-access open cannot meet one: its
    // own open would have been refused.)
    let keep = fe
        .open(open_req(
            "kept",
            Rights::READ,
            Rights::READ.union(Rights::WRITE),
            Durability::None,
            None,
        ))
        .unwrap();
    assert_eq!(
        fe.remove(RelPath::new("kept").unwrap(), None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::SharingViolation)
    );
    fe.close(keep.info.key).unwrap();
    fe.remove(RelPath::new("kept").unwrap(), None).unwrap();
    let b = fe
        .open(open_req("b", RWD, Rights::ALL, Durability::None, None))
        .unwrap();
    // Target exists: collision unless replace.
    std::fs::write(s.root().join("taken"), b"old").unwrap();
    assert_eq!(
        fe.rename(b.info.key, RelPath::new("taken").unwrap(), false, None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::Collision)
    );
    fe.rename(b.info.key, RelPath::new("taken").unwrap(), true, None)
        .unwrap();
    assert!(!s.root().join("b").exists());
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let h = ctl
        .handles()
        .unwrap()
        .into_iter()
        .find(|h| h.record.key == b.info.key)
        .unwrap();
    assert_eq!(h.record.path.as_str(), "taken");
    // Remove by path; escaping paths are refused.
    fe.close(a.info.key).unwrap();
    fe.remove(RelPath::new("a").unwrap(), None).unwrap();
    assert!(!s.root().join("a").exists());
    assert_eq!(
        fe.remove(RelPath::new("a").unwrap(), None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::NotFound)
    );
    std::os::unix::fs::symlink("/etc", s.root().join("etc")).unwrap();
    assert_eq!(
        fe.remove(RelPath::new("etc/hostname").unwrap(), None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::AccessDenied)
    );
}

const STEPS: &[&str] = &[
    "commit.before:2",
    "commit.after:2",
    "intent.after_commit",
    "intent.after_fs",
    "commit.before:3",
    "commit.after:3",
    "reply.before_send:2",
];

#[test]
fn rename_is_exactly_once_across_a_crash_at_every_step() {
    for fp in STEPS {
        let s = Scratch::new("rn-crash");
        let guid = CreateGuid(uuid::Uuid::new_v4());
        let req = || {
            open_req(
                "old",
                RWD,
                Rights::READ,
                Durability::Persistent { timeout_ms: 60_000 },
                Some(guid),
            )
        };
        let key = {
            let _d = Filterd::start(&s, &[], &[]);
            let h = frontend(&s).open(req()).unwrap();
            std::fs::write(s.root().join("old"), b"content").unwrap();
            h.info.key
        };
        let rename = |fe: &FilterClient| {
            let record = RecordSpec {
                scope: ReplayScope::Handle(key),
                op_id: 42,
                reply: "renamed".into(),
                keep: 64,
            };
            fe.rename(key, RelPath::new("new").unwrap(), false, Some(record))
        };
        // Commit 1 in this daemon is the reattach; the rename's intent is 2.
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let fe = frontend(&s);
        fe.replay_open(req()).unwrap();
        let first = rename(&fe);
        assert!(
            first.is_err(),
            "{fp}: filterd dies before the answer: {first:?}"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        drop(fe);
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        fe.replay_open(req()).unwrap();
        // The client replays: recorded reply, else execute again.
        match fe.lookup_reply(ReplayScope::Handle(key), 42).unwrap() {
            Some(r) => assert_eq!(r.reply, "renamed", "{fp}"),
            None => rename(&fe).unwrap_or_else(|e| panic!("{fp}: re-executed rename failed: {e}")),
        }
        assert_eq!(
            std::fs::read(s.root().join("new")).unwrap(),
            b"content",
            "{fp}"
        );
        assert!(!s.root().join("old").exists(), "{fp}");
        let ctl = FilterClient::connect_control(&s.socket()).unwrap();
        let h = ctl
            .handles()
            .unwrap()
            .into_iter()
            .find(|h| h.record.key == key)
            .unwrap();
        assert_eq!(
            h.record.path.as_str(),
            "new",
            "{fp}: store and filesystem agree"
        );
        assert!(
            fe.lookup_reply(ReplayScope::Handle(key), 42)
                .unwrap()
                .is_some(),
            "{fp}: recorded"
        );
    }
}

#[test]
fn remove_is_exactly_once_across_a_crash_at_every_step() {
    // No reattach here: the intent is commit 1, the final commit 2.
    for fp in [
        "commit.before",
        "commit.after",
        "intent.after_commit",
        "intent.after_fs",
        "commit.before:2",
        "commit.after:2",
        "reply.before_send",
    ] {
        let s = Scratch::new("rm-crash");
        std::fs::write(s.root().join("victim"), b"x").unwrap();
        let scope = ReplayScope::Session(ScopeName::new("sess-1/slot-0").unwrap());
        let remove = |fe: &FilterClient| {
            let record = RecordSpec {
                scope: scope.clone(),
                op_id: 7,
                reply: "NFS4_OK".into(),
                keep: 1,
            };
            fe.remove(RelPath::new("victim").unwrap(), Some(record))
        };
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let first = remove(&frontend(&s));
        assert!(
            first.is_err(),
            "{fp}: filterd dies before the answer: {first:?}"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        match fe.lookup_reply(scope.clone(), 7).unwrap() {
            Some(r) => assert_eq!(r.reply, "NFS4_OK", "{fp}"),
            None => remove(&fe).unwrap_or_else(|e| panic!("{fp}: re-executed remove failed: {e}")),
        }
        assert!(!s.root().join("victim").exists(), "{fp}");
        assert!(fe.lookup_reply(scope.clone(), 7).unwrap().is_some(), "{fp}");
    }
}

#[test]
fn end_of_file_is_exactly_once_across_a_crash_at_every_step() {
    for fp in STEPS {
        let s = Scratch::new("eof-crash");
        let guid = CreateGuid(uuid::Uuid::new_v4());
        let req = || {
            open_req(
                "f",
                RWD,
                Rights::READ,
                Durability::Persistent { timeout_ms: 60_000 },
                Some(guid),
            )
        };
        let key = {
            let _d = Filterd::start(&s, &[], &[]);
            let h = frontend(&s).open(req()).unwrap();
            std::fs::write(s.root().join("f"), b"0123456789").unwrap();
            h.info.key
        };
        let truncate = |fe: &FilterClient| {
            let record = RecordSpec {
                scope: ReplayScope::Handle(key),
                op_id: 9,
                reply: "eof set".into(),
                keep: 64,
            };
            fe.set_end_of_file(key, 4, Some(record))
        };
        let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", fp)]);
        let fe = frontend(&s);
        fe.replay_open(req()).unwrap();
        let first = truncate(&fe);
        assert!(
            first.is_err(),
            "{fp}: filterd dies before the answer: {first:?}"
        );
        d.wait_killed_at(fp, Duration::from_secs(10));
        drop(fe);
        let _d2 = Filterd::start(&s, &[], &[]);
        let fe = frontend(&s);
        fe.replay_open(req()).unwrap();
        let done = fe.lookup_reply(ReplayScope::Handle(key), 9).unwrap();
        match done {
            Some(r) => assert_eq!(r.reply, "eof set", "{fp}"),
            None => truncate(&fe)
                .unwrap_or_else(|e| panic!("{fp}: re-executed end-of-file failed: {e}")),
        }
        assert_eq!(std::fs::read(s.root().join("f")).unwrap(), b"0123", "{fp}");
        assert!(
            fe.lookup_reply(ReplayScope::Handle(key), 9)
                .unwrap()
                .is_some(),
            "{fp}"
        );
        // Access rules: a read-only open may not set the end of file.
        let ro = fe
            .open(open_req(
                "f",
                Rights::READ,
                Rights::ALL,
                Durability::None,
                None,
            ))
            .unwrap();
        assert_eq!(
            fe.set_end_of_file(ro.info.key, 0, None).unwrap_err().code(),
            Some(ErrorCode::AccessDenied)
        );
    }
}
