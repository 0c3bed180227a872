//! A complete (tiny) frontend over libfilter — the example docs/integrating.md
//! walks through. It attaches to filterd, opens a persistent handle for a
//! client, writes through the descriptor filterd hands back, records the
//! reply of that write for replay, takes a byte-range lock, and keeps its
//! handles across a daemon restart with `Attachment`.
//!
//! Run against a filterd: `cargo run -p libfilter --example minimal_frontend -- STATE/filterd.sock`
#![forbid(unsafe_code)]

use std::os::unix::fs::FileExt;

use libfilter::attach::{AttachEvent, Attachment};
use libfilter::locks::{LockOp, LockRange};
use libfilter::model::*;
use libfilter::proto::OpenRequest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::args()
        .nth(1)
        .ok_or("usage: minimal_frontend SOCKET")?;
    // 1. Attach under a protocol and an instance name. A replacement process
    //    with the same name takes over this one's handles if it dies.
    let filter = Attachment::connect(
        socket.as_ref(),
        Protocol::new("myproto")?,
        InstanceName::new("myproto-1")?,
    )?;

    // 2. Open for a client. The create GUID identifies the open for
    //    reconnects and replays; persistent means it survives a filterd crash.
    let guid = CreateGuid(uuid::Uuid::new_v4());
    let client = ClientId::new("client-42")?;
    let h = filter.open(OpenRequest {
        create_guid: Some(guid),
        ..OpenRequest::new(
            client.clone(),
            RelPath::new("hello.txt")?,
            Access::new(Rights::READ.union(Rights::WRITE))?,
            Rights::READ,
            Disposition::OpenIf,
            Durability::Persistent { timeout_ms: 0 },
        )
    })?;
    println!("opened {} ({})", h.info.key, h.info.create_action);

    // 3. I/O goes straight to the descriptor: no round trip per read/write.
    let file = std::fs::File::from(h.fd);
    file.write_all_at(b"hello from a frontend\n", 0)?;

    // 4. Record the reply of a mutating request, so a client re-sending it
    //    after a failure gets the same answer without a second execution.
    let c = filter.client();
    c.record_reply(
        ReplayScope::Handle(h.info.key),
        1,
        "{\"count\":22}".into(),
        64,
    )?;
    println!(
        "replay of op 1 answers {:?}",
        c.lookup_reply(ReplayScope::Handle(h.info.key), 1)?
            .map(|r| r.reply)
    );

    // 5. Locks are enforced across protocols and mirrored for local fcntl users.
    let lock = LockOp {
        range: LockRange {
            offset: 0,
            length: 5,
        },
        exclusive: true,
        unlock: false,
    };
    c.lock(h.info.key, vec![lock], None)?;

    // 6. If filterd restarts meanwhile, the attachment reconnects and resumes
    //    the handle by itself; the descriptor keeps working throughout, but
    //    reads and writes wait (`io_ready`) until the frontend has marked
    //    the files that have locks and called `resynced`. A frontend that
    //    skips CheckIo on files without locks decides each read or write
    //    with `decide_io` (and does it while holding the per-file guard
    //    that returns), handles `LocksPresent` with `locks_present`, and
    //    applies `Reattached` under `exclusive_io`. On a file with locks
    //    (`IoDecision::Check`) `check_io` returns a guard to hold, through
    //    `checked`, across the pread/pwrite: filterd grants no conflicting
    //    lock until it is dropped. The attachment waits for those guards
    //    before it says hello to a restarted filterd. With the table in
    //    etcd filterd grants no lock hints (`FEATURE_FENCED_IO`) and
    //    `decide_io` answers `Check` for every file: a filterd stopped
    //    past its lease must not leave its frontends writing unchecked.
    if let Ok(AttachEvent::Reattached {
        generation,
        resumed,
        locked,
        lost,
        ..
    }) = filter
        .events()
        .recv_timeout(std::time::Duration::from_millis(100))
    {
        println!(
            "reattached: {} resumed ({} with locks), {} lost",
            resumed.len(),
            locked.len(),
            lost.len()
        );
        filter.resynced(generation);
    }

    // 7. Close when the client closes (a dropped client connection would
    //    call `detach` instead and keep the handle for its timeout).
    filter.close(h.info.key)?;
    println!("closed");
    Ok(())
}
