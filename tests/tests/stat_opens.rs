//! Attribute-only ("stat") opens through the frontend socket, as any
//! frontend may send them (issue 14's review): an honoured one gets an
//! `O_PATH` descriptor (no reading past a share-none holder), no lease that
//! would need another key's write caching broken, and it stays a stat open
//! across a filterd kill -9.

use std::os::fd::AsFd;

use libfilter::client::FilterClient;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::*;
use libfilter::proto::{ErrorCode, Event, OpenRequest};
use rkfilter_tests::{plain_open, Filterd, Scratch};

fn frontend(s: &Scratch, proto: &str, inst: &str) -> FilterClient {
    rkfilter_tests::attach(&s.socket(), proto, inst)
}

fn st(s: &str) -> LeaseState {
    LeaseState::parse(s).unwrap()
}

const RW: Rights = Rights::READ.union(Rights::WRITE);
const PERSISTENT: Durability = Durability::Persistent { timeout_ms: 60_000 };

fn req(client: &str, access: Rights, share: Rights, dur: Durability, stat: bool) -> OpenRequest {
    OpenRequest {
        access: Access::new(access).unwrap(),
        share,
        disposition: Disposition::OpenIf,
        durability: dur,
        no_wait: true,
        stat,
        ..plain_open(client, "f")
    }
}

/// Whether reading the descriptor gives the file's bytes.
fn reads(fd: impl AsFd) -> Result<usize, nix::errno::Errno> {
    let mut buf = [0u8; 16];
    nix::sys::uio::pread(fd.as_fd(), &mut buf, 0)
}

#[test]
fn an_honoured_stat_open_cannot_read_a_file_held_share_none() {
    let s = Scratch::new("stat-open-fd");
    let _d = Filterd::start(&s, &[], &[]);
    let a = frontend(&s, "smb2", "fe-a");
    let raw = frontend(&s, "raw", "fe-raw");
    let holder = a
        .open(req("alice", RW, Rights::NONE, Durability::None, false))
        .unwrap();
    nix::sys::uio::pwrite(holder.fd.as_fd(), b"secret", 0).unwrap();
    // An ordinary reader is refused by the share-none holder ...
    assert_eq!(
        raw.open(req(
            "mallory",
            Rights::READ,
            Rights::ALL,
            Durability::None,
            false
        ))
        .unwrap_err()
        .code(),
        Some(ErrorCode::SharingViolation)
    );
    // ... a stat open is not, and what it gets stats the file but does not
    // read it.
    let stat = raw
        .open(req(
            "mallory",
            Rights::READ,
            Rights::ALL,
            Durability::None,
            true,
        ))
        .unwrap();
    let st = nix::sys::stat::fstat(stat.fd.as_fd()).unwrap();
    assert_eq!(st.st_size, 6);
    assert_eq!(reads(&stat.fd), Err(nix::errno::Errno::EBADF));
    assert!(libfilter::sys::is_path_only(stat.fd.as_fd()));
    // Its times can still be set (SMB SET_INFO basic information).
    let t = libc::timespec {
        tv_sec: 1_000_000,
        tv_nsec: 0,
    };
    libfilter::sys::set_times(stat.fd.as_fd(), t, t).unwrap();
    assert_eq!(
        nix::sys::stat::fstat(holder.fd.as_fd()).unwrap().st_mtime,
        1_000_000
    );
    // The holder is undisturbed.
    assert_eq!(reads(&holder.fd), Ok(6));
}

#[test]
fn a_stat_open_gets_no_lease_beside_another_keys_write_caching() {
    let s = Scratch::new("stat-open-lease");
    let _d = Filterd::start(&s, &[], &[]);
    let a = frontend(&s, "smb2", "fe-a");
    let b = frontend(&s, "smb2", "fe-b");
    let k1 = LeaseKey(uuid::Uuid::new_v4());
    let k2 = LeaseKey(uuid::Uuid::new_v4());
    let mut first = req("alice", RW, Rights::ALL, Durability::None, false);
    first.lease = Some(LeaseRequest {
        key: k1,
        state: st("RWH"),
        epoch: 0,
    });
    let held = a.open(first).unwrap();
    assert_eq!(held.info.lease.map(|l| l.state), Some(st("RWH")));
    let mut stat = req("bob", Rights::READ, Rights::ALL, Durability::None, true);
    stat.lease = Some(LeaseRequest {
        key: k2,
        state: st("RWH"),
        epoch: 0,
    });
    let got = b.open(stat).unwrap();
    // RH beside another key's RWH would need a break, which a stat open
    // does not make: nothing is granted (MS-FSA 2.1.5.17.2).
    assert_eq!(
        got.info.lease.map(|l| l.state).unwrap_or(LeaseState::NONE),
        LeaseState::NONE
    );
    // No break reached the holder, whose lease is whole.
    assert!(!matches!(
        a.events().try_recv(),
        Ok(Event::LeaseBreak { .. })
    ));
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let h = ctl
        .handles()
        .unwrap()
        .into_iter()
        .find(|h| h.record.key == held.info.key)
        .unwrap();
    assert_eq!(h.record.lease.map(|l| l.state), Some(st("RWH")));
    // Alone (the holder gone), a stat open is granted what it asks for
    // (smbtorture smb2.lease.statopen).
    a.close(held.info.key).unwrap();
    b.close(got.info.key).unwrap();
    let mut alone = req("bob", Rights::READ, Rights::ALL, Durability::None, true);
    alone.lease = Some(LeaseRequest {
        key: k2,
        state: st("RWH"),
        epoch: 0,
    });
    assert_eq!(
        b.open(alone).unwrap().info.lease.map(|l| l.state),
        Some(st("RWH"))
    );
}

