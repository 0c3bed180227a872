//! filterctl — the operator's view of rkfilter.
//!
//! Talks to a live filterd over its socket (`--socket`, or `--state DIR`: the
//! daemon that holds DIR, found through its runtime record whatever socket it
//! serves), or, when the daemon is down, reads the LMDB files of `--state DIR`
//! read-only: the post-mortem view. The post-mortem view shows what a restart
//! will show — every persistent handle disconnected (or lost), no durable or
//! non-durable ones — not what the dead daemon last wrote. Mutating commands
//! need the live daemon. `--json` prints one JSON document; otherwise aligned
//! tables.
#![forbid(unsafe_code)]

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use libfilter::client::FilterClient;
use libfilter::model::HandleRecord;
use libfilter::model::{ConnState, Intent, IntentChange, ResumeKey};
use libfilter::proto::{CorruptRecords, FileView, HandleView, Reply, Request};
use libfilter::runtime::{Liveness, Phase};
use libfilter::store::{MetaInfo, StateStore, Store, StoreError};

/// Inspect and manage the handle state of rkfilter's filterd.
#[derive(Parser, Debug)]
#[command(name = "filterctl", version, about, long_about = None)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["socket", "state", "store"])))]
struct Args {
    /// filterd's Unix socket.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// filterd's state directory: the daemon serving it if one runs (on
    /// whatever socket), else its LMDB files, read-only, shown as a restart
    /// will show them.
    #[arg(long, value_name = "DIR", global = true)]
    state: Option<PathBuf>,
    /// An etcd table (`etcd://HOST:PORT[,HOST:PORT…]/PREFIX`, as filterd's
    /// `--store`), read as it is now, shown as a takeover will show it;
    /// `status` names its owner and fencing revision.
    #[arg(long, value_name = "URL", global = true, value_parser = store_arg)]
    store: Option<String>,
    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a live daemon that does not answer within this many
    /// milliseconds (stopped, or stalled behind its disk): exit 1 saying
    /// so, rather than wait for it.
    #[arg(long, value_name = "MS", global = true, default_value_t = DEFAULT_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Listings (handles, files, locks, leases) wait for every commit
    /// pending at them, however long (each page up to --timeout-ms), and
    /// never answer with the durable state only; `frontends` never
    /// answers with older rows: refused while commits are stuck, it is
    /// asked again until --timeout-ms, then fails (exit 1): for scripts
    /// that need the complete list.
    #[arg(long, global = true)]
    complete: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug, Clone)]
enum Cmd {
    /// Daemon status (or, offline, what the store says). Exits 0 whenever
    /// it can report: unreadable stored records are shown (`corrupt
    /// records`) and named on stderr, never a failure. Live, when the
    /// commits pending at it do not resolve within 1 s (a stalled store,
    /// or just one commit slower than that), durable counts (of the last
    /// moment nothing was pending, or of one whose commits all resolved
    /// since) and a `commits pending` line; on etcd, the
    /// lease's time left (`store lease`).
    Status,
    /// Every handle. Live, when the commits pending at the listing do not
    /// resolve within 1 s (a stalled store, or just one commit slower than
    /// that; counted from the moment commits stopped resolving if that
    /// was before the listing), only what is durable: every file a pending commit changes is
    /// left out with every handle and lock on it, durable ones too, and a
    /// `durable state only` line says so (on stderr with --json, ending in
    /// `commit_wait` and its JSON). The 1 s is the listing's, not each
    /// page's: once commits have been pending that long with none
    /// resolving, every page answers at once (a new listing's first one
    /// too). So do `files`, `locks` and `leases`. Not with --complete:
    /// then every page waits for the commits pending at it (each page up
    /// to --timeout-ms).
    Handles,
    /// One handle in detail.
    Handle {
        /// Its resume key.
        #[arg(value_parser = parse_key)]
        key: ResumeKey,
    },
    /// Files with handles, and who holds them.
    Files,
    /// Byte-range locks (offline: as the stored handles hold them).
    Locks,
    /// Leases by file and key, with any break in progress (offline: as the
    /// stored handles hold them).
    Leases,
    /// Protocol clients: nfsl/1 client records (smbl/1 clients show as the
    /// CLIENT of their handles).
    Clients,
    /// Frontend instances: the attached ones and those stored handles name
    /// (offline: the latter), one row each; live, past about 48 KiB of
    /// rows the rest are counted (`…and N more`), not listed. Live, when
    /// the commits pending at it do not resolve within 1 s, the rows as
    /// durable at a recent moment, as `status` counts them, and a
    /// `durable state only` line saying how old (on stderr with --json,
    /// ending in `commit_wait` and its JSON); refused with the reason
    /// (exit 1) when filterd has no such rows yet (a store stalled since
    /// the first `frontends`). With --complete never the older rows: asked
    /// again until it answers with the rows of now, or failing (exit 1)
    /// once the timeout (--timeout-ms) passes.
    Frontends,
    /// Counters since the daemon started (live only).
    Stats,
    /// Expire a disconnected handle now (live only).
    Expire {
        /// Its resume key.
        #[arg(value_parser = parse_key)]
        key: ResumeKey,
    },
    /// Purge every handle without a connection now, lost ones too (live
    /// only).
    Purge {
        /// Required: purge disconnected handles.
        #[arg(long, required = true)]
        disconnected: bool,
    },
}

