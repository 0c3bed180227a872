//! Local open cost with fanotify mediation (root only: it mounts a tmpfs).
//!
//! Beside each other, in the same run, on the same tmpfs:
//! - raw `open+close` with no fanotify group at all;
//! - an allow-all listener (a fanotify group in this process answering every
//!   permission event ALLOW): the floor for any mediated open;
//! - filterd mediating: a file without protocol state (ignore-marked after
//!   its first open, so it should cost about a raw open), and a file with
//!   protocol state (every open decided by the engine).
//!
//! And the same with [`OPENERS`] threads opening one file at once (issue
//! 18: thousands of pending local opens): the file with protocol state
//! under filterd, beside the same opens under the allow-all listener and
//! with no listener.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use libfilter::client::FilterClient;
use libfilter::model::*;
use libfilter::proto::OpenRequest;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};

use crate::raw::timed;
use crate::report::Figure;

/// The figures of this section.
pub struct LocalFigures {
    /// Raw open+close.
    pub raw: Figure,
    /// Under an allow-all listener.
    pub allow_all: Figure,
    /// Under filterd, file without protocol state.
    pub stateless: Figure,
    /// Under filterd, file with protocol state (a share-all open).
    pub stateful: Figure,
    /// [`OPENERS`] concurrent openers, no fanotify.
    pub raw_many: Figure,
    /// [`OPENERS`] concurrent openers, allow-all listener.
    pub allow_all_many: Figure,
    /// [`OPENERS`] concurrent openers of the file with protocol state,
    /// under filterd; and how many of their opens were refused.
    pub stateful_many: (Figure, u64),
}

/// Concurrent local openers in the many-openers figures.
pub const OPENERS: usize = 1000;

/// One opener thread: open+close of one file; a refused open (filterd
/// overloaded) is counted, not an error.
struct Opener {
    path: std::path::PathBuf,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl crate::gate::Worker for Opener {
    fn warm_up(&mut self) -> anyhow::Result<()> {
        self.op()
    }
    fn op(&mut self) -> anyhow::Result<()> {
        match std::fs::File::open(&self.path) {
            Ok(f) => drop(f),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// [`OPENERS`] threads opening `path` at once for `dur`: the figure over
/// all of them, and how many opens were refused.
fn many_open_close(path: &Path, dur: Duration) -> anyhow::Result<(Figure, u64)> {
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers = (0..OPENERS)
        .map(|_| Opener {
            path: path.to_owned(),
            refused: refused.clone(),
        })
        .collect();
    let (all, wall) = crate::gate::run("opener", workers, dur)?;
    let n = all.len() as u64;
    Ok((
        Figure::from_samples(all, n, wall),
        refused.load(Ordering::Relaxed),
    ))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn open_close(path: &Path, dur: Duration) -> anyhow::Result<Figure> {
    timed(dur, || {
        drop(std::fs::File::open(path)?);
        Ok(())
    })
}

/// Measures; `None` when not root.
pub fn measure(filterd: &Path, dir: &Path, dur: Duration) -> anyhow::Result<Option<LocalFigures>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let root = dir.join("local/root");
    let state = dir.join("local/state");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&state)?;
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .context("mounting a tmpfs")?;
    let _unmount = Unmount(root.clone());
    std::fs::write(root.join("plain"), b"x")?;
    std::fs::write(root.join("stateful"), b"x")?;
    let raw = open_close(&root.join("plain"), dur)?;
    let (raw_many, _) = many_open_close(&root.join("plain"), dur)?;

    // An allow-all listener in this process.
    let allow_all = {
        let fan = Arc::new(Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC,
        )?);
        let rootfd = std::fs::File::open(&root)?;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
            MaskFlags::FAN_OPEN_PERM,
            rootfd.as_fd(),
            None::<&Path>,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, s2) = (fan.clone(), stop.clone());
        let listener = std::thread::Builder::new()
            .name("allow-all".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                while !s2.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(f2.as_fd(), PollFlags::POLLIN)];
                    if poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) == 0 {
                        continue;
                    }
                    if let Ok(events) = f2.read_events() {
                        for ev in events {
                            if let Some(fd) = ev.fd() {
                                let _ = f2
                                    .write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW));
                            }
                        }
                    }
                }
            })?;
        let f = open_close(&root.join("plain"), dur)
            .and_then(|one| Ok((one, many_open_close(&root.join("plain"), dur)?.0)));
        stop.store(true, Ordering::Relaxed);
        let _ = listener.join();
        f?
    };
    let (allow_all, allow_all_many) = allow_all;

    // filterd mediating.
    let d = crate::daemon::Daemon::start_on(
        filterd,
        &root,
        &state,
        &dir.join("local/filterd.log"),
        true,
        &[],
    )?;
    let fe = FilterClient::connect_frontend(
        &d.socket,
        Protocol::new("bench")?,
        InstanceName::new("bench-local")?,
    )?;
    let _h = fe.open(OpenRequest::new(
        ClientId::new("bench")?,
        RelPath::new("stateful")?,
        Access::new(Rights::READ)?,
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    ))?;
    drop(std::fs::File::open(root.join("plain"))?); // first open sets the ignore mark
    let stateless = open_close(&root.join("plain"), dur)?;
    let stateful = open_close(&root.join("stateful"), dur)?;
    let stateful_many = many_open_close(&root.join("stateful"), dur)?;
    drop(fe);
    drop(d);
    Ok(Some(LocalFigures {
        raw,
        allow_all,
        stateless,
        stateful,
        raw_many,
        allow_all_many,
        stateful_many,
    }))
}
