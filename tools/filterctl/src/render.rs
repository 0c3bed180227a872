//! Human-readable rendering: aligned tables and key: value listings.

use libfilter::model::{ConnState, HandleRecord};
use libfilter::proto::{CorruptRecords, FileView, FrontendView, HandleView, Stats, StatusInfo};
use libfilter::store::MetaInfo;

/// `s` as it may go to a terminal, or to a script that splits a table's
/// columns on runs of spaces: as is, unless it could be taken for
/// something else; then quoted, with `"`, `\\` and the characters not
/// printed as themselves escaped (`\n`, `\u{1b}`). Paths, client and
/// owner names come from clients: printed raw, a path with a newline
/// forged table rows and one with escape sequences drove the operator's
/// terminal (review r4 #3). Quoting is unambiguous: a text that starts
/// with `"` or holds a `\\` is itself quoted, so no text prints as another
/// one's escaped form. Other non-ASCII text (accents, combining marks of
/// NFD names) stays readable. JSON output needs none of this.
pub fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if !needs_quotes(s) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hidden(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out.into()
}

/// Whether [`text`] must quote `s`: it holds a character not printed as
/// itself, would read as a quoted text (a leading `"`, a `\\`), or would
/// not read as one column (two spaces in a row, a space at either end).
fn needs_quotes(s: &str) -> bool {
    s.starts_with(['"', ' '])
        || s.ends_with(' ')
        || s.contains("  ")
        || s.contains('\\')
        || s.chars().any(hidden)
}

/// A character a terminal does not print as itself: a control character
/// (C0, DEL, C1 — a newline, an escape sequence's ESC or CSI), a line or
/// paragraph separator (line-splitting tools split on them), or an
/// invisible format character (zero-width spaces and joiners, direction
/// marks, bidi embeddings, overrides and isolates, the byte order mark).
/// Not everything `escape_debug` escapes: it escapes combining marks too,
/// which would quote every name in NFD form.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// An aligned table with a header row; columns are as wide as their widest
/// cell. Every cell goes through [`text`].
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|c| text(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(|c| c.as_ref()).collect()));
    }
    out
}

/// "12.3s", "4m05s", "2h10m".
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn state_cell(r: &HandleRecord, now: u64) -> String {
    match r.conn {
        ConnState::Connected => "connected".into(),
        ConnState::Disconnected { expires_ms, .. } if expires_ms > now => {
            format!(
                "disconnected (expires in {})",
                duration_ms(expires_ms - now)
            )
        }
        ConnState::Disconnected { .. } => "disconnected (expiring)".into(),
        ConnState::Lost => "lost".into(),
    }
}

/// The `handles` table.
pub fn handles(views: &[HandleView], now: u64) -> String {
    let mut views: Vec<&HandleView> = views.iter().collect();
    views.sort_by_key(|v| (v.record.opened_ms, v.record.key));
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let r = &v.record;
            vec![
                r.key.to_string(),
                state_cell(r, now),
                r.durability.word().into(),
                r.protocol.to_string(),
                r.frontend.to_string(),
                r.client.to_string(),
                r.access.to_string(),
                r.share.to_string(),
                duration_ms(now.saturating_sub(r.opened_ms)),
                r.path.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "KEY",
            "STATE",
            "DURABILITY",
            "PROTO",
            "FRONTEND",
            "CLIENT",
            "ACCESS",
            "SHARE",
            "AGE",
            "PATH",
        ],
        &rows,
    );
    out.push_str(&format!("{} handle(s)\n", views.len()));
    out
}