/// `print!` that returns the write's error instead of panicking: a reader
/// that went away (`filterctl … | head`) ends the command quietly ([`main`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `println!` that returns the write's error, as [`out!`] does.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// How long a live daemon has to answer by default: long enough for a
/// listing of a million handles behind a busy disk, short enough that a
/// monitoring script learns of a hung daemon.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// `--store` checked as the command line is parsed: a malformed one is bad
/// usage (exit 2), as filterd's `--store` is.
fn store_arg(s: &str) -> Result<String, String> {
    libfilter::etcd::EtcdUrl::parse(s).map(|_| s.to_owned())
}

/// Where the answers come from.
enum Source {
    Live(FilterClient),
    Offline(Offline),
}

/// A store read without a daemon: LMDB files or an etcd table.
enum Offline {
    Lmdb(Store),
    /// The table, and its URL in canonical form (`EtcdUrl`'s).
    Etcd(Box<libfilter::etcd::EtcdStore>, String),
}

impl Offline {
    fn intents(&self) -> Result<Vec<Result<Intent, StoreError>>, StoreError> {
        match self {
            Offline::Lmdb(s) => s.intents(),
            Offline::Etcd(s, _) => s.all_intents(),
        }
    }
    fn handles(&self) -> Result<Vec<Result<HandleRecord, StoreError>>, StoreError> {
        match self {
            Offline::Lmdb(s) => s.handles(),
            Offline::Etcd(s, _) => s.all_handles(),
        }
    }
    fn replays(&self) -> Result<Vec<libfilter::store::RawReplay>, StoreError> {
        match self {
            Offline::Lmdb(s) => s.replays(),
            Offline::Etcd(s, _) => s.all_replays(),
        }
    }
    fn meta(&self) -> Result<MetaInfo, StoreError> {
        match self {
            Offline::Lmdb(s) => s.meta(),
            Offline::Etcd(s, _) => Ok(s.meta()),
        }
    }
    /// For a shared store: where it is and who owns it now.
    fn owner(&self) -> Option<String> {
        match self {
            Offline::Lmdb(_) => None,
            Offline::Etcd(s, _) => Some(s.last_owner()),
        }
    }
    /// The owner serving the table now, if any (a shared store's): what
    /// it holds live — attachments, handles' connections — this read
    /// cannot see.
    fn serving_owner(&self) -> Option<String> {
        self.owner().filter(|o| o != "none" && !o.is_empty())
    }
    /// The store as filterd's `status` names it: `lmdb`, or the etcd
    /// table's canonical URL.
    fn name(&self) -> String {
        match self {
            Offline::Lmdb(_) => "lmdb".into(),
            Offline::Etcd(_, url) => url.clone(),
        }
    }
    /// The epoch filterd's `status` would give: the LMDB store's last
    /// one; for etcd the owner's fencing revision, unknown (`None`) once
    /// no owner holds the table (etcd keeps no revision of a gone one).
    fn epoch(&self, meta: &MetaInfo) -> Option<u64> {
        match self {
            Offline::Lmdb(_) => Some(meta.epoch),
            Offline::Etcd(..) => Some(meta.epoch).filter(|e| *e != 0),
        }
    }
}

