//! filterd — the resume-key filter daemon.
//!
//! One per export root. Performs the opens of every attached frontend beneath
//! the root, owns every handle's descriptor, and keeps persistent handle state
//! in an LMDB environment in the state directory. This file is the thin shell:
//! flags, the state-dir lock, recovery, and the threads (listener, one reader
//! per connection, the engine, the committer) — see `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]

mod closer;
mod command;
mod committer;
mod conn;
mod engine;
mod failpoint;
mod frontends_seen;
mod fsops;
mod lease_claim;
mod local;
mod local_opens;
mod observability;
mod outbox;
mod statedir;
mod unread;

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tracing::{error, info, warn};

use libfilter::runtime::{DaemonRecord, Phase};
use libfilter::store::{StateStore, Store};

/// The rkfilter daemon: performs opens beneath an export root for protocol
/// frontends and keeps every handle's state crash-safe in LMDB.
#[derive(Parser, Debug)]
#[command(name = "filterd", version, about, long_about = None)]
struct Args {
    /// The export root: every client path is resolved beneath it.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// State directory: LMDB environment (lmdb/, 0700), runtime record
    /// (filterd.run), default socket. One active daemon: its lock is
    /// STATE/filterd.lock (0600, no other user can hold it; the
    /// directory's own flock is taken too, for older filterds). Must be
    /// filterd's user's, in a directory of that user or root that neither
    /// its group (unless filterd's user's primary group, the directory
    /// being that user's) nor others may write, or sticky. Its group's and
    /// others' write permission is taken away at start, the rest once
    /// locked (mode less 0027); what filterd uses in it must be its user's.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// Unix socket frontends and filterctl attach to [default: STATE/filterd.sock].
    /// A stale socket there is replaced; anything else there refuses the start.
    /// Its directory (links resolved) must be filterd's user's or root's and
    /// writable by neither its group nor others, or sticky; its parent as for
    /// --state's parent.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Do not mediate local access with fanotify.
    #[arg(long)]
    no_fanotify: bool,
    /// How long a conflicting request waits for a lease-break ack.
    #[arg(long, value_name = "N", default_value_t = 35_000)]
    break_timeout_ms: u64,
    /// Cap on the disconnected lifetime of durable and persistent handles.
    #[arg(long, value_name = "N", default_value_t = 300_000)]
    durable_timeout_max_ms: u32,
    /// Most handles one protocol client may hold (its further opens are
    /// refused; other clients are not affected). Besides, one peer user
    /// other than root, filterd's own and those of --share-exempt-uid may
    /// hold handles counting as three quarters of the descriptors left to
    /// them (one a handle, one more while it holds byte-range locks; the
    /// limit less a reserve and the budget of replies queued unread): at
    /// a limit of 65536 about 42,000 handles, at 4096 about 1,900.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    max_handles_per_client: usize,
    /// Most handles one frontend instance may hold.
    #[arg(long, value_name = "N", default_value_t = 1_048_576)]
    max_handles_per_frontend: usize,
    /// A peer uid never held to a share of the descriptors left to handles
    /// (as root and filterd's own user are not), e.g. the service user of
    /// a frontend running alone; may be repeated.
    #[arg(long, value_name = "UID")]
    share_exempt_uid: Vec<u32>,
    /// Most connections (frontends and filterctl) at once; further hellos
    /// are refused. One user (peer uid) may hold three quarters of them.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_connections: usize,
    /// Most requests waiting at once — for lease-break acknowledgements,
    /// commits, lock hints or checked I/O; further requests that would
    /// wait are refused (LimitReached) instead.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_pending_breaks: usize,
    /// Most commands (local opens, new connections) queued for the engine;
    /// a local open that finds it full waits, and is refused as undecided
    /// (EPERM) if it stays full until the break timeout + 2 s.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    command_queue: usize,
    /// Most local opens of the export waiting for the engine's verdict at
    /// once (each holds a descriptor); as many more wait in the fanotify
    /// reader's backlog, and past that an open of the export is refused as
    /// undecided (EPERM) — opens outside a subtree export are answered
    /// all the same [default: 16384, at most a quarter of the descriptor
    /// limit].
    #[arg(long, value_name = "N")]
    max_local_pending: Option<u64>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = observability::LogFormat::Text)]
    log_format: observability::LogFormat,
    /// Wait for the active daemon on this state dir (and, with an etcd
    /// store, for the owner of the etcd prefix, on any machine) to die, then
    /// take over (SIGTERM or SIGINT stops it while it waits, exit 0); it
    /// waits on while etcd has no quorum or its quota is full.
    #[arg(long)]
    standby: bool,
    /// Bind the state to this export root although it belongs to another
    /// (a restored copy of the export, a filesystem whose id changed).
    /// Without it filterd refuses to start on another root: recovered
    /// there, every handle it could not find would be marked lost.
    #[arg(long)]
    rebind_root: bool,
    /// LMDB store: the directory of the export roots' lock files (one
    /// filterd per export root) [default: /run/rkfilter/roots as root;
    /// without it a non-root filterd locks the root directory itself,
    /// which any user who can open the root can hold]. Every filterd
    /// serving one export root must use the same directory: give one on
    /// a shared filesystem when they run in containers or sandboxes with
    /// /run of their own (or /run read-only). It must be filterd's user's,
    /// writable by nobody else (created 0700 when missing).
    #[arg(long, value_name = "DIR")]
    root_lock_dir: Option<PathBuf>,
    /// Where the resume-key table lives: `lmdb` (embedded, in the state
    /// dir) or `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` (an etcd v3 cluster,
    /// shared with standbys on other machines; README "Two machines").
    #[arg(long, value_name = "STORE", default_value = "lmdb", value_parser = store_arg)]
    store: String,
    /// etcd store: the ownership lease's time to live in seconds (2 to
    /// 86400; another value is refused, exit 2). filterd stops acting
    /// max(TTL/4, 500 ms) before it could expire; a standby already
    /// waiting takes over within about TTL after the owner dies, one
    /// started after an unclean stop (or at TTL 2 or 3) one TTL after it
    /// finds the old lease gone (README "Two machines"). Use one TTL on
    /// every daemon of a table.
    #[arg(long, value_name = "SECS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(2..=86_400))]
    lease_ttl_secs: u64,
    /// etcd store: compact etcd's history this often (seconds; 0: never).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    compact_every_secs: u64,
    /// LMDB map size in MiB (the file grows only as used).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    map_size_mib: usize,
    /// The LMDB map doubles when it fills, up to this size (MiB). Its last
    /// sixteenth is kept for closes, expiries and purges: a persistent
    /// change that would grow the tables into it gets DISK_FULL.
    #[arg(long, value_name = "MIB", default_value_t = 1 << 20)]
    max_map_size_mib: usize,
}

