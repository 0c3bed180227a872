//! The act with a real SMB 3 client: smbprotocol (PyPI, a client written
//! by others) opens a persistent handle with an RWH lease through rksmbd
//! and writes; its connection drops, rksmbd is SIGKILLed and a replacement
//! starts; another client's conflicting open is refused meanwhile, and the
//! first reconnects (DH2C) and reads its data back through the same handle.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::stage::Stage;
use crate::{ms, Story};

/// The client script the tests run too (tests/tests/rksmbd.rs).
const SCRIPT: &str = include_str!("../../../tests/smb3/durable_reconnect.py");
/// What the script writes and reads back.
const DATA: &str = "persistent data survives the drop";
const USER: &str = "alice";
const PASSWORD: &str = "demo password";

/// The python to use, if it has smbprotocol.
fn python(s: &Story, given: Option<&Path>) -> Option<PathBuf> {
    let p = match given {
        Some(p) => p.to_owned(),
        None => s.bin.parent()?.join("smbvenv/bin/python"),
    };
    Command::new(&p)
        .args(["-c", "import smbprotocol"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success())
        .then_some(p)
}

/// Plays the act (skipped, with a note, without rksmbd or smbprotocol).
pub fn act(s: &mut Story, stage: &Stage, given: Option<&Path>) -> anyhow::Result<()> {
    let t = s.heading(
        "a real SMB 3 client (smbprotocol) through rksmbd: persistent handle, rksmbd SIGKILLed and replaced",
    )?;
    let Some(python) = python(s, given) else {
        say!(
            "   skipped: no python with smbprotocol (`make demo` makes target/smbvenv; or pass --smb-python)"
        );
        s.done(t)?;
        return Ok(());
    };
    if !s.bin.join("rksmbd").exists() {
        bail!(
            "rksmbd not found in {} (run `make demo`, which builds it)",
            s.bin.display()
        );
    }
    // The users file: smbpasswd format, NT hashes only.
    let users = s.dir.join("smbpasswd");
    let mut hash = Command::new(s.bin.join("rksmbd"))
        .args(["hash-password", USER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = hash.stdin.take() {
        writeln!(i, "{PASSWORD}")?;
    }
    let out = hash.wait_with_output()?;
    if !out.status.success() {
        bail!("rksmbd hash-password failed");
    }
    // 0600: rksmbd refuses a users file group or others may read.
    rksmbd::users::create_file(&users)?.write_all(&out.stdout)?;
    let users = users.display().to_string();
    let flags = ["--share", "data", "--users", users.as_str()];
    let (pid, addr) = s.start_frontend(stage, "rksmbd", "rksmbd-demo", &flags)?;
    let port = addr.rsplit(':').next().unwrap_or_default().to_owned();
    say!("   rksmbd pid {pid} serves share \\\\127.0.0.1\\data on {addr} (users file {users})");

    let script = s.dir.join("durable_reconnect.py");
    std::fs::write(&script, SCRIPT)?;
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["127.0.0.1", &port, "data", USER, PASSWORD])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(s.log("smbprotocol")?);
    let (client, mut input, out) = stage.spawn_io(&mut cmd)?;
    let mut out = BufReader::new(out);
    say!("   $ python durable_reconnect.py 127.0.0.1 {port} data {USER} ***");
    loop {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            bail!(
                "the smbprotocol client ended early; see {}",
                s.dir.join("smbprotocol.log").display()
            );
        }
        say!("     {}", line.trim_end());
        if line.starts_with("dropped") {
            break;
        }
    }
    stage.kill9(pid);
    let t_kill = Instant::now();
    let (pid2, addr2) = s.start_frontend(stage, "rksmbd", "rksmbd-demo", &flags)?;
    let up = t_kill.elapsed();
    say!(
        "   SIGKILLed rksmbd pid {pid}; replacement pid {pid2} listening on {addr2} {:.1} ms later",
        ms(up)
    );
    let port2 = addr2.rsplit(':').next().unwrap_or_default();
    writeln!(input, "{port2}")?;
    drop(input);
    let mut passed = false;
    for line in out.lines() {
        let line = line?;
        say!("     {line}");
        passed |= line == "PASS";
    }
    if !stage.wait_success(client) || !passed {
        bail!(
            "the smbprotocol client failed; see {}",
            s.dir.join("smbprotocol.log").display()
        );
    }
    let reconnected = t_kill.elapsed();
    let on_disk = std::fs::read_to_string(s.root.join("durable.txt"))
        .context("durable.txt after the reconnect")?;
    say!(
        "   the client reconnected through the replacement and read back {:?}; on disk: {:?}",
        DATA,
        on_disk.trim_end()
    );
    if on_disk.trim_end() != DATA {
        bail!("durable.txt holds {on_disk:?}");
    }
    s.record(
        "rksmbd: SIGKILL → SMB 3 client read back",
        format!("{:.1} ms", ms(reconnected)),
    );
    s.done(t)?;
    Ok(())
}