fn open_source(args: &Args) -> anyhow::Result<Source> {
    let within = std::time::Duration::from_millis(args.timeout_ms);
    let connect = |sock: &std::path::Path| FilterClient::connect_control_within(sock, within);
    if let Some(sock) = &args.socket {
        return connect(sock)
            .map(Source::Live)
            .with_context(|| format!("filterd at {}", sock.display()));
    }
    if let Some(url) = &args.store {
        let parsed =
            libfilter::etcd::EtcdUrl::parse(url).map_err(|e| anyhow::anyhow!("--store {e}"))?;
        let store = libfilter::etcd::EtcdStore::open_read_only(&parsed)
            .with_context(|| format!("reading the etcd table {parsed}"))?;
        if let Some(why) = store.unreadable_redo_log() {
            eprintln!(
                "filterctl: warning: {why}: the table is shown without the requests its redo log holds; no filterd can claim it until the bad PREFIX/x/ and PREFIX/xp/ keys are deleted"
            );
        }
        return Ok(Source::Offline(Offline::Etcd(
            Box::new(store),
            parsed.to_string(),
        )));
    }
    let state = args
        .state
        .as_deref()
        .context("--socket or --state is required")?;
    // The daemon that holds the state dir says where it listens. While it
    // runs, its store is never read behind its back.
    // Whoever holds the state dir's lock is the live daemon; its runtime
    // record says where it listens. While it runs, its store is never read
    // behind its back.
    match libfilter::runtime::live(state) {
        Ok(Liveness::Running {
            record: Some(rec),
            user,
        }) => {
            let pid = rec.pid;
            return match FilterClient::connect_control_to_user(&rec.socket, within, user) {
                Ok(c) => Ok(Source::Live(c)),
                Err(e) if rec.phase == Phase::Starting => Err(e).with_context(|| {
                    format!(
                        "filterd (pid {pid}) is starting on {} (recovering its store); try again once it serves {}",
                        state.display(),
                        rec.socket.display()
                    )
                }),
                Err(e) => Err(e).with_context(|| {
                    format!(
                        "filterd (pid {pid}) serves {} on {}, which does not answer",
                        state.display(),
                        rec.socket.display()
                    )
                }),
            };
        }
        Ok(Liveness::Running { record: None, user }) => {
            // Its record is gone (deleted, or not yet written): try the
            // default socket, and otherwise say so rather than "not running".
            let default = state.join("filterd.sock");
            return FilterClient::connect_control_to_user(&default, within, user)
                .map(Source::Live)
                .with_context(|| {
                    format!(
                        "a filterd holds {} but its runtime record ({}) is missing (not written yet, or its filesystem is full) and {} does not answer: it may still be starting (recovering its store), so try again; if it serves another socket, pass --socket",
                        state.display(),
                        state.join(libfilter::runtime::RUNTIME_FILE).display(),
                        default.display()
                    )
                });
        }
        Ok(Liveness::NotRunning) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot tell whether a filterd serves {}", state.display())
            })
        }
    }
    let store = Store::open_read_only(state).with_context(|| {
        format!(
            "filterd is not running and {} holds no readable LMDB state (a node whose table is in etcd: pass --store etcd://HOST:PORT/PREFIX)",
            state.display()
        )
    })?;
    Ok(Source::Offline(Offline::Lmdb(store)))
}

/// A resume key checked as the command line is parsed: a malformed one is
/// bad usage (exit 2), said before any daemon is asked.
fn parse_key(s: &str) -> Result<ResumeKey, String> {
    s.parse::<ResumeKey>().map_err(|e| e.to_string())
}

/// The handles a restart of filterd on this store would show: every
/// persistent record (non-persistent ones are dropped at recovery),
/// including the one an interrupted overwrite installs, disconnected with a
/// fresh timeout — whatever state the dead daemon last wrote — or lost if
/// it was lost already or has no kernel handle to reopen by. (Recovery also
/// marks lost a handle whose file is gone; only a restart can tell.)
/// The records that cannot be read go to `corrupt`, named as filterd's
/// recovery names them, in its order: intents, then (`replays_too`, for
/// `status`) the replay table's, then handles.
fn offline_handles(
    store: &Offline,
    corrupt: &mut CorruptRecords,
    replays_too: bool,
) -> anyhow::Result<Vec<HandleView>> {
    let mut records = Vec::new();
    for i in store.intents()? {
        match i {
            Ok(Intent {
                change: IntentChange::TruncatingOpen { record, .. },
                ..
            }) => records.push(*record),
            Ok(_) => {}
            Err(e) => corrupt.note(e.to_string()),
        }
    }
    if replays_too {
        for (k, r) in store.replays()? {
            match r {
                Ok(_) => corrupt.note_replay(&k, None),
                Err(e) => corrupt.note_replay(&k, Some(&e)),
            }
        }
    }
    for r in store.handles()? {
        match r {
            Ok(record) => records.push(record),
            Err(e) => corrupt.note(e.to_string()),
        }
    }
    let now = libfilter::model::now_ms();
    let mut views: Vec<HandleView> = records
        .into_iter()
        .filter(|r| r.durability.is_persistent())
        .map(|mut record| {
            record.conn = match (record.conn, &record.kernel_handle) {
                (ConnState::Lost, _) | (_, None) => ConnState::Lost,
                _ => ConnState::Disconnected {
                    since_ms: now,
                    expires_ms: now + u64::from(record.durability.timeout_ms().unwrap_or(0)),
                },
            };
            HandleView {
                record,
                fd_open: false,
                // A restart ends every break.
                breaking: None,
            }
        })
        .collect();
    views.sort_by_key(|v| v.record.key);
    views.dedup_by_key(|v| v.record.key);
    Ok(views)
}

