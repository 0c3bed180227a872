//! The command lines of the rkfilter programs (filterd, filterctl and the
//! frontends): spec/cli.md wants a bad flag or a missing argument to give
//! "a one-line error naming it and exit 2". clap's own report is its error,
//! then a usage block and a hint, five lines or more; [`parse`] prints
//! `PROGRAM: what is wrong; try 'PROGRAM --help'` instead. `--help` and
//! `--version` are clap's, unchanged.

use clap::error::ErrorKind;
use clap::Parser;

/// Parses this process's arguments into `P`; on a usage error prints one
/// line on stderr and exits 2.
pub fn parse<P: Parser>() -> P {
    match P::try_parse() {
        Ok(p) => p,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            let cmd = P::command();
            eprintln!("{}", usage_line(&cmd, &e));
            std::process::exit(2)
        }
    }
}

/// The one line a usage error `e` of `cmd` is reported with.
fn usage_line(cmd: &clap::Command, e: &clap::Error) -> String {
    let program = cmd.get_name();
    let what = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // Nothing given at all: clap would print the whole help.
        let required: Vec<String> = cmd
            .get_groups()
            .filter(|g| g.is_required_set())
            .map(|g| {
                let flags: Vec<String> = g.get_args().map(|a| format!("--{a}")).collect();
                flags.join(" or ")
            })
            .chain(
                cmd.is_subcommand_required_set()
                    .then(|| "a command".to_owned()),
            )
            .collect();
        format!("{} required", required.join(" and "))
    } else {
        summary(&e.render().to_string())
    };
    format!("{program}: {what}; try '{program} --help'")
}

/// clap's rendered error without its `error: ` prefix, usage block and
/// closing hint, on one line: the lines of a paragraph (a list of missing
/// arguments) joined by spaces, paragraphs (a `tip:`) by `; `.
fn summary(rendered: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    for paragraph in rendered.split("\n\n") {
        let p = paragraph.trim();
        if p.starts_with("Usage:") || p.starts_with("For more information") {
            break;
        }
        let words: Vec<&str> = p.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if !words.is_empty() {
            paragraphs.push(words.join(" "));
        }
    }
    let line = paragraphs.join("; ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

/// A panic in any thread ends the process (after the usual message), like
/// `panic = "abort"`. Every rkfilter daemon calls it first thing: a thread
/// that unwound would leave the rest serving half-broken — filterd's
/// engine or committer gone while its socket still accepts; a frontend's
/// connection thread gone with its sessions' handles still held (every
/// reconnect refused), a poisoned table lock failing every later request,
/// a break or recall never sent (review rvpanic). A process that ends is
/// restarted under the same instance name and takes its handles back.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!("panic: {info}; aborting so that a restart recovers the state");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Parser, Debug)]
    #[command(name = "prog")]
    struct Args {
        #[arg(long)]
        filter: String,
        #[arg(long)]
        listen: String,
    }

    fn line(args: &[&str]) -> String {
        let e = Args::try_parse_from(args).expect_err("a usage error");
        usage_line(&Args::command(), &e)
    }

    #[test]
    fn a_usage_error_is_one_line_naming_what_is_wrong() {
        let l = line(&["prog", "--filter", "x"]);
        assert_eq!(
            l,
            "prog: the following required arguments were not provided: --listen <LISTEN>; try 'prog --help'"
        );
        let l = line(&["prog", "--bogus"]);
        assert!(
            l.starts_with("prog: unexpected argument '--bogus' found"),
            "{l}"
        );
        assert!(!l.contains('\n') && !l.contains("Usage"), "{l}");
    }

    /// Run as a child of the test below: installs the hook, then panics
    /// on another thread and waits for it.
    #[test]
    fn child_panicking_on_a_thread() {
        if std::env::var_os("RKFILTER_ABORT_ON_PANIC_CHILD").is_none() {
            return;
        }
        abort_on_panic();
        let _ = std::thread::spawn(|| panic!("a connection thread panics")).join();
        // Without the hook the join returns the panic and we get here.
        std::process::exit(0);
    }

    #[test]
    fn a_panic_on_any_thread_aborts_the_process() {
        use std::os::unix::process::ExitStatusExt as _;
        let exe = std::env::current_exe().expect("the test binary");
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "cli::tests::child_panicking_on_a_thread",
                "--nocapture",
            ])
            .env("RKFILTER_ABORT_ON_PANIC_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run the child");
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "child ended {status:?}"
        );
    }
}
