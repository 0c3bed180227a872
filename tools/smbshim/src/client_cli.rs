//! `smbshim client ADDR`: an interactive and scriptable smbl/1 client over
//! the `smbl` crate.
//!
//! Reads one command per line from stdin and prints every reply as one JSON
//! line on stdout, exactly as the server sent it, and every notification
//! (`LEASE_BREAK`) as it arrives. A line is either raw JSON (sent as is; a
//! `mid` is added when missing) or one of the short forms in [`HELP`], which
//! fill in the session id of the last successful SESSION_SETUP and
//! remember, per file id, the create GUID and lease key a CREATE used, so
//! `reconnect FILE_ID` needs nothing more. Problems with the input go to
//! stderr; the exit status is 1 when any line failed (not understood, or a
//! `wait` that saw nothing), and when the connection is lost.
//!
//! Commands run one at a time, in input order: a script reads like a
//! transcript. Notifications arriving meanwhile are printed after the reply
//! being waited for.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use shimline::cli::{emit, word, Step};
use smbl::{Client, CreateArgs, Durable, LockSpec, Reply};
use uuid::Uuid;

/// The short forms, printed by `help` and `smbshim client --help`.
pub const HELP: &str = "\
Input: one command per line. Replies print as JSON lines on stdout;
LEASE_BREAK notifications print as they arrive. FILE_ID may be `.` for the
file of the last CREATE or RECONNECT. The session id of the last setup is
filled in.

  {JSON}                       send as is (a mid is added when missing);
                               a line the server cannot read a mid from
                               waits for its mid-null reply
  raw TEXT                     send TEXT as one line, wait for the mid-null reply
  setup USER [CLIENT_GUID] [prev=SESSION_ID]
  session SESSION_ID           use this session id from now on
  create PATH [access=read,write] [share=read|none] [disp=open_if]
              [durable|persistent] [timeout=MS] [guid=CREATE_GUID]
              [lease=R|RH|RW|RWH] [key=LEASE_KEY] [replay]
  reconnect FILE_ID [CREATE_GUID [LEASE_KEY]]
  read FILE_ID OFFSET LEN      (data comes back base64)
  write FILE_ID OFFSET TEXT    (TEXT: the rest of the line)
  flush FILE_ID
  lock FILE_ID OFFSET LEN [shared] [seq=NUMBER/INDEX] [replay]
  unlock FILE_ID OFFSET LEN [seq=NUMBER/INDEX] [replay]
  rename FILE_ID TO [replace]
  eof FILE_ID SIZE
  delete-on-close FILE_ID [false]
  ack LEASE_KEY STATE          LEASE_BREAK_ACK (STATE: R, RH, RW, RWH or none)
  close FILE_ID
  logoff
  echo
  wait [SECONDS]               wait for the next notification (default 60 s)
  help
  quit
";

/// What a CREATE or RECONNECT used, by file id.
#[derive(Default, Clone, Copy)]
struct Remembered {
    create_guid: Option<Uuid>,
    lease_key: Option<Uuid>,
}

struct Cli<'a> {
    client: &'a Client,
    client_guid: Uuid,
    session: Option<u64>,
    last_file: Option<String>,
    opens: HashMap<String, Remembered>,
}

/// What one input line asks for.
enum Action {
    /// Send this request and print its reply.
    Call(Value),
    /// Send this request keeping its mid.
    CallKeepingMid(Value),
    /// Send these bytes, print the mid-null reply.
    Raw(Vec<u8>),
    /// Print the next notification within this time.
    Wait(Duration),
    Help,
    Quit,
    Nothing,
}