/// One handle, key: value.
pub fn handle(v: &HandleView, now: u64) -> String {
    let r = &v.record;
    let mut rows: Vec<(&str, String)> = vec![
        ("resume key", r.key.to_string()),
        ("state", state_cell(r, now)),
        (
            "durability",
            match r.durability.timeout_ms() {
                Some(t) => format!(
                    "{} (timeout {})",
                    r.durability.word(),
                    duration_ms(u64::from(t))
                ),
                None => r.durability.word().into(),
            },
        ),
        ("protocol", r.protocol.to_string()),
        ("frontend", r.frontend.to_string()),
        // The frontend process a client's resume or replay attached it
        // through last (a reattach by another one is refused): 0 until a
        // client moves it, the process that opened it (or a record from
        // before the stamp).
        (
            "attached by",
            match r.attached_by {
                0 => "the opener".into(),
                n => format!("process {n:016x}"),
            },
        ),
        ("client", r.client.to_string()),
        (
            "create guid",
            r.create_guid
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("owner", r.owner.clone().unwrap_or_else(|| "-".into())),
        ("path", r.path.to_string()),
        ("file", r.file.to_string()),
        ("access", r.access.to_string()),
        ("share", r.share.to_string()),
        ("create action", r.create_action.to_string()),
        (
            "opened",
            format!("{} ago", duration_ms(now.saturating_sub(r.opened_ms))),
        ),
        (
            "kernel handle",
            if r.kernel_handle.is_some() {
                "yes"
            } else {
                "no"
            }
            .into(),
        ),
        (
            "daemon descriptor",
            if v.fd_open { "open" } else { "none" }.into(),
        ),
        ("lease", handle_lease(v)),
        (
            "lock owner",
            r.lock_owner.clone().unwrap_or_else(|| "-".into()),
        ),
        ("locks", handle_locks(v)),
    ];
    // One row per byte-range lock, as `locks` shows them: what `--json`
    // shows of the handle, text omitted before. A lost handle's are what
    // it held, said so.
    let held = if holds_state(v) { "lock" } else { "lock (was)" };
    rows.extend(r.locks.iter().map(|l| (held, lock_text(l.range, l.kind))));
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.drain(..)
        .map(|(k, v)| format!("{:<w$}  {}\n", format!("{k}:"), text(&v), w = w + 1))
        .collect()
}

/// A handle's lease, as `handle KEY` shows it: its key, state and epoch,
/// and any break in progress (as the `leases` table shows one). A lost
/// handle holds no lease ([`holds_state`]) whatever its record still
/// names: `none (lost; was KEY RWH)`, as `leases` leaves it out. Before,
/// it read as held.
fn handle_lease(v: &HandleView) -> String {
    let Some(l) = v.record.lease else {
        return "none".into();
    };
    let state = l.state.to_string();
    let state = if state.is_empty() {
        "none".into()
    } else {
        state
    };
    if !holds_state(v) {
        return format!("none (lost; was {} {state})", l.key);
    }
    let mut s = format!("{} {state} (epoch {})", l.key, l.epoch);
    if let Some(b) = v.breaking {
        s.push_str(&format!(", breaking {}", breaking(b)));
    }
    s
}

/// A handle's lock count, as `handle KEY` shows it: a lost handle holds
/// none ([`holds_state`]), as `locks` shows: `0 (lost; held 2)`.
fn handle_locks(v: &HandleView) -> String {
    let n = v.record.locks.len();
    if holds_state(v) || n == 0 {
        n.to_string()
    } else {
        format!("0 (lost; held {n})")
    }
}

/// A byte-range lock in one line: `exclusive, offset 0, length 100`
/// (`length to EOF` for a lock to the end of the file).
fn lock_text(range: libfilter::locks::LockRange, kind: libfilter::locks::LockKind) -> String {
    format!(
        "{}, offset {}, length {}",
        format!("{kind:?}").to_lowercase(),
        range.offset,
        lock_length(range.length)
    )
}

/// A lock's length as the tables show it: `to EOF` for `u64::MAX`.
fn lock_length(length: u64) -> String {
    if length == u64::MAX {
        "to EOF".to_string()
    } else {
        length.to_string()
    }
}

/// The `files` table: one row per holder.
pub fn files(files: &[FileView]) -> String {
    let mut rows = Vec::new();
    for f in files {
        for h in &f.holders {
            rows.push(vec![
                f.path.to_string(),
                f.file.to_string(),
                h.key.to_string(),
                h.access.to_string(),
                h.share.to_string(),
                h.durability.word().into(),
                h.conn.word().into(),
            ]);
        }
    }
    let mut out = table(
        &[
            "PATH",
            "FILE",
            "HANDLE",
            "ACCESS",
            "SHARE",
            "DURABILITY",
            "STATE",
        ],
        &rows,
    );
    out.push_str(&format!("{} file(s)\n", files.len()));
    out
}

/// The `locks` table.
pub fn locks(locks: &[libfilter::proto::LockView]) -> String {
    let rows: Vec<Vec<String>> = locks
        .iter()
        .map(|l| {
            let len = lock_length(l.range.length);
            vec![
                l.file.to_string(),
                l.key.to_string(),
                l.owner.clone().unwrap_or_else(|| "-".into()),
                l.range.offset.to_string(),
                len,
                if l.unmirrored {
                    format!("{:?} (not yet seen by local processes)", l.kind).to_lowercase()
                } else {
                    format!("{:?}", l.kind).to_lowercase()
                },
            ]
        })
        .collect();
    let mut out = table(
        &["FILE", "HANDLE", "OWNER", "OFFSET", "LENGTH", "KIND"],
        &rows,
    );
    out.push_str(&format!("{} lock(s)\n", locks.len()));
    out
}

/// One lease: a key on a file, with the handles that share it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseRow {
    /// The file.
    pub file: libfilter::model::FileId,
    /// A path it was opened by.
    pub path: String,
    /// The lease key.
    pub lease_key: libfilter::lease::LeaseKey,
    /// Its state.
    pub state: libfilter::lease::LeaseState,
    /// Its epoch.
    pub epoch: u16,
    /// The client holding it.
    pub client: String,
    /// The handles sharing it.
    pub handles: Vec<libfilter::model::ResumeKey>,
    /// Its break in progress (live only): what the holder was asked to
    /// keep, how long it has yet to acknowledge, whether an open waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaking: Option<libfilter::proto::BreakView>,
}

