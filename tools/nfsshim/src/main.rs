//! nfsshim — the NFS-like (nfsl/1) frontend of rkfilter.
//!
//! Serves spec/nfs-like.md over TCP, one JSON object per line. It keeps
//! nothing durable of its own: client records, sessions with their slot
//! caches and open states are records of its session scopes in filterd
//! (`state.rs`), opens are persistent filterd handles, so a replacement
//! nfsshim with the same `--instance`, or a restarted filterd, carries on
//! with the same clientids, sessionids and stateids.
//!
//! A reader and a writer thread per client connection (shimline): requests
//! of one connection run in order on the reader; replies and CB_RECALLs go
//! through the connection's bounded outbound queue, so a client that stops
//! reading is dropped instead of stalling anyone. Blocking calls keep each
//! step simple; connections, clients, sessions and open states are capped
//! by named limits (server.rs `Limits`).
//!
//! `nfsshim client ADDR` is a small interactive and scriptable nfsl/1
//! client (client_cli.rs) for trying a server by hand and for shell-driven
//! tests.
#![forbid(unsafe_code)]

mod client_cli;

use nfsshim::server;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The NFS-like (nfsl/1) frontend of rkfilter.
///
/// Serve: `nfsshim --filter SOCKET --listen HOST:PORT [--instance NAME]
/// [--lease-ms N]` prints `listening on HOST:PORT` as its first stdout
/// line, then serves. Try a server by hand: `nfsshim client HOST:PORT`
/// (see `nfsshim client --help`).
///
/// nfsshim raises its soft descriptor limit to the hard one and keeps the
/// descriptors its opens hold below it, less 64 and --max-connections (at
/// most a quarter of it); an OPEN past that is NFS4ERR_DELAY.
#[derive(Parser, Debug)]
#[command(
    name = "nfsshim",
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
    /// Frontend instance name [default: nfs]; a new nfsshim with the same
    /// name takes over the state of a dead one.
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Client lease length in milliseconds (1000 to 86400000, a day;
    /// another value is refused, exit 2).
    #[arg(long, value_name = "N", default_value_t = 90_000,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    lease_ms: u64,
    /// Most client connections served at once; one more is refused with
    /// NFS4ERR_RESOURCE.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most client connections served at once from one IP address; one
    /// more from it is refused with NFS4ERR_RESOURCE.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_peer: u32,
    /// Most client records (EXCHANGE_ID of a new owner beyond it:
    /// NFS4ERR_RESOURCE). At most 4096, filterd's records per scope.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_clients: u32,
    /// Most live client records created from one IP address (EXCHANGE_ID
    /// of a new owner from it beyond that: NFS4ERR_RESOURCE).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_clients_per_peer: u32,
    /// Most sessions per client (CREATE_SESSION beyond it: NFS4ERR_RESOURCE).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_sessions_per_client: u32,
    /// Most open states per client (OPEN of a further file:
    /// NFS4ERR_RESOURCE; a delegation kept past its open's CLOSE is
    /// recalled first, the OPEN NFS4ERR_DELAY). At most 4096, filterd's
    /// records per scope.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_opens_per_client: u32,
    #[command(flatten)]
    lines: shimline::LineArgs,
    #[command(flatten)]
    filterd_wait: shimline::cli::FilterdWaitArg,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to an nfsl/1 server and run commands read from stdin, one
    /// per line, printing each reply (and each CB_RECALL) as a JSON line.
    #[command(after_help = client_cli::HELP)]
    Client {
        /// The server, e.g. 127.0.0.1:2049.
        #[arg(value_name = "HOST:PORT")]
        addr: String,
        /// Seconds to wait for each reply.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
        timeout: f64,
    },
}

fn main() -> std::process::ExitCode {
    libfilter::cli::abort_on_panic();
    shimline::cli::exit_status("nfsshim", run())
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
            args.lines.apply();
            args.filterd_wait.apply();
            server::run(
                &filter,
                &listen,
                args.instance.as_deref().unwrap_or("nfs"),
                args.lease_ms,
                server::Limits {
                    max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                    max_connections_per_peer: usize::try_from(args.max_connections_per_peer)
                        .unwrap_or(usize::MAX),
                    max_clients: usize::try_from(args.max_clients).unwrap_or(usize::MAX),
                    max_clients_per_peer: usize::try_from(args.max_clients_per_peer)
                        .unwrap_or(usize::MAX),
                    max_sessions_per_client: usize::try_from(args.max_sessions_per_client)
                        .unwrap_or(usize::MAX),
                    max_opens_per_client: usize::try_from(args.max_opens_per_client)
                        .unwrap_or(usize::MAX),
                    // Raises the soft descriptor limit to the hard one.
                    max_descriptors: shimline::descriptors::opens_allowed(
                        usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                    ),
                },
            )
        }
        // clap requires both flags when there is no subcommand.
        (None, _, _) => anyhow::bail!("--filter and --listen are required"),
    }
}
