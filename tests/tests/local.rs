//! Local access through fanotify, on a tmpfs export (root only; CI is root):
//! share modes refuse local opens, local opens break caching leases, files
//! without protocol state are not gated, and filterd refuses fanotify on a
//! root that is not a mount point.

use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::*;
use libfilter::proto::{Event, OpenRequest, Reply, Request};
use rkfilter_tests::{Filterd, Scratch};

fn frontend(s: &Scratch) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-1").unwrap(),
    )
    .unwrap()
}

fn req(path: &str, share: Rights, lease: Option<(LeaseKey, &str)>) -> OpenRequest {
    OpenRequest {
        client: ClientId::new("alice").unwrap(),
        path: RelPath::new(path).unwrap(),
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability: Durability::None,
        create_guid: None,
        owner: None,
        lease: lease.map(|(key, s)| LeaseRequest {
            key,
            state: LeaseState::parse(s).unwrap(),
        }),
        no_wait: false,
        share_group: None,
    }
}

/// A local open in another thread, with its outcome on the receiver.
fn local_open(path: std::path::PathBuf) -> crossbeam_channel::Receiver<std::io::Result<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(path).map(|_| ()));
    });
    rx
}

#[test]
fn fanotify_needs_the_root_to_be_a_mount_point() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: fanotify needs root");
        return;
    }
    let s = Scratch::new("fan-nomount");
    let mut d = Filterd::spawn_mediated(&s);
    let st = d.wait_exit(Duration::from_secs(10));
    assert!(!st.success());
    let log = d.log_text();
    assert!(
        log.contains("not a mount point") && log.contains("mount --bind"),
        "{log}"
    );
}

#[test]
fn share_modes_refuse_local_opens_until_closed() {
    let Some(s) = Scratch::with_tmpfs("fan-share") else {
        return;
    };
    let _d = Filterd::start_mediated(&s, &[]);
    std::fs::write(s.root().join("free"), b"x").unwrap();
    let fe = frontend(&s);
    let h = fe.open(req("locked", Rights::NONE, None)).unwrap();
    let e = std::fs::File::open(s.root().join("locked")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    // A file without protocol state is not gated (and is then ignored).
    std::fs::File::open(s.root().join("free")).unwrap();
    std::fs::File::open(s.root().join("free")).unwrap();
    // Share read lets local readers in.
    let h2 = fe.open(req("shared", Rights::READ, None)).unwrap();
    std::fs::File::open(s.root().join("shared")).unwrap();
    fe.close(h.info.key).unwrap();
    std::fs::File::open(s.root().join("locked")).unwrap();
    // A file that was ignored gets gated again once protocol state appears.
    let h3 = fe.open(req("free", Rights::NONE, None)).unwrap();
    assert_eq!(
        std::fs::File::open(s.root().join("free"))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::PermissionDenied
    );
    fe.close(h3.info.key).unwrap();
    fe.close(h2.info.key).unwrap();
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    match ctl.call(Request::Stats).unwrap().0 {
        Reply::Stats(st) => assert!(
            st.local_opens_denied >= 2 && st.local_opens_allowed >= 2,
            "{st:?}"
        ),
        other => panic!("{other:?}"),
    }
    match ctl.call(Request::Status).unwrap().0 {
        Reply::Status(st) => assert!(st.fanotify),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_local_open_breaks_a_write_lease_and_waits_for_the_ack() {
    let Some(s) = Scratch::with_tmpfs("fan-lease") else {
        return;
    };
    let _d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let k = LeaseKey(uuid::Uuid::new_v4());
    let h = fe.open(req("doc", Rights::ALL, Some((k, "RWH")))).unwrap();
    assert_eq!(
        h.info.lease.map(|l| l.state.to_string()),
        Some("RWH".into())
    );
    let pending = local_open(s.root().join("doc"));
    let (cur, new) = loop {
        match fe
            .events()
            .recv_timeout(Duration::from_secs(10))
            .expect("lease break")
        {
            Event::LeaseBreak {
                current_state,
                new_state,
                ack_required,
                ..
            } => {
                assert!(ack_required);
                break (current_state, new_state);
            }
            _ => continue,
        }
    };
    assert_eq!(
        (cur.to_string(), new.to_string()),
        ("RWH".into(), "RH".into())
    );
    assert!(
        pending.recv_timeout(Duration::from_millis(200)).is_err(),
        "the local open waits for the holder's ack"
    );
    fe.call(Request::LeaseBreakAck {
        lease_key: k,
        state: new,
    })
    .unwrap();
    pending
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
}

/// A restart with persistent handles under fanotify: recovery reopens their
/// files, which must not wait on filterd's own (not yet read) group; once
/// serving, the recovered handle's share mode refuses local opens again.
#[test]
fn restart_with_persistent_handles_under_fanotify() {
    let Some(s) = Scratch::with_tmpfs("fan-restart") else {
        return;
    };
    let mut d = Filterd::start_mediated(&s, &[]);
    let fe = frontend(&s);
    let mut r = req("kept", Rights::NONE, None);
    r.durability = Durability::Persistent { timeout_ms: 60_000 };
    fe.open(r).unwrap();
    d.kill9();
    drop(fe);
    let _d2 = Filterd::start_mediated(&s, &[]);
    let rx = local_open(s.root().join("kept"));
    let res = rx.recv_timeout(Duration::from_secs(10)).expect("a verdict");
    assert!(res.is_err(), "the recovered handle shares nothing: {res:?}");
}
