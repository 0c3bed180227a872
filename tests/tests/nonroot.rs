//! The non-root run: filterd as uid 65534 (no CAP_DAC_READ_SEARCH, no
//! CAP_SYS_ADMIN) on an export and state dir it owns. Persistent truncates
//! and end-of-file changes work through the path fallback (checked by kernel
//! file handle), persistent creates carry a `user.*` marker so a create
//! replayed after a crash is still recognised, and a restart reopens
//! persistent handles by path — a file replaced under the same name is
//! lost, never taken for the old one. Runs when the tests run as root
//! (CI does: it switches to uid 65534 with setpriv); as any other user the
//! rest of the suite is already a non-root run.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use rkfilter_tests::{filterctl, plain_open, root_or_skip, Filterd, Scratch};

const NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// A scratch dir whose export and state dir belong to uid 65534; `None`
/// (with a note) when not root.
fn nobodys_scratch(name: &str) -> Option<Scratch> {
    if !root_or_skip(name, "to switch to uid 65534") {
        return None;
    }
    let s = Scratch::new(name);
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    let nogroup = Some(nix::unistd::Gid::from_raw(65534));
    for d in [s.root(), s.state()] {
        nix::unistd::chown(&d, nobody, nogroup).unwrap();
    }
    Some(s)
}

fn start_as_nobody(s: &Scratch, env: &[(&str, &str)]) -> Filterd {
    let d = Filterd::spawn_on(s, None, &NOBODY, &[], env);
    d.wait_ready();
    d
}

fn write_as_nobody(s: &Scratch, name: &str, data: &[u8]) {
    let p = s.root().join(name);
    std::fs::write(&p, data).unwrap();
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    nix::unistd::chown(&p, nobody, None).unwrap();
}

fn frontend(s: &Scratch) -> FilterClient {
    rkfilter_tests::attach(&s.socket(), "smb", "smb-a")
}

fn persistent(client: &str, path: &str, disp: Disposition) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share: Rights::NONE,
        disposition: disp,
        durability: Durability::Persistent { timeout_ms: 60000 },
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        ..plain_open(client, path)
    }
}

fn size_of(s: &Scratch, name: &str) -> u64 {
    std::fs::metadata(s.root().join(name)).unwrap().len()
}

/// Overwrite, supersede and end-of-file on persistent handles, as nobody.
#[test]
fn nonroot_persistent_truncates_and_end_of_file_work() {
    let Some(s) = nobodys_scratch("nonroot-trunc") else {
        return;
    };
    let d = start_as_nobody(&s, &[]);
    let fe = frontend(&s);
    for (name, disp, action) in [
        ("ow", Disposition::OverwriteIf, CreateAction::Overwritten),
        ("sup", Disposition::Supersede, CreateAction::Superseded),
    ] {
        write_as_nobody(&s, name, b"old contents");
        let h = fe
            .open(persistent("alice", name, disp))
            .unwrap_or_else(|e| panic!("{disp:?} as nobody: {e}\n{}", d.log_text()));
        assert_eq!(h.info.create_action, action, "{disp:?}");
        assert_eq!(size_of(&s, name), 0, "{disp:?} truncated");
        fe.close(h.info.key).unwrap();
    }
    write_as_nobody(&s, "eof", b"0123456789");
    let h = fe
        .open(persistent("alice", "eof", Disposition::Open))
        .unwrap();
    fe.set_end_of_file(h.info.key, 4, None)
        .unwrap_or_else(|e| panic!("set end of file as nobody: {e}\n{}", d.log_text()));
    assert_eq!(size_of(&s, "eof"), 4);
    assert!(
        d.log_text().contains("no CAP_DAC_READ_SEARCH"),
        "{}",
        d.log_text()
    );
}

