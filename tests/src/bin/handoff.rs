//! handoff — connects to filterd's socket N times and hands each connection
//! back, unused, over its standard input (one end of a Unix socket pair).
//!
//! `setpriv --reuid=UID … -- handoff SOCKET N` gives a test connections
//! that filterd sees (`SO_PEERCRED`, taken at `connect`) as another user's,
//! which the test then drives frame by frame itself.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, n] = args.as_slice() else {
        anyhow::bail!("usage: handoff SOCKET N");
    };
    let n: usize = n.parse()?;
    let back = std::io::stdin();
    for _ in 0..n {
        let conn = rkfilter_tests::raw_socket(sock.as_ref());
        libfilter::sys::send_packet(back.as_fd(), b"conn", Some(conn.as_fd()))?;
    }
    Ok(())
}