/// The files the stored handles hold, as a restart shows them: a lost
/// handle holds none ([`render::holds_state`]).
fn offline_files(views: &[HandleView]) -> Vec<FileView> {
    let mut by_file: std::collections::BTreeMap<libfilter::model::FileId, FileView> =
        Default::default();
    for v in views.iter().filter(|v| render::holds_state(v)) {
        let r = &v.record;
        by_file
            .entry(r.file)
            .or_insert_with(|| FileView {
                file: r.file,
                path: r.path.clone(),
                holders: vec![],
            })
            .holders
            .push(libfilter::proto::FileHolder {
                key: r.key,
                access: r.access,
                share: r.share,
                durability: r.durability,
                conn: r.conn,
            });
    }
    by_file.into_values().collect()
}

/// The nfsl/1 client records of every nfsshim instance's table in the
/// store, by op id; a record that cannot be read goes to `unreadable`,
/// named by its key (it was skipped without a word before).
fn offline_clients(
    store: &Offline,
    unreadable: &mut CorruptRecords,
) -> anyhow::Result<Vec<(u64, String)>> {
    let mut recs = Vec::new();
    for (k, r) in store.replays()? {
        let Some((scope, op)) = libfilter::store::parse_replay_key(&k) else {
            continue;
        };
        if !is_nfs_clients_scope(&scope) {
            continue;
        }
        match r {
            Ok(r) => recs.push((op, r.reply)),
            Err(e) => unreadable.note_replay(&k, Some(&e)),
        }
    }
    Ok(recs)
}

/// Live `status --json`: the daemon's [`StatusInfo`], with `daemon` and
/// `handles` (the total) — names the offline document gives the same
/// facts ([`offline_status_json`]). An older daemon, which sent no
/// `store_detail`, sent its store's description as `store` (etcd:
/// `etcd://…/PREFIX (owner …, fencing revision …)`): split as this one
/// sends it ([`old_store`]), so `store` is the canonical name on both
/// sides whatever the daemon's age.
fn live_status_json(s: &libfilter::proto::StatusInfo) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(s)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("daemon".into(), "running".into());
        let total = s.handles_connected + s.handles_disconnected + s.handles_lost;
        o.insert("handles".into(), total.into());
        if s.store_detail.is_empty() {
            let (store, detail) = old_store(&s.store);
            o.insert("store".into(), store);
            o.insert("store_detail".into(), detail);
        }
    }
    Ok(v)
}

/// A live listing answered without waiting for stuck commits says so:
/// after the table, or — the `--json` array keeping its shape — on stderr,
/// as a line a script can read (`commit_wait` and its JSON document).
fn say_durable_only(
    args: &Args,
    wait: Option<&libfilter::proto::CommitWait>,
) -> anyhow::Result<()> {
    let Some(w) = wait else {
        return Ok(());
    };
    if args.json {
        eprintln!(
            "filterctl: {}; commit_wait {}",
            render::durable_only(w),
            serde_json::to_string(w)?
        );
    } else {
        outln!("{}", render::durable_only(w))?;
    }
    Ok(())
}

/// An older daemon's `store` (its description) as `store` and
/// `store_detail`: the name before ` (`, and the whole description; null
/// both when it said nothing.
fn old_store(described: &str) -> (serde_json::Value, serde_json::Value) {
    if described.is_empty() {
        return (serde_json::Value::Null, serde_json::Value::Null);
    }
    let name = described
        .split_once(" (")
        .map_or(described, |(name, _)| name);
    (name.into(), described.into())
}

/// Offline `status --json`. A fact the live document also gives carries
/// its name there (`daemon`, `epoch`, `schema_version`, `store`,
/// `state_dir`, `handles`, `handles_connected`, `handles_disconnected`,
/// `handles_lost`, `corrupt_records`, `corrupt_records_total`), counted as
/// a restart will show the handles; what only the store tells
/// (`clean_shutdown`, `owner`, `stored_handles`: the persistent handles a
/// restart or takeover recovers) is offline only. `meta` repeats the
/// store's record as before. What the read cannot know is null: the
/// `epoch` of an etcd table no owner holds, and — while an owner serves
/// the table elsewhere — `handles` and the per-state counts, which are
/// the owner's to say (as `frontends` leaves attachments null).
fn offline_status_json(
    args: &Args,
    store: &Offline,
    meta: &MetaInfo,
    views: &[HandleView],
    corrupt: &CorruptRecords,
) -> serde_json::Value {
    let serving = store.serving_owner().is_some();
    let count = |f: fn(&ConnState) -> bool| {
        let n = views.iter().filter(|v| f(&v.record.conn)).count();
        Some(n).filter(|_| !serving)
    };
    let daemon = match store {
        Offline::Lmdb(_) => "not running",
        Offline::Etcd(..) => "read from the store",
    };
    serde_json::json!({
        "daemon": daemon,
        "owner": store.owner(),
        "epoch": store.epoch(meta),
        "schema_version": meta.schema_version,
        "clean_shutdown": meta.clean_shutdown,
        "store": store.name(),
        // Canonical, as filterd shows its own: `--state ./state` and the
        // live daemon's absolute path name the same dir alike.
        "state_dir": args.state.as_ref().map(|d| {
            d.canonicalize()
                .unwrap_or_else(|_| d.clone())
                .display()
                .to_string()
        }),
        "handles": count(|_| true),
        "stored_handles": views.len(),
        "handles_connected": count(|c| matches!(c, ConnState::Connected)),
        "handles_disconnected": count(|c| matches!(c, ConnState::Disconnected { .. })),
        "handles_lost": count(|c| matches!(c, ConnState::Lost)),
        "meta": meta,
        "corrupt_records": corrupt.names,
        "corrupt_records_total": corrupt.total,
    })
}

