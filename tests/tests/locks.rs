//! Byte-range locks end to end: conflicts across frontends, mandatory I/O
//! checks, OFD locks visible to local processes, lock-sequence replay, and
//! locks surviving a filterd kill -9.

// struct flock's constants are small c_shorts.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsFd;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::locks::{LockKind, LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};
use rkfilter_tests::{plain_open, Filterd, Scratch};

fn frontend(s: &Scratch, proto: &str, inst: &str) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new(proto).unwrap(),
        InstanceName::new(inst).unwrap(),
    )
    .unwrap()
}

fn open(
    fe: &FilterClient,
    client: &str,
    access: Rights,
    dur: Durability,
    guid: Option<CreateGuid>,
) -> libfilter::client::OpenedHandle {
    fe.open(open_request(client, access, dur, guid, Disposition::OpenIf))
        .unwrap()
}

/// An open of "f" sharing everything.
fn open_request(
    client: &str,
    access: Rights,
    dur: Durability,
    guid: Option<CreateGuid>,
    disposition: Disposition,
) -> OpenRequest {
    OpenRequest {
        access: Access::new(access).unwrap(),
        disposition,
        durability: dur,
        create_guid: guid,
        ..plain_open(client, "f")
    }
}

/// filterd with a 100-byte "f", a frontend with lock hints holding a
/// handle of it (the writer), and one without hints (the changer, which
/// checks all its I/O: only the writer is waited for).
fn writer_and_changer(
    name: &str,
) -> (
    Scratch,
    Filterd,
    FilterClient,
    libfilter::client::OpenedHandle,
    FilterClient,
) {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &["--break-timeout-ms", "20000"], &[]);
    std::fs::write(s.root().join("f"), [b'x'; 100]).unwrap();
    let writer = FilterClient::connect_frontend_with(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-w").unwrap(),
        libfilter::proto::FEATURE_LOCK_HINTS,
    )
    .unwrap();
    let w = open(&writer, "carol", RW, Durability::None, None);
    let changer = FilterClient::connect_frontend_with(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-c").unwrap(),
        0,
    )
    .unwrap();
    (s, d, writer, w, changer)
}

fn op(offset: u64, length: u64, exclusive: bool, unlock: bool) -> LockOp {
    LockOp {
        range: LockRange { offset, length },
        exclusive,
        unlock,
    }
}

/// "f" opened read-write by a local process: an open file description of
/// its own.
fn local_open(s: &Scratch) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.root().join("f"))
        .unwrap()
}

/// An fcntl write lock of `[offset, offset+len)`.
fn write_lock(offset: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: offset,
        l_len: len,
        l_pid: 0,
    }
}

/// What a local process's F_OFD_GETLK says about `[offset, offset+len)`
/// for a write lock: the type of the conflicting lock, or F_UNLCK.
fn local_getlk(s: &Scratch, offset: i64, len: i64) -> i16 {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut fl = write_lock(offset, len);
    fcntl(local_open(s).as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).unwrap();
    fl.l_type
}

const RW: Rights = Rights::READ.union(Rights::WRITE);

