//! rksmbd with a real SMB client: Samba's `smbclient` against the real
//! filterd and rksmbd — ls, get, put, rm, mkdir, rmdir, rename over SMB
//! 3.1.1, 3.0.2 and 2.1, a wrong password and an unknown share refused.
//!
//! `smbclient` must be installed (Debian package `smbclient`; `.ci/run`
//! installs it): without it these tests fail, they do not skip.

use std::process::{Command, Output};
use std::time::Duration;

use rkfilter_tests::{wait_for, Filterd, RkSmbd, Scratch};

/// Runs smbclient against rksmbd's share with `dialect` as both the
/// lowest and highest protocol it may use, so the session runs exactly
/// that dialect or fails.
fn smbclient(srv: &RkSmbd, user: &str, password: &str, dialect: &str, cmds: &str) -> Output {
    let ok = Command::new("smbclient")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "smbclient is not installed: these tests need Samba's smbclient \
         (apt-get install -y smbclient; .ci/run installs it)"
    );
    Command::new("timeout")
        .arg("60")
        .arg("smbclient")
        .arg(format!("//127.0.0.1/{}", srv.share))
        .args(["-p", &srv.port()])
        .args(["-s", "/dev/null"])
        .arg("-U")
        .arg(format!("{user}%{password}"))
        .arg(format!("--option=client min protocol={dialect}"))
        .arg(format!("--option=client max protocol={dialect}"))
        .args(["-c", cmds])
        .output()
        .expect("run smbclient")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every filterd handle rksmbd opened is closed again.
fn no_handles_left(d: &Filterd) {
    wait_for(
        "rksmbd's handles to be closed",
        Duration::from_secs(10),
        || {
            d.control()
                .handles()
                .ok()
                .filter(|h| h.is_empty())
                .map(|_| ())
        },
    );
}

fn file_ops_over(dialect: &str) {
    let s = Scratch::new(&format!("rksmbd-ops-{dialect}"));
    let root = s.root();
    std::fs::write(root.join("hello.txt"), "hello\n").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    let local = s.dir.join("local");
    std::fs::create_dir(&local).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(local.join("up.bin"), &payload).unwrap();
    let d = Filterd::start(&s, &[], &[]);
    let srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "s3cret pw")]);

    let cmds = format!(
        "lcd {}; ls; put up.bin; get hello.txt got.txt; mkdir newdir; \
         rename up.bin newdir\\moved.bin; rm hello.txt; rmdir sub; ls newdir\\*",
        local.display()
    );
    let o = smbclient(&srv, "alice", "s3cret pw", dialect, &cmds);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("NT_STATUS_"), "an operation failed:\n{out}");
    // ls of the root listed both entries; ls of newdir the moved file.
    assert!(out.contains("hello.txt") && out.contains("sub"), "{out}");
    assert!(out.contains("moved.bin"), "{out}");
    // get
    assert_eq!(
        std::fs::read_to_string(local.join("got.txt")).unwrap(),
        "hello\n"
    );
    // put + rename into a new directory
    assert_eq!(
        std::fs::read(root.join("newdir/moved.bin")).unwrap(),
        payload
    );
    assert!(!root.join("up.bin").exists());
    // rm, rmdir
    assert!(!root.join("hello.txt").exists());
    assert!(!root.join("sub").exists());
    no_handles_left(&d);
}

#[test]
fn smbclient_file_ops_over_smb3_11() {
    file_ops_over("SMB3_11");
}

#[test]
fn smbclient_file_ops_over_smb3_02() {
    file_ops_over("SMB3_02");
}

#[test]
fn smbclient_file_ops_over_smb2_10() {
    file_ops_over("SMB2_10");
}

#[test]
fn smbclient_wrong_password_and_unknown_share_are_refused() {
    let s = Scratch::new("rksmbd-refused");
    std::fs::write(s.root().join("secret.txt"), "x").unwrap();
    let _d = Filterd::start(&s, &[], &[]);
    let srv = RkSmbd::start(&s, "rksmbd", "data", &[("alice", "right")]);
    for dialect in ["SMB3_11", "SMB3_02"] {
        let o = smbclient(&srv, "alice", "wrong", dialect, "ls");
        let out = text(&o);
        assert!(!o.status.success(), "{out}");
        assert!(out.contains("NT_STATUS_LOGON_FAILURE"), "{out}");
        assert!(!out.contains("secret.txt"), "{out}");
        let o = smbclient(&srv, "mallory", "right", dialect, "ls");
        assert!(text(&o).contains("NT_STATUS_LOGON_FAILURE"), "{}", text(&o));
    }
    let other = RkSmbd {
        shim: srv.shim,
        share: "nosuch".into(),
    };
    let o = smbclient(&other, "alice", "right", "SMB3_11", "ls");
    assert!(
        text(&o).contains("NT_STATUS_BAD_NETWORK_NAME"),
        "{}",
        text(&o)
    );
    // The server keeps serving after the refusals.
    let ok = RkSmbd {
        shim: other.shim,
        share: "data".into(),
    };
    let o = smbclient(&ok, "alice", "right", "SMB3_11", "ls");
    assert!(text(&o).contains("secret.txt"), "{}", text(&o));
}

#[test]
fn hash_password_writes_smbpasswd_lines() {
    let out = Command::new(rkfilter_tests::bin("rksmbd"))
        .args(["hash-password", "bob", "--uid", "1001"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                writeln!(i, "Password")?;
            }
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    // MS-NLMP 4.2.2.1.2: the NT hash of "Password".
    assert!(
        line.starts_with(
            "bob:1001:XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:A4F49C406510BDCAB6824EE7C30FD852:[U          ]:LCT-"
        ),
        "{line}"
    );
}
