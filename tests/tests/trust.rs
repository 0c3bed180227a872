//! End-to-end tests of the socket's trust boundary (README "What an admitted
//! peer can do"): the socket's mode, who is admitted (SO_PEERCRED: root, filterd's user, the
//! socket's group as primary or supplementary group) and what a refused
//! peer is told; an instance name held by one live connection, a dead
//! holder evicted by its replacement; a handle resumed only by the instance
//! that owns it; session scopes private to their protocol.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use libfilter::model::{RecordSpec, ReplayScope, ScopeName};
use libfilter::proto::ErrorCode;
use rkfilter_tests::{attach, bin, filterctl, root_or_skip, Filterd, Scratch, TestFront};
use serde_json::json;

/// The group the socket is given in these tests (no user has it).
const SOCKET_GID: u32 = 4242;

/// Runs `filterctl --socket SOCK status` as uid 65534 with the given
/// setpriv group arguments.
fn status_as_nobody(sock: &std::path::Path, groups: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .arg("--reuid=65534")
        .args(groups)
        .arg("--")
        .arg(bin("filterctl"))
        .arg("--socket")
        .arg(sock)
        .arg("status")
        .output()
        .expect("setpriv")
}

/// Members of the socket's group are admitted through a supplementary
/// group as through their primary one; anyone else is refused by the
/// SO_PEERCRED check itself (the socket is made world-writable so its
/// mode does not stand guard) and is told so in a refusal frame, not
/// with a bare reset. Root only (it switches users).
#[test]
fn the_peer_check_admits_the_sockets_group_and_tells_others_why_not() {
    if !root_or_skip("peercred", "to run peers as other users") {
        return;
    }
    let s = Scratch::new("peercred");
    // The socket inherits the state dir's group (setgid directory).
    // Group-writable and open to all (2775): filterd takes that away at
    // start (checked below).
    s.give_socket_group(SOCKET_GID);
    let _d = Filterd::start(&s, &[], &[]);
    let sock = s.socket();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), SOCKET_GID);

    let gid = format!("--regid={SOCKET_GID}");
    let supp = format!("--groups={SOCKET_GID}");
    for (how, groups) in [
        ("primary group", vec![gid.as_str(), "--clear-groups"]),
        ("supplementary group", vec!["--regid=65534", supp.as_str()]),
    ] {
        let out = status_as_nobody(&sock, &groups);
        assert!(
            out.status.success(),
            "a member through its {how} must be admitted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The socket's mode keeps everyone else out first...
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let out = status_as_nobody(&sock, &["--regid=65534", "--clear-groups"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ermission denied"), "{err}");
    // ...and with the mode widened, the peer check alone still does. (filterd
    // took its group's write and other users' permissions off the state
    // dir at start; the search permission is given back here, so that
    // the socket's mode alone would not keep anyone out.)
    assert_eq!(
        std::fs::metadata(s.state()).unwrap().permissions().mode() & 0o7777,
        0o2750,
        "the state dir tightened"
    );
    std::fs::set_permissions(s.state(), std::fs::Permissions::from_mode(0o2775)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_as_nobody(&sock, &["--regid=65534", "--clear-groups"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "nobody must be refused: {err}");
    assert!(
        err.contains("NotPermitted")
            && err.contains(&format!("not in the socket's group (gid {SOCKET_GID}")),
        "an explicit refusal naming the group, not a reset: {err}"
    );
    // The socket's group is read at every connection: an operator's chgrp
    // counts from the next one on (it was read once at start, and the
    // refusal named the old group).
    let nogroup = nix::unistd::Gid::from_raw(65534);
    nix::unistd::chown(&sock, None, Some(nogroup)).unwrap();
    let out = status_as_nobody(&sock, &["--regid=65534", "--clear-groups"]);
    assert!(
        out.status.success(),
        "a member of the socket's new group must be admitted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status_as_nobody(&sock, &["--regid=4343", "--clear-groups"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotPermitted") && err.contains("not in the socket's group (gid 65534"),
        "the refusal names the group checked: {err}"
    );
    // Root still can.
    assert_eq!(
        filterctl(&["--socket", sock.to_str().unwrap(), "status"]).code,
        0
    );
}

fn open_cmd(client: &str, path: &str, guid: &str) -> serde_json::Value {
    json!({"cmd": "open", "client": client, "path": path, "access": ["read", "write"],
           "share": [], "disposition": "open_if",
           "durability": {"kind": "persistent", "timeout_ms": 60000}, "create_guid": guid})
}

/// An instance name is held by one live connection; a replacement evicts a
/// dead holder at once. A frontend under another instance name cannot
/// resume (by key or create GUID) or replay-open the dead instance's
/// handle, even naming its client — only the replacement can.
#[test]
fn only_the_owning_instance_resumes_its_handles() {
    let s = Scratch::new("instances");
    let _d = Filterd::start(&s, &[], &[]);
    let mut owner = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let g = uuid::Uuid::new_v4().to_string();
    let h = owner.cmd(open_cmd("alice", "secret", &g));
    assert_eq!(h["ok"], true, "{h}");
    owner.cmd(json!({"cmd": "write", "key": h["key"], "offset": 0, "data": "alice's"}));

    let busy = TestFront::start(&s.socket(), "smb", "smb-a")
        .err()
        .expect("busy");
    assert_eq!(busy["code"], "InstanceBusy", "{busy}");
    owner.kill9();

    let mut squatter = TestFront::start(&s.socket(), "smb", "smb-evil").unwrap();
    for attempt in [
        json!({"cmd": "resume", "client": "alice", "key": h["key"]}),
        json!({"cmd": "resume", "client": "alice", "create_guid": g}),
    ] {
        let r = squatter.cmd(attempt.clone());
        assert_eq!(r["ok"], false, "{attempt} from another instance: {r}");
        assert_eq!(r["code"], "NotOwner", "{r}");
    }
    let fe = attach(&s.socket(), "smb", "smb-evil2");
    let replay: libfilter::proto::OpenRequest =
        serde_json::from_value(open_cmd("alice", "secret", &g)).unwrap();
    let r = fe.replay_open(replay);
    assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::NotOwner));

    // The dead holder is evicted by its replacement, which resumes.
    let mut replacement = TestFront::start(&s.socket(), "smb", "smb-a").unwrap();
    let r = replacement.cmd(json!({"cmd": "resume", "client": "alice", "create_guid": g}));
    assert_eq!(r["ok"], true, "{r}");
    let data = replacement.cmd(json!({"cmd": "read", "key": h["key"], "offset": 0, "len": 7}));
    assert_eq!(data["data"], "alice's");
    drop(squatter);
}

/// A frontend's session scopes are its protocol's: another protocol's
/// frontend writing a scope of the same name, or one named like the other
/// protocol's, neither sees nor changes the other's records.
#[test]
fn session_scopes_belong_to_their_protocol() {
    let s = Scratch::new("scopes");
    let _d = Filterd::start(&s, &[], &[]);
    let nfs = attach(&s.socket(), "nfs", "nfs-1");
    let smb = attach(&s.socket(), "smb", "smb-1");
    let scope = |n: &str| ReplayScope::Session(ScopeName::new(n).unwrap());
    let spec = |sc: &str, v: &str| RecordSpec {
        scope: scope(sc),
        op_id: 1,
        reply: v.into(),
        keep: 16,
    };
    // nfsshim's layout: its instances, and a client table per instance.
    nfs.write_records(
        vec![
            spec("instances", r#""nfs-1""#),
            spec("nfs-1/clients", r#"{"clientid":"real"}"#),
        ],
        vec![],
    )
    .unwrap();
    smb.write_records(
        vec![
            spec("nfs-1/clients", r#"{"clientid":"smb's"}"#),
            spec("nfs/nfs-1/clients", r#"{"clientid":"forged"}"#),
            spec("nfs/instances", r#""nfs-1""#),
        ],
        vec![(scope("nfs/nfs-1/clients"), 1)],
    )
    .unwrap();
    let theirs = nfs.list_records(scope("nfs-1/clients")).unwrap();
    assert_eq!(theirs, vec![(1, r#"{"clientid":"real"}"#.to_owned())]);
    assert_eq!(
        smb.list_records(scope("nfs-1/clients")).unwrap(),
        vec![(1, r#"{"clientid":"smb's"}"#.to_owned())]
    );
    let out = filterctl(&[
        "--socket",
        s.socket().to_str().unwrap(),
        "clients",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ids: Vec<_> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["clientid"].clone())
        .collect();
    assert_eq!(ids, vec![json!("real")], "{}", out.stdout);
}

/// attack51a L3: `filterctl --state DIR` run as root on a directory of
/// another user, who holds its lock and wrote a runtime record naming
/// another user's socket (here a root filterd's, which root could reach),
/// talks to nothing: the listener runs as root, the record's writer as
/// nobody, so it is not DIR's filterd. Without a record the same goes for
/// a link at DIR's default socket name. The real daemon is still reached
/// through its own state dir. Root only (chown).
#[test]
fn filterctl_talks_only_to_a_listener_of_the_state_dirs_user() {
    use std::os::unix::fs::OpenOptionsExt;
    if !root_or_skip("runtime-peer", "to make another user's directory") {
        return;
    }
    let s = Scratch::new("runtime-peer");
    let _d = Filterd::start(&s, &[], &[]);
    let fake = s.dir.join("theirs");
    std::fs::create_dir(&fake).unwrap();
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    nix::unistd::chown(&fake, nobody, None).unwrap();
    let _held = nix::fcntl::Flock::lock(
        std::fs::File::open(&fake).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let record = fake.join(libfilter::runtime::RUNTIME_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&record)
        .unwrap();
    std::fs::write(
        &record,
        json!({"pid": 1, "socket": s.socket(), "phase": "serving"}).to_string(),
    )
    .unwrap();
    nix::unistd::chown(&record, nobody, None).unwrap();
    let fake_arg = fake.to_str().unwrap();
    let out = filterctl(&["--state", fake_arg, "status"]);
    assert_ne!(out.code, 0, "talked to root's filterd: {}", out.stdout);
    assert!(
        out.stderr.contains("runs as uid 0") && out.stderr.contains("uid 65534"),
        "{}",
        out.stderr
    );
    std::fs::remove_file(&record).unwrap();
    std::os::unix::fs::symlink(s.socket(), fake.join("filterd.sock")).unwrap();
    let out = filterctl(&["--state", fake_arg, "status"]);
    assert_ne!(out.code, 0, "talked to root's filterd: {}", out.stdout);
    assert!(out.stderr.contains("runs as uid 0"), "{}", out.stderr);
    let state = s.state();
    let out = filterctl(&["--state", state.to_str().unwrap(), "status"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}
