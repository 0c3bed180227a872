//! A filterd that was stalled — SIGSTOP and SIGCONT here; a cgroup
//! freeze, `docker pause`, a debugger or a long preemption in the field —
//! reads what its peers sent in time before it enforces the deadlines that
//! passed meanwhile (review rvclock). Before: `epoll_wait`'s `EINTR` after
//! SIGCONT was taken for "nothing ready", and the engine went straight to
//! its deadlines: a resume sent 200 ms into a 2 s timeout found its handle
//! expired, a lease break acknowledged at once was "not acknowledged in
//! time", a frontend that acknowledged a lock hint was dropped; and with
//! more than one read round's worth of frames (32) ahead of the answer,
//! that happened however the wait returned.
//!
//! Each test stops filterd (waiting until every thread of it is stopped),
//! sends its answer on a raw connection (queued in filterd's socket when
//! `send` returns), lets the deadline pass while filterd is stopped, then
//! lets it go on. The waits for time to pass are the point of the tests,
//! not waits for readiness.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use libfilter::client::FilterClient;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::locks::{LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::{
    self, Event, Hello, OpenRequest, Reply, Request, RequestFrame, ResumeRequest, ResumeTarget,
    Role, ServerFrame, WireError,
};
use libfilter::sys::{recv_packet, send_packet, Packet};
use nix::sys::signal::Signal;
use rkfilter_tests::{plain_open, Filterd, Scratch};

/// A frontend written frame by frame, so the test knows each request is
/// in filterd's socket before it goes on.
struct RawFront {
    fd: OwnedFd,
    buf: Vec<u8>,
    next: u64,
    events: VecDeque<Event>,
}

impl RawFront {
    fn attach(socket: &Path, protocol: &str, instance: &str, features: u64) -> RawFront {
        let fd = rkfilter_tests::raw_socket(socket);
        // A filterd that never answers fails the test, not hangs it.
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(30, 0),
        )
        .unwrap();
        let hello = proto::encode(&Hello {
            version: proto::PROTO_VERSION,
            features,
            role: Role::Frontend {
                protocol: Protocol::new(protocol).unwrap(),
                instance: InstanceName::new(instance).unwrap(),
                incarnation: None,
            },
        })
        .unwrap();
        send_packet(fd.as_fd(), &hello, None).unwrap();
        let mut f = RawFront {
            fd,
            buf: vec![0u8; proto::MAX_FRAME + 1],
            next: 0,
            events: VecDeque::new(),
        };
        match f.frame() {
            ServerFrame::Hello(_) => f,
            other => panic!("hello refused: {other:?}"),
        }
    }

    /// Sends `req` (queued in filterd's socket on return); its id.
    fn send(&mut self, req: Request) -> u64 {
        self.next += 1;
        let bytes = proto::encode(&RequestFrame { id: self.next, req }).unwrap();
        send_packet(self.fd.as_fd(), &bytes, None).unwrap();
        self.next
    }

    fn frame(&mut self) -> ServerFrame {
        match recv_packet(self.fd.as_fd(), &mut self.buf).unwrap() {
            Packet::Data { len, .. } => proto::decode_server(&self.buf[..len]).unwrap(),
            other => panic!("no frame: {other:?}"),
        }
    }

    /// The reply to request `id` (replies to others are passed over).
    fn reply(&mut self, id: u64) -> Result<Reply, WireError> {
        loop {
            match self.frame() {
                ServerFrame::Reply {
                    id: Some(i),
                    result,
                } if i == id => return result,
                ServerFrame::Event(e) => self.events.push_back(e),
                _ => {}
            }
        }
    }

    fn call(&mut self, req: Request) -> Result<Reply, WireError> {
        let id = self.send(req);
        self.reply(id)
    }

    fn event(&mut self) -> Event {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        loop {
            if let ServerFrame::Event(e) = self.frame() {
                return e;
            }
        }
    }
}

fn opened(r: Result<Reply, WireError>) -> ResumeKey {
    match r {
        Ok(Reply::Opened(o)) => o.key,
        other => panic!("not opened: {other:?}"),
    }
}

/// Returns once `d` has passed since `from`.
fn let_pass(from: Instant, d: Duration) {
    std::thread::sleep((from + d).saturating_duration_since(Instant::now()));
}

fn rw() -> Access {
    Access::new(Rights::READ.union(Rights::WRITE)).unwrap()
}

#[test]
fn a_resume_sent_in_time_while_filterd_is_stopped_resumes() {
    let s = Scratch::new("stall-resume");
    let d = Filterd::start(&s, &[], &[]);
    let mut fe = RawFront::attach(&s.socket(), "smb", "smb-a", 0);
    let key = opened(fe.call(Request::Open(OpenRequest {
        access: rw(),
        disposition: Disposition::OpenIf,
        share: Rights::NONE,
        durability: Durability::Durable { timeout_ms: 2_000 },
        ..plain_open("carol", "f")
    })));
    assert_eq!(
        fe.call(Request::Detach {
            key,
            delete_on_close: None
        }),
        Ok(Reply::Done)
    );
    let detached = Instant::now();
    d.stop();
    // Sent with nearly all of the 2 s to go.
    let id = fe.send(Request::Resume(ResumeRequest {
        client: ClientId::new("carol").unwrap(),
        target: ResumeTarget::Key { key },
        owner: None,
        matching: None,
        if_last_held: false,
    }));
    let_pass(detached, Duration::from_millis(3_000));
    d.signal(Signal::SIGCONT);
    let r = fe.reply(id);
    let st = d.control().stats().unwrap();
    assert_eq!(opened(r), key, "the resume that came in time is refused");
    assert_eq!(st.expiries, 0);
}