#[test]
fn locks_conflict_across_frontends_and_gate_io() {
    let s = Scratch::new("locks");
    let _d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s, "smb", "smb-1");
    let nfs = frontend(&s, "nfs", "nfs-1");
    let a = open(&smb, "alice", Rights::READ, Durability::None, None);
    let b = open(&nfs, "bob", RW, Durability::None, None);
    let (ka, kb) = (a.info.key, b.info.key);
    // A read-only open may take an exclusive lock (LockFileEx).
    smb.lock(ka, vec![op(0, 10, true, false)], None).unwrap();
    let e = nfs
        .lock(kb, vec![op(5, 1, false, false)], None)
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LockNotGranted));
    match e {
        libfilter::client::ClientError::Refused(w) => {
            let c = w.conflict.expect("conflict detail");
            assert_eq!(
                (c.key, c.range.offset, c.range.length, c.kind),
                (ka, 0, 10, LockKind::Exclusive)
            );
        }
        other => panic!("{other:?}"),
    }
    // Exclusive over own exclusive: refused too.
    assert_eq!(
        smb.lock(ka, vec![op(5, 10, true, false)], None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::LockNotGranted)
    );
    // Mandatory I/O among protocol clients.
    let r = LockRange {
        offset: 3,
        length: 2,
    };
    assert_eq!(
        nfs.check_io(kb, r, false).unwrap_err().code(),
        Some(ErrorCode::LockConflict)
    );
    assert_eq!(
        nfs.check_io(kb, r, true).unwrap_err().code(),
        Some(ErrorCode::LockConflict)
    );
    drop(smb.check_io(ka, r, true).unwrap());
    drop(
        nfs.check_io(
            kb,
            LockRange {
                offset: 10,
                length: 5,
            },
            true,
        )
        .unwrap(),
    );
    // All or nothing: the second element conflicts, the first is not kept.
    assert!(nfs
        .lock(
            kb,
            vec![op(20, 5, true, false), op(9, 1, false, false)],
            None
        )
        .is_err());
    smb.lock(ka, vec![op(20, 5, true, false)], None).unwrap();
    smb.lock(ka, vec![op(20, 5, true, true)], None).unwrap();
    // Unlocking what is not locked.
    assert_eq!(
        nfs.lock(kb, vec![op(0, 10, false, true)], None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::RangeNotLocked)
    );
    assert_eq!(
        smb.lock(ka, vec![op(0, 5, false, true)], None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::RangeNotLocked)
    );
    // filterctl-visible listing.
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(ctl.locks().unwrap().len(), 1);
    let out =
        rkfilter_tests::filterctl(&["--socket", s.socket().to_str().unwrap(), "locks", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    assert_eq!(v[0]["offset"], 0);
    assert_eq!(v[0]["length"], 10);
    assert_eq!(v[0]["kind"], "exclusive");
    // Closing the handle releases its locks.
    smb.close(ka).unwrap();
    nfs.lock(kb, vec![op(5, 1, true, false)], None).unwrap();
    assert_eq!(ctl.locks().unwrap().len(), 1);
}

#[test]
fn local_processes_see_protocol_locks_and_protocol_sees_theirs() {
    let s = Scratch::new("ofd");
    let _d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s, "smb", "smb-1");
    let a = open(&smb, "alice", RW, Durability::None, None);
    assert_eq!(local_getlk(&s, 0, 100), libc::F_UNLCK as i16);
    smb.lock(a.info.key, vec![op(10, 10, true, false)], None)
        .unwrap();
    assert_eq!(
        local_getlk(&s, 15, 1),
        libc::F_WRLCK as i16,
        "local F_OFD_GETLK sees the exclusive lock"
    );
    assert_eq!(
        local_getlk(&s, 20, 5),
        libc::F_UNLCK as i16,
        "and nothing beyond it"
    );
    smb.lock(
        a.info.key,
        vec![op(10, 10, true, true), op(30, 5, false, false)],
        None,
    )
    .unwrap();
    assert_eq!(local_getlk(&s, 15, 1), libc::F_UNLCK as i16);
    assert_eq!(
        local_getlk(&s, 30, 1),
        libc::F_RDLCK as i16,
        "a shared lock shows as a read lock"
    );
    // A local process holding an fcntl write lock keeps a protocol lock out.
    use nix::fcntl::{fcntl, FcntlArg};
    let local = local_open(&s);
    let fl = write_lock(100, 10);
    fcntl(local.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    let e = smb
        .lock(a.info.key, vec![op(105, 1, true, false)], None)
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LockNotGranted));
    // ... and the refused lock left nothing behind, the earlier one intact.
    assert_eq!(local_getlk(&s, 30, 1), libc::F_RDLCK as i16);
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(ctl.locks().unwrap().len(), 1);
    drop(local);
    smb.lock(a.info.key, vec![op(105, 1, true, false)], None)
        .unwrap();
}

/// Review: a lock may end anywhere up to 2^64, but the kernel refuses an
/// OFD lock ending past the largest file offset (`EOVERFLOW`), and such a
/// valid LOCK was refused as an internal error. It is granted, and local
/// processes see it from its first byte on.
#[test]
fn a_lock_ending_past_the_largest_file_offset_is_granted_and_seen_locally() {
    let s = Scratch::new("ofd-far");
    let _d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s, "smb", "smb-1");
    let a = open(&smb, "alice", RW, Durability::None, None);
    smb.lock(a.info.key, vec![op(100, (1 << 63) - 1, true, false)], None)
        .unwrap();
    assert_eq!(local_getlk(&s, 100, 1), libc::F_WRLCK as i16);
    assert_eq!(local_getlk(&s, i64::MAX, 1), libc::F_WRLCK as i16);
    assert_eq!(local_getlk(&s, 99, 1), libc::F_UNLCK as i16);
}

