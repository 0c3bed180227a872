//! `nfsshim client ADDR`: an interactive and scriptable nfsl/1 client over
//! the `nfsl` crate, the counterpart of `smbshim client`.
//!
//! Reads one command per line from stdin and prints every reply as one JSON
//! line on stdout, exactly as the server sent it, and every callback
//! (`CB_RECALL`) as it arrives. A line is either raw JSON (sent as is; an
//! `xid` is added when missing, and a sequenced op without `seq` gets the
//! next seqid of slot 0 of the current session) or one of the short forms
//! in [`HELP`]. The client remembers the clientid of the last EXCHANGE_ID,
//! the session of the last CREATE_SESSION (with its slot table, so seqids
//! are filled in), and the stateids of the last OPEN, delegation and LOCK,
//! which `.` names. Problems with the input go to stderr; the exit status
//! is 1 when any line failed (not understood, no reply, or a `wait` that
//! saw nothing), and when the connection is lost.
//!
//! Every short form that carries a `seq` uses slot 0: one request at a
//! time, in input order, so a script reads like a transcript. Callbacks
//! arriving meanwhile are printed after the reply being waited for.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nfsl::ops::{self, Access, CreateMode, Deny, LockType, OpenArgs, WantDelegation};
use nfsl::{Client, Reply, Session, StateId, TO_EOF};
use serde_json::{json, Value};
use shimline::cli::{emit, word, Step};

/// The short forms, printed by `help` and `nfsshim client --help`.
pub const HELP: &str = "\
Input: one command per line. Replies print as JSON lines on stdout;
CB_RECALL callbacks print as they arrive. Sequenced requests go on slot 0
of the current session, with the next seqid.

