//! A file is one fact, known by its kernel handle (issue: the transactional
//! engine, defects 5–8): delete on close happens only after its close
//! commits and never to a file that merely reuses the inode number; a
//! rename moves every handle of the file; replacing a target is deleting
//! it; a file reopened by kernel handle must still lie beneath the root.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::{ErrorCode, OpenRequest};
use libfilter::store::Store;
use rkfilter_tests::{plain_open, wait_for, Filterd, Scratch};

fn frontend(s: &Scratch, instance: &str) -> FilterClient {
    FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new(instance).unwrap(),
    )
    .expect("attach")
}

/// A persistent read handle of alice's (deny write) on `path` (made, with
/// its directory), left by a filterd killed with SIGKILL: its key.
fn persistent_handle_of_a_killed_filterd(s: &Scratch, path: &str) -> ResumeKey {
    let file = s.root().join(path);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&file, b"x").unwrap();
    let mut d = Filterd::start(s, &[], &[]);
    let fe = frontend(s, "smb-a");
    let held = fe
        .open(req(
            path,
            "alice",
            Rights::READ,
            Durability::Persistent {
                timeout_ms: 600_000,
            },
        ))
        .unwrap();
    let key = held.info.key;
    drop(held);
    d.kill9();
    key
}

fn req(path: &str, client: &str, share: Rights, durability: Durability) -> OpenRequest {
    OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE).union(Rights::DELETE)).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability,
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        ..plain_open(client, path)
    }
}

fn persistent(timeout_ms: u32) -> Durability {
    Durability::Persistent { timeout_ms }
}