/// `--store` checked as the command line is parsed, so a malformed one is
/// a usage error (exit 2) like any bad flag value.
fn store_arg(s: &str) -> Result<String, String> {
    if s == "lmdb" {
        return Ok(s.to_owned());
    }
    libfilter::etcd::EtcdUrl::parse(s).map(|_| s.to_owned())
}

fn main() {
    // Before any other thread: see the function (issue 16's profile).
    libfilter::sys::no_malloc_fastbins();
    let args: Args = libfilter::cli::parse();
    observability::init(args.log_format);
    // A panic anywhere ends the process: the service manager restarts it
    // (README: `Restart=always`) and recovery brings back every persistent
    // handle.
    libfilter::cli::abort_on_panic();
    if let Err(e) = failpoint::init() {
        error!("{e}");
        eprintln!("filterd: {e}");
        std::process::exit(2);
    }
    failpoint::withheld_features();
    if let Err(e) = run(args) {
        error!("{e:#}");
        eprintln!("filterd: {e:#}");
        std::process::exit(1);
    }
}

/// Whether this process may open files by kernel handle
/// (`open_by_handle_at` needs `CAP_DAC_READ_SEARCH`, bit 2 of `CapEff`).
fn has_cap_dac_read_search() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 2) != 0)
}

/// Raises the descriptor limit as far as allowed: filterd holds one
/// descriptor per open handle (100k persistent handles are 100k descriptors).
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    // Root may raise the hard limit too; others get their hard limit.
    if nr_open > hard && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return nr_open;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Descriptors left to handles at descriptor limit `fd_limit`: the limit