STATEID is `.` (the open of the last OPEN; for locku, the lock state of the
last LOCK; for delegreturn, the delegation of the last OPEN), OTHER (the
stateid's `other` string, sent with seqid 0 = current), or OTHER:SEQID.

  {JSON}                       send as is (an xid is added when missing; an
                               op other than EXCHANGE_ID, CREATE_SESSION and
                               DESTROY_CLIENTID without `seq` gets slot 0's)
  raw TEXT                     send TEXT as one line, wait for the xid-null reply
  exchange OWNER [VERIFIER]    EXCHANGE_ID (VERIFIER: 16 hex digits, default random)
  session [CLIENTID]           CREATE_SESSION for the last clientid; used from then on
  open PATH [access=read|write|both] [deny=none|read|write|both]
            [create=unchecked|guarded|exclusive] [verifier=HEX] [truncate]
            [deleg=read|write] [owner=NAME]
                               (defaults: access=both deny=none, no create,
                               owner OWNER-open after `exchange OWNER`)
  read STATEID OFFSET COUNT    (data comes back base64)
  write STATEID OFFSET TEXT    (TEXT: the rest of the line)
  commit STATEID
  lock STATEID OFFSET LEN [read|write] [owner=NAME]
                               (LEN: a number or `eof`; default write,
                               owner OWNER-lock)
  locku LOCKSTATEID OFFSET LEN
  close STATEID
  delegreturn STATEID
  remove PATH
  rename FROM TO
  reclaim                      RECLAIM_COMPLETE
  resend                       re-send the last sequenced request, same seqid
                               (the server answers from its slot cache)
  destroy-session              DESTROY_SESSION of the current session
  destroy-client [CLIENTID]    DESTROY_CLIENTID (default: the last clientid)
  wait [SECONDS]               wait for the next callback (default 60 s)
  help
  quit
";

/// The ops that carry no `seq`.
const UNSEQUENCED: [&str; 3] = ["EXCHANGE_ID", "CREATE_SESSION", "DESTROY_CLIENTID"];

/// Open-owner and lock-owner prefix before any EXCHANGE_ID.
const DEFAULT_OWNER: &str = "nfsshim-client";

struct Cli {
    client: Arc<Client>,
    /// The owner of the last successful EXCHANGE_ID.
    owner: Option<String>,
    clientid: Option<String>,
    session: Option<Session>,
    /// The last request sent on slot 0 of `session` (for `resend`).
    last_sequenced: Option<Value>,
    last_open: Option<StateId>,
    last_deleg: Option<StateId>,
    last_lock: Option<StateId>,
}

/// What one input line asks for.
enum Action {
    /// Send this request (no `seq`), keeping a u64 `xid` it carries.
    Call(Value),
    /// Send this request on slot 0 of the current session, next seqid.
    Sequenced(Value),
    /// Re-send the last sequenced request with its seqid.
    Resend,
    /// Send these bytes, print the xid-null reply.
    Raw(Vec<u8>),
    /// Print the next callback within this time.
    Wait(Duration),
    Help,
    Quit,
    Nothing,
}

/// Connects to `addr` and runs commands from stdin until EOF or `quit`.
pub fn run(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = Arc::new(Client::connect(addr).with_context(|| format!("connecting to {addr}"))?);
    client.set_timeout(timeout);
    if std::io::stdin().is_terminal() {
        eprintln!(
            "connected to {}; one command per line, `help` lists them",
            client.peer_addr()
        );
    }
    let mut cli = Cli {
        client: client.clone(),
        owner: None,
        clientid: None,
        session: None,
        last_sequenced: None,
        last_open: None,
        last_deleg: None,
        last_lock: None,
    };
    let tally = shimline::cli::drive(client.callbacks(), |n, line, callbacks| {
        Ok::<_, anyhow::Error>(match cli.parse(line) {
            Ok(Action::Quit) => Step::Quit,
            Ok(action) => match cli.perform(action, callbacks)? {
                true => Step::Done,
                false => Step::Failed,
            },
            Err(e) => {
                eprintln!("error: line {n}: {e:#}");
                Step::Failed
            }
        })
    })?;
    if tally.failed > 0 {
        bail!("{} of {} input lines failed", tally.failed, tally.lines);
    }
    Ok(())
}

fn num<T: std::str::FromStr>(what: &str, s: Option<&str>) -> anyhow::Result<T> {
    let s = s.ok_or_else(|| anyhow!("missing {what}"))?;
    s.parse()
        .map_err(|_| anyhow!("{what} must be a number, not {s:?}"))
}

/// A byte-range length: a number, or `eof` for "to end of file".
fn length(s: Option<&str>) -> anyhow::Result<u64> {
    match s {
        Some("eof") => Ok(TO_EOF),
        other => num("LEN", other),
    }
}

/// A verifier for EXCHANGE_ID: 16 random hex digits.
fn random_verifier() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    hex.get(..16).unwrap_or(&hex).to_owned()
}

fn access_arg(s: &str) -> anyhow::Result<Access> {
    Ok(match s {
        "read" => Access::Read,
        "write" => Access::Write,
        "both" => Access::Both,
        _ => bail!("access= wants read, write or both, not {s:?}"),
    })
}

fn deny_arg(s: &str) -> anyhow::Result<Deny> {
    Ok(match s {
        "none" => Deny::None,
        "read" => Deny::Read,
        "write" => Deny::Write,
        "both" => Deny::Both,
        _ => bail!("deny= wants none, read, write or both, not {s:?}"),
    })
}

fn create_arg(s: &str) -> anyhow::Result<CreateMode> {
    Ok(match s {
        "unchecked" => CreateMode::Unchecked,
        "guarded" => CreateMode::Guarded,
        "exclusive" => CreateMode::Exclusive,
        _ => bail!("create= wants unchecked, guarded or exclusive, not {s:?}"),
    })
}

fn deleg_arg(s: &str) -> anyhow::Result<WantDelegation> {
    Ok(match s {
        "none" => WantDelegation::None,
        "read" => WantDelegation::Read,
        "write" => WantDelegation::Write,
        _ => bail!("deleg= wants read or write, not {s:?}"),
    })
}

/// `OTHER` (seqid 0 = current) or `OTHER:SEQID`.
fn stateid_arg(s: &str) -> anyhow::Result<StateId> {
    let (other, seqid) = match s.split_once(':') {
        Some((o, n)) => (o, num("stateid seqid", Some(n))?),
        None => (s, 0),
    };
    if other.is_empty() {
        bail!("a stateid needs its `other` string, not {s:?}");
    }
    Ok(StateId {
        other: other.to_owned(),
        seqid,
    })
}

/// Which remembered stateid `.` stands for.
#[derive(Clone, Copy)]
enum Dot {
    Open,
    Lock,
    Deleg,
}

impl Cli {
    fn stateid(&self, arg: Option<&str>, dot: Dot) -> anyhow::Result<StateId> {
        match arg {
            Some(".") => {
                let (known, what) = match dot {
                    Dot::Open => (&self.last_open, "the open of the last OPEN"),
                    Dot::Lock => (&self.last_lock, "the lock state of the last LOCK"),
                    Dot::Deleg => (&self.last_deleg, "the delegation of the last OPEN"),
                };
                known
                    .clone()
                    .ok_or_else(|| anyhow!("`.` names {what}, and there is none yet"))
            }
            Some(s) => stateid_arg(s),
            None => bail!("missing STATEID"),
        }
    }

    fn clientid(&self, arg: Option<&str>) -> anyhow::Result<String> {
        match arg {
            Some(c) => Ok(c.to_owned()),
            None => self
                .clientid
                .clone()
                .ok_or_else(|| anyhow!("no clientid yet: run `exchange OWNER` first")),
        }
    }

    /// The default open-owner or lock-owner: after the client's owner.
    fn owner(&self, suffix: &str) -> String {
        format!(
            "{}-{suffix}",
            self.owner.as_deref().unwrap_or(DEFAULT_OWNER)
        )
    }

    fn parse(&mut self, line: &str) -> anyhow::Result<Action> {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return Ok(Action::Nothing);
        }
        if trimmed.starts_with(['{', '[', '"']) {
            return Ok(match serde_json::from_str::<Value>(trimmed) {
                Ok(v @ Value::Object(_)) => match v.get("xid") {
                    // The server cannot read this xid: its reply has none.
                    Some(x) if !x.is_u64() => Action::Raw(trimmed.as_bytes().to_vec()),
                    _ => {
                        let op = v.get("op").and_then(Value::as_str).unwrap_or("");
                        if v.get("seq").is_none() && !op.is_empty() && !UNSEQUENCED.contains(&op) {
                            Action::Sequenced(v)
                        } else {
                            Action::Call(v)
                        }
                    }
                },
                _ => Action::Raw(trimmed.as_bytes().to_vec()),
            });
        }
        let Some((cmd, rest)) = word(trimmed) else {
            return Ok(Action::Nothing);
        };
        if cmd == "raw" {
            return Ok(Action::Raw(rest.as_bytes().to_vec()));
        }
        if cmd == "write" {
            // TEXT is the rest of the line, spaces and all.
            let (stateid, rest) = word(rest).ok_or_else(|| anyhow!("missing STATEID"))?;
            let (offset, text) = word(rest).ok_or_else(|| anyhow!("missing OFFSET"))?;
            let offset: u64 = num("OFFSET", Some(offset))?;
            let stateid = self.stateid(Some(stateid), Dot::Open)?;
            return Ok(Action::Sequenced(ops::write(
                &stateid,
                offset,
                text.as_bytes(),
            )));
        }
        let args: Vec<&str> = rest.split_whitespace().collect();
        let arg = |i: usize| args.get(i).copied();
        let flag = |name: &str| args.iter().skip(1).any(|a| *a == name);
        let opt = |name: &str| {
            args.iter()
                .skip(1)
                .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        let v = match cmd {
            "help" | "?" => return Ok(Action::Help),
            "quit" | "exit" => return Ok(Action::Quit),
            "resend" => return Ok(Action::Resend),
            "wait" => {
                let secs: f64 = match arg(0) {
                    Some(s) => num("SECONDS", Some(s))?,
                    None => 60.0,
                };
                return Ok(Action::Wait(
                    Duration::try_from_secs_f64(secs)
                        .map_err(|_| anyhow!("SECONDS must be a non-negative number"))?,
                ));
            }
            "exchange" => {
                let owner = arg(0).ok_or_else(|| anyhow!("missing OWNER"))?;
                let verifier = match arg(1) {
                    Some(v) => v.to_owned(),
                    None => random_verifier(),
                };
                return Ok(Action::Call(
                    json!({"op": "EXCHANGE_ID", "owner": owner, "verifier": verifier}),
                ));
            }
            "session" => {
                return Ok(Action::Call(
                    json!({"op": "CREATE_SESSION", "clientid": self.clientid(arg(0))?}),
                ));
            }
            "destroy-client" => {
                return Ok(Action::Call(
                    json!({"op": "DESTROY_CLIENTID", "clientid": self.clientid(arg(0))?}),
                ));
            }
            "open" => {
                let path = arg(0).ok_or_else(|| anyhow!("missing PATH"))?;
                let owner = match opt("owner") {
                    Some(o) => o.to_owned(),
                    None => self.owner("open"),
                };
                let mut a = OpenArgs::new(owner, path);
                if let Some(x) = opt("access") {
                    a.access = access_arg(x)?;
                }
                if let Some(x) = opt("deny") {
                    a.deny = deny_arg(x)?;
                }
                match (opt("create"), opt("verifier")) {
                    (Some(mode), verifier) => {
                        a.create = Some((create_arg(mode)?, verifier.map(str::to_owned)));
                    }
                    (None, Some(_)) => bail!("verifier= goes with create=exclusive"),
                    (None, None) => {}
                }
                a.truncate = flag("truncate");
                if let Some(x) = opt("deleg") {
                    a.want_delegation = deleg_arg(x)?;
                }
                ops::open(&a)
            }
            "read" => ops::read(
                &self.stateid(arg(0), Dot::Open)?,
                num("OFFSET", arg(1))?,
                num("COUNT", arg(2))?,
            ),
            "commit" => ops::commit(&self.stateid(arg(0), Dot::Open)?),
            "lock" => {
                let lock_type = match args.iter().skip(3).find(|a| !a.contains('=')) {
                    None | Some(&"write") => LockType::Write,
                    Some(&"read") => LockType::Read,
                    Some(other) => bail!("lock type is read or write, not {other:?}"),
                };
                let owner = match opt("owner") {
                    Some(o) => o.to_owned(),
                    None => self.owner("lock"),
                };
                ops::lock(
                    &self.stateid(arg(0), Dot::Open)?,
                    &owner,
                    lock_type,
                    num("OFFSET", arg(1))?,
                    length(arg(2))?,
                )
            }
            "locku" => ops::locku(
                &self.stateid(arg(0), Dot::Lock)?,
                num("OFFSET", arg(1))?,
                length(arg(2))?,
            ),
            "close" => ops::close(&self.stateid(arg(0), Dot::Open)?),
            "delegreturn" => ops::delegreturn(&self.stateid(arg(0), Dot::Deleg)?),
            "remove" => ops::remove(arg(0).ok_or_else(|| anyhow!("missing PATH"))?),
            "rename" => ops::rename(
                arg(0).ok_or_else(|| anyhow!("missing FROM"))?,
                arg(1).ok_or_else(|| anyhow!("missing TO"))?,
            ),
            "reclaim" => ops::reclaim_complete(),
            "destroy-session" => ops::destroy_session(),
            other => bail!("unknown command {other:?} (`help` lists them)"),
        };
        Ok(Action::Sequenced(v))
    }

    fn session(&self) -> anyhow::Result<&Session> {
        self.session
            .as_ref()
            .ok_or_else(|| anyhow!("no session yet: run `exchange OWNER` and `session` first"))
    }

    /// Runs one action; `Ok(false)` when it failed in a way worth the exit
    /// status, `Err` when the connection is gone.
    fn perform(
        &mut self,
        action: Action,
        callbacks: &crossbeam_channel::Receiver<Value>,
    ) -> anyhow::Result<bool> {
        let sent = match action {
            Action::Nothing | Action::Quit => return Ok(true),
            Action::Help => {
                eprint!("{HELP}");
                return Ok(true);
            }
            Action::Wait(d) => {
                return match callbacks.recv_timeout(d) {
                    Ok(v) => emit(&v).map(|()| true).context("writing stdout"),
                    Err(_) => {
                        eprintln!("error: no callback within {d:?}");
                        Ok(false)
                    }
                };
            }
            Action::Raw(bytes) => self.client.send_raw(&bytes).map(|r| (None, r)),
            Action::Call(v) => self
                .client
                .call_keeping_xid(v.clone())
                .map(|r| (Some(v), r)),
            Action::Sequenced(v) => {
                let session = match self.session() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(false);
                    }
                };
                let r = session.call_keeping_xid(0, v.clone());
                if r.is_ok() {
                    self.last_sequenced = Some(v.clone());
                }
                r.map(|r| (Some(v), r))
            }
            Action::Resend => {
                let (session, last) = match (self.session(), &self.last_sequenced) {
                    (Ok(s), Some(l)) => (s, l.clone()),
                    (Err(e), _) => {
                        eprintln!("error: {e}");
                        return Ok(false);
                    }
                    (Ok(_), None) => {
                        eprintln!("error: nothing sent on this session yet to re-send");
                        return Ok(false);
                    }
                };
                session.resend(0, last.clone()).map(|r| (Some(last), r))
            }
        };
        let (req, reply) = match sent {
            Ok(x) => x,
            Err(
                e @ (nfsl::Error::Timeout { .. }
                | nfsl::Error::XidInUse(_)
                | nfsl::Error::NotAnObject
                | nfsl::Error::NoSuchSlot { .. }
                | nfsl::Error::NothingToResend { .. }),
            ) => {
                eprintln!("error: {e}");
                return Ok(false);
            }
            Err(e) => return Err(e).context("nfsl/1 connection"),
        };
        emit(reply.value())?;
        if let Some(req) = req {
            self.remember(&req, &reply);
        }
        Ok(true)
    }

    /// Keeps what later short forms fill in: the clientid and owner of a
    /// successful EXCHANGE_ID, the session of a CREATE_SESSION, the
    /// stateids of an OPEN or LOCK; forgets what DESTROY_* ended.
    fn remember(&mut self, req: &Value, reply: &Reply) {
        if !reply.is_ok() {
            return;
        }
        match req.get("op").and_then(Value::as_str) {
            Some("EXCHANGE_ID") => {
                if let Some(c) = reply.clientid() {
                    self.clientid = Some(c.to_owned());
                }
                if let Some(o) = req.get("owner").and_then(Value::as_str) {
                    self.owner = Some(o.to_owned());
                }
            }
            Some("CREATE_SESSION") => {
                if let Some(s) = Session::from_reply(self.client.clone(), reply) {
                    self.session = Some(s);
                    self.last_sequenced = None;
                }
            }
            Some("OPEN") => {
                if let Some(s) = reply.stateid() {
                    self.last_open = Some(s);
                }
                self.last_deleg = reply
                    .delegation()
                    .and_then(|d| d.get("stateid"))
                    .and_then(StateId::from_json);
            }
            Some("LOCK") | Some("LOCKU") => {
                if let Some(s) = reply.lock_stateid() {
                    self.last_lock = Some(s);
                }
            }
            Some("DESTROY_SESSION") => {
                // Only a request on the current session ended it.
                let ours = match (req.pointer("/seq/sessionid"), &self.session) {
                    (None, _) => true,
                    (Some(id), Some(s)) => id.as_str() == Some(s.sessionid()),
                    (Some(_), None) => false,
                };
                if ours {
                    self.session = None;
                    self.last_sequenced = None;
                }
            }
            Some("DESTROY_CLIENTID")
                if req.get("clientid").and_then(Value::as_str) == self.clientid.as_deref() =>
            {
                self.clientid = None;
                self.session = None;
                self.last_sequenced = None;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateid_forms() {
        let s = stateid_arg("O1").unwrap();
        assert_eq!((s.other.as_str(), s.seqid), ("O1", 0));
        let s = stateid_arg("O1:3").unwrap();
        assert_eq!((s.other.as_str(), s.seqid), ("O1", 3));
        assert!(stateid_arg(":3").is_err());
        assert!(stateid_arg("O1:x").is_err());
        assert_eq!(length(Some("eof")).unwrap(), TO_EOF);
        assert_eq!(random_verifier().len(), 16);
    }
}
