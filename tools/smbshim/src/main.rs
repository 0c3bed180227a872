//! smbshim — the SMB-like (smbl/1) frontend of rkfilter.
//!
//! Serves spec/smb-like.md over TCP, one JSON object per line, and keeps
//! nothing durable of its own: every open lives in filterd (through
//! libfilter's `Attachment`), so a replacement smbshim with the same
//! `--instance` takes over, and a filterd restart is ridden out.
//!
//! One thread per client connection: requests of one connection are served
//! in order (smbl/1 allows replies in any order; in order is one of them),
//! blocking I/O keeps each step simple, and the connections a file server
//! frontend carries are counted in hundreds, not hundreds of thousands.
//!
//! Every command of smbl/1 is served; docs/smb-like.md describes this
//! implementation's choices.
#![forbid(unsafe_code)]

mod server;

use std::path::PathBuf;

use clap::Parser;

/// The SMB-like (smbl/1) frontend of rkfilter.
#[derive(Parser, Debug)]
#[command(name = "smbshim", version, about, long_about = None)]
struct Args {
    /// filterd's Unix socket.
    #[arg(long, value_name = "SOCKET")]
    filter: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Frontend instance name [default: smb].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    server::run(
        &args.filter,
        &args.listen,
        args.instance.as_deref().unwrap_or("smb"),
    )
}