/// A persistent create interrupted before its commit is recognised as the
/// client's own when replayed after the restart (the `user.*` marker), and
/// a restart as nobody reopens persistent handles by path — a file
/// replaced under its name meanwhile is lost, not taken for the old one.
#[test]
fn nonroot_create_replay_and_restart_reopen() {
    let Some(s) = nobodys_scratch("nonroot-replay") else {
        return;
    };
    let mut d = start_as_nobody(&s, &[("RKFILTER_FAILPOINTS", "commit.before")]);
    let fe = frontend(&s);
    let req = persistent("alice", "new", Disposition::Create);
    assert!(fe.open(req.clone()).is_err(), "no reply before the commit");
    d.wait_killed_at("commit.before", Duration::from_secs(10));
    assert!(s.root().join("new").exists(), "the create reached the disk");
    drop(fe);

    let mut d = start_as_nobody(&s, &[]);
    let fe = frontend(&s);
    let h = fe
        .replay_open(req)
        .unwrap_or_else(|e| panic!("replayed create: {e}\n{}", d.log_text()));
    assert_eq!(h.info.create_action, CreateAction::Created);
    assert!(
        d.log_text().contains("user.rkfilter.create"),
        "marked with a user.* attribute: {}",
        d.log_text()
    );
    std::fs::File::from(h.fd).write_all_at(b"mine", 0).unwrap();
    let kept = h.info.key;
    let replaced = fe
        .open(persistent("alice", "replaced", Disposition::Create))
        .unwrap();
    drop(fe);
    d.kill9();

    std::fs::remove_file(s.root().join("replaced")).unwrap();
    write_as_nobody(&s, "replaced", b"someone else's");
    let _d = start_as_nobody(&s, &[]);
    let out = filterctl(&["--state", s.state().to_str().unwrap(), "handles", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    let state = |k: ResumeKey| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|h| h["key"] == serde_json::json!(k))
            .map(|h| h["conn"]["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state(kept).as_deref(), Some("disconnected"), "{v}");
    assert_eq!(state(replaced.info.key).as_deref(), Some("lost"), "{v}");
    let fe = frontend(&s);
    let h = fe.resume(ClientId::new("alice").unwrap(), kept).unwrap();
    let mut buf = [0u8; 4];
    std::fs::File::from(h.fd)
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"mine");
}

/// Review r1 b2: in a directory nobody may write but not read (`0333`),
/// filterd cannot open the directory to fsync it: a persistent create, a
/// durable rename and a delete on close there are made all the same, the
/// export's filesystem synced (`syncfs`) instead. Refused (2ef4b32), each
/// failed after its change's intent had committed.
#[test]
fn nonroot_changes_in_a_write_only_directory_are_made() {
    let Some(s) = nobodys_scratch("nonroot-wx") else {
        return;
    };
    let wo = s.root().join("wo");
    std::fs::create_dir(&wo).unwrap();
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    nix::unistd::chown(&wo, nobody, None).unwrap();
    std::fs::set_permissions(&wo, std::fs::Permissions::from_mode(0o333)).unwrap();
    let d = start_as_nobody(&s, &[]);
    let fe = frontend(&s);
    let req = OpenRequest {
        access: Access::new(Rights::ALL).unwrap(),
        ..persistent("alice", "wo/new", Disposition::Create)
    };
    let h = fe
        .open(req)
        .unwrap_or_else(|e| panic!("persistent create in -wx: {e}\n{}", d.log_text()));
    assert!(wo.join("new").exists());
    fe.rename(h.info.key, RelPath::new("wo/renamed").unwrap(), false, None)
        .unwrap_or_else(|e| panic!("rename in -wx: {e}\n{}", d.log_text()));
    assert!(wo.join("renamed").exists() && !wo.join("new").exists());
    fe.set_delete_on_close(h.info.key, true, None).unwrap();
    fe.close(h.info.key)
        .unwrap_or_else(|e| panic!("close with delete on close in -wx: {e}\n{}", d.log_text()));
    assert!(!wo.join("renamed").exists(), "deleted on close");
}

/// A non-root filterd without `--root-lock-dir` locks the export root's
/// directory itself, whatever its environment: one started with an
/// `XDG_RUNTIME_DIR` and one without, on one root with different state
/// dirs, exclude each other, and nothing is put in the runtime dir. Before
/// (review rr37b) the first locked a file in its `XDG_RUNTIME_DIR` and the
/// second the directory, and both served.
#[test]
fn nonroot_root_lock_does_not_depend_on_the_environment() {
    let (Some(s), Some(b)) = (
        nobodys_scratch("nonroot-rootlock"),
        nobodys_scratch("nonroot-rootlock-b"),
    ) else {
        return;
    };
    let run = s.dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let env = [("XDG_RUNTIME_DIR", run.to_str().unwrap())];
    let mut d = start_as_nobody(&s, &env);
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "nothing in the runtime dir"
    );
    std::fs::remove_dir(b.root()).unwrap();
    std::os::unix::fs::symlink(s.root(), b.root()).unwrap();
    let mut second = Filterd::spawn_on(&b, None, &NOBODY, &[], &[]);
    let st = second.wait_exit(std::time::Duration::from_secs(20));
    assert!(!st.success(), "{st:?}");
    let log = second.log_text();
    assert!(
        log.contains("another filterd serves export root")
            && log.contains("a flock on the directory"),
        "{log}"
    );
    d.kill9();
}
