//! smbshim — the SMB-like (smbl/1) frontend of rkfilter.
//!
//! Not implemented yet: this build only parses its command line (per
//! spec/cli.md) and says so. See the project's issues for the plan.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// The SMB-like (smbl/1) frontend of rkfilter (not implemented yet).
#[derive(Parser, Debug)]
#[command(name = "smbshim", version, about, long_about = None)]
struct Args {
    /// filterd's Unix socket.
    #[arg(long, value_name = "SOCKET")]
    filter: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Frontend instance name [default: the protocol name].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "smbshim is not implemented yet in this build (would attach to {} and listen on {})",
        args.filter.display(),
        args.listen
    )
}