/// Whether a handle holds what its record names — its locks, its lease,
/// its place among a file's holders. A lost handle holds none of them:
/// filterd gives it no locks, no lease key and no file-index entry
/// (`Engine::lose`, recovery), so it conflicts with nothing; showing them
/// anyway listed a second RWH lease beside the one filterd granted, and
/// the offline view differed from what a restart shows. `handles` still
/// lists lost handles, with their state.
pub fn holds_state(v: &HandleView) -> bool {
    !matches!(v.record.conn, ConnState::Lost)
}

/// Groups the held leases ([`holds_state`]) by (file, key).
pub fn lease_rows(views: &[HandleView]) -> Vec<LeaseRow> {
    let mut rows: Vec<LeaseRow> = Vec::new();
    for v in views.iter().filter(|v| holds_state(v)) {
        let r = &v.record;
        let Some(l) = r.lease else { continue };
        match rows
            .iter_mut()
            .find(|x| x.file == r.file && x.lease_key == l.key)
        {
            Some(x) => x.handles.push(r.key),
            None => rows.push(LeaseRow {
                file: r.file,
                path: r.path.to_string(),
                lease_key: l.key,
                state: l.state,
                epoch: l.epoch,
                client: r.client.to_string(),
                handles: vec![r.key],
                breaking: v.breaking,
            }),
        }
    }
    rows
}