/// Live `frontends --json`: each attached frontend, and each instance the
/// handle table names that is not attached, marked `attached` as the
/// offline rows are; `handles` counts the handles it holds through its
/// attachment and `stored_handles` those the table names it in, as
/// offline (null from an older daemon, which did not say). An
/// unattached instance has no process: its `pid`, `uid` and
/// `attached_ms` are null.
fn live_frontends_json(fs: &[libfilter::proto::FrontendView]) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(fs)?;
    for (f, view) in v.as_array_mut().into_iter().flatten().zip(fs) {
        if let Some(o) = f.as_object_mut().filter(|_| !view.attached) {
            for absent in ["pid", "uid", "attached_ms"] {
                o.insert(absent.into(), serde_json::Value::Null);
            }
        }
    }
    Ok(v)
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn session_scope(name: &str) -> anyhow::Result<libfilter::model::ReplayScope> {
    Ok(libfilter::model::ReplayScope::Session(
        libfilter::model::ScopeName::new(name)?,
    ))
}

/// Whether a scope holds an nfsshim instance's client records
/// (`nfs/<instance>/clients`, nfsshim/src/state.rs).
fn is_nfs_clients_scope(scope: &libfilter::model::ReplayScope) -> bool {
    match scope {
        libfilter::model::ReplayScope::Session(n) => n
            .as_str()
            .strip_prefix("nfs/")
            .and_then(|r| r.strip_suffix("/clients"))
            .is_some_and(|inst| !inst.is_empty() && !inst.contains('/')),
        _ => false,
    }
}

/// Runs the command; then names on stderr each stored record it could not
/// read. One rule for every command, live and offline: none fails because
/// of unreadable stored records. `status` exits 0 whenever it can report
/// (filterd is ready once `status` answers: README's quick start and
/// scripts loop `until filterctl … status`), shows them in its output
/// (`corrupt records`, JSON `corrupt_records`/`corrupt_records_total`)
/// and names them on stderr too; a listing keeps its shape whatever the
/// data (`handles --json` is an array: a script's `jq '.[]'` works on),
/// shows every readable record, names each unreadable one it met on
/// stderr and exits 0. Before, `status` exited 1 for them, so a daemon
/// serving a store with one bad record never looked ready.
fn run(args: &Args) -> anyhow::Result<()> {
    let mut unreadable = CorruptRecords::default();
    let result = run_command(args, &mut unreadable);
    for r in &unreadable.names {
        eprintln!("filterctl: unreadable: {}", render::text(r));
    }
    let more = unreadable.total - unreadable.names.len() as u64;
    if more > 0 {
        eprintln!("filterctl: unreadable: and {more} more");
    }
    result
}

