//! `smbl_pairs ADDR N [typed|value] [durable|persistent]`: one connection's N
//! CREATE+CLOSE pairs (durable + RWH lease, or persistent) against an
//! smbshim at ADDR, as rkbench's smbl/1 rows make them — for counting the
//! client's CPU and instructions per pair (`perf stat`, callgrind: the
//! difference of two N). `value` makes them through the `Value` calls
//! ([`smbl::Client::create`]), `typed` (the default) through
//! [`smbl::Client::create_outcome`].

use smbl::{Client, CreateArgs, Durable};
use uuid::Uuid;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let addr = a
        .get(1)
        .ok_or("usage: smbl_pairs ADDR N [typed|value] [durable|persistent]")?;
    let n: u64 = a.get(2).map_or(Ok(1000), |s| s.parse())?;
    let typed = a.get(3).is_none_or(|m| m != "value");
    let persistent = a.get(4).is_some_and(|k| k == "persistent");
    let c = Client::connect(addr.as_str())?;
    let sid = c
        .session_setup(Uuid::new_v4(), "bench", None)?
        .session_id()
        .ok_or("no session_id")?;
    let mut args = CreateArgs::new(sid, format!("pairs-{}", std::process::id()));
    if !persistent {
        args.lease = Some((Uuid::new_v4(), "RWH".into()));
    }
    let started = std::time::Instant::now();
    for _ in 0..n {
        args.durable = Some(Durable {
            create_guid: Uuid::new_v4(),
            persistent,
            timeout_ms: 0,
        });
        if typed {
            let r = c.create_outcome(&args)?.require_success()?;
            let f = r.file_id().ok_or("no file_id")?;
            c.close_outcome(sid, f)?.require_success()?;
        } else {
            let r = c.create(&args)?.require_success()?;
            let f = r.file_id().ok_or("no file_id")?;
            c.close(sid, f)?.require_success()?;
        }
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    println!("{n} pairs, {us:.1} µs/pair");
    Ok(())
}