/// The `leases` table.
pub fn leases(rows: &[LeaseRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|l| {
            let state = l.state.to_string();
            vec![
                l.path.clone(),
                l.lease_key.to_string(),
                if state.is_empty() {
                    "none".into()
                } else {
                    state
                },
                l.epoch.to_string(),
                l.client.clone(),
                l.handles.len().to_string(),
                l.breaking.map_or_else(|| "-".into(), breaking),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "PATH",
            "LEASE KEY",
            "STATE",
            "EPOCH",
            "CLIENT",
            "HANDLES",
            "BREAKING",
        ],
        &cells,
    );
    out.push_str(&format!("{} lease(s)\n", rows.len()));
    out
}

/// A break in progress, as the `leases` table shows it: `-> RH 12.3s`
/// (the state asked for and the time left to acknowledge it) and `, open
/// waits` when an open waits for it — the cause of a stalled open, and
/// who stalls it.
fn breaking(b: libfilter::proto::BreakView) -> String {
    let to = b.to.to_string();
    let to = if to.is_empty() { "none".to_owned() } else { to };
    let (s, tenths) = (b.ms_left / 1000, (b.ms_left % 1000) / 100);
    let waits = if b.waiters { ", open waits" } else { "" };
    format!("-> {to} {s}.{tenths}s{waits}")
}

/// The `frontends` table, live: `ATTACHED HANDLES` are those the
/// frontend holds through its attachment, `STORED HANDLES` those the
/// handle table names its instance in (as offline: `-` from an older
/// daemon). An instance that is not attached shows `-` for its process
/// and `not attached` for how long.
pub fn frontends(fs: &[FrontendView], now: u64) -> String {
    let rows: Vec<Vec<String>> = fs
        .iter()
        .map(|f| {
            let (pid, uid, since) = if f.attached {
                (
                    f.pid.to_string(),
                    f.uid.to_string(),
                    duration_ms(now.saturating_sub(f.attached_ms)),
                )
            } else {
                ("-".into(), "-".into(), "not attached".into())
            };
            vec![
                f.protocol.to_string(),
                f.instance.to_string(),
                pid,
                uid,
                f.handles.to_string(),
                f.stored_handles
                    .map_or_else(|| "-".into(), |n| n.to_string()),
                since,
            ]
        })
        .collect();
    table(
        &[
            "PROTOCOL",
            "INSTANCE",
            "PID",
            "UID",
            "ATTACHED HANDLES",
            "STORED HANDLES",
            "ATTACHED FOR",
        ],
        &rows,
    )
}

fn kv(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$}  {}\n", format!("{k}:"), text(v)))
        .collect()
}

/// `status`, live.
pub fn status(s: &StatusInfo) -> String {
    let mut out = kv(&[
        (
            "daemon",
            format!("running (pid {}, epoch {})", s.pid, s.epoch),
        ),
        ("uptime", duration_ms(s.uptime_ms)),
        ("export root", s.root.clone()),
        ("state dir", s.state_dir.clone()),
        (
            "handles",
            format!(
                "{} connected, {} disconnected, {} lost",
                s.handles_connected, s.handles_disconnected, s.handles_lost
            ),
        ),
        ("frontends", s.frontends.to_string()),
        ("recovering", s.recovering.to_string()),
        (
            "local mediation",
            if s.fanotify {
                format!("fanotify on the {}", s.mediation)
            } else {
                "off".into()
            },
        ),
        (
            "store",
            // The description (for etcd: owner, fencing revision, lease)
            // when the daemon gives one.
            if s.store_detail.is_empty() {
                s.store.clone()
            } else {
                s.store_detail.clone()
            },
        ),
        ("schema version", s.schema_version.to_string()),
    ]);
    if let Some(left) = s.lease_left_ms {
        out.push_str(&kv(&[(
            "store lease",
            format!(
                "{} left (as the keepalive last proved it)",
                duration_ms(left)
            ),
        )]));
    }
    if let Some(w) = &s.commit_wait {
        out.push_str(&kv(&[(
            "commits pending",
            format!(
                "for {} ({} replies waiting); answered after {} without them: handles and frontends as durable {}",
                duration_ms(w.pending_for_ms),
                w.replies_awaiting_commit,
                duration_ms(w.waited_ms),
                w.counts_age_ms
                    .map_or_else(|| "unknown (never settled since the start)".into(), |a| format!("{} ago", duration_ms(a)))
            ),
        )]));
    }
    match (&s.corrupt_records, s.corrupt_records_total) {
        (Some(names), Some(total)) => {
            out.push_str(&corrupt_records(names, total, AT_RECOVERY));
        }
        _ => out.push_str(&kv(&[(
            "corrupt records",
            "unknown (this filterd does not say)".into(),
        )])),
    }
    out
}

/// The line a listing answered without waiting for stuck commits ends
/// with (on stderr for `--json`, whose array keeps its shape): what it
/// shows is durable, and what it left out — every file a pending commit
/// changes (one with no handles too: an intent's), with every handle and
/// lock on it, durable ones too; the handle count also counts handles a
/// pending commit removes (a close, an expiry), gone from memory already.
pub fn durable_only(w: &libfilter::proto::CommitWait) -> String {
    format!(
        "durable state only: commits pending for {} ({} replies waiting); answered after {} without them, leaving out the {} files they change with every handle and lock on them ({} handles, counting those they remove)",
        duration_ms(w.pending_for_ms),
        w.replies_awaiting_commit,
        duration_ms(w.waited_ms),
        w.files_left_out.unwrap_or(0),
        w.handles_left_out.unwrap_or(0),
    )
}

