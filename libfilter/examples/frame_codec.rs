//! Issue 16: the CPU cost of the frame codec, JSON against binary frames
//! and the compact hot frames
//! (`cargo run --release -p libfilter --example frame_codec`): a
//! non-durable open+close pair's four frames (open request, opened reply,
//! close request, done reply), each encoded and decoded once, timed with
//! the thread's CPU clock so other processes' load does not count.

use libfilter::model::*;
use libfilter::proto::*;
fn cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let key = ResumeKey::new_random();
    let req = RequestFrame {
        id: 12345,
        req: Request::Open(OpenRequest::new(
            ClientId::new("client-1").unwrap(),
            RelPath::new("dir/file-0001.txt").unwrap(),
            Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
            Rights::READ,
            Disposition::OpenIf,
            Durability::None,
        )),
    };
    let rep = ServerFrame::Reply {
        id: Some(12345),
        result: Ok(Reply::Opened(Opened {
            key,
            create_action: CreateAction::Opened,
            size: 4096,
            file: FileId {
                dev: 2049,
                ino: 123456,
            },
            durability: Durability::None,
            lease: None,
            locked: false,
        })),
    };
    let close = RequestFrame {
        id: 12346,
        req: Request::Close {
            key,
            put: Vec::new(),
            delete: Vec::new(),
            delete_on_close: None,
        },
    };
    let done = ServerFrame::Reply {
        id: Some(12346),
        result: Ok(Reply::Done),
    };
    // `frame_codec [PAIRS [json|binary|compact]]`: one encoding for a fixed
    // count (for `perf stat -e instructions:u` of two counts), else all
    // three alternated over five rounds.
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let (rounds, encs) = match args.next().as_deref() {
        Some("json") => (1, vec![Encoding::Json]),
        Some("binary") => (1, vec![Encoding::Binary]),
        Some("compact") => (1, vec![Encoding::Compact]),
        _ => (5, vec![Encoding::Json, Encoding::Binary, Encoding::Compact]),
    };
    for round in 0..rounds {
        for &enc in &encs {
            let t = cpu_s();
            let mut bytes = 0;
            for _ in 0..n {
                // One open+close pair: both requests and both replies,
                // each encoded once and decoded once.
                let a = encode_request(enc, &req).unwrap();
                let b = encode_server(enc, &rep).unwrap();
                let c = encode_request(enc, &close).unwrap();
                let d = encode_server(enc, &done).unwrap();
                bytes = a.len() + b.len() + c.len() + d.len();
                std::hint::black_box(decode_request(&a).unwrap());
                std::hint::black_box(decode_server(&b).unwrap());
                std::hint::black_box(decode_request(&c).unwrap());
                std::hint::black_box(decode_server(&d).unwrap());
            }
            let per = (cpu_s() - t) * 1e6 / f64::from(n);
            println!("round {round} {enc:?}: {per:.2} CPU µs per open+close pair (4 frames, {bytes} bytes)");
        }
    }
}
