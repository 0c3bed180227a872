//! rksmbd — the SMB 2.1–3.1.1 server frontend of rkfilter (a thin main
//! over the `rksmbd` library).
//!
//! Serve: `rksmbd --filter SOCKET --listen HOST:PORT [--instance NAME]
//! --share NAME --users FILE [--channel-memory MIB] [--logon-timeout SECS]
//! [--logon-queue SECS]` prints `listening on HOST:PORT` as its first
//! stdout line, then serves. `rksmbd hash-password USER [--uid N]` reads a
//! password from stdin and prints a users-file (smbpasswd) line for it.
//! rksmbd refuses a users file group or others may read or write.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The SMB 2.1–3.1.1 server frontend of rkfilter: one share, every open a
/// filterd handle.
#[derive(Parser, Debug)]
#[command(
    name = "rksmbd",
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
    /// Frontend instance name [default: rksmbd]; a new rksmbd with the
    /// same name takes over the handles of a dead one, and the server's
    /// GUID is derived from it: give each deployment its own.
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// The share's name (the export root of filterd).
    #[arg(long, value_name = "NAME", required = true)]
    share: Option<String>,
    /// Users file in Samba's smbpasswd format (NT hashes); refused unless
    /// only its owner may read or write it (chmod 600).
    #[arg(long, value_name = "FILE", required = true)]
    users: Option<PathBuf>,
    /// Most MiB of answers all multichannel channels' outboxes hold
    /// together; past it a channel with answers unread forwards nothing
    /// more, and one whose client reads nothing for 5 s is ended.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    channel_memory: u32,
    /// Seconds a connection may go without a logged-on session before it
    /// is ended (a client logs on right after connecting).
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    logon_timeout: u64,
    /// Seconds ahead a logon may be queued for its turn after failed
    /// logons of its user and address; one further ahead is refused
    /// unchecked.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    logon_queue: u64,
    #[command(flatten)]
    filterd_wait: shimline::cli::FilterdWaitArg,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read a password from stdin (first line; an empty one or none is
    /// refused, exit 1) and print a users-file line for USER:
    /// `name:uid:XXXX…:NTHASH:[U          ]:LCT-…:`. Append it
    /// with `(umask 077; rksmbd hash-password USER >> FILE)`: rksmbd refuses
    /// a users file group or others may read or write.
    HashPassword {
        /// The user name.
        user: String,
        /// The uid field (informational).
        #[arg(long, default_value_t = 1000)]
        uid: u32,
    },
}

fn main() -> std::process::ExitCode {
    libfilter::cli::abort_on_panic();
    shimline::cli::exit_status("rksmbd", run())
}

/// `hash-password` appending to a file group or others may read (made
/// under umask 022): says so on stderr, as rksmbd will refuse that file.
fn warn_if_stdout_exposed() {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o077 != 0 {
        eprintln!(
            "rksmbd: warning: the file written is readable or writable by group or others \
             (mode {mode:04o}) and rksmbd refuses such a users file: chmod 600 it, \
             or write it with `(umask 077; rksmbd hash-password NAME >> FILE)`"
        );
    }
}

fn run() -> anyhow::Result<()> {
    let args: Args = libfilter::cli::parse();
    if let Some(Command::HashPassword { user, uid }) = args.command {
        if user.is_empty() || user.contains(':') {
            anyhow::bail!("USER must be non-empty and contain no ':'");
        }
        let pw = rksmbd::users::read_password(&mut std::io::stdin().lock())?;
        print!("{}", rksmbd::users::line(&user, uid, &pw));
        warn_if_stdout_exposed();
        return Ok(());
    }
    let (Some(filter), Some(listen), Some(share), Some(users)) =
        (args.filter, args.listen, args.share, args.users)
    else {
        // clap requires these flags when there is no subcommand.
        anyhow::bail!("--filter, --listen, --share and --users are required");
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let users = rksmbd::users::Users::load(&users).map_err(|e| match e {
        // Names the file itself, with the chmod that fixes it.
        e @ rksmbd::users::UsersError::Exposed { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(users.display().to_string()),
    })?;
    rksmbd::channels::set_memory(args.channel_memory as usize * (1 << 20));
    args.filterd_wait.apply();
    let config = rksmbd::server::Config {
        share,
        users,
        server_name: "RKSMBD".into(),
        logon_timeout: std::time::Duration::from_secs(args.logon_timeout),
        logon_queue: std::time::Duration::from_secs(args.logon_queue),
    };
    rksmbd::server::run(
        &filter,
        &listen,
        args.instance.as_deref().unwrap_or("rksmbd"),
        config,
    )
}