/// The line a live `frontends` answered without waiting for stuck
/// commits ends with (on stderr for `--json`): its rows are those taken
/// with `status`'s durable counts, and how old they are.
pub fn frontends_as_of(w: &libfilter::proto::CommitWait) -> String {
    format!(
        "durable state only: commits pending for {} ({} replies waiting); answered after {} without them, with the rows as durable {}",
        duration_ms(w.pending_for_ms),
        w.replies_awaiting_commit,
        duration_ms(w.waited_ms),
        w.counts_age_ms
            .map_or_else(|| "at an unknown time".into(), |a| format!("{} ago", duration_ms(a)))
    )
}

/// What live `status`'s count of corrupt records is as of: filterd
/// counted them when it recovered the store (at its start or takeover)
/// and does not count again — a record filterd has deleted since (a
/// dropped or trimmed replay scope, a closed handle's) is still named
/// until the next restart. Offline counts what the store holds now.
const AT_RECOVERY: &str = " (found at filterd's last recovery)";

/// The `corrupt records` line of `status`, live and offline alike: how
/// many stored records could not be read (`as_of`: when, if not now),
/// then each one named (the first
/// [`libfilter::proto::CORRUPT_NAMES_KEPT`]).
fn corrupt_records(names: &[String], total: u64, as_of: &str) -> String {
    let mut out = kv(&[("corrupt records", format!("{total}{as_of}"))]);
    for c in names {
        out.push_str(&format!("  {}\n", text(c)));
    }
    let more = total.saturating_sub(names.len() as u64);
    if more > 0 {
        out.push_str(&format!("  and {more} more\n"));
    }
    out
}

/// `status`, offline.
pub fn offline_status(
    meta: &MetaInfo,
    epoch: Option<u64>,
    owner: Option<&str>,
    views: &[HandleView],
    corrupt: &CorruptRecords,
) -> String {
    let count = |f: fn(&ConnState) -> bool| views.iter().filter(|v| f(&v.record.conn)).count();
    let daemon = match owner {
        // A shared (etcd) table: its owner may be serving on another node.
        Some(o) => format!("owner {o} (read-only view of the etcd table)"),
        None => "not running (read-only view of the store)".into(),
    };
    let mut out = kv(&[
        ("daemon", daemon),
        (
            if owner.is_some() {
                "fencing revision"
            } else {
                "last epoch"
            },
            epoch.map_or_else(|| "unknown (no owner)".into(), |e| e.to_string()),
        ),
        (
            "last shutdown",
            if meta.clean_shutdown {
                "clean"
            } else {
                "not clean (crash or still starting)"
            }
            .into(),
        ),
        ("schema version", meta.schema_version.to_string()),
        (
            "persistent handles",
            format!(
                "{} ({} lost); all will be disconnected after a restart or a takeover",
                views.len(),
                count(|c| matches!(c, ConnState::Lost))
            ),
        ),
    ]);
    out.push_str(&corrupt_records(&corrupt.names, corrupt.total, ""));
    out
}

/// `clients`.
pub fn clients(cs: &[serde_json::Value]) -> String {
    let rows: Vec<Vec<String>> = cs
        .iter()
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or("").to_owned();
            vec![f("protocol"), f("clientid"), f("owner"), f("verifier")]
        })
        .collect();
    let mut out = table(&["PROTO", "CLIENTID", "OWNER", "VERIFIER"], &rows);
    out.push_str(&format!("{} client(s)\n", cs.len()));
    out
}

/// `stats`.
pub fn stats(s: &Stats) -> anyhow::Result<String> {
    let v = serde_json::to_value(s)?;
    let pairs: Vec<(String, String)> = v
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
        .unwrap_or_default();
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v:>10}\n"))
        .collect())
}