/// The command itself: its output, and in `unreadable` what it could not
/// read ([`run`] reports them).
fn run_command(args: &Args, unreadable: &mut CorruptRecords) -> anyhow::Result<()> {
    let src = open_source(args)?;
    // The stored handles, their unreadable records kept for [`run`].
    let mut read_handles = |store: &Offline| -> anyhow::Result<Vec<HandleView>> {
        offline_handles(store, unreadable, false)
    };
    match (&args.command, src) {
        (Cmd::Locks, src) => {
            let mut wait = None;
            let locks = match src {
                Source::Live(c) => {
                    let l = c.locks_listed(!args.complete)?;
                    wait = l.commit_wait;
                    l.items
                }
                Source::Offline(store) => read_handles(&store)?
                    .iter()
                    .filter(|v| render::holds_state(v))
                    .flat_map(|v| {
                        v.record.locks.iter().map(|l| libfilter::proto::LockView {
                            file: v.record.file,
                            key: v.record.key,
                            owner: v
                                .record
                                .lock_owner
                                .clone()
                                .or_else(|| v.record.owner.clone()),
                            range: l.range,
                            kind: l.kind,
                            unmirrored: false,
                        })
                    })
                    .collect(),
            };
            if args.json {
                print_json(&locks)?;
            } else {
                out!("{}", render::locks(&locks))?;
            }
            say_durable_only(args, wait.as_ref())
        }
        (Cmd::Leases, src) => {
            let (views, wait) = match src {
                Source::Live(c) => {
                    let l = c.handles_listed(!args.complete)?;
                    (l.items, l.commit_wait)
                }
                Source::Offline(store) => (read_handles(&store)?, None),
            };
            let leases = render::lease_rows(&views);
            if args.json {
                print_json(&leases)?;
            } else {
                out!("{}", render::leases(&leases))?;
            }
            say_durable_only(args, wait.as_ref())
        }
        (Cmd::Clients, src) => {
            // Every nfsshim instance's client table; the live daemon is
            // asked by the instance names nfsshim registers.
            let recs: Vec<(u64, String)> = match src {
                Source::Live(c) => {
                    let mut all = Vec::new();
                    for (op, text) in c.list_records(session_scope("nfs/instances")?)? {
                        let inst = match serde_json::from_str::<String>(&text) {
                            Ok(inst) => inst,
                            Err(e) => {
                                unreadable.note(format!(
                                    "instance record {op} of nfs/instances: not a JSON string: {e}"
                                ));
                                continue;
                            }
                        };
                        all.extend(c.list_records(session_scope(&format!("nfs/{inst}/clients"))?)?);
                    }
                    all
                }
                Source::Offline(store) => offline_clients(&store, unreadable)?,
            };
            let clients: Vec<serde_json::Value> = recs
                .iter()
                .filter_map(|(op, text)| match serde_json::from_str(text) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        unreadable.note(format!("client record {op}: not JSON: {e}"));
                        None
                    }
                })
                .map(|mut v: serde_json::Value| {
                    v["protocol"] = serde_json::json!("nfs");
                    v
                })
                .collect();
            if args.json {
                print_json(&clients)
            } else {
                out!("{}", render::clients(&clients))?;
                Ok(())
            }
        }
        (Cmd::Status, Source::Live(c)) => match c.call(Request::Status)?.0 {
            Reply::Status(s) => {
                if args.json {
                    print_json(&live_status_json(&s)?)?;
                } else {
                    out!("{}", render::status(&s))?;
                }
                // Named on stderr as every command names them.
                *unreadable = CorruptRecords {
                    names: s.corrupt_records.unwrap_or_default(),
                    total: s.corrupt_records_total.unwrap_or(0),
                };
                Ok(())
            }
            other => bail!("unexpected reply {other:?}"),
        },
        (Cmd::Status, Source::Offline(store)) => {
            let meta = store.meta()?;
            // Every table recovery reads, replay records too; named in
            // the output and, as every command names them, on stderr.
            let mut corrupt = CorruptRecords::default();
            let views = offline_handles(&store, &mut corrupt, true)?;
            if args.json {
                print_json(&offline_status_json(args, &store, &meta, &views, &corrupt))?;
            } else {
                out!(
                    "{}",
                    render::offline_status(
                        &meta,
                        store.epoch(&meta),
                        store.owner().as_deref(),
                        &views,
                        &corrupt
                    )
                )?;
            }
            *unreadable = corrupt;
            Ok(())
        }
        (Cmd::Handles, src) => {
            let (views, wait) = match src {
                Source::Live(c) => {
                    let l = c.handles_listed(!args.complete)?;
                    (l.items, l.commit_wait)
                }
                Source::Offline(store) => (read_handles(&store)?, None),
            };
            if args.json {
                print_json(&views)?;
            } else {
                out!("{}", render::handles(&views, libfilter::model::now_ms()))?;
            }
            say_durable_only(args, wait.as_ref())
        }
        (Cmd::Handle { key }, src) => {
            let key = *key;
            let view = match src {
                Source::Live(c) => match c
                    .call(Request::Handle {
                        key,
                        learning: false,
                    })?
                    .0
                {
                    Reply::Handle(v) => v,
                    other => bail!("unexpected reply {other:?}"),
                },
                Source::Offline(store) => read_handles(&store)?
                    .into_iter()
                    .find(|v| v.record.key == key)
                    .with_context(|| {
                        format!("no handle {key} in the store that a restart would recover")
                    })?,
            };
            if args.json {
                print_json(&view)
            } else {
                out!("{}", render::handle(&view, libfilter::model::now_ms()))?;
                Ok(())
            }
        }
        (Cmd::Files, src) => {
            let (files, wait) = match src {
                Source::Live(c) => {
                    let l = c.files_listed(!args.complete)?;
                    (l.items, l.commit_wait)
                }
                Source::Offline(store) => (offline_files(&read_handles(&store)?), None),
            };
            if args.json {
                print_json(&files)?;
            } else {
                out!("{}", render::files(&files))?;
            }
            say_durable_only(args, wait.as_ref())
        }
        (Cmd::Frontends, Source::Live(c)) => {
            match frontends_live(&c, args)? {
                // The reply is bounded (a frame): rows past it are counted,
                // said after the table, or on stderr for JSON (the array
                // keeps its shape).
                Reply::Frontends {
                    frontends,
                    more,
                    commit_wait,
                } if args.json => {
                    print_json(&live_frontends_json(&frontends)?)?;
                    if more > 0 {
                        eprintln!("filterctl: frontends: and {more} more (not listed: the reply is bounded)");
                    }
                    if let Some(w) = &commit_wait {
                        eprintln!(
                            "filterctl: {}; commit_wait {}",
                            render::frontends_as_of(w),
                            serde_json::to_string(w)?
                        );
                    }
                    Ok(())
                }
                Reply::Frontends {
                    frontends,
                    more,
                    commit_wait,
                } => {
                    out!(
                        "{}",
                        render::frontends(&frontends, libfilter::model::now_ms())
                    )?;
                    if more > 0 {
                        outln!("…and {more} more (not listed: the reply is bounded)")?;
                    }
                    if let Some(w) = &commit_wait {
                        outln!("{}", render::frontends_as_of(w))?;
                    }
                    Ok(())
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        (Cmd::Frontends, Source::Offline(store)) => {
            let views = read_handles(&store)?;
            let mut names: std::collections::BTreeMap<(String, String), u64> = Default::default();
            for v in &views {
                *names
                    .entry((v.record.protocol.to_string(), v.record.frontend.to_string()))
                    .or_default() += 1;
            }
            // An LMDB store read offline has no daemon; an etcd table may
            // have an owner serving on another node, whose frontends this
            // read cannot see: their attachment, and the handles they hold
            // through it, are unknown (JSON null). `handles` means what it
            // means live — the handles the instance holds through its
            // attachment: none when nothing is attached. The handles the
            // store names the instance in are `stored_handles` (offline
            // `handles` counted them before, the same name for another
            // fact).
            let (attached, held, attached_text) = match (store.serving_owner(), store.owner()) {
                (Some(o), _) => (
                    serde_json::Value::Null,
                    serde_json::Value::Null,
                    format!("unknown (owner {o} serves the table)"),
                ),
                (None, Some(_)) => (
                    serde_json::json!(false),
                    serde_json::json!(0),
                    "no (the table has no owner)".into(),
                ),
                (None, None) => (
                    serde_json::json!(false),
                    serde_json::json!(0),
                    "no (daemon down)".into(),
                ),
            };
            if args.json {
                let v: Vec<_> = names
                    .iter()
                    .map(|((p, i), n)| {
                        serde_json::json!({"protocol": p, "instance": i, "attached": attached,
                                           "handles": held, "stored_handles": n})
                    })
                    .collect();
                print_json(&v)
            } else {
                let rows: Vec<Vec<String>> = names
                    .iter()
                    .map(|((p, i), n)| {
                        vec![p.clone(), i.clone(), n.to_string(), attached_text.clone()]
                    })
                    .collect();
                out!(
                    "{}",
                    render::table(
                        &["PROTOCOL", "INSTANCE", "STORED HANDLES", "ATTACHED"],
                        &rows
                    )
                )?;
                Ok(())
            }
        }
        (Cmd::Stats, Source::Live(c)) => match c.call(Request::Stats)?.0 {
            Reply::Stats(s) if args.json => print_json(&s),
            Reply::Stats(s) => {
                out!("{}", render::stats(&s)?)?;
                Ok(())
            }
            other => bail!("unexpected reply {other:?}"),
        },
        (Cmd::Stats, Source::Offline(_)) => {
            bail!("stats need the running daemon (counters live in its memory)")
        }
        (Cmd::Expire { key }, Source::Live(c)) => {
            let key = *key;
            c.call(Request::Expire { key })?;
            if args.json {
                print_json(&serde_json::json!({ "expired": key }))
            } else {
                outln!("expired {key}")?;
                Ok(())
            }
        }
        (Cmd::Purge { .. }, Source::Live(c)) => match c.call(Request::PurgeDisconnected)?.0 {
            Reply::Purged { count, lost } => {
                let (line, json) = render::purged(count, lost);
                if args.json {
                    print_json(&json)
                } else {
                    outln!("{line}")?;
                    Ok(())
                }
            }
            other => bail!("unexpected reply {other:?}"),
        },
        (Cmd::Expire { .. } | Cmd::Purge { .. }, Source::Offline(_)) => {
            bail!("filterd is not running: the state is read-only; start filterd to expire or purge handles")
        }
    }
}

fn main() -> ExitCode {
    let args: Args = libfilter::cli::parse();
    // The store's warnings (a store read without its lock file) reach the
    // operator on stderr; without a subscriber they were dropped
    // (attack50 L1). Only those: the etcd client's retries are summed up
    // in filterctl's own one-line errors; `RUST_LOG`, exported for a
    // daemon, is not read (scripts parse filterctl's stderr, rr50d B4).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("libfilter::store=warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`filterctl handles | head`):
        // what it wanted it has; stop quietly, as ripgrep does.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("filterctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Whether `e` is a write to a closed pipe (stdout's reader is gone).
/// Not one to filterd's socket: a daemon that closed the connection (it
/// is shutting down) made `status` exit 0 without a word, and a readiness
/// loop (`until filterctl status`) took the dying daemon for a ready one.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    !e.chain().any(|c| c.is::<libfilter::client::ClientError>())
        && e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        })
}