/// Connects to `addr` and runs commands from stdin until EOF or `quit`.
pub fn run(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = Client::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    client.set_timeout(timeout);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "connected to {}; one command per line, `help` lists them",
            client.peer_addr()
        );
    }
    let mut cli = Cli {
        client: &client,
        client_guid: Uuid::new_v4(),
        session: None,
        last_file: None,
        opens: HashMap::new(),
    };
    let tally = shimline::cli::drive(client.notifications(), |n, line, notes| {
        Ok::<_, anyhow::Error>(match cli.parse(line) {
            Ok(Action::Quit) => Step::Quit,
            Ok(action) => match cli.perform(action, notes)? {
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

fn uuid_arg(what: &str, s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| anyhow!("{what} must be a UUID, not {s:?}"))
}

/// `read,write` → `["read", "write"]`; `none` or empty → `[]`.
fn rights(s: &str) -> Vec<String> {
    if s == "none" {
        return Vec::new();
    }
    s.split(',')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `N/I` → `(N, I)`.
fn lock_sequence(s: &str) -> anyhow::Result<(u8, u8)> {
    let (n, i) = s
        .split_once('/')
        .ok_or_else(|| anyhow!("seq= wants NUMBER/INDEX, e.g. seq=1/3"))?;
    Ok((
        num("lock sequence number", Some(n))?,
        num("lock sequence index", Some(i))?,
    ))
}

impl Cli<'_> {
    fn session(&self) -> anyhow::Result<u64> {
        self.session
            .ok_or_else(|| anyhow!("no session yet: run `setup USER` first"))
    }

    fn file<'s>(&'s self, arg: Option<&'s str>) -> anyhow::Result<&'s str> {
        match arg {
            Some(".") => self
                .last_file
                .as_deref()
                .ok_or_else(|| anyhow!("`.` names the last file opened, and there is none yet")),
            Some(f) => Ok(f),
            None => bail!("missing FILE_ID"),
        }
    }

    fn parse(&mut self, line: &str) -> anyhow::Result<Action> {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return Ok(Action::Nothing);
        }
        if trimmed.starts_with(['{', '[', '"']) {
            return Ok(match serde_json::from_str::<Value>(trimmed) {
                Ok(v @ Value::Object(_)) => match v.get("mid") {
                    None => Action::Call(v),
                    Some(m) if m.is_u64() => Action::CallKeepingMid(v),
                    // The server cannot read this mid: its reply has none.
                    Some(_) => Action::Raw(trimmed.as_bytes().to_vec()),
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
            let (file, rest) = word(rest).ok_or_else(|| anyhow!("missing FILE_ID"))?;
            let (offset, text) = word(rest).ok_or_else(|| anyhow!("missing OFFSET"))?;
            let offset: u64 = num("OFFSET", Some(offset))?;
            let file = self.file(Some(file))?;
            return Ok(Action::Call(
                json!({"cmd": "WRITE", "session_id": self.session()?, "file_id": file,
                       "offset": offset,
                       "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD,
                                                      text.as_bytes())}),
            ));
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
            "session" => {
                self.session = Some(num("SESSION_ID", arg(0))?);
                return Ok(Action::Nothing);
            }
            "echo" => json!({"cmd": "ECHO"}),
            "setup" => {
                let user = arg(0).ok_or_else(|| anyhow!("missing USER"))?;
                if let Some(g) = arg(1).filter(|a| !a.contains('=')) {
                    self.client_guid = uuid_arg("CLIENT_GUID", g)?;
                }
                let mut v = json!({"cmd": "SESSION_SETUP", "client_guid": self.client_guid,
                                   "user": user});
                if let (Some(p), Some(m)) = (opt("prev"), v.as_object_mut()) {
                    m.insert(
                        "previous_session_id".into(),
                        json!(num::<u64>("prev", Some(p))?),
                    );
                }
                v
            }
            "create" => {
                let path = arg(0).ok_or_else(|| anyhow!("missing PATH"))?;
                let mut a = CreateArgs::new(self.session()?, path);
                if let Some(x) = opt("access") {
                    a.access = rights(x);
                }
                if let Some(x) = opt("share") {
                    a.share = rights(x);
                }
                if let Some(x) = opt("disp") {
                    x.clone_into(&mut a.disposition);
                }
                let persistent = flag("persistent");
                if persistent || flag("durable") || opt("guid").is_some() {
                    let guid = match opt("guid") {
                        Some(g) => uuid_arg("guid", g)?,
                        None => Uuid::new_v4(),
                    };
                    a.durable = Some(Durable {
                        create_guid: guid,
                        persistent,
                        timeout_ms: match opt("timeout") {
                            Some(t) => num("timeout", Some(t))?,
                            None => 0,
                        },
                    });
                }
                if let Some(state) = opt("lease") {
                    let key = match opt("key") {
                        Some(k) => uuid_arg("key", k)?,
                        None => Uuid::new_v4(),
                    };
                    a.lease = Some((key, state.to_owned()));
                }
                a.replay = flag("replay");
                a.to_json()
            }
            "reconnect" => {
                let file = self.file(arg(0))?.to_owned();
                let known = self.opens.get(&file).copied().unwrap_or_default();
                let guid = match arg(1) {
                    Some(g) => uuid_arg("CREATE_GUID", g)?,
                    None => known
                        .create_guid
                        .ok_or_else(|| anyhow!("no create GUID remembered for {file}: give it"))?,
                };
                let key = match arg(2) {
                    Some(k) => Some(uuid_arg("LEASE_KEY", k)?),
                    None => known.lease_key,
                };
                let mut v = json!({"cmd": "RECONNECT", "session_id": self.session()?,
                                   "file_id": file, "create_guid": guid});
                if let (Some(k), Some(m)) = (key, v.as_object_mut()) {
                    m.insert("lease_key".into(), json!(k));
                }
                v
            }
            "read" => json!({"cmd": "READ", "session_id": self.session()?,
                             "file_id": self.file(arg(0))?,
                             "offset": num::<u64>("OFFSET", arg(1))?,
                             "length": num::<u64>("LEN", arg(2))?}),
            "flush" | "close" => json!({"cmd": cmd.to_uppercase(), "session_id": self.session()?,
                                        "file_id": self.file(arg(0))?}),
            "lock" | "unlock" => {
                let spec = LockSpec {
                    offset: num("OFFSET", arg(1))?,
                    length: num("LEN", arg(2))?,
                    exclusive: !flag("shared"),
                    unlock: cmd == "unlock",
                };
                let mut v = json!({"cmd": "LOCK", "session_id": self.session()?,
                                   "file_id": self.file(arg(0))?,
                                   "locks": [{"offset": spec.offset, "length": spec.length,
                                              "exclusive": spec.exclusive,
                                              "unlock": spec.unlock}]});
                if let Some(m) = v.as_object_mut() {
                    if let Some(s) = opt("seq") {
                        let (number, index) = lock_sequence(s)?;
                        m.insert(
                            "lock_sequence".into(),
                            json!({"number": number, "index": index}),
                        );
                    }
                    if flag("replay") {
                        m.insert("replay".into(), json!(true));
                    }
                }
                v
            }
            "rename" => json!({"cmd": "SET_INFO", "session_id": self.session()?,
                               "file_id": self.file(arg(0))?,
                               "rename": {"to": arg(1).ok_or_else(|| anyhow!("missing TO"))?,
                                          "replace": flag("replace")}}),
            "eof" => json!({"cmd": "SET_INFO", "session_id": self.session()?,
                            "file_id": self.file(arg(0))?,
                            "end_of_file": num::<u64>("SIZE", arg(1))?}),
            "delete-on-close" => json!({"cmd": "SET_INFO", "session_id": self.session()?,
                                        "file_id": self.file(arg(0))?,
                                        "delete_on_close": !flag("false")}),
            "ack" => {
                let key = uuid_arg(
                    "LEASE_KEY",
                    arg(0).ok_or_else(|| anyhow!("missing LEASE_KEY"))?,
                )?;
                let state = match arg(1) {
                    Some("none") | Some("\"\"") => "",
                    Some(s) => s,
                    None => bail!("missing STATE"),
                };
                json!({"cmd": "LEASE_BREAK_ACK", "session_id": self.session()?,
                       "lease_key": key, "state": state})
            }
            "logoff" => json!({"cmd": "LOGOFF", "session_id": self.session()?}),
            other => bail!("unknown command {other:?} (`help` lists them)"),
        };
        Ok(Action::Call(v))
    }

    /// Runs one action; `Ok(false)` when it failed in a way worth the exit
    /// status, `Err` when the connection is gone.
    fn perform(
        &mut self,
        action: Action,
        notes: &crossbeam_channel::Receiver<Value>,
    ) -> anyhow::Result<bool> {
        let (req, reply) = match action {
            Action::Nothing | Action::Quit => return Ok(true),
            Action::Help => {
                eprint!("{HELP}");
                return Ok(true);
            }
            Action::Wait(d) => {
                return match notes.recv_timeout(d) {
                    Ok(v) => emit(&v).map(|()| true).context("writing stdout"),
                    Err(_) => {
                        eprintln!("error: no notification within {d:?}");
                        Ok(false)
                    }
                };
            }
            Action::Raw(bytes) => (None, self.client.send_raw(&bytes)),
            Action::Call(v) => (Some(v.clone()), self.client.call(v)),
            Action::CallKeepingMid(v) => (Some(v.clone()), self.client.call_keeping_mid(v)),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e @ smbl::Error::Timeout { .. }) => {
                eprintln!("error: {e}");
                return Ok(false);
            }
            Err(e) => return Err(e).context("smbl/1 connection"),
        };
        emit(reply.value())?;
        if let Some(req) = req {
            self.remember(&req, &reply);
        }
        Ok(true)
    }

    /// Keeps what later short forms fill in: the session of a successful
    /// SESSION_SETUP, and the ids a successful CREATE or RECONNECT used.
    fn remember(&mut self, req: &Value, reply: &Reply) {
        if !reply.is_success() {
            return;
        }
        match req.get("cmd").and_then(Value::as_str) {
            Some("SESSION_SETUP") => {
                if let Some(s) = reply.session_id() {
                    self.session = Some(s);
                }
                if let Some(g) = req
                    .get("client_guid")
                    .and_then(Value::as_str)
                    .and_then(|g| Uuid::parse_str(g).ok())
                {
                    self.client_guid = g;
                }
            }
            Some("CREATE") | Some("RECONNECT") => {
                let Some(file) = reply.file_id() else { return };
                let uuid_at = |v: Option<&Value>| {
                    v.and_then(Value::as_str)
                        .and_then(|s| Uuid::parse_str(s).ok())
                };
                let r = Remembered {
                    create_guid: uuid_at(req.pointer("/durable/create_guid"))
                        .or_else(|| uuid_at(req.get("create_guid"))),
                    lease_key: uuid_at(req.pointer("/lease/key"))
                        .or_else(|| uuid_at(req.get("lease_key"))),
                };
                self.opens.insert(file.to_owned(), r);
                self.last_file = Some(file.to_owned());
            }
            _ => {}
        }
    }
}
