//! A peer of filterd that stops reading hurts only itself (invariant 9):
//! the engine never waits on its socket, other peers keep being answered,
//! and once what is queued for it passes its limit it is dropped.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use libfilter::client::FilterClient;
use libfilter::sys::{recv_packet, send_packet, Packet};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use rkfilter_tests::{wait_for, Filterd, Scratch};

#[test]
fn a_peer_that_stops_reading_is_dropped_and_stalls_nobody() {
    let s = Scratch::new("slow-peer");
    let d = Filterd::start(&s, &[], &[]);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&s.socket()).unwrap()).unwrap();
    send_packet(
        fd.as_fd(),
        br#"{"version":1,"role":{"kind":"control"}}"#,
        None,
    )
    .unwrap();
    let mut buf = vec![0u8; 70_000];
    assert!(matches!(
        recv_packet(fd.as_fd(), &mut buf).unwrap(),
        Packet::Data { .. }
    ));
    // Ask, and never read an answer.
    let flood = std::thread::spawn(move || {
        for id in 0..200_000u64 {
            let req = format!(r#"{{"id":{id},"op":"status"}}"#);
            if send_packet(fd.as_fd(), req.as_bytes(), None).is_err() {
                return Some(id);
            }
        }
        None
    });
    // Meanwhile another peer is answered promptly, every time.
    let mut ctl = FilterClient::connect_control(&s.socket()).unwrap();
    ctl.set_timeout(Duration::from_secs(2));
    for _ in 0..50 {
        ctl.stats()
            .expect("answered while another peer does not read");
    }
    let dropped_after = flood.join().unwrap();
    assert!(
        dropped_after.is_some(),
        "a peer that never reads is dropped once its queue is full"
    );
    wait_for("the drop to be logged", Duration::from_secs(10), || {
        d.log_text()
            .contains("dropping a peer that cannot take what it is sent")
            .then_some(())
    });
    ctl.stats().expect("still serving");
}