/// Defect 5: a crash between a delete-on-close CLOSE and its commit used to
/// find the file already unlinked and the handle "lost". Now the unlink
/// follows the commit: a crash before it brings the handle back intact, and
/// the client's second CLOSE deletes the file.
#[test]
fn delete_on_close_unlinks_only_after_its_close_commits() {
    let s = Scratch::new("id-doc-crash");
    std::fs::write(s.root().join("f"), b"data").unwrap();
    // Commits: the open, the delete-on-close flag, the close.
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "commit.before:3")]);
    let fe = frontend(&s, "smb-a");
    let h = fe
        .open(req("f", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    fe.set_delete_on_close(h.info.key, true, None).unwrap();
    assert!(
        fe.close(h.info.key).is_err(),
        "filterd dies in the close's commit"
    );
    d.wait_killed_at("commit.before:3", Duration::from_secs(10));
    assert!(
        s.root().join("f").exists(),
        "nothing was unlinked before the close committed"
    );
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let back = fe
        .resume(ClientId::new("alice").unwrap(), h.info.key)
        .expect("the handle comes back intact, not lost");
    fe.close(back.info.key).unwrap();
    assert!(
        !s.root().join("f").exists(),
        "the second close deletes the file"
    );
}

/// The other side of the same window: a crash after the close committed
/// and before the unlink — recovery finishes the delete.
#[test]
fn recovery_finishes_an_interrupted_delete_on_close() {
    let s = Scratch::new("id-doc-finish");
    std::fs::write(s.root().join("f"), b"data").unwrap();
    let mut d = Filterd::start(&s, &[], &[("RKFILTER_FAILPOINTS", "intent.after_commit")]);
    let fe = frontend(&s, "smb-a");
    let h = fe
        .open(req("f", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    fe.set_delete_on_close(h.info.key, true, None).unwrap();
    assert!(fe.close(h.info.key).is_err());
    d.wait_killed_at("intent.after_commit", Duration::from_secs(10));
    assert!(s.root().join("f").exists(), "killed before the unlink");
    let _d = Filterd::start(&s, &[], &[]);
    assert!(!s.root().join("f").exists(), "recovery unlinked it");
    let store = Store::open_read_only(&s.state()).unwrap();
    assert!(store.handles().unwrap().is_empty());
    assert!(store.intents().unwrap().is_empty());
}

/// A file deleted behind filterd's back whose inode number the filesystem
/// gives to a new file at the same path: the old handle is lost, expiring it
/// deletes nothing, and lost handles go away at their timeout.
#[test]
fn a_reused_inode_number_is_never_taken_for_the_old_file() {
    // An ext4 of its own where it can be had (root): on the shared test
    // disk other tests running beside it may take the freed inode number
    // first, and it then never comes back (a CI run saw that).
    let s = Scratch::with_ext4("id-reuse").unwrap_or_else(|| Scratch::new("id-reuse"));
    std::fs::write(s.root().join("f"), b"old").unwrap();
    let old_ino = std::fs::metadata(s.root().join("f")).unwrap().ino();
    let mut d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let h = fe
        .open(req("f", "alice", Rights::ALL, persistent(2_000)))
        .unwrap();
    fe.set_delete_on_close(h.info.key, true, None).unwrap();
    drop(h);
    d.kill9();
    drop(fe);
    // Behind filterd's back: the file goes, and a new one takes its inode
    // number at the same path (ext4 hands freed inodes out again at once).
    std::fs::remove_file(s.root().join("f")).unwrap();
    let mut reused = false;
    for i in 0..200 {
        std::fs::write(s.root().join("f"), b"new, unrelated").unwrap();
        if std::fs::metadata(s.root().join("f")).unwrap().ino() == old_ino {
            reused = true;
            break;
        }
        std::fs::rename(s.root().join("f"), s.root().join(format!("other{i}"))).unwrap();
    }
    assert!(
        reused,
        "the filesystem under the test dir reuses inode numbers (ext4)"
    );
    let d = Filterd::start(&s, &[], &[]);
    let ctl = d.control();
    let hs = ctl.handles().unwrap();
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].record.conn, ConnState::Lost, "{hs:?}");
    // Expiring the lost handle must not delete the new file.
    let key = hs[0].record.key;
    ctl.call(libfilter::proto::Request::Expire { key })
        .expect("a lost handle can be expired");
    assert_eq!(
        std::fs::read(s.root().join("f")).unwrap(),
        b"new, unrelated",
        "the new file survives"
    );
    // And lost handles expire by themselves (the same fresh timeout as a
    // disconnected one), instead of lingering forever.
    let s2 = Scratch::new("id-lost-expiry");
    std::fs::write(s2.root().join("g"), b"x").unwrap();
    let mut d2 = Filterd::start(&s2, &[], &[]);
    let fe2 = frontend(&s2, "smb-a");
    let _h2 = fe2
        .open(req("g", "alice", Rights::ALL, persistent(500)))
        .unwrap();
    d2.kill9();
    drop(fe2);
    std::fs::remove_file(s2.root().join("g")).unwrap();
    let d2 = Filterd::start(&s2, &[], &[]);
    let ctl2 = d2.control();
    assert_eq!(ctl2.handles().unwrap()[0].record.conn, ConnState::Lost);
    wait_for("the lost handle to expire", Duration::from_secs(10), || {
        ctl2.handles().unwrap().is_empty().then_some(())
    });
}

/// Defect 6: a rename moves the path of every handle of the file, so
/// delete on close set through another handle deletes the renamed file —
/// also after a restart.
#[test]
fn a_rename_moves_every_handle_of_the_file() {
    let s = Scratch::new("id-rename-all");
    std::fs::write(s.root().join("a"), b"data").unwrap();
    let mut d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let x = fe
        .open(req("a", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    let y = fe
        .open(req("a", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    fe.rename(x.info.key, RelPath::new("b").unwrap(), false, None)
        .unwrap();
    let store_paths = |s: &Scratch| {
        let store = Store::open_read_only(&s.state()).unwrap();
        store
            .handles()
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().path.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    d.kill9();
    drop(fe);
    assert_eq!(
        store_paths(&s),
        vec!["b", "b"],
        "both records name the new path"
    );
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let alice = ClientId::new("alice").unwrap();
    let x = fe.resume(alice.clone(), x.info.key).unwrap();
    let y = fe.resume(alice, y.info.key).unwrap();
    fe.set_delete_on_close(y.info.key, true, None).unwrap();
    fe.close(y.info.key).unwrap();
    fe.close(x.info.key).unwrap();
    assert!(
        !s.root().join("b").exists(),
        "delete on close followed the rename"
    );
    assert!(!s.root().join("a").exists());
}

/// Defect 7: replacing a target is deleting it — refused while an open of
/// the target does not share delete, as REMOVE of it is.
#[test]
fn rename_with_replace_respects_the_target_share_modes() {
    let s = Scratch::new("id-replace");
    std::fs::write(s.root().join("t"), b"precious").unwrap();
    std::fs::write(s.root().join("s"), b"intruder").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let holder = frontend(&s, "smb-a");
    let _t = holder
        .open(req("t", "alice", Rights::READ, persistent(60_000)))
        .unwrap();
    let nfs = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-a").unwrap(),
    )
    .unwrap();
    let src = nfs
        .open(req("s", "bob", Rights::ALL, Durability::None))
        .unwrap();
    let e = nfs
        .rename(src.info.key, RelPath::new("t").unwrap(), true, None)
        .expect_err("the target is held without share delete");
    assert_eq!(e.code(), Some(ErrorCode::SharingViolation), "{e}");
    assert_eq!(std::fs::read(s.root().join("t")).unwrap(), b"precious");
    // As REMOVE of the same file is.
    let e = nfs.remove(RelPath::new("t").unwrap(), None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SharingViolation), "{e}");
    // A target held with share delete may be replaced.
    std::fs::write(s.root().join("u"), b"replaceable").unwrap();
    let _u = holder
        .open(req("u", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    nfs.rename(src.info.key, RelPath::new("u").unwrap(), true, None)
        .unwrap();
    assert_eq!(std::fs::read(s.root().join("u")).unwrap(), b"intruder");
}

/// Defect 8: a file an administrator moved out of the export while filterd
/// was down is not reached through the handle's kernel file handle.
#[test]
fn a_handle_whose_file_left_the_root_is_lost() {
    let s = Scratch::new("id-escape");
    std::fs::write(s.root().join("f"), b"inside").unwrap();
    let mut d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let h = fe
        .open(req("f", "alice", Rights::ALL, persistent(60_000)))
        .unwrap();
    let key = h.info.key;
    drop(h);
    d.kill9();
    drop(fe);
    let outside = s.dir.join("outside");
    std::fs::rename(s.root().join("f"), &outside).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let r = fe.resume(ClientId::new("alice").unwrap(), key);
    assert!(
        r.is_err(),
        "resumed a file outside the export: {:?}",
        r.map(|h| h.info)
    );
    let hs = d.control().handles().unwrap();
    assert_eq!(hs[0].record.conn, ConnState::Lost, "{hs:?}");
    assert_eq!(std::fs::read(&outside).unwrap(), b"inside");
}

/// On an ext4 export: file `f` opened persistent by alice sharing `share`
/// (with delete on close when `delete`), then filterd killed. Returns the
/// handle's key and the file's inode number.
fn persistent_f_then_kill(s: &Scratch, share: Rights, delete: bool) -> (ResumeKey, u64) {
    std::fs::write(s.root().join("f"), b"old").unwrap();
    let ino = std::fs::metadata(s.root().join("f")).unwrap().ino();
    let mut d = Filterd::start(s, &[], &[]);
    let fe = frontend(s, "smb-a");
    let h = fe
        .open(req("f", "alice", share, persistent(60_000)))
        .unwrap();
    if delete {
        fe.set_delete_on_close(h.info.key, true, None).unwrap();
    }
    d.kill9();
    (h.info.key, ino)
}

/// Makes files in the export root until the filesystem gives one the inode
/// number `ino` (ext4 hands a freed one out again at once); returns its
/// name.
fn file_reusing(s: &Scratch, ino: u64, content: &[u8]) -> String {
    for i in 0..200 {
        let name = format!("g{i}");
        std::fs::write(s.root().join(&name), content).unwrap();
        if std::fs::metadata(s.root().join(&name)).unwrap().ino() == ino {
            return name;
        }
    }
    panic!("ext4 did not give inode number {ino} to a new file");
}

/// Hunt aQ (inode numbers reused): a lost handle stayed in filterd's file
/// index under its old file's id. Here its file was removed and its inode
/// number given to an unrelated file while filterd was down, so recovery
/// marked it lost. The handle had delete on close set; when it expired,
/// the "delete pending" passed to the opens of the file now holding that
/// number, and the unrelated file was deleted when its own open closed —
/// an open that never asked for it.
#[test]
fn a_lost_handles_delete_on_close_does_not_pass_to_a_file_reusing_its_inode() {
    let Some(s) = Scratch::with_ext4("id-reuse-doc-pass") else {
        return;
    };
    let (key, old_ino) = persistent_f_then_kill(&s, Rights::ALL, true);
    std::fs::remove_file(s.root().join("f")).unwrap();
    let name = file_reusing(&s, old_ino, b"unrelated");
    let d = Filterd::start(&s, &[], &[]);
    let ctl = d.control();
    let hs = ctl.handles().unwrap();
    assert_eq!(hs.len(), 1, "{hs:?}");
    assert_eq!(hs[0].record.conn, ConnState::Lost, "{hs:?}");
    assert_eq!(hs[0].record.file.ino, old_ino);
    let fe = frontend(&s, "smb-b");
    let g = fe
        .open(req(&name, "bob", Rights::ALL, Durability::None))
        .unwrap();
    assert_eq!(g.info.file.ino, old_ino, "the new file has the old number");
    ctl.call(libfilter::proto::Request::Expire { key })
        .expect("a lost handle can be expired");
    wait_for("the lost handle to go", Duration::from_secs(10), || {
        (ctl.handles().unwrap().len() == 1).then_some(())
    });
    fe.close(g.info.key).unwrap();
    assert_eq!(
        std::fs::read(s.root().join(&name)).ok().as_deref(),
        Some(&b"unrelated"[..]),
        "the unrelated file survives its own close"
    );
}

/// Hunt aQ: the other direction. A recovered handle holds no descriptor of
/// its file, so the file can be removed after recovery and its number
/// reused; the first open of the new file marks the old handle lost — but
/// it stayed in the file index, and the new file's delete on close passed
/// to it instead of happening: the close was answered, the file stayed.
#[test]
fn a_delete_on_close_of_a_file_reusing_a_lost_handles_inode_deletes_it() {
    let Some(s) = Scratch::with_ext4("id-reuse-doc-kept") else {
        return;
    };
    let (key, old_ino) = persistent_f_then_kill(&s, Rights::ALL, false);
    let d = Filterd::start(&s, &[], &[]);
    let ctl = d.control();
    // Recovered, holding no descriptor: the file can go now.
    assert!(matches!(
        ctl.handles().unwrap()[0].record.conn,
        ConnState::Disconnected { .. }
    ));
    std::fs::remove_file(s.root().join("f")).unwrap();
    let name = file_reusing(&s, old_ino, b"to be deleted");
    let fe = frontend(&s, "smb-b");
    let g = fe
        .open(req(&name, "bob", Rights::ALL, Durability::None))
        .unwrap();
    assert_eq!(g.info.file.ino, old_ino, "the new file has the old number");
    let hs = ctl.handles().unwrap();
    let old = hs.iter().find(|v| v.record.key == key).unwrap();
    assert_eq!(old.record.conn, ConnState::Lost, "{hs:?}");
    fe.set_delete_on_close(g.info.key, true, None).unwrap();
    fe.close(g.info.key).unwrap();
    assert!(
        !s.root().join(&name).exists(),
        "the close with delete on close deleted the file"
    );
}

/// On an ext4 export, a persistent handle of `f` sharing no delete,
/// recovered (holding no descriptor); then `f` is removed behind its back
/// and a new file gets its inode number. Returns that file's name.
fn recovered_then_replaced(s: &Scratch) -> (Filterd, String) {
    let (_, old_ino) = persistent_f_then_kill(s, Rights::READ.union(Rights::WRITE), false);
    let d = Filterd::start(s, &[], &[]);
    std::fs::remove_file(s.root().join("f")).unwrap();
    (d, file_reusing(s, old_ino, b"unrelated"))
}

/// Hunt aQ: a REMOVE by path names no handle, so nothing had compared the
/// recovered handle's kernel handle with the file now holding its inode
/// number: the unrelated file's removal was refused by the old handle's
/// share mode (SharingViolation), until that handle's timeout.
#[test]
fn a_file_reusing_a_recovered_handles_inode_can_be_removed() {
    let Some(s) = Scratch::with_ext4("id-reuse-remove") else {
        return;
    };
    let (_d, name) = recovered_then_replaced(&s);
    let fe = frontend(&s, "smb-b");
    fe.remove(RelPath::new(&name).unwrap(), None)
        .expect("the unrelated file is removed");
    assert!(!s.root().join(&name).exists());
}

/// Hunt aQ: the same for a rename replacing the unrelated file (replacing
/// a target is deleting it: its opens must share delete).
#[test]
fn a_file_reusing_a_recovered_handles_inode_can_be_replaced() {
    let Some(s) = Scratch::with_ext4("id-reuse-replace") else {
        return;
    };
    let (_d, name) = recovered_then_replaced(&s);
    std::fs::write(s.root().join("src"), b"replacement").unwrap();
    let fe = frontend(&s, "smb-b");
    let src = fe
        .open(req("src", "bob", Rights::ALL, Durability::None))
        .unwrap();
    fe.rename(src.info.key, RelPath::new(&name).unwrap(), true, None)
        .expect("the unrelated file is replaced");
    assert_eq!(std::fs::read(s.root().join(&name)).unwrap(), b"replacement");
}

/// Hunt aQ (files replaced under open handles): a persistent handle's file
/// replaced while filterd was down — an editor's save, a new file renamed
/// over the old name — is lost at recovery; its lease key stayed taken by
/// the lost handle's (gone) file, so its client's open of the file now at
/// that name under the same key (what an SMB client does: one lease key
/// per name) was refused (LeaseKeyInUse) until the lost handle's timeout.
#[test]
fn a_lost_handles_lease_key_is_free_for_the_file_that_replaced_it() {
    let s = Scratch::new("id-replaced-lease");
    std::fs::write(s.root().join("f"), b"old").unwrap();
    let mut d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let key = libfilter::lease::LeaseKey(uuid::Uuid::new_v4());
    let leased = |share| OpenRequest {
        lease: Some(LeaseRequest {
            key,
            state: libfilter::lease::LeaseState::parse("RWH").unwrap(),
            epoch: 0,
        }),
        ..req("f", "alice", share, persistent(60_000))
    };
    let h = fe.open(leased(Rights::READ)).unwrap();
    assert!(h.info.lease.is_some());
    d.kill9();
    drop((fe, h));
    std::fs::write(s.root().join("f.new"), b"saved").unwrap();
    std::fs::rename(s.root().join("f.new"), s.root().join("f")).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let hs = d.control().handles().unwrap();
    assert_eq!(hs[0].record.conn, ConnState::Lost, "{hs:?}");
    let fe = frontend(&s, "smb-a");
    let again = fe
        .open(leased(Rights::READ))
        .expect("the client's open of the new file under its lease key");
    assert!(again.info.lease.is_some(), "{:?}", again.info);
}

/// Review rr-emfile36: a recovered persistent handle holds no descriptor,
/// and its resume opens the file by kernel handle. Once the file's dentry
/// has been evicted (a cold cache after a restart, memory pressure), the
/// kernel gives a dentry with no name, whose `/proc/self/fd` link reads
/// "/": taken for a file moved out of the export (`EXDEV`), the handle was
/// lost for good — its share mode, locks and lease — though the file was
/// there all along. Now the recorded path, beneath the root and with the
/// same kernel handle, proves it.
#[test]
fn a_resume_after_the_files_dentry_was_evicted_finds_the_file() {
    let Some(s) = Scratch::with_ext4("id-evicted") else {
        return;
    };
    let key = persistent_handle_of_a_killed_filterd(&s, "d/f");
    let d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    // Every unused dentry and inode of the host goes (the file's among
    // them: nothing holds it open now).
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", b"2\n").expect("drop caches");
    let r = fe.resume(ClientId::new("alice").unwrap(), key);
    let conn = d
        .control()
        .handles()
        .unwrap()
        .into_iter()
        .find(|h| h.record.key == key)
        .map(|h| h.record.conn);
    let resumed = r.unwrap_or_else(|e| panic!("resume refused: {e}; the handle is {conn:?}"));
    assert_eq!(resumed.info.key, key);
    // Its share mode holds: a writer is refused.
    let other = frontend(&s, "smb-b");
    let w = other.open(req("d/f", "bob", Rights::ALL, Durability::None));
    assert!(w.is_err(), "a writer got in beside a deny-write open");
}

/// Re-review rr-emfile36: a local rename of a persistent handle's file
/// between filterd's read of the file's name and its resolution beneath
/// the root (the proof of a resume's reopen by kernel handle) was taken
/// for a file that is gone, and the handle was lost for good — its share
/// mode with it. Now the name is read again while the file is linked.
#[test]
fn a_resume_racing_a_local_rename_of_the_file_keeps_the_handle() {
    resume_racing("id-prove-race", |root| {
        std::fs::rename(root.join("d/f"), root.join("d/g")).unwrap();
        "d/g"
    });
}

/// Re-review rr37b: the same race, the file's directory renamed and a
/// link out of the export put in its place (the name read resolves
/// outside the root, `EXDEV`).
#[test]
fn a_resume_racing_a_directory_swapped_for_a_link_keeps_the_handle() {
    resume_racing("id-prove-link", |root| {
        std::fs::rename(root.join("d"), root.join("d2")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("d")).unwrap();
        "d2/f"
    });
}

/// A persistent handle of `d/f` resumed after a restart while `change`
/// (returning the file's new name) runs between the proof's read of the
/// file's name and its resolution: the resume succeeds and the handle's
/// share mode holds at the new name.
///
/// The proof reads a name only while the file's dentry is cached: one
/// evicted (memory pressure: the CI flake, a resume answered by the
/// recorded path without reaching the proof) gives the open by handle a
/// nameless dentry, and the recorded path decides
/// (`a_resume_after_the_files_dentry_was_evicted_finds_the_file`). An
/// `O_PATH` descriptor of the test's keeps the dentry until the proof has
/// read its name (it breaks no lease and the lease probe ignores it;
/// filterd's `/proc` scan of local openers would count it, but runs only
/// with fanotify, which these tests leave off), and, where permitted,
/// every unused dentry of the host is dropped right before the resume, so
/// an eviction happens on every run rather than on a loaded machine's.
fn resume_racing(name: &str, change: impl FnOnce(&std::path::Path) -> &'static str) {
    let s = Scratch::new(name);
    let key = persistent_handle_of_a_killed_filterd(&s, "d/f");
    // Nothing has opened the file by handle since filterd died, so this
    // open by path makes the only dentry an open by handle finds, or
    // keeps the one there.
    let pin = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(s.root().join("d/f"))
            .expect("an O_PATH descriptor of d/f")
    };
    // The proof stalls once, after it read the file's name.
    let d = Filterd::start(
        &s,
        &[],
        &[("RKFILTER_FAILPOINTS", "fs.prove_beneath:1:sleep2000")],
    );
    let fe = frontend(&s, "smb-a");
    // Refused (not root, a read-only /proc/sys): the pin is tested only
    // when the machine evicts on its own.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", b"2\n");
    let (resumed, now) = std::thread::scope(|t| {
        let resume = t.spawn(|| fe.resume(ClientId::new("alice").unwrap(), key));
        let stalled = || {
            d.log_text()
                .contains("failpoint fs.prove_beneath: stalling")
        };
        // The resume answered without the proof stalling is a failure of
        // its own, told with its answer and filterd's log.
        wait_for("the proof to stall", Duration::from_secs(20), || {
            (stalled() || resume.is_finished()).then_some(())
        });
        // The name is read: filterd's own descriptor holds the dentry now.
        drop(pin);
        if !stalled() {
            let answer = resume.join().expect("resume thread");
            panic!(
                "answered before the proof stalled: {:?}\n{}",
                answer.map(|h| h.info.key),
                d.log_text()
            );
        }
        let now = change(&s.root());
        (resume.join().expect("resume thread"), now)
    });
    let resumed = resumed.unwrap_or_else(|e| panic!("resume refused: {e}"));
    assert_eq!(resumed.info.key, key);
    // Its share mode holds at the file's new name: a writer is refused.
    let other = frontend(&s, "smb-b");
    let w = other.open(req(now, "bob", Rights::ALL, Durability::None));
    assert!(w.is_err(), "a writer got in beside a deny-write open");
}

/// Re-review rr37b: a file a client named `x (deleted)` — the suffix the
/// kernel gives an unlinked name — was taken for an unlinked one when its
/// persistent handle was resumed after a restart: lost, then (with the
/// rename race's retry) refused "retry" until its timeout.
#[test]
fn a_resume_of_a_file_named_like_a_deleted_one_finds_it() {
    let s = Scratch::new("id-deleted-name");
    let key = persistent_handle_of_a_killed_filterd(&s, "d/x (deleted)");
    let _d = Filterd::start(&s, &[], &[]);
    let fe = frontend(&s, "smb-a");
    let resumed = fe
        .resume(ClientId::new("alice").unwrap(), key)
        .unwrap_or_else(|e| panic!("resume refused: {e}"));
    assert_eq!(resumed.info.key, key);
}
