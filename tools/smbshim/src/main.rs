//! smbshim — the SMB-like (smbl/1) frontend of rkfilter.
//!
//! Serves spec/smb-like.md over TCP, one JSON object per line, and keeps
//! nothing durable of its own: every open lives in filterd (through
//! libfilter's `Attachment`), so a replacement smbshim with the same
//! `--instance` takes over, and a filterd restart is ridden out.
//!
//! Three threads per client connection (shimline): a reader that answers
//! LEASE_BREAK_ACK at once (and, while the worker is idle, a CREATE that
//! needs no lease break, a CLOSE or an ECHO), a worker that serves the
//! other requests in order (smbl/1 allows replies in any order), and a
//! writer for what the socket does not take at once (replies go straight
//! to the socket when nothing is queued), so a client that stops reading
//! is dropped instead of stalling anyone. Blocking I/O keeps each step
//! simple; connections are capped (--max-connections, and per peer
//! address), counted in hundreds, not hundreds of thousands.
//!
//! Every command of smbl/1 is served; docs/smb-like.md describes this
//! implementation's choices.
//!
//! `smbshim client ADDR` is a small interactive and scriptable smbl/1 client
//! (client_cli.rs) for trying a server by hand and for shell-driven tests.
#![forbid(unsafe_code)]

mod client_cli;

use smbshim::server;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The SMB-like (smbl/1) frontend of rkfilter.
///
/// Serve: `smbshim --filter SOCKET --listen HOST:PORT [--instance NAME]`
/// prints `listening on HOST:PORT` as its first stdout line, then serves.
/// Try a server by hand: `smbshim client HOST:PORT` (see `smbshim client --help`).
#[derive(Parser, Debug)]
#[command(
    name = "smbshim",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// filterd's Unix socket.
    #[arg(long, value_name = "SOCKET", required = true)]
    filter: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT", required = true,
          value_parser = shimline::cli::listen_arg)]
    listen: Option<String>,
    /// Frontend instance name [default: smb]; a new smbshim with the same
    /// name takes over the handles of a dead one.
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Connections to filterd, each attached as an instance of its own:
    /// NAME, NAME.1, … NAME.(N-1). A client (by client GUID) always goes
    /// through the same one, which owns its handles; keep N the same
    /// across restarts, or a client whose GUID maps elsewhere cannot
    /// RECONNECT its handles (they wait out their timeout). filterd's
    /// --max-handles-per-frontend counts per connection. Experimental
    /// (docs/ARCHITECTURE.md, "A pool of filterd connections").
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=smbshim::server::MAX_FILTER_CONNECTIONS as i64))]
    filter_connections: u32,
    /// Most client connections served at once; one more is refused with
    /// STATUS_INSUFFICIENT_RESOURCES.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most client connections served at once from one IP address; one
    /// more from it is refused with STATUS_INSUFFICIENT_RESOURCES.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_peer: u32,
    /// Most sessions one connection may set up; one more SESSION_SETUP is
    /// refused with STATUS_INSUFFICIENT_RESOURCES.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions_per_connection: u32,
    /// Most opens the sessions of one IP address may hold at once; one
    /// more CREATE or RECONNECT from it is refused with
    /// STATUS_INSUFFICIENT_RESOURCES, other peers' are served. Default: a
    /// quarter of the opens smbshim's descriptor limit allows, or 64 where
    /// that is more (all of them if fewer).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_opens_per_peer: Option<u32>,
    #[command(flatten)]
    lines: shimline::LineArgs,
    #[command(flatten)]
    filterd_wait: shimline::cli::FilterdWaitArg,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to an smbl/1 server and run commands read from stdin, one
    /// per line, printing each reply (and each LEASE_BREAK) as a JSON line.
    #[command(after_help = client_cli::HELP)]
    Client {
        /// The server, e.g. 127.0.0.1:4450.
        #[arg(value_name = "HOST:PORT")]
        addr: String,
        /// Seconds to wait for each reply.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
        timeout: f64,
    },
}

fn main() -> std::process::ExitCode {
    libfilter::cli::abort_on_panic();
    shimline::cli::exit_status("smbshim", run())
}

fn run() -> anyhow::Result<()> {
    let args: Args = libfilter::cli::parse();
    match (args.command, args.filter, args.listen) {
        (Some(Command::Client { addr, timeout }), _, _) => {
            let timeout = Duration::try_from_secs_f64(timeout)
                .map_err(|_| anyhow::anyhow!("--timeout must be a non-negative number"))?;
            client_cli::run(&addr, timeout)
        }
        (None, Some(filter), Some(listen)) => {
            let max_opens =
                server::opens_allowed(usize::try_from(args.max_connections).unwrap_or(usize::MAX));
            let limits = server::Limits {
                max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                max_connections_per_peer: usize::try_from(args.max_connections_per_peer)
                    .unwrap_or(usize::MAX),
                max_sessions_per_connection: usize::try_from(args.max_sessions_per_connection)
                    .unwrap_or(usize::MAX),
                max_opens,
                max_opens_per_peer: args.max_opens_per_peer.map_or_else(
                    || server::opens_per_peer(max_opens),
                    |n| usize::try_from(n).unwrap_or(usize::MAX),
                ),
            };
            args.lines.apply();
            args.filterd_wait.apply();
            server::run(
                &filter,
                &listen,
                args.instance.as_deref().unwrap_or("smb"),
                usize::try_from(args.filter_connections).unwrap_or(1),
                limits,
            )
        }
        // clap requires both flags when there is no subcommand.
        (None, _, _) => anyhow::bail!("--filter and --listen are required"),
    }
}