#[test]
fn a_break_acknowledged_in_time_while_filterd_is_stopped_is_honoured() {
    let s = Scratch::new("stall-break");
    let d = Filterd::start(&s, &["--break-timeout-ms", "1000"], &[]);
    let mut smb = RawFront::attach(&s.socket(), "smb", "smb-1", 0);
    let nfs = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("nfs").unwrap(),
        InstanceName::new("nfs-1").unwrap(),
    )
    .unwrap();
    let lk = LeaseKey(uuid::Uuid::new_v4());
    opened(smb.call(Request::Open(OpenRequest {
        access: rw(),
        share: Rights::ALL,
        disposition: Disposition::OpenIf,
        lease: Some(LeaseRequest {
            key: lk,
            state: LeaseState::parse("RWH").unwrap(),
            epoch: 0,
        }),
        ..plain_open("alice", "f")
    })));
    let pending = std::thread::spawn(move || {
        nfs.open(OpenRequest {
            access: Access::new(Rights::READ).unwrap(),
            share: Rights::ALL,
            disposition: Disposition::OpenIf,
            ..plain_open("bob", "f")
        })
        .map(|_| ())
    });
    match smb.event() {
        Event::LeaseBreak { .. } => {}
        other => panic!("{other:?}"),
    }
    let broken = Instant::now();
    d.stop();
    // Acknowledged at once, with nearly all of the second to go.
    let id = smb.send(Request::LeaseBreakAck {
        lease_key: lk,
        state: LeaseState::parse("RH").unwrap(),
        client: None,
    });
    let_pass(broken, Duration::from_millis(2_000));
    d.signal(Signal::SIGCONT);
    let r = smb.reply(id);
    pending.join().unwrap().unwrap();
    match r {
        Ok(Reply::Lease(l)) => assert_eq!(l.state, LeaseState::parse("RH").unwrap()),
        other => panic!("the acknowledgement sent in time was not honoured: {other:?}"),
    }
    assert!(
        !d.log_text().contains("not acknowledged in time"),
        "{}",
        d.log_text()
    );
}

/// The acknowledgement of a lock hint sent in time behind `queued` other
/// requests of the same frontend. Returns filterd's count of dropped
/// frontends.
fn hint_acknowledged_behind(name: &str, queued: usize) -> u64 {
    let s = Scratch::new(name);
    let d = Filterd::start(&s, &["--break-timeout-ms", "1000"], &[]);
    std::fs::write(s.root().join("f"), [b'x'; 100]).unwrap();
    let mut writer = RawFront::attach(&s.socket(), "nfs", "nfs-w", proto::FEATURE_LOCK_HINTS);
    opened(writer.call(Request::Open(OpenRequest {
        access: rw(),
        disposition: Disposition::OpenIf,
        durability: Durability::Durable { timeout_ms: 60_000 },
        ..plain_open("carol", "f")
    })));
    let locker = FilterClient::connect_frontend(
        &s.socket(),
        Protocol::new("smb").unwrap(),
        InstanceName::new("smb-l").unwrap(),
    )
    .unwrap();
    let key = locker
        .open(OpenRequest {
            access: rw(),
            disposition: Disposition::OpenIf,
            ..plain_open("alice", "f")
        })
        .unwrap()
        .info
        .key;
    let lock = std::thread::spawn(move || {
        locker
            .lock(
                key,
                vec![LockOp {
                    range: LockRange {
                        offset: 0,
                        length: 10,
                    },
                    exclusive: true,
                    unlock: false,
                }],
                None,
            )
            .map(|_| ())
    });
    let file = match writer.event() {
        Event::LocksPresent { file } => file,
        other => panic!("{other:?}"),
    };
    let hinted = Instant::now();
    d.stop();
    // The frontend goes on: its clients' requests, then its
    // acknowledgement, all with nearly the whole second to go.
    for _ in 0..queued {
        writer.send(Request::Stats);
    }
    let ack = writer.send(Request::LockHintAck { file });
    let_pass(hinted, Duration::from_millis(2_000));
    d.signal(Signal::SIGCONT);
    assert_eq!(writer.reply(ack), Ok(Reply::Done), "{}", d.log_text());
    lock.join().unwrap().unwrap();
    d.control().stats().unwrap().frontends_dropped
}

#[test]
fn a_lock_hint_acknowledged_in_time_while_filterd_is_stopped_drops_nobody() {
    assert_eq!(hint_acknowledged_behind("stall-hint", 4), 0);
}

/// More than one read round's worth of frames (32) ahead of the answer.
#[test]
fn a_lock_hint_acknowledged_in_time_behind_many_requests_drops_nobody() {
    assert_eq!(hint_acknowledged_behind("stall-hint-many", 100), 0);
}