/// What `purge --disconnected` says of a purge of `count` handles, `lost`
/// of them lost: a line and its JSON. An older daemon does not tell the
/// lost apart (`None`): the line gives only the count and the JSON has no
/// `lost`. Before, that read as "N disconnected, 0 lost".
pub fn purged(count: u64, lost: Option<u64>) -> (String, serde_json::Value) {
    match lost {
        Some(lost) => (
            format!(
                "purged {count} handle(s): {} disconnected, {lost} lost",
                count.saturating_sub(lost)
            ),
            serde_json::json!({ "purged": count, "lost": lost }),
        ),
        None => (
            format!("purged {count} handle(s)"),
            serde_json::json!({ "purged": count }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An older daemon's purge reply (no `lost`) is not told as none
    /// lost, in text or JSON.
    #[test]
    fn a_purge_without_lost_says_only_the_count() {
        let frame = br#"{"frame":"reply","id":1,"result":{"Ok":{"kind":"purged","count":2}}}"#;
        let old = libfilter::proto::decode_server(frame);
        let Ok(libfilter::proto::ServerFrame::Reply {
            result: Ok(libfilter::proto::Reply::Purged { count, lost }),
            ..
        }) = old
        else {
            panic!("{old:?}");
        };
        let (line, json) = purged(count, lost);
        assert_eq!(line, "purged 2 handle(s)");
        assert_eq!(json, serde_json::json!({ "purged": 2 }));
        let (line, json) = purged(2, Some(1));
        assert_eq!(line, "purged 2 handle(s): 1 disconnected, 1 lost");
        assert_eq!(json, serde_json::json!({ "purged": 2, "lost": 1 }));
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["xxxxx".into(), "y".into(), "z".into()],
                vec!["1".into(), "2".into(), "3".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A      LONG HEADER  C");
        assert_eq!(lines[1], "xxxxx  y            z");
        assert_eq!(lines[2], "1      2            3");
    }

    /// A client's path cannot add table rows or reach the terminal as
    /// an escape sequence (review r4 #3); ordinary paths print as they are.
    #[test]
    fn cells_with_control_characters_are_quoted_and_escaped() {
        let forged = "x\nKEY  connected\x1b[2J\u{9b}31m\u{202e}";
        let t = table(
            &["PATH", "N"],
            &[
                vec![forged.into(), "1".into()],
                vec!["a b/é's".into(), "2".into()],
            ],
        );
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(!t.contains('\x1b') && !t.contains('\u{9b}') && !t.contains('\u{202e}'));
        assert!(
            t.contains(r#""x\nKEY  connected\u{1b}[2J\u{9b}31m\u{202e}""#),
            "{t}"
        );
        assert!(t.contains("a b/é's  "), "{t}");
        assert_eq!(text("plain/path"), "plain/path");
        assert_eq!(kv(&[("k", "a\rb".into())]), "k:  \"a\\rb\"\n");
    }

    /// No text prints as another one's quoted form: a text
    /// that looks quoted or holds a backslash is quoted itself.
    #[test]
    fn quoting_is_unambiguous() {
        assert_ne!(text("\"x\\nK\""), text("x\nK"));
        assert_eq!(text("\"x\\nK\""), r#""\"x\\nK\"""#);
        assert_eq!(text("x\nK"), r#""x\nK""#);
        assert_eq!(text("a\\b"), r#""a\\b""#);
        assert_eq!(text("\"a"), r#""\"a""#);
        assert_eq!(text("a\"b"), "a\"b", "a quote inside is not ambiguous");
        assert_eq!(
            text("\u{200b}\u{2028}\u{feff}"),
            r#""\u{200b}\u{2028}\u{feff}""#
        );
    }

    /// A name with a run of spaces (or a space at an end) would shift the
    /// columns of a script that splits on them: it is quoted; one space
    /// and non-ASCII text, combining marks of NFD names too, are not.
    #[test]
    fn texts_that_would_not_read_as_one_column_are_quoted() {
        assert_eq!(text("bob  smith"), r#""bob  smith""#);
        assert_eq!(text(" bob"), r#"" bob""#);
        assert_eq!(text("bob "), r#""bob ""#);
        assert_eq!(text("bob smith"), "bob smith");
        let nfd = "cafe\u{301}/n\u{303}o\u{308}l";
        assert_eq!(text(nfd), nfd);
        assert_eq!(text("日本語/ファイル"), "日本語/ファイル");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_ms(1234), "1.2s");
        assert_eq!(duration_ms(65_000), "1m05s");
        assert_eq!(duration_ms(7_800_000), "2h10m");
    }
}
