//! Line-JSON framing shared by rkfilter's protocol frontends: smbl/1 and
//! nfsl/1 both carry one JSON object per `\n`-terminated line over TCP,
//! with a 4 MiB line limit after which the server answers once and closes.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

/// Longest request line (both specs: 4 MiB).
pub const MAX_LINE: usize = 4 << 20;

/// A connection's writer, shared with whoever pushes notifications.
pub type Writer = Arc<Mutex<TcpStream>>;

/// Binds `listen` and prints `listening on HOST:PORT` (the real port) as
/// the first line on stdout, as spec/cli.md asks.
pub fn announce(listen: &str) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(listen)?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on {}", l.local_addr()?)?;
    out.flush()?;
    Ok(l)
}

/// Accepts connections forever, serving each on a thread of its own
/// (`{prefix}-conn-N`, N numbering the connections from 1).
pub fn accept_forever(
    listener: TcpListener,
    prefix: &str,
    serve: impl Fn(u64, TcpStream) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    let mut next = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        next += 1;
        let (conn, serve) = (next, serve.clone());
        let _ = std::thread::Builder::new()
            .name(format!("{prefix}-conn-{conn}"))
            .spawn(move || serve(conn, stream));
    }
}

/// The writers of live connections by number, for pushing notifications
/// (LEASE_BREAK, CB_RECALL) to the connection a client last used.
#[derive(Default)]
pub struct Writers(Mutex<HashMap<u64, Writer>>);

impl Writers {
    /// The writer of connection `conn`, while it lives.
    pub fn get(&self, conn: u64) -> Option<Writer> {
        self.0.lock().ok().and_then(|w| w.get(&conn).cloned())
    }

    /// Serves `stream` as connection `conn` ([`serve_lines`]) with its
    /// writer registered meanwhile.
    pub fn serve(
        &self,
        conn: u64,
        stream: TcpStream,
        id_field: &str,
        status: &str,
        handle: impl FnMut(&[u8]) -> Value,
    ) {
        let Ok((writer, reader)) = split(stream) else {
            return;
        };
        if let Ok(mut w) = self.0.lock() {
            w.insert(conn, writer.clone());
        }
        serve_lines(reader, &writer, id_field, status, handle);
        if let Ok(mut w) = self.0.lock() {
            w.remove(&conn);
        }
    }
}

/// Splits a connection into its shared writer and a buffered reader.
pub fn split(stream: TcpStream) -> std::io::Result<(Writer, BufReader<TcpStream>)> {
    let w = stream.try_clone()?;
    Ok((Arc::new(Mutex::new(w)), BufReader::new(stream)))
}

/// Sends one JSON line; false when the connection is gone.
pub fn send(w: &Mutex<TcpStream>, v: &Value) -> bool {
    let mut line = v.to_string();
    line.push('\n');
    match w.lock() {
        Ok(mut s) => s.write_all(line.as_bytes()).is_ok(),
        Err(_) => false,
    }
}

/// One line read.
enum Line {
    Data,
    Eof,
    TooLong,
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Line {
    buf.clear();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    match r.by_ref().take(limit).read_until(b'\n', buf) {
        Ok(0) | Err(_) => Line::Eof,
        Ok(_) if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE => Line::TooLong,
        Ok(_) => Line::Data,
    }
}

/// Serves a connection: answers every line with `handle`, in order, until
/// the peer goes away. An over-long line is answered with an error
/// (`id_field` null, `status`) and ends the connection.
pub fn serve_lines(
    mut reader: BufReader<TcpStream>,
    writer: &Writer,
    id_field: &str,
    status: &str,
    mut handle: impl FnMut(&[u8]) -> Value,
) {
    let mut buf = Vec::new();
    loop {
        match read_line(&mut reader, &mut buf) {
            Line::Data => {}
            Line::Eof => return,
            Line::TooLong => {
                send(
                    writer,
                    &json!({id_field: null, "status": status, "error": "line longer than 4 MiB"}),
                );
                return;
            }
        }
        if !send(writer, &handle(&buf)) {
            return;
        }
    }
}

/// Decodes a request line: its object and its numeric id (`id_field`), or
/// the reply for a malformed one (`status`, the id echoed when readable).
pub fn parse_request(
    line: &[u8],
    id_field: &str,
    status: &str,
) -> Result<(Map<String, Value>, u64), Value> {
    let v: Value = serde_json::from_slice(line).map_err(
        |e| json!({id_field: null, "status": status, "error": format!("not JSON: {e}")}),
    )?;
    let Value::Object(obj) = v else {
        return Err(json!({id_field: null, "status": status, "error": "not a JSON object"}));
    };
    let Some(id) = obj.get(id_field).and_then(Value::as_u64) else {
        return Err(
            json!({id_field: null, "status": status, "error": format!("{id_field} must be a u64")}),
        );
    };
    Ok((obj, id))
}

/// A required field.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    obj.get(name).ok_or_else(|| format!("missing field {name}"))
}

/// A required u64 field.
pub fn u64_field(obj: &Map<String, Value>, name: &str) -> Result<u64, String> {
    field(obj, name)?
        .as_u64()
        .ok_or_else(|| format!("{name} must be a u64"))
}

/// A required string field.
pub fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    field(obj, name)?
        .as_str()
        .ok_or_else(|| format!("{name} must be a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_get_the_status_and_a_null_id() {
        for line in [&b"{x"[..], b"[1]", b"{\"mid\": \"7\"}"] {
            let r = parse_request(line, "mid", "BAD").unwrap_err();
            assert_eq!(r["status"], "BAD", "{r}");
            assert!(r["mid"].is_null());
            assert!(r["error"].is_string());
        }
        let (obj, id) = parse_request(b"{\"xid\": 9, \"op\": \"X\"}", "xid", "BAD").unwrap();
        assert_eq!((id, obj["op"].as_str()), (9, Some("X")));
    }

    #[test]
    fn lines_are_limited() {
        let mut long = vec![b'a'; MAX_LINE + 2];
        long.push(b'\n');
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut &long[..], &mut buf), Line::TooLong));
        let ok = b"{}\n";
        assert!(matches!(read_line(&mut &ok[..], &mut buf), Line::Data));
        assert!(matches!(read_line(&mut &b""[..], &mut buf), Line::Eof));
    }
}