/// Review: each LOCK re-mirrored the handle's OFD locks by releasing them
/// all first, so a local process waiting for a range the handle held
/// exclusively took it when the handle locked an unrelated range; the
/// LOCK was refused and the range stayed the local process's. A waiter
/// gets the range only once the handle unlocks it.
#[test]
fn a_local_waiter_gets_a_held_range_only_when_it_is_unlocked() {
    use nix::fcntl::{fcntl, FcntlArg};
    let s = Scratch::new("ofd-waiter");
    let _d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s, "smb", "smb-1");
    let a = open(&smb, "alice", RW, Durability::None, None);
    smb.lock(a.info.key, vec![op(0, 100, true, false)], None)
        .unwrap();
    let local = local_open(&s);
    let (took, taken) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let fl = write_lock(0, 100);
        fcntl(local.as_fd(), FcntlArg::F_OFD_SETLKW(&fl)).unwrap();
        took.send(()).unwrap();
        local // its lock goes with it
    });
    // A blocked waiter shows in /proc/locks as "->", with the file's inode.
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(s.root().join("f")).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("-> OFDLCK") && l.contains(&format!(":{ino} ")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never blocked"
        );
        std::thread::yield_now();
    }
    for i in 0..50 {
        smb.lock(a.info.key, vec![op(200 + 10 * i, 5, true, false)], None)
            .unwrap();
        assert!(taken.try_recv().is_err(), "the waiter took a held range");
    }
    smb.lock(a.info.key, vec![op(0, 100, true, true)], None)
        .unwrap();
    taken.recv_timeout(Duration::from_secs(10)).unwrap();
    drop(waiter.join().unwrap());
}

#[test]
fn lock_sequence_replays_and_locks_survive_kill9() {
    let s = Scratch::new("lockseq");
    let mut d = Filterd::start(&s, &[], &[]);
    let guid = CreateGuid(uuid::Uuid::new_v4());
    let smb = frontend(&s, "smb", "smb-1");
    let h = open(
        &smb,
        "alice",
        RW,
        Durability::Persistent { timeout_ms: 60_000 },
        Some(guid),
    );
    let key = h.info.key;
    let seq = Some(LockSequence {
        number: 3,
        index: 1,
    });
    smb.lock(key, vec![op(0, 100, true, false)], seq).unwrap();
    // The same sequence again is a replay: success, nothing applied.
    smb.lock(key, vec![op(0, 100, true, false)], seq).unwrap();
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(ctl.locks().unwrap().len(), 1, "the replay applied nothing");
    drop(ctl);
    // Unlock-by-replay also applies nothing: same entry, same number.
    smb.lock(key, vec![op(0, 100, true, true)], seq).unwrap();
    assert_eq!(local_getlk(&s, 50, 1), libc::F_WRLCK as i16);
    d.kill9();
    drop(smb);
    let _d2 = Filterd::start(&s, &[], &[]);
    // Before any client is back, the lock is re-taken: local processes see
    // it, other protocol clients are kept out.
    assert_eq!(
        local_getlk(&s, 50, 1),
        libc::F_WRLCK as i16,
        "OFD lock re-taken after restart"
    );
    let smb = frontend(&s, "smb", "smb-1");
    let nfs = frontend(&s, "nfs", "nfs-1");
    let b = open(&nfs, "bob", RW, Durability::None, None);
    assert_eq!(
        nfs.lock(b.info.key, vec![op(10, 1, false, false)], None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::LockNotGranted)
    );
    // The client reconnects and replays its lock: recognised after failover.
    let h = smb
        .replay_open(OpenRequest {
            access: Access::new(RW).unwrap(),
            disposition: Disposition::OpenIf,
            durability: Durability::Persistent { timeout_ms: 60_000 },
            create_guid: Some(guid),
            ..plain_open("alice", "f")
        })
        .unwrap();
    assert_eq!(h.info.key, key);
    smb.lock(key, vec![op(0, 100, true, false)], seq).unwrap();
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    assert_eq!(ctl.locks().unwrap().len(), 1);
    // A new sequence number on the same index executes.
    smb.lock(
        key,
        vec![op(0, 100, true, true)],
        Some(LockSequence {
            number: 4,
            index: 1,
        }),
    )
    .unwrap();
    assert!(ctl.locks().unwrap().is_empty());
    rkfilter_tests::wait_for("OFD lock released", Duration::from_secs(5), || {
        (local_getlk(&s, 50, 1) == libc::F_UNLCK as i16).then_some(())
    });
}

