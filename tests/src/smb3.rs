//! Real SMB 3 clients for the rksmbd tests: smbprotocol (PyPI) in a venv
//! and the Python scripts in `tests/smb3/`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The smbprotocol release the tests and `make demo` use.
pub const SMBPROTOCOL: &str = "smbprotocol==1.17.0";

/// The venv's python with smbprotocol (PyPI), made under `target/smbvenv`
/// on first use (the Makefile's `smbvenv` target makes the same one); a
/// failure to make it fails the test, with the reason. Tests run in
/// parallel: the first makes the venv while the others wait (two `venv` +
/// `pip install` runs into one directory break each other).
pub fn smbprotocol_python() -> PathBuf {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let target = crate::bin("rksmbd")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned();
    let venv = target.join("smbvenv");
    let python = venv.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", "import smbprotocol"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", SMBPROTOCOL])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            made && has(&python),
            "could not make a python venv with smbprotocol at {} \
             (needs python3-venv and PyPI)",
            venv.display()
        );
    }
    python
}

/// A client script in `tests/smb3/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("smb3")
        .join(name)
}

/// Waits until every filterd handle rksmbd opened is closed again (fails
/// after 10 s).
pub fn no_handles_left(d: &crate::Filterd) {
    crate::wait_for(
        "rksmbd's handles to be closed",
        std::time::Duration::from_secs(10),
        || {
            d.control()
                .handles()
                .ok()
                .filter(|h| h.is_empty())
                .map(|_| ())
        },
    );
}

/// A `tests/smb3/` script run as alice against an rksmbd, that a test
/// talks with: it waits for the script's lines (read by a thread, so a
/// silent script fails the test after 30 s instead of hanging it) and
/// writes lines to its stdin.
pub struct Dialogue {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    rx: crossbeam_channel::Receiver<String>,
    /// Everything the script printed so far (for failure messages).
    pub log: String,
}

impl Dialogue {
    /// Starts `tests/smb3/SCRIPT HOST PORT data alice pw` with
    /// smbprotocol's python, killed after `limit`.
    pub fn start(srv: &crate::RkSmbd, name: &str, limit: std::time::Duration) -> Dialogue {
        Dialogue::start_with(srv, name, &[], limit)
    }

    /// [`Dialogue::start`] with `extra` arguments after the password.
    pub fn start_with(
        srv: &crate::RkSmbd,
        name: &str,
        extra: &[&str],
        limit: std::time::Duration,
    ) -> Dialogue {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new("timeout")
            .arg(limit.as_secs().to_string())
            .arg(smbprotocol_python())
            .arg(script(name))
            .args(["127.0.0.1", &srv.port(), &srv.share, "alice", "pw"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the smbprotocol script");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("the script's stdout");
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dialogue {
            child,
            stdin,
            rx,
            log: String::new(),
        }
    }

    /// Waits (30 s at most) for a line starting with `prefix` and returns it.
    pub fn expect(&mut self, prefix: &str) -> String {
        use crossbeam_channel::RecvTimeoutError;
        loop {
            match self.rx.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {prefix:?} line in 30 s:\n{}", self.log)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let err = self.stderr();
                    panic!(
                        "the script ended before {prefix:?}:\n{}\nstderr:\n{err}",
                        self.log
                    )
                }
            }
        }
    }

    /// Writes `line` to the script's stdin.
    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("the script's stdin is open");
        writeln!(stdin, "{line}").expect("write to the script");
    }

    /// Closes the script's stdin, waits for its PASS line and its
    /// successful exit.
    pub fn finish(&mut self) {
        drop(self.stdin.take());
        self.expect("PASS");
        let status = self.child.wait().expect("the script's exit");
        let err = self.stderr();
        assert!(status.success(), "{}\nstderr:\n{err}", self.log);
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }
}
