//! A fake nfsl/1 server on a loopback TcpListener, for the unit tests: each
//! test scripts exactly what the server reads and writes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// Accepts one connection and runs `script` on it in a thread.
pub(crate) fn fake(
    script: impl FnOnce(BufReader<TcpStream>, TcpStream) + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::Builder::new()
        .name("nfsl-fake-server".into())
        .spawn(move || {
            let (s, _) = l.accept().unwrap();
            // A test whose client never hangs up fails instead of hanging.
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let w = s.try_clone().unwrap();
            script(BufReader::new(s), w);
        })
        .unwrap();
    (addr, t)
}

/// The next request, parsed.
pub(crate) fn recv_line(r: &mut BufReader<TcpStream>) -> Value {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap()
}

/// Reads until the client closes the connection (or 30 s pass).
pub(crate) fn wait_close(r: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
}

/// Writes one line.
pub(crate) fn send(w: &mut TcpStream, v: Value) {
    w.write_all(format!("{v}\n").as_bytes()).unwrap();
}