/// A frontend that does not acknowledge a first-lock hint in time is
/// treated as failed — dropped, its handles detached — never bypassed: it
/// cannot go on doing unchecked I/O on a file that now has a lock.
#[test]
fn a_frontend_that_ignores_a_lock_hint_is_dropped_not_bypassed() {
    let s = Scratch::new("lock-hint-deaf");
    let _d = Filterd::start(&s, &["--break-timeout-ms", "500"], &[]);
    let deaf = FilterClient::connect_frontend_with(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-deaf").unwrap(),
        libfilter::proto::FEATURE_LOCK_HINTS,
    )
    .unwrap();
    assert_ne!(
        deaf.hello().features & libfilter::proto::FEATURE_LOCK_HINTS,
        0,
        "hints granted"
    );
    let _h = open(
        &deaf,
        "carol",
        Rights::READ.union(Rights::WRITE),
        Durability::Durable { timeout_ms: 60_000 },
        None,
    );
    let locker = frontend(&s, "smb", "smb-l");
    let l = open(
        &locker,
        "alice",
        Rights::READ.union(Rights::WRITE),
        Durability::None,
        None,
    );
    // The deaf frontend never acknowledges LocksPresent.
    locker
        .lock(l.info.key, vec![op(0, 10, true, false)], None)
        .expect("the lock proceeds once the deaf frontend is dropped");
    rkfilter_tests::wait_for(
        "the deaf frontend to be dropped",
        Duration::from_secs(5),
        || deaf.is_dead().then_some(()),
    );
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let st = ctl.stats().unwrap();
    assert_eq!(st.frontends_dropped, 1, "{st:?}");
    let hs = ctl.handles().unwrap();
    let carol = hs
        .iter()
        .find(|h| h.record.client.as_str() == "carol")
        .expect("carol's durable handle stays, detached");
    assert!(
        matches!(carol.record.conn, ConnState::Disconnected { .. }),
        "{carol:?}"
    );
}

/// A local process took a conflicting lock while filterd was down: recovery
/// cannot mirror the recovered protocol lock as an OFD lock. filterctl says
/// so, and filterd keeps trying: once the local locker lets go, local
/// processes see the protocol lock again (it used to be given up for good).
#[test]
fn a_lock_recovery_could_not_mirror_is_retried() {
    use nix::fcntl::{fcntl, FcntlArg};
    let s = Scratch::new("lock-unmirrored");
    let mut d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb", "smb-a");
    let h = open(
        &fe,
        "alice",
        RW,
        Durability::Persistent { timeout_ms: 60_000 },
        Some(CreateGuid(uuid::Uuid::new_v4())),
    );
    fe.lock(h.info.key, vec![op(0, 10, true, false)], None)
        .unwrap();
    d.kill9();
    drop(fe);
    // A local process locks the same range while filterd is down.
    let local = local_open(&s);
    let fl = write_lock(0, 10);
    fcntl(local.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let locks = d.control().locks().unwrap();
    assert_eq!(locks.len(), 1);
    assert!(
        locks[0].unmirrored,
        "filterctl shows the lock is not mirrored: {locks:?}"
    );
    // The local locker lets go: filterd takes the mirror.
    drop(local);
    rkfilter_tests::wait_for("the mirror to be taken", Duration::from_secs(10), || {
        (local_getlk(&s, 0, 10) == libc::F_WRLCK as i16).then_some(())
    });
    assert!(!d.control().locks().unwrap()[0].unmirrored);
}

/// The writer is told the file's size is about to change; the change
/// (its answer on `rx`) waits — "f" keeps its 100 bytes — until the writer
/// acknowledges (its intent would take the stamp of a file the writer may
/// still be writing unchecked); then it is answered.
fn held_until_the_writer_acknowledges<T>(
    s: &Scratch,
    writer: &FilterClient,
    w: &libfilter::client::OpenedHandle,
    rx: &std::sync::mpsc::Receiver<T>,
) -> T {
    let file = match writer.events().recv_timeout(Duration::from_secs(10)) {
        Ok(libfilter::proto::Event::LocksPresent { file }) => file,
        other => panic!("the writer is told to check its I/O first: {other:?}"),
    };
    assert_eq!(file, w.info.file);
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the size change went on before the writer acknowledged the hint"
    );
    assert_eq!(
        std::fs::metadata(s.root().join("f")).unwrap().len(),
        100,
        "not changed before the acknowledgement"
    );
    writer.lock_hint_ack(file).unwrap();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the size change is answered once acknowledged")
}

