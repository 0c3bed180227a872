//! The loop both protocol command-line clients (`smbshim client`,
//! `nfsshim client`) run: stdin is read on a thread of its own so that what
//! the server pushes (LEASE_BREAK, CB_RECALL) is printed while the user is
//! typing; each input line goes to the protocol's own parser and performer.

use std::io::{BufRead, Write};

use crossbeam_channel::Receiver;
use serde_json::Value;

/// What became of one input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Done (or nothing to do).
    Done,
    /// It failed (counted; the loop goes on).
    Failed,
    /// Stop reading input.
    Quit,
}

/// Input lines read and how many failed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// Lines read.
    pub lines: usize,
    /// Lines that failed.
    pub failed: usize,
}

/// Runs `each` on every stdin line (numbered from 1) until EOF or
/// [`Step::Quit`], printing every `pushed` value as a JSON line as it
/// arrives, and whatever is left of them at the end. `each` gets the pushed
/// channel too, to wait on it (a `wait` command).
pub fn drive<E: From<std::io::Error>>(
    pushed: &Receiver<Value>,
    mut each: impl FnMut(usize, &str, &Receiver<Value>) -> Result<Step, E>,
) -> Result<Tally, E> {
    let (line_tx, lines) = crossbeam_channel::bounded::<std::io::Result<String>>(16);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let stop = line.is_err();
                if line_tx.send(line).is_err() || stop {
                    return;
                }
            }
        })?;
    let mut pushed = pushed.clone();
    let mut tally = Tally::default();
    loop {
        crossbeam_channel::select! {
            recv(lines) -> line => {
                let line = match line {
                    Ok(l) => l?,
                    Err(_) => break, // EOF
                };
                tally.lines += 1;
                match each(tally.lines, &line, &pushed)? {
                    Step::Done => {}
                    Step::Failed => tally.failed += 1,
                    Step::Quit => break,
                }
            }
            recv(pushed) -> v => match v {
                Ok(v) => emit(&v)?,
                // The connection ended; the next command says so.
                Err(_) => pushed = crossbeam_channel::never(),
            }
        }
    }
    // Whatever was pushed before the input ended.
    while let Ok(v) = pushed.try_recv() {
        emit(&v)?;
    }
    Ok(tally)
}

/// Prints one JSON line on stdout.
pub fn emit(v: &Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").and_then(|()| out.flush())
}

/// Splits off the first whitespace-separated word.
pub fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((s.get(..end)?, s.get(end..)?.trim_start()))
}

/// How a frontend's `main` ends: status 0, or its error as one line on
/// stderr (`PROGRAM: what failed: why`, the chain `{:#}` prints) and status
/// 1 — the form filterd and filterctl use, rather than the multi-line
/// `Error: … Caused by: …` (and, with `RUST_BACKTRACE` set, a backtrace)
/// that returning the error from `main` prints.
pub fn exit_status<E: std::fmt::Display>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--listen HOST:PORT` checked as the command line is parsed, so a
/// malformed one is a usage error (exit 2) rather than a failure found
/// after attaching to filterd. HOST may be a name or an address (an IPv6
/// one in brackets); PORT a number, 0 for a free one.
pub fn listen_arg(s: &str) -> Result<String, String> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected HOST:PORT, e.g. 127.0.0.1:4450 (port 0 picks a free port)".into())
    }
}

/// How long a frontend waits at start for filterd (it may be starting or
/// recovering) before it gives up.
pub const FILTERD_START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long this frontend waits at start for filterd: `--filterd-wait
/// SECS` ([`set_filterd_start_wait`]), [`FILTERD_START_WAIT`] unless
/// set; `Duration::MAX` is without limit.
pub fn filterd_start_wait() -> std::time::Duration {
    START_WAIT.get().copied().unwrap_or(FILTERD_START_WAIT)
}

static START_WAIT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Sets [`filterd_start_wait`] from `--filterd-wait SECS` (once, in
/// `main`): 0 waits without limit — for a frontend started beside a
/// `filterd --standby`, which listens only once it owns the table
/// (review rvnode, finding 5: the frontends gave up after 30 s, exit 1).
pub fn set_filterd_start_wait(secs: u64) {
    let wait = match secs {
        0 => std::time::Duration::MAX,
        s => std::time::Duration::from_secs(s),
    };
    let _ = START_WAIT.set(wait);
}

/// `--filterd-wait SECS`, the same in every frontend (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct FilterdWaitArg {
    /// Seconds to wait at start for filterd to serve (it may be starting
    /// or recovering); 0 waits without limit — for a frontend started
    /// beside a `filterd --standby`, which serves only once it has taken
    /// over. Nothing is listened on meanwhile.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub filterd_wait: u64,
}

impl FilterdWaitArg {
    /// Makes it the process's [`filterd_start_wait`].
    pub fn apply(&self) {
        set_filterd_start_wait(self.filterd_wait);
    }
}

/// What a frontend says, once, while it waits at start for filterd at
/// `socket` (`libfilter::attach::Attachment::connect_patiently`): one line
/// on stderr, `PROGRAM: filterd at SOCKET is not answering yet (why);
/// waiting up to N s`.
pub fn say_waiting_for_filterd<E: std::fmt::Display>(
    program: &'static str,
    socket: &std::path::Path,
    within: std::time::Duration,
) -> impl FnMut(&E) {
    let socket = socket.display().to_string();
    let limit = match within {
        std::time::Duration::MAX => "without limit".to_owned(),
        w => format!("up to {} s", w.as_secs()),
    };
    move |e| {
        eprintln!("{program}: filterd at {socket} is not answering yet ({e}); waiting {limit}");
    }
}
