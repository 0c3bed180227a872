//! nfsshim — the NFS-like (nfsl/1) frontend of rkfilter.
//!
//! Serves spec/nfs-like.md over TCP, one JSON object per line. It keeps
//! nothing durable of its own: client records, sessions with their slot
//! caches and open states are records of its session scopes in filterd
//! (`state.rs`), opens are persistent filterd handles, so a replacement
//! nfsshim with the same `--instance`, or a restarted filterd, carries on
//! with the same clientids, sessionids and stateids.
//!
//! One thread per client connection, as in smbshim: requests of one
//! connection run in order; blocking calls keep each step simple.
#![forbid(unsafe_code)]

mod server;
mod state;

use std::path::PathBuf;

use clap::Parser;

/// The NFS-like (nfsl/1) frontend of rkfilter.
#[derive(Parser, Debug)]
#[command(name = "nfsshim", version, about, long_about = None)]
struct Args {
    /// filterd's Unix socket.
    #[arg(long, value_name = "SOCKET")]
    filter: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Frontend instance name [default: nfs].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Client lease length in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 90_000)]
    lease_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    server::run(
        &args.filter,
        &args.listen,
        args.instance.as_deref().unwrap_or("nfs"),
        args.lease_ms.max(1_000),
    )
}