/// A bracketed end-of-file change waits until every other frontend with a
/// handle of the file has acknowledged `LocksPresent` before it takes the
/// file's stamp and commits its intent: a frontend's unchecked WRITE
/// decided before the hint reached it must land before the stamp, or a
/// crash during the change leaves recovery "outcome unknown" for a change
/// never made (`end_of_file_with_a_concurrent_write_from_another_frontend_at_every_failpoint`
/// in crash_matrix.rs is the end-to-end case, which loses that race only
/// sometimes).
#[test]
fn a_size_change_waits_for_the_other_frontends_to_hear_of_it() {
    let (s, _d, writer, w, changer) = writer_and_changer("size-hint");
    let c = open(
        &changer,
        "alice",
        RW,
        Durability::Persistent { timeout_ms: 60_000 },
        Some(CreateGuid(uuid::Uuid::new_v4())),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let key = c.info.key;
    std::thread::spawn(move || {
        let _ = tx.send(changer.set_end_of_file(key, 10, None));
    });
    let r = held_until_the_writer_acknowledges(&s, &writer, &w, &rx);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(std::fs::metadata(s.root().join("f")).unwrap().len(), 10);
}

/// A truncating open (overwrite) with a persistent handle is a bracketed
/// size change too: it waits before its intent, as an end-of-file change
/// does, until the other frontends with handles of the file acknowledged
/// the hint. Old code: it truncated at once, telling nobody (review sG).
#[test]
fn a_truncating_open_waits_for_the_other_frontends_to_hear_of_it() {
    let (s, _d, writer, w, changer) = writer_and_changer("truncate-hint");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(changer.open(open_request(
            "alice",
            RW,
            Durability::Persistent { timeout_ms: 60_000 },
            Some(CreateGuid(uuid::Uuid::new_v4())),
            Disposition::Overwrite,
        )));
    });
    let r = held_until_the_writer_acknowledges(&s, &writer, &w, &rx);
    let h = r.expect("the truncating open");
    assert_eq!(h.info.create_action, CreateAction::Overwritten);
    assert_eq!(std::fs::metadata(s.root().join("f")).unwrap().len(), 0);
}

/// Review xB (round 12, the lock descriptor kept until the unlock of a
/// handle's last lock is durable): the kept descriptor holds no lock a
/// local process sees — the unlocked range is free as soon as the unlock
/// is answered — and does not outlive its handle, persistent or not.
#[test]
fn a_kept_lock_descriptor_holds_no_lock_and_goes_with_its_handle() {
    let s = Scratch::new("ofd-kept");
    let d = Filterd::start(&s, &[], &[]);
    let smb = frontend(&s, "smb", "smb-1");
    let f = s.root().join("f");
    let filterd_holds_f = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == f))
            .count()
    };
    for dur in [
        Durability::None,
        Durability::Persistent { timeout_ms: 60_000 },
    ] {
        for round in 0..10 {
            let a = open(&smb, "alice", RW, dur, None);
            smb.lock(a.info.key, vec![op(0, 100, true, false)], None)
                .unwrap();
            assert_eq!(local_getlk(&s, 50, 1), libc::F_WRLCK as i16);
            smb.lock(a.info.key, vec![op(0, 100, true, true)], None)
                .unwrap();
            assert_eq!(
                local_getlk(&s, 0, 0),
                libc::F_UNLCK as i16,
                "{dur:?} round {round}: the unlocked range is free at once"
            );
            smb.close(a.info.key).unwrap();
            rkfilter_tests::wait_for(
                "filterd to let go of the closed handle's file",
                Duration::from_secs(10),
                || (filterd_holds_f() == 0).then_some(()),
            );
        }
    }
}