/// `frontends` from a live daemon. When the commits pending at it do
/// not resolve within its 1 s bound (the stored counts are what those
/// commits change), filterd answers with the rows taken with `status`'s
/// durable counts (`commit_wait` saying how old), or refuses it (Busy)
/// if it took none. With `--complete` it is asked without `durable_ok`
/// (refused past the bound), again, 0.1 s apart, until it answers with
/// the rows of now; once `--timeout-ms` has passed, an error (exit 1):
/// before re-review rr47a F2, the older rows, exit 0, which a script
/// reading the JSON could not tell from the rows of now.
fn frontends_live(c: &FilterClient, args: &Args) -> anyhow::Result<Reply> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(args.timeout_ms);
    loop {
        let r = c.call(Request::Frontends {
            durable_ok: !args.complete,
        });
        let not_of_now = match &r {
            Err(libfilter::client::ClientError::Refused(e)) => {
                e.code == libfilter::proto::ErrorCode::Busy
            }
            Ok((Reply::Frontends { commit_wait, .. }, _)) => commit_wait.is_some(),
            _ => false,
        };
        if !(args.complete && not_of_now) {
            return Ok(r?.0);
        }
        if std::time::Instant::now() >= deadline {
            let last = match r {
                Err(e) => e.to_string(),
                Ok(_) => "answered with older rows".into(),
            };
            bail!(
                "frontends: no rows of now within --timeout-ms ({} ms), commits still pending; last answer: {last}",
                args.timeout_ms
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed stdout ends filterctl quietly (exit 0); filterd closing
    /// its socket does not.
    #[test]
    fn only_a_closed_stdout_is_a_quiet_broken_pipe() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe(&anyhow::Error::from(pipe())));
        let socket = anyhow::Error::from(libfilter::client::ClientError::Io(pipe()))
            .context("filterd at /run/rk/filterd.sock");
        assert!(!is_broken_pipe(&socket));
    }

    /// A status as a filterd older than `store_detail` sent it.
    fn old_status(store: &str) -> libfilter::proto::StatusInfo {
        libfilter::proto::StatusInfo {
            pid: 1,
            epoch: 7,
            root: "/srv".into(),
            state_dir: "/var/lib/rk".into(),
            uptime_ms: 0,
            handles_connected: 0,
            handles_disconnected: 0,
            handles_lost: 0,
            frontends: 0,
            recovering: false,
            fanotify: false,
            mediation: String::new(),
            store: store.into(),
            store_detail: String::new(),
            schema_version: 2,
            corrupt_records: None,
            corrupt_records_total: None,
            commit_wait: None,
            lease_left_ms: None,
        }
    }

    /// An older filterd's `store` was its description: `--json` splits
    /// it into the canonical `store` and `store_detail`, as a current
    /// daemon sends them. Before, only an empty one was touched (nulled),
    /// and an older daemon never sent one empty.
    #[test]
    fn an_older_daemons_store_is_split_into_store_and_detail() {
        let etcd =
            "etcd://e1:2379,e2:2379/rk (owner n1, fencing revision 5, lease 10 s, margin 500 ms)";
        let v = live_status_json(&old_status(etcd)).unwrap();
        assert_eq!(v["store"], "etcd://e1:2379,e2:2379/rk", "{v}");
        assert_eq!(v["store_detail"], etcd, "{v}");
        let v = live_status_json(&old_status("lmdb")).unwrap();
        assert_eq!(v["store"], "lmdb", "{v}");
        assert_eq!(v["store_detail"], "lmdb", "{v}");
        let v = live_status_json(&old_status("")).unwrap();
        assert!(v["store"].is_null() && v["store_detail"].is_null(), "{v}");
    }
}
