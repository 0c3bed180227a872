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