/// less the reserve kept for reading local opens and the budget of
/// replies queued unread (which may hold descriptors of handles closed
/// since). One peer user may hold three quarters of it (engine
/// `handle_shares`). No limit known (0): unbounded.
fn handle_room(fd_limit: u64) -> usize {
    if fd_limit == 0 {
        return usize::MAX;
    }
    let left = fd_limit.saturating_sub(local::descriptor_reserve(fd_limit));
    usize::try_from(left)
        .unwrap_or(usize::MAX)
        .saturating_sub(outbox::descriptor_budget(fd_limit))
}

/// A claimed store, its epoch (fencing revision) and whether the last
/// owner stopped cleanly.
type Claimed = (Arc<dyn StateStore>, u64, bool);

/// `--store` as `status` names it: `lmdb`, or the etcd URL in its
/// canonical form (`EtcdUrl`'s), as filterctl's offline view prints it.
fn store_display(store: &str) -> String {
    libfilter::etcd::EtcdUrl::parse(store).map_or_else(|_| store.to_owned(), |u| u.to_string())
}

/// Opens and claims the resume-key table the flags name. `None`: a standby
/// was stopped by a signal before it took over.
fn open_store(
    args: &Args,
    state: &std::path::Path,
    sigs: &SigSet,
) -> anyhow::Result<Option<Claimed>> {
    if args.store == "lmdb" {
        let lmdb =
            Store::open(state, args.map_size_mib << 20).context("opening the state store")?;
        lmdb.set_max_map_size(args.max_map_size_mib.max(args.map_size_mib) << 20);
        let store: Arc<dyn StateStore> = Arc::new(lmdb);
        // Claiming the table fences any earlier claimant: its commits fail.
        let (epoch, was_clean) = store.claim()?;
        return Ok(Some((store, epoch, was_clean)));
    }
    let url =
        libfilter::etcd::EtcdUrl::parse(&args.store).map_err(|e| anyhow::anyhow!("--store {e}"))?;
    let etcd = libfilter::etcd::EtcdStore::connect(
        &url,
        std::time::Duration::from_secs(args.lease_ttl_secs),
        std::time::Duration::from_secs(args.compact_every_secs),
    )?;
    etcd.set_failpoints(Box::new(failpoint::fails));
    let signals = nix::sys::signalfd::SignalFd::with_flags(
        sigs,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .context("signalfd")?;
    // Asks only: the signal stays pending for the wait below.
    let no_signal = || !signal_within(&signals, std::time::Duration::ZERO);
    let mut waiting: Option<String> = None;
    let mut failed = 0u32;
    let (epoch, was_clean) = loop {
        let mut pause = std::time::Duration::from_millis(50);
        match etcd.try_claim_while(&no_signal) {
            Ok(Some(claimed)) => break claimed,
            // Told to stop while the claim waited for a revoked old
            // owner's clock to run out (re-review rr48h finding 3): no
            // claim; the signal, still pending, ends it below.
            Ok(None) if !no_signal() => {}
            Ok(None) if !args.standby => bail!(
                "{}",
                libfilter::store::StoreError::Owned {
                    by: etcd.last_owner()
                }
            ),
            Ok(None) => {
                // Said again whenever the owner key says another owner
                // (re-put by hand, removed while its lease lives): the
                // log named only the first one (attack48e F4).
                let owner = etcd.last_owner();
                if waiting.as_deref() != Some(owner.as_str()) {
                    info!(owner = %owner, store = %url, "standby: waiting for the owner of the etcd table to go");
                    waiting = Some(owner);
                }
                failed = 0;
            }
            // Without quorum (or with etcd's quota full) the owner steps
            // down and only a standby that is still waiting can take over
            // once etcd serves again: before, the standby exited too, and
            // nobody did (review, etcd finding 1).
            Err(e) if args.standby && etcd.claim_may_succeed_later(&e) => {
                failed += 1;
                if failed == 1 || failed.is_multiple_of(20) {
                    warn!(error = %e, failed, store = %url, "standby: the etcd table cannot be claimed now; waiting on");
                }
                waiting = None;
                // Up to 1 s between failed claims, so a standby does not
                // ask an etcd that refuses at once (NOSPACE) 20 times a second.
                pause = pause
                    .saturating_mul(1 << failed.min(5))
                    .min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e).context("claiming the etcd table"),
        }
        if signal_within(&signals, pause) {
            let signal = signals
                .read_signal()
                .ok()
                .flatten()
                .map_or(0, |si| si.ssi_signo);
            info!(signal, "stopped before taking over the etcd table");
            return Ok(None);
        }
    };
    let store: Arc<dyn StateStore> = Arc::new(etcd);
    // Lease loss stops the daemon even when nothing else happens: it must
    // act on nothing once its lease may have run out (the engine and the
    // committer check too, before they act).
    let watch = store.clone();
    std::thread::Builder::new()
        .name("lease-watch".into())
        .spawn(move || loop {
            if let Err(e) = watch.owner_check() {
                error!(error = %e, "no longer the owner of the etcd table: stepping down");
                outbox::tell_stepping_down();
                std::process::exit(75);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        })?;
    Ok(Some((store, epoch, was_clean)))
}

/// How long a shutdown waits for the commits still in flight in a store
/// that pipelines them (etcd) before it stops as after a crash.
const SHUTDOWN_COMMIT_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Whether `thread` (the committer, the clean mark) returned within
/// `grace` (polled: a join cannot time out).
fn finished_within<T>(thread: &std::thread::JoinHandle<T>, grace: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + grace;
    while !thread.is_finished() {
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// The device and inode of the file at `path`, not following a link.
fn socket_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Refuses a table bound to another export root (unless
/// `--rebind-root`), and binds one that is bound to none yet (its first
/// start, or a table from before the binding). Started before the export
/// was mounted, or with a mistyped `--root`, recovery found no file of any
/// handle and marked them all lost, durably, and dropped the intents it
/// could not finish (review).
fn check_root(
    args: &Args,
    store: &dyn StateStore,
    identity: &str,
    root: &std::path::Path,
) -> anyhow::Result<()> {
    match store
        .bound_root()
        .context("reading the table's export root")?
    {
        Some(bound) if fsops::same_root(&bound, identity) => return Ok(()),
        Some(bound) if !args.rebind_root => bail!(
            "export root {} is not the one this state belongs to (bound to {bound}; this \
             root is {identity}): if the export's filesystem is not mounted yet, mount it \
             and start again; to bind the state to this root anyway (a restored copy of \
             the export), pass --rebind-root — handles whose files are not found there \
             are then reported lost",
            root.display()
        ),
        Some(bound) => {
            warn!(bound = %bound, root = %identity, "--rebind-root: the state is bound to this export root from now on")
        }
        None => info!(root = %identity, "the state is bound to this export root"),
    }
    store
        .bind_root(identity)
        .context("binding the table to the export root")
}

/// Whether a signal is pending on `signals`, waiting up to `how_long` for
/// one (rounded down to whole milliseconds, at most 65 s).
fn signal_within(signals: &nix::sys::signalfd::SignalFd, how_long: std::time::Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(signals),
        PollFlags::POLLIN,
    )];
    let ms = u16::try_from(how_long.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

fn run(args: Args) -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    // Signals are taken synchronously by the main thread; block them before
    // any thread exists so every thread inherits the mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&sigs), None)?;
    // A local open racing the write-lease probe (local_opens.rs) makes the
    // kernel send the lease holder SIGIO, whose default is to terminate:
    // blocked in every thread, never waited for.
    let mut sigio = SigSet::empty();
    sigio.add(Signal::SIGIO);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&sigio), None)?;

    if !args.state.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&args.state)
            .with_context(|| format!("creating state dir {}", args.state.display()))?;
    }
    let state = args.state.canonicalize()?;
    let root_path = args
        .root
        .canonicalize()
        .with_context(|| format!("export root {}", args.root.display()))?;
    if !root_path.is_dir() {
        bail!("export root {} is not a directory", root_path.display());
    }
    let _lock = match statedir::lock(&state, args.store == "lmdb", args.standby, &sigs)? {
        statedir::Locked::Held(l) => l,
        statedir::Locked::Stopped(sig) => {
            info!(signal = ?sig, "standby stopped before taking over");
            return Ok(());
        }
    };
    // Only once the state dir is ours: a second daemon that is refused
    // takes only group and other write off the live one's state dir (and
    // other users' access off its `lmdb/`), not its group's read.
    statedir::tighten(&state);
    let _root_lock = if args.store == "lmdb" {
        match statedir::lock_root(
            &root_path,
            args.root_lock_dir.as_deref(),
            args.standby,
            &sigs,
        )? {
            Some(l) => Some(l),
            None => {
                info!("standby stopped before taking over");
                return Ok(());
            }
        }
    } else {
        None
    };
    let socket_path = match args.socket.clone() {
        Some(p) if p.is_relative() => std::env::current_dir()?.join(p),
        Some(p) => p,
        None => state.join(statedir::SOCKET_FILE),
    };
    // Before the store is opened (and marked in use): a start refused for
    // its socket path must not count as a crash at the next start.
    let socket_path = statedir::trusted_socket_path(&socket_path)?;
    conn::check_socket_path(&socket_path)?;
    let mut record = DaemonRecord {
        pid: std::process::id(),
        socket: socket_path.clone(),
        phase: Phase::Starting,
    };
    write_record(&state, &record);
    let root = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&root_path)
        .with_context(|| format!("opening export root {}", root_path.display()))?;
    match fsops::choose_create_marker(std::os::fd::AsFd::as_fd(&root)) {
        Ok(name) => {
            info!(marker = %name.to_string_lossy(), "files made by persistent creates are marked")
        }
        Err(why) => warn!(%why, "persistent creates will be refused"),
    }
    if !has_cap_dac_read_search() {
        warn!("no CAP_DAC_READ_SEARCH: persistent handles are reopened by their recorded path (checked by kernel file handle); a file renamed while filterd was down is reported lost");
    }
    // With local mediation, every open of filterd's goes through a private
    // clone of the export's mount that the fanotify group exempts: filterd
    // never waits for its own group (local.rs).
    let root_fd = std::os::fd::AsFd::as_fd(&root);
    let local_identity = fsops::root_identity(root_fd, false)
        .with_context(|| format!("identifying export root {}", root_path.display()))?;
    let shared_identity = fsops::root_identity(root_fd, true)
        .with_context(|| format!("identifying export root {}", root_path.display()))?;
    let root: std::os::fd::OwnedFd = if args.no_fanotify {
        root.into()
    } else {
        // Fail fast; the group itself is made after recovery (below).
        local::check_mount_point(&root_path)?;
        local::own_root(&root_path)?
    };
    let own_mount = root.try_clone().context("duplicating the export root")?;

    let (store, epoch, was_clean) = match open_store(&args, &state, &sigs)? {
        Some(s) => s,
        None => return Ok(()),
    };
    let identity = if store.shared() {
        shared_identity
    } else {
        local_identity
    };
    check_root(&args, store.as_ref(), &identity, &root_path)?;
    info!(epoch, clean_previous_shutdown = was_clean, fd_limit, handle_room = handle_room(fd_limit), root = %root_path.display(), state = %state.display(), "filterd starting");
    if fd_limit < outbox::SMALL_FD_LIMIT {
        warn!(
            fd_limit,
            unread_descriptor_budget = outbox::descriptor_budget(fd_limit),
            "descriptor limit below 32768: what filterd keeps queued for peers that do not read may hold a quarter of it (at most 4096; up to half while other users hold their shares), a lone frontend with more replies unread than that is dropped, and the handles of all peers share what is left; raise the hard limit (LimitNOFILE=, ulimit -Hn)"
        );
    }

    let closer = closer::Closer::start()?;
    let (poller, cmd_tx) = conn::Poller::new(args.command_queue.max(16), closer.clone())?;
    let pipe = Arc::new(committer::Pipeline::default());
    let counters = Arc::new(committer::CommitCounters::default());
    let mut eng = engine::Engine::new(
        engine::Config {
            max_durable_timeout_ms: args.durable_timeout_max_ms,
            root_display: root_path.display().to_string(),
            state_display: state.display().to_string(),
            store_display: store_display(&args.store),
            fanotify: !args.no_fanotify,
            break_timeout_ms: args.break_timeout_ms,
            max_handles_per_client: args.max_handles_per_client,
            max_handles_per_frontend: args.max_handles_per_frontend,
            max_connections: args.max_connections,
            max_pending_breaks: args.max_pending_breaks,
            handle_room: handle_room(fd_limit),
            handle_share_exempt: [0, nix::unistd::geteuid().as_raw()]
                .into_iter()
                .chain(args.share_exempt_uid.iter().copied())
                .collect(),
        },
        Box::new(engine::fs::HostFs::new(root, store.clone())),
        epoch,
        pipe.clone(),
        store.clone(),
        counters.clone(),
    );
    eng.log_handle_shares();
    eng.recover(store.as_ref()).context("restart recovery")?;
    eng.set_frontends_seen(frontends_seen::FrontendsSeen::load(&state));
    // Only now: recovery reopens files by handle, and with the mount marked
    // before anyone reads the group those opens would wait for a verdict
    // nobody gives. The reader starts before the socket accepts anyone.
    let fanotify = if args.no_fanotify {
        None
    } else {
        Some(local::setup(
            &root_path,
            std::os::fd::AsFd::as_fd(&own_mount),
        )?)
    };
    let local_counters = Arc::new(local::LocalCounters::default());
    if let Some((fan, mediated)) = &fanotify {
        // O_PATH: no permission event (the reader has not started yet).
        let export_root = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&root_path)
            .with_context(|| format!("opening export root {}", root_path.display()))?;
        eng.set_fanotify(
            fan.clone(),
            local_counters.clone(),
            mediated.clone(),
            export_root.into(),
        );
        let scope = mediated.scope;
        let (tx, counters, fan, mediated) = (
            cmd_tx.clone(),
            local_counters.clone(),
            fan.clone(),
            mediated.clone(),
        );
        let bound = std::time::Duration::from_millis(args.break_timeout_ms.saturating_add(2000));
        let held_grace = local::held_grace(std::time::Duration::from_millis(args.break_timeout_ms));
        let args_max_local_pending = args.max_local_pending;
        std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || {
                local::run(
                    fan,
                    mediated,
                    tx,
                    counters,
                    bound,
                    held_grace,
                    args_max_local_pending
                        .unwrap_or_else(|| local::max_pending(fd_limit))
                        .max(1),
                )
            })?;
        info!(
            scope = scope.word(),
            "local access mediated through fanotify"
        );
        let dev = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        if scope == local::MarkScope::Subtree && dev(&state) == dev(&root_path) {
            warn!(
                state = %state.display(),
                "the state dir is on the export's (marked) filesystem: filterd's own writes there raise fanotify events, \
                 answered at once but delayed while filterd has no descriptor free to read events with; put it on another filesystem"
            );
        }
    }

    let committer = {
        let (store, tx, counters, pipe) = (
            store.clone(),
            cmd_tx.clone(),
            counters.clone(),
            pipe.clone(),
        );
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || committer::run(store, pipe, tx, counters))?
    };
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || eng.run(poller))?;

    let (listener, descriptors_refused) = conn::listen_at(&socket_path)?;
    closer.set_kernel_refuses(descriptors_refused);
    if descriptors_refused {
        info!("the kernel refuses descriptors peers send to filterd (SO_PASSRIGHTS)");
    } else {
        warn!(
            "this kernel lacks SO_PASSRIGHTS (Linux 6.16): descriptors peers send to filterd arrive; \
             each closes its connection and is closed on the closer thread, as are dropped connections"
        );
    }
    // The socket file this daemon made: removed at shutdown only if the
    // path still names it (another daemon may have bound the path since
    // this one's file was removed, and must not lose its socket to this
    // one's shutdown; review).
    let socket_made = socket_identity(&socket_path);
    {
        let (tx, p) = (cmd_tx.clone(), socket_path.clone());
        std::thread::Builder::new()
            .name("listener".into())
            .spawn(move || conn::accept_loop(listener, p, tx, closer))?;
    }
    record.phase = Phase::Serving;
    write_record(&state, &record);
    info!(socket = %socket_path.display(), "serving");

    let sig = sigs.wait()?;
    info!(signal = ?sig, "shutting down");
    let _ = cmd_tx.send(engine::Command::Shutdown);
    drop(cmd_tx);
    if engine_thread.join().is_err() {
        error!("engine thread panicked");
    }
    // The engine is gone; the fanotify reader refuses every local open
    // from now on (until the process exits and the kernel drops the group).
    failpoint::hit("shutdown.after_engine");
    // The engine flushed its last batch: the committer commits what is
    // queued, then returns.
    pipe.stop();
    if store.pipelines() && !finished_within(&committer, SHUTDOWN_COMMIT_GRACE) {
        // A commit over the network is still unresolved (etcd stalled or
        // slow): waiting for it would leave the node refusing local opens
        // and serving no protocol request until the lease check gave up,
        // up to TTL − margin (review rvslowetcd finding 2: 19.5 s with TTL
        // 30). Nothing unresolved was acknowledged, and the fencing
        // revision neutralises a late copy of its Txn: stop as after a
        // crash — no clean mark, no lease revoke, nothing told to the
        // frontends (the next owner waits out the lease and recovers).
        // Every fanotify permission event is answered: those read so far
        // were refused at once, and the kernel answers the rest when the
        // group goes with the process.
        warn!(
            grace = ?SHUTDOWN_COMMIT_GRACE,
            "a commit is still unresolved in the store: stopping without a clean shutdown"
        );
        if socket_made.is_some() && socket_identity(&socket_path) == socket_made {
            let _ = std::fs::remove_file(&socket_path);
        }
        std::process::exit(75);
    }
    if committer.join().is_err() {
        error!("committer thread panicked");
    }
    if socket_made.is_some() && socket_identity(&socket_path) == socket_made {
        let _ = std::fs::remove_file(&socket_path);
    }
    if store.pipelines() {
        // The clean mark is a commit over the network too: with etcd
        // stalled or slow and nothing else pending, waiting for it left
        // the node refusing local opens until the lease check gave up, or
        // for good on a slow link whose renewals still pass (re-review
        // rr42d A1: 20.8 s, and not within 60 s). Twice the grace — the
        // mark's commit, then the lease's revoke (bounded by 1.5 s; rr42f
        // 3: with one grace, a link slow enough to take most of it for
        // the mark made a clean stop exit 75; a round trip over 1.5 s
        // still does, and is documented) — then stop as after
        // a crash; a late mark is harmless (guarded by the owner key and
        // generation, and the table is clean by then).
        let marking = store.clone();
        let mark = std::thread::Builder::new()
            .name("clean-mark".into())
            .spawn(move || marking.clean_shutdown())?;
        if !finished_within(&mark, SHUTDOWN_COMMIT_GRACE.saturating_mul(2)) {
            warn!(
                grace = ?SHUTDOWN_COMMIT_GRACE.saturating_mul(2),
                "the clean shutdown mark is still unresolved in the store: stopping without a clean shutdown"
            );
            std::process::exit(75);
        }
        match mark.join() {
            Ok(done) => done?,
            Err(_) => bail!("the clean shutdown mark's thread panicked"),
        }
    } else {
        store.clean_shutdown()?;
    }
    libfilter::runtime::remove(&state);
    info!("clean shutdown");
    Ok(())
}

/// Writes the runtime record. Failing (a full state filesystem: attack45
/// F1, where the restart recovery depends on then exited 1 again and
/// again) is not fatal: the previous daemon's record is removed instead,
/// and `filterctl --state` then tries the default socket
/// (`STATE/filterd.sock`).
fn write_record(state: &std::path::Path, record: &DaemonRecord) {
    if let Err(e) = libfilter::runtime::write(state, record) {
        libfilter::runtime::remove(state);
        let tmp = format!("{}.tmp", libfilter::runtime::RUNTIME_FILE);
        let _ = std::fs::remove_file(state.join(tmp));
        warn!(error = %e, "cannot write the runtime record; filterctl --state finds this daemon only at the default socket");
    }
}
