//! Issue 16: CPU per mediated non-durable open+close pair, both sides,
//! over a fixed count — what machine load distorts least. Attaches to a
//! running filterd at SOCKET as a frontend, warms up, then runs PAIRS
//! open+close pairs of `f0` on one connection and prints this process's
//! CPU per pair (`getrusage`) and filterd's (`/proc/PID/stat` utime+stime
//! of the pid its hello names, all its threads). The encoding is the
//! client's choice (`RKFILTER_FRAMES`: unset compact, `binary`, `json`),
//! so one filterd serves the alternation:
//!
//! `cargo run --release -p libfilter --example pair_cpu -- SOCKET [PAIRS]`

use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;

fn own_cpu_s() -> f64 {
    // SAFETY: a valid out-pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("filterd's stat");
    // Fields after the command's closing parenthesis: utime is the 14th
    // field of the line, stime the 15th.
    let after = stat.rsplit_once(')').expect("stat line").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime")) / hz
}

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = std::path::PathBuf::from(args.next().expect("SOCKET"));
    let pairs: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let client = FilterClient::connect_frontend(
        &socket,
        Protocol::new("bench").unwrap(),
        InstanceName::new(format!("pair-cpu-{}", std::process::id())).unwrap(),
    )
    .expect("attaches");
    let pid = client.hello().pid;
    let features = client.hello().features;
    let req = OpenRequest::new(
        ClientId::new("client-1").unwrap(),
        RelPath::new("f0").unwrap(),
        Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        Rights::ALL,
        Disposition::OpenIf,
        Durability::None,
    );
    let pair = || {
        let h = client.open(req.clone()).expect("opens");
        client.close(h.info.key).expect("closes");
    };
    for _ in 0..2_000 {
        pair();
    }
    let (c0, d0, w0) = (own_cpu_s(), proc_cpu_s(pid), std::time::Instant::now());
    for _ in 0..pairs {
        pair();
    }
    let (c1, d1, wall) = (own_cpu_s(), proc_cpu_s(pid), w0.elapsed());
    let per = |s: f64| s * 1e6 / f64::from(pairs);
    println!(
        "features {features}: client {:.2} CPU µs/pair, filterd {:.2} CPU µs/pair, wall {:.2} µs/pair",
        per(c1 - c0),
        per(d1 - d0),
        wall.as_secs_f64() * 1e6 / f64::from(pairs)
    );
}
