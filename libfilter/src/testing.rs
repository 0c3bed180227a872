//! Values the crates' tests build (feature `test-util`, for
//! dev-dependencies; always in libfilter's own tests).

use crate::model::*;

/// A persistent handle record of `path` (file 1:2, a made-up kernel
/// handle, read access, sharing all), unlocked, delete on close unset.
pub fn persistent_record(path: &str) -> HandleRecord {
    HandleRecord {
        key: ResumeKey::new_random(),
        protocol: Protocol::new("smb").expect("a protocol name"),
        frontend: InstanceName::new("smb1").expect("an instance name"),
        client: ClientId::new("c").expect("a client id"),
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        owner: None,
        path: RelPath::new(path).expect("a relative path"),
        file: FileId { dev: 1, ino: 2 },
        kernel_handle: Some(KernelHandle {
            handle_type: 1,
            bytes: vec![1, 2, 3],
        }),
        access: Access::new(Rights::READ).expect("read access"),
        share: Rights::ALL,
        durability: Durability::Persistent { timeout_ms: 1000 },
        conn: ConnState::Connected,
        create_action: CreateAction::Created,
        opened_ms: 5,
        locks: Vec::new(),
        lock_sequence: Vec::new(),
        lease: None,
        delete_on_close: false,
        share_group: None,
        lock_owner: None,
        stat: false,
        share_exempt: false,
        through_link: false,
        attached_by: 0,
    }
}

/// A TCP socket whose close blocks for as long as its peer lives (review
/// rvunsafe): connected on loopback to a peer that never reads, its send
/// buffer full, `SO_LINGER` on with a timeout of days. Returns it and that
/// peer; dropping the peer (which resets the connection) ends a close
/// waiting on the socket. A descriptor a hostile peer could send filterd.
pub fn lingering_socket() -> (std::os::fd::OwnedFd, std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::io::Write;
    let srv = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    setsockopt(&srv, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    let addr = srv.local_addr().expect("its address");
    let mut cli = std::net::TcpStream::connect(addr).expect("connect");
    let (reader, _) = srv.accept().expect("accept");
    setsockopt(&cli, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    cli.set_nonblocking(true).expect("non-blocking");
    let chunk = vec![b'x'; 65536];
    loop {
        match cli.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the send buffer: {e}"),
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 1_000_000,
    };
    setsockopt(&cli, sockopt::Linger, &linger).expect("SO_LINGER");
    (std::os::fd::OwnedFd::from(cli), reader)
}
