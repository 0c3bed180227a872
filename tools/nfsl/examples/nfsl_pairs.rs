//! `nfsl_pairs ADDR N [typed|value]`: one connection's N OPEN+CLOSE pairs
//! (create unchecked, read and write, deny none, slot 0) against an
//! nfsshim at ADDR, as rkbench's nfsl/1 rows make them — for counting the
//! client's CPU and instructions per pair (`perf stat`, callgrind: the
//! difference of two N). `value` makes them through the `Value` calls
//! ([`nfsl::Session::open`]), `typed` (the default) through
//! [`nfsl::Session::open_outcome`].

use std::sync::Arc;

use nfsl::{Client, CreateMode, OpenArgs, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let addr = a.get(1).ok_or("usage: nfsl_pairs ADDR N [typed|value]")?;
    let n: u64 = a.get(2).map_or(Ok(1000), |s| s.parse())?;
    let typed = a.get(3).is_none_or(|m| m != "value");
    let pid = std::process::id();
    let c = Arc::new(Client::connect(addr.as_str())?);
    let id = c
        .exchange_id(&format!("pairs-{pid}"), "0123456789abcdef")?
        .require_ok()?;
    let created = c.create_session(id.clientid().ok_or("no clientid")?)?;
    let s = Session::from_reply(c, &created.require_ok()?).ok_or("no session")?;
    let mut args = OpenArgs::new(format!("pairs-{pid}-open"), format!("pairs-{pid}"));
    args.create = Some((CreateMode::Unchecked, None));
    let started = std::time::Instant::now();
    for _ in 0..n {
        if typed {
            let r = s.open_outcome(0, &args)?.require_ok()?;
            let sid = r.stateid().ok_or("no stateid")?;
            s.close_outcome(0, sid)?.require_ok()?;
        } else {
            let r = s.open(0, &args)?.require_ok()?;
            let sid = r.stateid().ok_or("no stateid")?;
            s.close(0, &sid)?.require_ok()?;
        }
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    println!("{n} pairs, {us:.1} µs/pair");
    Ok(())
}