#[test]
fn a_persistent_stat_open_stays_one_after_a_filterd_kill9() {
    stays_a_stat_open_across_kill9(&Scratch::new("stat-open-restart"), &[], &[]);
}

/// The same with the table in etcd (the same record encoding).
#[test]
fn a_persistent_stat_open_stays_one_in_the_etcd_store() {
    use rkfilter_tests::etcd::{etcd_available, Cluster};
    if !etcd_available("a_persistent_stat_open_stays_one_in_the_etcd_store") {
        return;
    }
    let s = Scratch::new("stat-open-etcd");
    let cluster = Cluster::start(&s, 1);
    let url = cluster.url("rk/stat");
    let flags = ["--store", &url, "--lease-ttl-secs", "2"];
    // The restarted one takes the table over once the dead one's lease
    // has expired.
    let restart = ["--store", &url, "--lease-ttl-secs", "2", "--standby"];
    stays_a_stat_open_across_kill9(&s, &flags, &restart);
}

/// A share-none holder and a persistent stat open of its file; filterd is
/// killed and restarted (`first`, `restart`: extra flags of the two
/// starts): the flag is recovered, the
/// stat open's resumed descriptor reads nothing, and an ordinary open is
/// refused by the holder and, once it is gone, not by the stat open.
fn stays_a_stat_open_across_kill9(s: &Scratch, first: &[&str], restart: &[&str]) {
    let mut d = Filterd::start(s, first, &[]);
    let a = frontend(s, "smb2", "fe-a");
    let b = frontend(s, "smb2", "fe-b");
    let c = frontend(s, "nfs", "fe-c");
    let holder = a
        .open(req("alice", RW, Rights::NONE, PERSISTENT, false))
        .unwrap();
    nix::sys::uio::pwrite(holder.fd.as_fd(), b"secret", 0).unwrap();
    let stat = b
        .open(req("bob", Rights::READ, Rights::ALL, PERSISTENT, true))
        .unwrap();
    // Before the crash: an ordinary open is refused by the holder.
    let ordinary = || req("carol", RW, Rights::NONE, Durability::None, false);
    assert_eq!(
        c.open(ordinary()).unwrap_err().code(),
        Some(ErrorCode::SharingViolation)
    );
    d.kill9();
    drop((a, b, c));
    let _d2 = Filterd::start(s, restart, &[]);
    let ctl = FilterClient::connect_control(&s.socket()).unwrap();
    let recovered = ctl.handles().unwrap();
    let rec = |k: ResumeKey| {
        recovered
            .iter()
            .find(|h| h.record.key == k)
            .map(|h| h.record.stat)
    };
    assert_eq!(rec(holder.info.key), Some(false));
    assert_eq!(rec(stat.info.key), Some(true), "the stat flag is recovered");
    // Both come back to their frontends; the stat open still cannot read.
    let a = frontend(s, "smb2", "fe-a");
    let b = frontend(s, "smb2", "fe-b");
    let c = frontend(s, "nfs", "fe-c");
    let holder = a
        .resume(ClientId::new("alice").unwrap(), holder.info.key)
        .unwrap();
    let stat = b
        .resume(ClientId::new("bob").unwrap(), stat.info.key)
        .unwrap();
    assert_eq!(reads(&holder.fd), Ok(6));
    assert_eq!(reads(&stat.fd), Err(nix::errno::Errno::EBADF));
    // An ordinary open behaves as before the crash: refused by the holder
    // ...
    assert_eq!(
        c.open(ordinary()).unwrap_err().code(),
        Some(ErrorCode::SharingViolation)
    );
    // ... and, once the holder is gone, not refused by the stat open
    // (which, taken for an ordinary reader, would refuse a share-none
    // writer).
    a.close(holder.info.key).unwrap();
    c.open(ordinary()).unwrap();
}

/// A stat open cannot lock byte ranges: a lock would keep a share-none
/// holder out of its own data (MS-FSA 2.1.5.7; an adversarial review
/// locked the holder out of its file through an attribute-only open).
#[test]
fn a_stat_open_cannot_lock_a_holder_out_of_its_own_file() {
    let s = Scratch::new("stat-open-lock");
    let _d = Filterd::start(&s, &[], &[]);
    let a = frontend(&s, "smb2", "fe-a");
    let raw = frontend(&s, "raw", "fe-raw");
    let holder = a
        .open(req("alice", RW, Rights::NONE, Durability::None, false))
        .unwrap();
    let stat = raw
        .open(req(
            "mallory",
            Rights::READ,
            Rights::ALL,
            Durability::None,
            true,
        ))
        .unwrap();
    let lock = vec![libfilter::locks::LockOp {
        range: libfilter::locks::LockRange {
            offset: 0,
            length: 100,
        },
        exclusive: true,
        unlock: false,
    }];
    assert_eq!(
        raw.lock(stat.info.key, lock.clone(), None)
            .unwrap_err()
            .code(),
        Some(ErrorCode::AccessDenied)
    );
    // The holder still writes its own data, and may lock it itself.
    let io = a
        .check_io(
            holder.info.key,
            libfilter::locks::LockRange {
                offset: 0,
                length: 6,
            },
            true,
        )
        .unwrap();
    drop(io);
    a.lock(holder.info.key, lock, None).unwrap();
}
