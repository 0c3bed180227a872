//! The one harness every end-to-end test uses: a temporary export and state
//! dir ([`Scratch`]), the real programs started as processes ([`Filterd`],
//! [`TestFront`], [`filterctl`]), and readiness by polling — never a fixed
//! sleep. Binaries are taken from the same `target/<profile>` directory as
//! the test executable; `make test` builds them first.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use libfilter::client::FilterClient;

pub mod etcd;
pub mod smb3;
use serde_json::{json, Value};

/// Path of a workspace binary built next to the test executable (or next
/// to a workspace binary such as rksoak).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/<bin> → target/<profile>/<name>;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let beside = exe.with_file_name(name);
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = if beside.exists() {
        beside
    } else {
        dir.join(name)
    };
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (or `make test`) first",
        p.display()
    );
    p
}

/// Polls the log file `log` (a daemon's, started logged) until it has
/// `needle`, for at most 20 s.
pub fn wait_logged(log: &Path, needle: &str) {
    wait_for(needle, Duration::from_secs(20), || {
        std::fs::read_to_string(log)
            .is_ok_and(|t| t.contains(needle))
            .then_some(())
    });
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of a process or thread from its `/proc/.../stat` (it
/// follows the command's closing parenthesis); `None` when it is gone.
fn task_state(stat: &Path) -> Option<char> {
    let st = std::fs::read_to_string(stat).ok()?;
    st.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until every thread of process `pid` (`what`), sent SIGSTOP,
/// has stopped (see [`Filterd::stop`]).
fn wait_stopped(what: &str, pid: u32) {
    let tasks = format!("/proc/{pid}/task");
    wait_for(&format!("{what} to stop"), Duration::from_secs(10), || {
        let all_stopped = std::fs::read_dir(&tasks).ok()?.all(|t| {
            t.ok()
                .and_then(|t| task_state(&t.path().join("stat")))
                .is_none_or(|state| state == 'T' || state == 't')
        });
        all_stopped.then_some(())
    });
}

/// A temporary directory with `root/` (the export) and `state/`; removed on drop.
pub struct Scratch {
    /// The top directory.
    pub dir: PathBuf,
    /// Held while the export is a mount of the test's own.
    _mounted: Option<MountSlot>,
}

/// Most tests of one binary whose export is a mount of their own
/// ([`Scratch::with_tmpfs`], [`Scratch::with_ext4`]) that run at once,
/// whatever the binary's test threads. filterd mediates local opens on
/// such an export, and its first open of a file after a restart scans
/// `/proc` against a CPU budget that other tests' processes and
/// descriptors eat into; `make test` runs the end-to-end files four tests
/// at a time (Makefile, `E2E_THREADS`), and these ran two at a time
/// before (four at once under a loaded machine cut such scans short).
const MOUNTED_AT_ONCE: usize = 2;

static MOUNTED: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

std::thread_local! {
    /// Slots this test's thread holds: a test with two mounts takes one.
    static MOUNTS_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One of [`MOUNTED_AT_ONCE`] places, given back on drop.
struct MountSlot {
    /// Whether this slot counts (the thread's first) or rides on one.
    counted: bool,
}

impl MountSlot {
    /// Waits for a place, unless this thread already holds one.
    fn take() -> MountSlot {
        let held = MOUNTS_HELD.with(|h| h.replace(h.get() + 1));
        if held > 0 {
            return MountSlot { counted: false };
        }
        let (lock, freed) = &MOUNTED;
        let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MOUNTED_AT_ONCE {
            n = freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        MountSlot { counted: true }
    }
}

impl Drop for MountSlot {
    fn drop(&mut self) {
        MOUNTS_HELD.with(|h| h.set(h.get().saturating_sub(1)));
        if self.counted {
            let (lock, freed) = &MOUNTED;
            let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
            *n = n.saturating_sub(1);
            freed.notify_one();
        }
    }
}

impl Scratch {
    /// Creates a fresh scratch dir named after the test.
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "rkf-e2e-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("root")).expect("mkdir root");
        std::fs::create_dir_all(dir.join("state")).expect("mkdir state");
        // Modes whatever the umask (002 gives 0775): filterd checks the
        // state dir's parent (README "Socket permissions", statedir
        // `check_parent`); 0750 is what it makes a state dir.
        use std::os::unix::fs::PermissionsExt;
        for (d, mode) in [(&dir, 0o755), (&dir.join("state"), 0o750)] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        Scratch {
            dir,
            _mounted: None,
        }
    }
    /// The export root.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// The state dir.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The default socket.
    pub fn socket(&self) -> PathBuf {
        self.state().join("filterd.sock")
    }

    /// Gives the socket filterd makes here group `gid` (it inherits the
    /// state dir's group: the dir is made setgid, group-searchable) and
    /// lets other users reach the state dir (root only: a chown).
    pub fn give_socket_group(&self, gid: u32) {
        use std::os::unix::fs::PermissionsExt;
        nix::unistd::chown(&self.state(), None, Some(nix::unistd::Gid::from_raw(gid)))
            .expect("chown the state dir");
        std::fs::set_permissions(self.state(), std::fs::Permissions::from_mode(0o2775))
            .expect("chmod the state dir");
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the scratch dir");
    }
}

/// Whether CI runs this (`CI=true`, as `.ci/run` is run): there a test
/// whose tool or privilege is missing fails instead of skipping, since a
/// skipped test passes having run nothing.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether this runs as root, which test `name` needs (`why`); says on
/// stderr that the test is skipped otherwise — and fails it under CI,
/// which runs as root.
pub fn root_or_skip(name: &str, why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(!in_ci(), "{name} needs root ({why}); CI runs as root");
        eprintln!("skipping: {name} needs root ({why})");
    }
    root
}

impl Scratch {
    /// A scratch dir whose export root is its own tmpfs mount (so filterd
    /// can mediate local access with fanotify). `None`, with a note on
    /// stderr, when not root or mounting fails; CI runs as root.
    pub fn with_tmpfs(name: &str) -> Option<Scratch> {
        if !root_or_skip(name, "to mount a tmpfs") {
            return None;
        }
        let slot = MountSlot::take();
        let mut s = Scratch::new(name);
        s._mounted = Some(slot);
        let r = nix::mount::mount(
            Some("tmpfs"),
            &s.root(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64m"),
        );
        match r {
            Ok(()) => Some(s),
            Err(e) => {
                panic!("mounting a tmpfs as root failed: {e}");
            }
        }
    }
}

impl Scratch {
    /// A scratch dir whose export root is an ext4 filesystem of its own (a
    /// loop-mounted image beside it): ext4 gives a freed inode number to
    /// the next file made at once, tmpfs never. `None`, with a note on
    /// stderr, when not root or the image cannot be made or mounted
    /// (`mkfs.ext4`, loop devices).
    pub fn with_ext4(name: &str) -> Option<Scratch> {
        if !root_or_skip(name, "to mount an ext4 image") {
            return None;
        }
        let slot = MountSlot::take();
        let mut s = Scratch::new(name);
        s._mounted = Some(slot);
        let img = s.dir.join("ext4.img");
        let ok = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success())
        };
        if !(ok(Command::new("truncate").arg("-s").arg("32M").arg(&img))
            && ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))
            && ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(s.root())))
        {
            assert!(
                !in_ci(),
                "{name} cannot make an ext4 loop mount (mkfs.ext4 from e2fsprogs, loop devices)"
            );
            eprintln!("skipping: {name} cannot make an ext4 loop mount (mkfs.ext4, loop devices)");
            return None;
        }
        Some(s)
    }
}

impl Scratch {
    /// A scratch dir whose export root is an overlayfs mount: `lower`
    /// fills the lower layer first; upper and work dirs lie on a tmpfs of
    /// their own beside it (an upper layer cannot be on an overlay, as
    /// a container's /tmp may be). `None`, with a note on stderr, when not
    /// root.
    pub fn with_overlay(name: &str, lower: impl FnOnce(&Path)) -> Option<Scratch> {
        if !root_or_skip(name, "to mount an overlayfs") {
            return None;
        }
        let s = Scratch::new(name);
        let layers = s.dir.join("layers");
        std::fs::create_dir(&layers).expect("mkdir layers");
        nix::mount::mount(
            Some("tmpfs"),
            &layers,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64m"),
        )
        .expect("mounting a tmpfs as root");
        for d in ["lower", "upper", "work"] {
            std::fs::create_dir(layers.join(d)).expect("mkdir a layer");
        }
        lower(&layers.join("lower"));
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            layers.join("lower").display(),
            layers.join("upper").display(),
            layers.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &s.root(),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .expect("mounting an overlayfs as root");
        Some(s)
    }
}

impl Scratch {
    /// A scratch dir whose state dir is a small tmpfs of `size` (e.g.
    /// "2m"), to run out of space on purpose. `None` when not root.
    pub fn with_small_state(name: &str, size: &str) -> Option<Scratch> {
        if !root_or_skip(name, "to mount a tmpfs") {
            return None;
        }
        let s = Scratch::new(name);
        nix::mount::mount(
            Some("tmpfs"),
            &s.state(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            // 0755, not tmpfs's 1777: filterd refuses a state dir other
            // users may write.
            Some(format!("size={size},mode=0755").as_str()),
        )
        .expect("mounting a small tmpfs as root");
        Some(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Unmount a tmpfs root if there is one (lazily: processes may still
        // be going away).
        let _ = nix::mount::umount2(&self.root(), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&self.state(), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&self.dir.join("layers"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running filterd.
pub struct Filterd {
    child: Option<Child>,
    /// Its stderr log file.
    pub log: PathBuf,
    socket: PathBuf,
}

impl Filterd {
    /// Starts filterd on the scratch dirs (`--no-fanotify` plus `extra` flags,
    /// `env` as extra environment) and waits until it answers a hello.
    pub fn start(s: &Scratch, extra: &[&str], env: &[(&str, &str)]) -> Filterd {
        let d = Self::spawn(s, extra, env);
        d.wait_ready();
        d
    }

    /// Starts filterd with fanotify mediation on (the scratch root must be a
    /// mount point: see [`Scratch::with_tmpfs`]).
    pub fn start_mediated(s: &Scratch, extra: &[&str]) -> Filterd {
        let d = Self::spawn_with(s, extra, &[], false);
        d.wait_ready();
        d
    }

    /// As [`Filterd::start_mediated`], with extra environment (failpoints).
    pub fn start_mediated_with(s: &Scratch, extra: &[&str], env: &[(&str, &str)]) -> Filterd {
        let d = Self::spawn_with(s, extra, env, false);
        d.wait_ready();
        d
    }

    /// Spawns filterd with fanotify on, without waiting (to see it refuse).
    pub fn spawn_mediated(s: &Scratch) -> Filterd {
        Self::spawn_with(s, &[], &[], false)
    }

    /// Starts filterd without waiting.
    pub fn spawn(s: &Scratch, extra: &[&str], env: &[(&str, &str)]) -> Filterd {
        Self::spawn_with(s, extra, env, true)
    }

    fn spawn_with(s: &Scratch, extra: &[&str], env: &[(&str, &str)], no_fanotify: bool) -> Filterd {
        Self::spawn_full(s, None, &[], extra, env, no_fanotify)
    }

    /// Starts filterd (`--no-fanotify`) serving `socket` instead of the
    /// default one, run through `wrap` (e.g. `setpriv --reuid=65534 ... --`)
    /// when given; does not wait.
    pub fn spawn_on(
        s: &Scratch,
        socket: Option<&Path>,
        wrap: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Filterd {
        Self::spawn_full(s, socket, wrap, extra, env, true)
    }

    fn spawn_full(
        s: &Scratch,
        socket: Option<&Path>,
        wrap: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
        no_fanotify: bool,
    ) -> Filterd {
        let n = std::fs::read_dir(&s.dir).map(|d| d.count()).unwrap_or(0);
        let log = s.dir.join(format!("filterd-{n}.log"));
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("filterd"));
                c
            }
            None => Command::new(bin("filterd")),
        };
        if let Some(sock) = socket {
            cmd.arg("--socket").arg(sock);
        }
        cmd.arg("--root")
            .arg(s.root())
            .arg("--state")
            .arg(s.state())
            .args(no_fanotify.then_some("--no-fanotify"))
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn filterd");
        Filterd {
            child: Some(child),
            log,
            socket: socket.map_or_else(|| s.socket(), Path::to_path_buf),
        }
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends it `sig` (it keeps running, or not, as it decides).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal filterd");
    }

    /// SIGSTOPs it and waits until every thread of it has stopped. The
    /// stop is not done when `kill` returns: on a loaded machine (a VM
    /// whose other vCPU is descheduled) a thread still ran for a while
    /// after it and answered the very request the test sent to a
    /// "stopped" filterd (late_reply.rs, ~1 run in 3 under load: the main
    /// thread was still `R` after the signal).
    pub fn stop(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        wait_stopped("filterd", self.pid());
    }

    /// Polls its log until it contains `needle` (panics with the log after
    /// `timeout`).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("filterd to log {needle:?}"), timeout, || {
            self.log_text().contains(needle).then_some(())
        });
    }

    /// Whether it has exited (reaping it if so), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// Polls until a control hello succeeds. Panics with the log if it
    /// exits first (it cannot claim its store, say) — at once, not at the
    /// deadline as if it were only slow (a CI run reported "not ready
    /// after 20 s" for a filterd whose log was all there was to tell).
    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        let stat = PathBuf::from(format!("/proc/{}/stat", self.pid()));
        loop {
            if FilterClient::connect_control(&self.socket).is_ok() {
                return;
            }
            if self.pid() != 0 && task_state(&stat).is_none_or(|s| s == 'Z' || s == 'X') {
                panic!(
                    "filterd exited before it was ready (after {:?}); log:\n{}",
                    t0.elapsed(),
                    self.log_text()
                );
            }
            if t0.elapsed() > Duration::from_secs(20) {
                panic!("filterd not ready after 20 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILLs it and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for it to exit by itself (e.g. at a failpoint), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let st = wait_for("filterd to exit", timeout, || c.try_wait().ok().flatten());
        self.child = None;
        st
    }

    /// Waits for it to die at the failpoint it was armed with, `armed` as
    /// in `RKFILTER_FAILPOINTS` (`name[:n][:kill]`): it must have logged
    /// that point's kill line and ended by SIGKILL. A daemon that died
    /// anywhere else (a crash, a panic, a kill at another point) fails the
    /// test instead of passing as a crash at the point under test.
    pub fn wait_killed_at(&mut self, armed: &str, timeout: Duration) {
        use std::os::unix::process::ExitStatusExt;
        let name = armed.split(':').next().unwrap_or(armed);
        let st = self.wait_exit(timeout);
        let log = self.log_text();
        assert!(
            log.contains(&format!("failpoint {name}: killing filterd")),
            "filterd exited ({st:?}), but not killed at failpoint {armed}; log:\n{log}"
        );
        assert_eq!(
            st.signal(),
            Some(nix::sys::signal::Signal::SIGKILL as i32),
            "filterd killed at {armed}, by SIGKILL"
        );
    }

    /// Waits until the thread that reached the failpoint armed as `armed`
    /// (`name[:n]:sleepMS`) is stalling there, so that what a test does
    /// next happens inside the stall and not after it (or with no stall at
    /// all: a misspelled point or one the path never reaches times out).
    pub fn wait_stalled_at(&self, armed: &str, timeout: Duration) {
        let name = armed.split(':').next().unwrap_or(armed);
        self.wait_log(&format!("failpoint {name}: stalling"), timeout);
    }

    /// Waits for a daemon that is to refuse to start to exit, asserts it
    /// failed, and returns its log (which says why).
    pub fn refused(&mut self) -> String {
        let st = self.wait_exit(Duration::from_secs(20));
        assert!(!st.success(), "filterd started: {st:?}");
        self.log_text()
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let st = wait_for("filterd to stop", Duration::from_secs(20), || {
            c.try_wait().ok().flatten()
        });
        self.child = None;
        st
    }

    /// A control connection.
    pub fn control(&self) -> FilterClient {
        FilterClient::connect_control(&self.socket).expect("control connection")
    }
}

impl Drop for Filterd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A testfront process: a frontend over libfilter driven line by line.
pub struct TestFront {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The daemon epoch it saw at hello.
    pub epoch: u64,
}

impl TestFront {
    /// Starts `testfront` attached to `socket` as `protocol`/`instance` and
    /// waits for its ready line. Returns the error JSON if it could not attach.
    pub fn start(socket: &Path, protocol: &str, instance: &str) -> Result<TestFront, Value> {
        let mut child = Command::new(bin("testfront"))
            .arg(socket)
            .arg(protocol)
            .arg(instance)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn testfront");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("testfront ready line");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["ready"] != Value::Bool(true) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(v);
        }
        let epoch = v["epoch"].as_u64().unwrap_or(0);
        Ok(TestFront {
            child,
            stdin,
            stdout,
            epoch,
        })
    }

    /// Sends one command and returns its result line.
    pub fn cmd(&mut self, v: Value) -> Value {
        writeln!(self.stdin, "{v}").expect("write to testfront");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from testfront");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad testfront line {line:?}: {e}"))
    }

    /// SIGKILLs it (its handles stay open until the kernel closes its socket).
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An open of `path` by `client` asking for nothing beyond it: read access,
/// share all, open (never create), not durable, no create GUID, owner,
/// lease or stat. Tests change what they need with struct update syntax:
/// `OpenRequest { durability, ..plain_open("alice", "f") }`. Panics on a
/// name the model refuses (tests build their own requests).
pub fn plain_open(client: &str, path: &str) -> libfilter::proto::OpenRequest {
    use libfilter::model::{Access, ClientId, Disposition, Durability, RelPath, Rights};
    libfilter::proto::OpenRequest::new(
        ClientId::new(client).expect("client id"),
        RelPath::new(path).expect("relative path"),
        Access::new(Rights::READ).expect("read access"),
        Rights::ALL,
        Disposition::Open,
        Durability::None,
    )
}

/// A read-write `open_if` of `path` by `alice` sharing `share`, with a lease
/// (key, state such as "RWH") if given: the local-open tests' request.
pub fn rw_open_if(
    path: &str,
    share: libfilter::model::Rights,
    lease: Option<(libfilter::lease::LeaseKey, &str)>,
) -> libfilter::proto::OpenRequest {
    use libfilter::model::{Access, Disposition, Rights};
    libfilter::proto::OpenRequest {
        access: Access::new(Rights::READ.union(Rights::WRITE)).expect("read-write access"),
        share,
        disposition: Disposition::OpenIf,
        lease: lease.map(|(key, s)| libfilter::model::LeaseRequest {
            key,
            state: libfilter::lease::LeaseState::parse(s).expect("lease state"),
            epoch: 0,
        }),
        ..plain_open("alice", path)
    }
}

/// Attaches an in-process frontend of `protocol` named `instance` (panics
/// if filterd refuses it).
pub fn attach(socket: &Path, protocol: &str, instance: &str) -> FilterClient {
    FilterClient::connect_frontend(
        socket,
        libfilter::model::Protocol::new(protocol).expect("protocol name"),
        libfilter::model::InstanceName::new(instance).expect("instance name"),
    )
    .unwrap_or_else(|e| panic!("frontend {protocol}/{instance} attaches: {e}"))
}

/// A raw SEQPACKET connection to filterd's socket at `path` that has sent `hello`
/// (a JSON hello document) and nothing else: for tests that write frames
/// by hand.
pub fn raw_connect(path: &Path, hello: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::AsFd;
    let fd = raw_socket(path);
    libfilter::sys::send_packet(fd.as_fd(), hello.as_bytes(), None).expect("hello");
    fd
}

/// A raw SEQPACKET connection to filterd's socket at `path` that has sent
/// nothing.
pub fn raw_socket(path: &Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    connect(fd.as_raw_fd(), &UnixAddr::new(path).expect("address")).expect("connect");
    fd
}

/// Output of a filterctl run.
pub struct CtlOutput {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CtlOutput {
    /// Stdout parsed as JSON (panics with the output if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "filterctl output is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs filterctl with `args`; a listing (`handles`, `files`, `locks`,
/// `leases`) with `--complete`: it waits for every commit pending at it,
/// as the checks made on it need — past filterctl's 1 s bound a
/// durable-only answer would leave out a file whose close is pending and
/// a "closed in filterd" check would pass before the close is durable
/// (re-review rr43d G1). [`filterctl_as_is`] runs it without.
pub fn filterctl(args: &[&str]) -> CtlOutput {
    let listing = args
        .iter()
        .any(|a| matches!(*a, "handles" | "files" | "locks" | "leases" | "frontends"));
    let mut all = Vec::with_capacity(args.len() + 1);
    if listing && !args.contains(&"--complete") {
        all.push("--complete");
    }
    all.extend_from_slice(args);
    filterctl_as_is(&all)
}

/// Runs filterctl with exactly `args`.
pub fn filterctl_as_is(args: &[&str]) -> CtlOutput {
    let out = Command::new(bin("filterctl"))
        .args(args)
        .output()
        .expect("run filterctl");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An smbl/1 connection to `addr` with a session (SESSION_SETUP as user m).
pub fn smb_session(addr: &str) -> (LineClient, u64) {
    let mut m = LineClient::connect(addr);
    let r = m.call(json!({"cmd": "SESSION_SETUP", "client_guid": uuid::Uuid::new_v4().to_string(), "user": "m"}));
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    let sid = r["session_id"].as_u64().expect("session_id");
    (m, sid)
}

/// A persistent CREATE of `path` (read/write, sharing read, a new create
/// GUID, 60 s timeout) on an smbl/1 connection; the reply as it came.
pub fn smb_persistent_create(c: &mut LineClient, sid: u64, path: &str) -> Value {
    c.call(
        json!({"cmd": "CREATE", "session_id": sid, "path": path, "access": ["read", "write"],
               "share": ["read"], "disposition": "create",
               "durable": {"create_guid": uuid::Uuid::new_v4().to_string(), "persistent": true, "timeout_ms": 60000}}),
    )
}

/// The paths of a `filterctl handles --json` listing, sorted: a live
/// daemon's (`path`) or a store's read offline (`record.path`).
pub fn listed_paths(v: &Value) -> Vec<String> {
    let mut p: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|h| {
            h["record"]["path"]
                .as_str()
                .or(h["path"].as_str())
                .map(str::to_owned)
        })
        .collect();
    p.sort();
    p
}

/// The paths of the handles the filterd serving `socket` lists, sorted.
pub fn handle_paths(socket: &Path) -> Vec<String> {
    let sock = socket.display().to_string();
    listed_paths(&filterctl(&["--socket", &sock, "handles", "--json"]).json())
}

/// Two smbl/1 clients of the smbshim at `addr` opening `f` (write access,
/// sharing write) and closing it again, as fast as they can, for `run`:
/// opens that never conflict with each other. Returns each client's
/// (completed opens, sharing violations).
pub fn create_close_loops(addr: &str, run: Duration) -> Vec<(u32, u32)> {
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                let (mut c, sid) = smb_session(&addr);
                let (mut done, mut violations) = (0, 0);
                let until = Instant::now() + run;
                while Instant::now() < until {
                    let r = c.call(json!({"cmd": "CREATE", "session_id": sid, "path": "f",
                        "access": ["write"], "share": ["write"], "disposition": "open_if"}));
                    if r["status"] == "STATUS_SHARING_VIOLATION" {
                        violations += 1;
                        continue;
                    }
                    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
                    let r = c.call(json!({"cmd": "CLOSE", "session_id": sid,
                        "file_id": r["file_id"]}));
                    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
                    done += 1;
                }
                (done, violations)
            })
        })
        .collect();
    loops
        .into_iter()
        .map(|t| t.join().expect("a client loop"))
        .collect()
}

/// A running protocol frontend (smbshim or nfsshim) and its TCP address.
pub struct Shim {
    child: Child,
    /// Where it listens.
    pub addr: String,
}

impl Shim {
    /// Starts `bin` with `--filter SOCKET --listen 127.0.0.1:0 --instance NAME`
    /// and waits for its `listening on` line.
    pub fn start(bin_name: &str, socket: &Path, instance: &str) -> Shim {
        Shim::start_with(bin_name, socket, instance, &[])
    }

    /// As [`Shim::start`], with extra flags.
    pub fn start_with(bin_name: &str, socket: &Path, instance: &str, extra: &[&str]) -> Shim {
        Shim::spawn(Command::new(bin(bin_name)), socket, instance, extra)
    }

    /// As [`Shim::start`], with extra environment (e.g. `RKFILTER_FRAMES`).
    pub fn start_with_env(
        bin_name: &str,
        socket: &Path,
        instance: &str,
        env: &[(&str, &str)],
    ) -> Shim {
        Shim::start_with_env_args(bin_name, socket, instance, &[], env)
    }

    /// As [`Shim::start_with_env`], with extra flags too.
    pub fn start_with_env_args(
        bin_name: &str,
        socket: &Path,
        instance: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Shim {
        let mut cmd = Command::new(bin(bin_name));
        cmd.envs(env.iter().copied());
        Shim::spawn(cmd, socket, instance, extra)
    }

    /// As [`Shim::start_with_env`], its standard error written to `log`
    /// (to be polled for what it says).
    pub fn start_logged(
        bin_name: &str,
        socket: &Path,
        instance: &str,
        env: &[(&str, &str)],
        log: &Path,
    ) -> Shim {
        Shim::start_logged_with(bin_name, socket, instance, &[], env, log)
    }

    /// As [`Shim::start_logged`], with extra flags too.
    pub fn start_logged_with(
        bin_name: &str,
        socket: &Path,
        instance: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Shim {
        let mut cmd = Command::new(bin(bin_name));
        cmd.envs(env.iter().copied());
        let file = std::fs::File::create(log).expect("shim log file");
        Shim::spawn_to(cmd, socket, instance, extra, Stdio::from(file))
    }

    /// As [`Shim::start_with`], under a descriptor limit of `nofile`
    /// (soft and hard, set by util-linux `prlimit`).
    pub fn start_with_nofile(
        bin_name: &str,
        socket: &Path,
        instance: &str,
        extra: &[&str],
        nofile: u64,
    ) -> Shim {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(bin(bin_name));
        Shim::spawn(cmd, socket, instance, extra)
    }

    fn spawn(cmd: Command, socket: &Path, instance: &str, extra: &[&str]) -> Shim {
        Shim::spawn_to(cmd, socket, instance, extra, Stdio::inherit())
    }

    /// [`Shim::spawn`] with its standard error to `stderr`.
    fn spawn_to(
        mut cmd: Command,
        socket: &Path,
        instance: &str,
        extra: &[&str],
        stderr: Stdio,
    ) -> Shim {
        let mut child = cmd
            .arg("--filter")
            .arg(socket)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--instance")
            .arg(instance)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn shim");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Shim { child, addr }
    }

    /// Sends it `sig` (SIGSTOP / SIGCONT to freeze and thaw it).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal shim");
    }

    /// SIGSTOPs it and waits until every thread of it has stopped (as
    /// [`Filterd::stop`]); SIGCONT thaws it.
    pub fn stop(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        wait_stopped("the shim", self.child.id());
    }

    /// SIGKILLs it.
    pub fn kill9(mut self) {
        self.kill9_in_place();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it and reaps it, keeping the value (to be replaced).
    pub fn kill9_in_place(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `addr` whose source address is `from` (any address
/// of 127.0.0.0/8 is this host's loopback): a second "host" for tests of
/// per-peer limits.
pub fn connect_from(from: std::net::Ipv4Addr, addr: &str) -> std::net::TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let to: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 address");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .expect("bind the source address");
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    std::net::TcpStream::from(fd)
}

/// Writes `bytes` as rksmbd's users file `path`, mode 0600 (rksmbd
/// refuses one group or others may read or write).
pub fn write_users_file(path: &Path, bytes: &[u8]) {
    rksmbd::users::create_file(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// How [`RkSmbd::start_full`] starts rksmbd.
enum Launch {
    /// With the environment given, its log to the test's standard error.
    Plain,
    /// Under a descriptor limit (the environment given is not used).
    Nofile(u64),
    /// With the environment given, its log to this file, under a
    /// descriptor limit if one is given.
    Logged(std::fs::File, Option<u64>),
}

/// A running rksmbd (the SMB 2/3 server) serving one share, with a users
/// file made by `rksmbd hash-password`.
pub struct RkSmbd {
    /// The process (a [`Shim`]: same flags, same `listening on` line).
    pub shim: Shim,
    /// The share's name.
    pub share: String,
}

impl RkSmbd {
    /// Writes `users` (name, password) into `DIR/users` in smbpasswd
    /// format (mode 0600) and starts rksmbd on filterd's socket, sharing `share`.
    pub fn start(s: &Scratch, instance: &str, share: &str, users: &[(&str, &str)]) -> RkSmbd {
        RkSmbd::start_with(s, instance, share, users, &[])
    }

    /// [`RkSmbd::start`] with `extra` flags.
    pub fn start_with(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        extra: &[&str],
    ) -> RkSmbd {
        RkSmbd::start_full(s, instance, share, users, extra, &[], Launch::Plain)
    }

    /// [`RkSmbd::start`] with extra environment (e.g.
    /// `RKFILTER_CALL_TIMEOUT_MS`).
    pub fn start_with_env(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> RkSmbd {
        RkSmbd::start_full(s, instance, share, users, &[], env, Launch::Plain)
    }

    /// [`RkSmbd::start_with_env`], its log (standard error, `RUST_LOG`
    /// `info` unless `env` says otherwise) written to the file returned.
    pub fn start_logged(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> (RkSmbd, PathBuf) {
        RkSmbd::start_logged_under(s, instance, share, users, env, None)
    }

    /// [`RkSmbd::start_logged`] under a descriptor limit of `nofile` (as
    /// [`RkSmbd::start_with_nofile`]).
    pub fn start_logged_with_nofile(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
        nofile: u64,
    ) -> (RkSmbd, PathBuf) {
        RkSmbd::start_logged_under(s, instance, share, users, env, Some(nofile))
    }

    fn start_logged_under(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> (RkSmbd, PathBuf) {
        let log = s.dir.join(format!("{instance}.log"));
        let file = std::fs::File::create(&log).expect("rksmbd log file");
        let how = Launch::Logged(file, nofile);
        let srv = RkSmbd::start_full(s, instance, share, users, &[], env, how);
        (srv, log)
    }

    /// [`RkSmbd::start`] under a descriptor limit of `nofile` (as
    /// [`Shim::start_with_nofile`]).
    pub fn start_with_nofile(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        nofile: u64,
    ) -> RkSmbd {
        RkSmbd::start_full(s, instance, share, users, &[], &[], Launch::Nofile(nofile))
    }

    fn start_full(
        s: &Scratch,
        instance: &str,
        share: &str,
        users: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
        how: Launch,
    ) -> RkSmbd {
        let file = s.dir.join("users");
        let mut text = String::new();
        for (name, password) in users {
            let out = Command::new(bin("rksmbd"))
                .args(["hash-password", name])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    if let Some(mut i) = c.stdin.take() {
                        writeln!(i, "{password}")?;
                    }
                    c.wait_with_output()
                })
                .expect("rksmbd hash-password");
            assert!(out.status.success(), "rksmbd hash-password failed");
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        write_users_file(&file, text.as_bytes());
        let users_arg = file.to_string_lossy().into_owned();
        let flags = [&["--share", share, "--users", &users_arg][..], extra].concat();
        let mut cmd = match &how {
            Launch::Logged(_, Some(n)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin("rksmbd"));
                c
            }
            _ => Command::new(bin("rksmbd")),
        };
        cmd.envs(env.iter().copied());
        let shim = match how {
            Launch::Nofile(n) => {
                Shim::start_with_nofile("rksmbd", &s.socket(), instance, &flags, n)
            }
            Launch::Plain => Shim::spawn(cmd, &s.socket(), instance, &flags),
            Launch::Logged(f, _) => {
                if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
                    cmd.env("RUST_LOG", "info");
                }
                Shim::spawn_to(cmd, &s.socket(), instance, &flags, Stdio::from(f))
            }
        };
        RkSmbd {
            shim,
            share: share.to_owned(),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> String {
        self.shim
            .addr
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

/// A line-JSON protocol client (smbl/1 or nfsl/1) over TCP.
pub struct LineClient {
    stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
    next: u64,
}

impl LineClient {
    /// Connects.
    pub fn connect(addr: &str) -> LineClient {
        LineClient::over(std::net::TcpStream::connect(addr).expect("connect"))
    }

    /// A client over a connected stream.
    pub fn over(stream: std::net::TcpStream) -> LineClient {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        LineClient {
            stream,
            reader,
            next: 1,
        }
    }

    /// Sends raw bytes and reads one reply line (`None` at EOF).
    pub fn raw(&mut self, bytes: &[u8]) -> Option<Value> {
        self.stream.write_all(bytes).ok()?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// Sends a request with the next `mid` under `id_field` and returns the reply.
    pub fn call_with(&mut self, id_field: &str, mut v: Value) -> Value {
        let id = self.next;
        self.next += 1;
        v[id_field] = Value::from(id);
        let mut line = v.to_string();
        line.push('\n');
        let reply = self.raw(line.as_bytes()).expect("a reply");
        assert_eq!(
            reply[id_field],
            Value::from(id),
            "reply to another request: {reply}"
        );
        reply
    }

    /// The next line the server sends unprompted (a notification).
    pub fn next_line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// Sends a request with the next id under `id_field` without reading
    /// its reply; returns the id.
    pub fn send_only(&mut self, id_field: &str, mut v: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        v[id_field] = Value::from(id);
        let mut line = v.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).expect("send");
        id
    }

    /// The connection (to write or read around the client).
    pub fn stream(&self) -> &std::net::TcpStream {
        &self.stream
    }

    /// How long a read waits (default 60 s); a read that times out is `None`.
    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("timeout");
    }

    /// Reads lines until the reply to `id_field` = `id`, returning it and
    /// the notifications read on the way (`None` at EOF or timeout).
    pub fn reply_to(&mut self, id_field: &str, id: u64) -> Option<(Value, Vec<Value>)> {
        let mut seen = Vec::new();
        loop {
            let v = self.next_line()?;
            if v[id_field] == id {
                return Some((v, seen));
            }
            seen.push(v);
        }
    }

    /// smbl/1: a request with a fresh `mid`.
    pub fn call(&mut self, v: Value) -> Value {
        self.call_with("mid", v)
    }

    /// smbl/1: [`LineClient::call`], but `None` when the connection ends
    /// before the reply (the request's outcome is then unknown).
    pub fn try_call(&mut self, mut v: Value) -> Option<Value> {
        let id = self.next;
        self.next += 1;
        v["mid"] = Value::from(id);
        let mut line = v.to_string();
        line.push('\n');
        let reply = self.raw(line.as_bytes())?;
        assert_eq!(
            reply["mid"],
            Value::from(id),
            "reply to another request: {reply}"
        );
        Some(reply)
    }
}

/// A smbl/1 request sent on a thread of its own while the test goes on
/// (kills filterd, say), whose outcome the test must then get: a reply, or
/// the connection ended. A request that got no answer at all (a hang) or
/// whose thread panicked fails the test — it is not "not acknowledged".
pub struct InFlight {
    rx: std::sync::mpsc::Receiver<Option<Value>>,
    thread: Option<std::thread::JoinHandle<()>>,
    got: Option<Option<Value>>,
}

impl InFlight {
    /// Sends `req` on `c` ([`LineClient::try_call`]) from a new thread.
    pub fn send(mut c: LineClient, req: Value) -> InFlight {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let _ = tx.send(c.try_call(req));
        });
        InFlight {
            rx,
            thread: Some(thread),
            got: None,
        }
    }

    /// Whether its outcome came within `within` (kept for
    /// [`InFlight::outcome`]).
    pub fn early(&mut self, within: Duration) -> bool {
        if self.got.is_none() {
            match self.rx.recv_timeout(within) {
                Ok(r) => self.got = Some(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => self.panicked(),
            }
        }
        self.got.is_some()
    }

    /// Waits up to `timeout` for the outcome: `Some(reply)`, or `None` if
    /// the connection ended first. Panics if no outcome came (a hang) or
    /// the client thread panicked; joins the thread.
    pub fn outcome(mut self, what: &str, timeout: Duration) -> Option<Value> {
        if !self.early(timeout) {
            panic!("{what}: no answer in {timeout:?} (a hang)");
        }
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        self.got.take().flatten()
    }

    fn panicked(&mut self) -> ! {
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Err(e)) => std::panic::resume_unwind(e),
            _ => panic!("the client thread ended without an outcome"),
        }
    }
}

/// Asserts that `r`, smbshim's answer to a request in flight as filterd
/// was killed, is one the kill explains: done (`STATUS_SUCCESS`), or
/// "retry later" because smbshim's connection to filterd was lost.
pub fn assert_answered_across_a_kill(what: &str, r: &Value) {
    let lost = r["status"] == "STATUS_FILE_NOT_AVAILABLE"
        && r["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection to filterd lost"));
    assert!(
        r["status"] == "STATUS_SUCCESS" || lost,
        "{what}: not an answer a kill of filterd explains: {r}"
    );
}

/// Another frontend's client (an in-process frontend `bob-front` of
/// protocol `other`) opens `path` for reading and writing, sharing all,
/// writes `data` at offset 0 and closes it. Its open waits in filterd for
/// whatever it waits for (an open gate, a lease break).
pub fn write_as_another_frontend(socket: &Path, path: &str, data: &[u8]) {
    use std::os::unix::fs::FileExt as _;
    let bob = attach(socket, "other", "bob-front");
    let h = bob
        .open(rw_open_if(path, libfilter::model::Rights::ALL, None))
        .expect("the other frontend's open");
    std::fs::File::from(h.fd)
        .write_all_at(data, 0)
        .expect("the other frontend's write");
    bob.close(h.info.key).expect("the other frontend's close");
}

/// An smbl/1 client's leased open (review rvping 2): a session on
/// smbshim `addr`, `path` opened (open_if) for reading and writing,
/// sharing all, persistent, with an RWH lease under a fresh key, and
/// `A-WROTE!` written.
pub struct LeasedOpen {
    /// The connection.
    pub client: LineClient,
    /// Its session.
    pub session: u64,
    /// The open.
    pub file_id: Value,
    /// Its lease key.
    pub lease_key: String,
    /// The lease's epoch as granted.
    pub epoch: u64,
}

impl LeasedOpen {
    /// Opens it (see [`LeasedOpen`]).
    pub fn start(addr: &str, path: &str) -> LeasedOpen {
        use base64::Engine as _;
        let (mut client, session) = smb_session(addr);
        let lease_key = uuid::Uuid::new_v4().to_string();
        let r = client.call(json!({"cmd": "CREATE", "session_id": session, "path": path,
               "access": ["read", "write"], "share": ["read", "write", "delete"],
               "disposition": "open_if", "lease": {"key": lease_key, "state": "RWH"},
               "durable": {"create_guid": uuid::Uuid::new_v4().to_string(),
                           "persistent": true, "timeout_ms": 60000}}));
        assert_eq!(r["lease"]["state"], "RWH", "{r}");
        let epoch = r["lease"]["epoch"].as_u64().expect("the lease's epoch");
        let file_id = r["file_id"].clone();
        let data = base64::engine::general_purpose::STANDARD.encode("A-WROTE!");
        let w = client.call(
            json!({"cmd": "WRITE", "session_id": session, "file_id": file_id,
                                   "offset": 0, "data": data}),
        );
        assert_eq!(w["status"], "STATUS_SUCCESS", "{w}");
        LeasedOpen {
            client,
            session,
            file_id,
            lease_key,
            epoch,
        }
    }

    /// Once its smbshim reattached after the lease was lowered to `now`
    /// (by another frontend's client writing `theirs`): READs (refused
    /// with the retry status until smbshim has resynced) and checks that
    /// it reads `theirs` and was sent, before, a LEASE_BREAK from RWH to
    /// `now` with no acknowledgment asked, at an epoch past the grant's.
    pub fn assert_told_before_its_read(&mut self, now: &str, theirs: &str) {
        use base64::Engine as _;
        let mut notes = Vec::new();
        let reply = wait_for("the holder's READ", Duration::from_secs(30), || {
            let mid = self.client.send_only(
                "mid",
                json!({"cmd": "READ", "session_id": self.session, "file_id": self.file_id,
                       "offset": 0, "length": 64}),
            );
            let (r, n) = self.client.reply_to("mid", mid).expect("a READ reply");
            notes.extend(n);
            (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
        });
        assert_eq!(reply["status"], "STATUS_SUCCESS", "{reply}");
        let theirs = base64::engine::general_purpose::STANDARD.encode(theirs);
        assert_eq!(reply["data"], theirs, "{reply}");
        let n = notes.first().unwrap_or_else(|| {
            panic!("the holder of RWH read another client's write and was sent no LEASE_BREAK")
        });
        assert_eq!(n["cmd"], "LEASE_BREAK", "{n}");
        assert_eq!(n["lease_key"], self.lease_key.as_str(), "{n}");
        assert_eq!(
            (n["current_state"].as_str(), n["new_state"].as_str()),
            (Some("RWH"), Some(now)),
            "{n}"
        );
        assert_eq!(n["ack_required"], false, "{n}");
        assert!(n["epoch"].as_u64().is_some_and(|e| e > self.epoch), "{n}");
    }
}

/// Sends a smbl/1 request until the answer is not the retry status
/// (smbshim reattaching to a restarted filterd, or re-learning its locks).
pub fn smb_patiently(m: &mut LineClient, req: Value) -> Value {
    wait_for("smbshim to answer", Duration::from_secs(20), || {
        let r = m.call(req.clone());
        (r["status"] != "STATUS_FILE_NOT_AVAILABLE").then_some(r)
    })
}

/// An smbl/1 CREATE of `f` (read and write access, sharing `share`,
/// disposition open) on a new session at `addr`, sent from a thread of
/// its own and again while smbshim answers the retry status: its reply,
/// and when it came. The connection (and the open) goes when the answer
/// has been read.
pub fn smb_open_of_f(addr: &str, share: Value) -> std::sync::mpsc::Receiver<(Value, Instant)> {
    let (mut m, sid) = smb_session(addr);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = smb_patiently(
            &mut m,
            json!({"cmd": "CREATE", "session_id": sid, "path": "f",
                   "access": ["read", "write"], "share": share, "disposition": "open"}),
        );
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// Waits until an open sent to a restarted filterd (`answered`, from
/// [`smb_open_of_f`]) is either answered — `Some` answer — or held by
/// filterd's open gate (a request waiting: `None`).
pub fn answered_or_held(
    d: &Filterd,
    answered: &std::sync::mpsc::Receiver<(Value, Instant)>,
) -> Option<(Value, Instant)> {
    wait_for(
        "the CREATE to be answered or held by filterd",
        Duration::from_secs(20),
        || {
            if let Ok(r) = answered.try_recv() {
                return Some(Some(r));
            }
            let st = d.control().stats().expect("stats");
            (st.requests_waiting >= 1).then_some(None)
        },
    )
}

/// The open of [`smb_open_of_f`] held by a restarted filterd until a
/// frontend resynced, which happened at `resync` or after: it is granted,
/// well before filterd's break timeout in these tests (15 s), so that
/// resync let it in. When it was granted.
pub fn granted_at_the_resync(
    answered: &std::sync::mpsc::Receiver<(Value, Instant)>,
    resync: Instant,
) -> Instant {
    let (r, at) = answered
        .recv_timeout(Duration::from_secs(20))
        .expect("the CREATE's answer");
    assert_eq!(r["status"], "STATUS_SUCCESS", "{r}");
    assert!(
        at - resync < Duration::from_secs(10),
        "the frontend's resync ended the wait, not the 15 s break timeout: {:?}",
        at - resync
    );
    at
}

/// The lock tests' file `f`, made of 100 dots: bytes 10..30 (the locked
/// range) are still dots.
pub fn nothing_landed(s: &Scratch) {
    let bytes = std::fs::read(s.root().join("f")).expect("read f");
    assert_eq!(
        bytes.get(10..30),
        Some(&[b'.'; 20][..]),
        "nothing landed in the lock"
    );
}

/// Strace attached to `pid`, delaying each of `delays` (syscall, µs) at
/// its entry; the trace goes to `trace`.
pub fn slow_syscalls(pid: u32, trace: &std::path::Path, delays: &[(&str, u32)]) -> Strace {
    let names: Vec<&str> = delays.iter().map(|(n, _)| *n).collect();
    let injects: Vec<String> = delays
        .iter()
        .map(|(name, us)| format!("{name}:delay_enter={us}"))
        .collect();
    let injects: Vec<&str> = injects.iter().map(String::as_str).collect();
    Strace::attach(pid, trace, &names, &injects)
}

/// Whether a thread of `pid` is held at the entry of a pwrite64 (18).
pub fn in_pwrite(pid: u32) -> bool {
    in_pwrites(pid) > 0
}

/// How many of `pid`'s threads are in pwrite64 now.
pub fn in_pwrites(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("syscall"))
                        .is_ok_and(|s| s.split(' ').next() == Some("18"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// An nfsl/1 client with its session and slot 0's seqid.
pub struct Nfs {
    /// The connection.
    pub c: LineClient,
    /// Its clientid.
    pub clientid: String,
    /// Its session.
    pub sessionid: String,
    /// Slot 0's last seqid.
    pub seqid: u64,
}

impl Nfs {
    /// EXCHANGE_ID and CREATE_SESSION as `owner` with `verifier`. An
    /// EXCHANGE_ID answered `NFS4ERR_DELAY` (nfsshim not attached to a
    /// restarted filterd yet) is sent again, as a client does, for up to
    /// 10 s.
    pub fn connect(addr: &str, owner: &str, verifier: &str) -> Nfs {
        let mut c = LineClient::connect(addr);
        let r = wait_for(
            "nfsshim to answer EXCHANGE_ID",
            Duration::from_secs(10),
            || {
                let r = c.call_with(
                    "xid",
                    json!({"op": "EXCHANGE_ID", "owner": owner, "verifier": verifier}),
                );
                (r["status"] != "NFS4ERR_DELAY").then_some(r)
            },
        );
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        let clientid = r["clientid"].as_str().unwrap().to_owned();
        let r = c.call_with("xid", json!({"op": "CREATE_SESSION", "clientid": clientid}));
        assert_eq!(r["status"], "NFS4_OK", "{r}");
        assert!(r["slots"].as_u64().unwrap() >= 8);
        Nfs {
            c,
            clientid,
            sessionid: r["sessionid"].as_str().unwrap().to_owned(),
            seqid: 0,
        }
    }

    /// Sends `req` on slot 0 with the next seqid.
    pub fn call(&mut self, req: Value) -> Value {
        self.seqid += 1;
        self.send(req)
    }

    /// Sends `req` with the next seqid, re-sending it (same seqid) while the
    /// answer is NFS4ERR_DELAY, as a client does while nfsshim reattaches.
    pub fn call_patiently(&mut self, req: Value) -> Value {
        self.seqid += 1;
        self.resend_patiently(&req, Duration::from_secs(10))
    }

    /// Re-sends `req` (same slot and seqid) while the answer is
    /// NFS4ERR_DELAY, for up to `timeout`.
    pub fn resend_patiently(&mut self, req: &Value, timeout: Duration) -> Value {
        wait_for("an answer other than DELAY", timeout, || {
            let r = self.send(req.clone());
            (r["status"] != "NFS4ERR_DELAY").then_some(r)
        })
    }

    /// Sends `req` on slot 0 with the current seqid: its answer, and the
    /// lines (callbacks) sent on the same connection before it and right
    /// behind it ([`Nfs::send_around`]).
    pub fn send_seeing(&mut self, req: &Value) -> (Value, Vec<Value>) {
        let (mut seen, r, behind) = self.send_around(req);
        seen.extend(behind);
        (r, seen)
    }

    /// Sends `req` on slot 0 with the current seqid: the lines (callbacks)
    /// sent on the same connection before its answer, the answer, and
    /// those sent behind it before the answer to a request sent next (a
    /// line with no op, answered NFS4ERR_INVAL at once: requests on a
    /// connection are answered in order, so nothing is waited for).
    pub fn send_around(&mut self, req: &Value) -> (Vec<Value>, Value, Vec<Value>) {
        let mut req = req.clone();
        req["seq"] = json!({"sessionid": self.sessionid, "slot": 0, "seqid": self.seqid});
        let id = self.c.send_only("xid", req);
        let fence = self.c.send_only("xid", json!({"op": ""}));
        let (r, before) = self.c.reply_to("xid", id).expect("the answer");
        let (f, behind) = self.c.reply_to("xid", fence).expect("the fence's answer");
        assert_eq!(f["status"], "NFS4ERR_INVAL", "{f}");
        (before, r, behind)
    }

    /// Sends `req` on slot 0 with the current seqid (a re-send).
    pub fn send(&mut self, mut req: Value) -> Value {
        req["seq"] = json!({"sessionid": self.sessionid, "slot": 0, "seqid": self.seqid});
        self.c.call_with("xid", req)
    }

    /// OPEN with `extra` fields merged in.
    pub fn open(
        &mut self,
        owner: &str,
        path: &str,
        access: &str,
        deny: &str,
        extra: Value,
    ) -> Value {
        let mut req =
            json!({"op": "OPEN", "owner": owner, "path": path, "access": access, "deny": deny});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                req[k] = v;
            }
        }
        self.call(req)
    }
}

/// `filterctl expire KEY` through the scratch dir's default socket, once
/// filterd has let the handle's frontend go. filterd expires only
/// disconnected handles, and detaches a killed frontend's on its own
/// time: its poller sees the connection end, then the engine detaches
/// them (`on_closed`), after the kill has returned. Refused as still
/// connected, the expire is asked again (a refusal changes nothing) for
/// up to 10 s; any other refusal fails at once.
pub fn expire_once_detached(s: &Scratch, key: &str) {
    let sock = s.socket().display().to_string();
    wait_for(
        &format!("filterd to detach handle {key} and expire it"),
        Duration::from_secs(10),
        || {
            let out = filterctl(&["--socket", &sock, "expire", key]);
            if out.code == 0 {
                return Some(());
            }
            assert!(out.stderr.contains("is connected"), "{}", out.stderr);
            None
        },
    );
}

/// filterd's handles of `path` (through the scratch dir's default socket):
/// (resume key, access as JSON text).
pub fn handles_on(s: &Scratch, path: &str) -> Vec<(String, String)> {
    let sock = s.socket().display().to_string();
    let handles = filterctl(&["--socket", &sock, "handles", "--json"]).json();
    handles
        .as_array()
        .expect("a list")
        .iter()
        .filter(|h| h["path"] == path)
        .map(|h| {
            (
                h["key"].as_str().unwrap_or("").to_owned(),
                h["access"].to_string(),
            )
        })
        .collect()
}

/// `strace` attached to a running process (all its threads, and those it
/// starts), tracing `syscalls` into a file and injecting faults or delays
/// (`-e inject=SPEC` for each of `injects`, e.g.
/// `fsync:error=EIO:delay_enter=3000000:when=1`). Detaches when dropped.
pub struct Strace(Child);

impl Strace {
    /// Attaches to `pid` and waits until every thread of it is traced.
    pub fn attach(pid: u32, trace: &Path, syscalls: &[&str], injects: &[&str]) -> Strace {
        Strace::attach_with(pid, trace, syscalls, injects, &[])
    }

    /// [`Strace::attach`] with strace's `flags` besides (e.g. `-yy`:
    /// descriptors printed with their paths and sockets' addresses).
    pub fn attach_with(
        pid: u32,
        trace: &Path,
        syscalls: &[&str],
        injects: &[&str],
        flags: &[&str],
    ) -> Strace {
        let strace = ["/usr/bin/strace", "/bin/strace"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("strace is not installed: `apt-get install strace` (.ci/run installs it)");
        let mut cmd = Command::new(strace);
        cmd.args(["-f", "-qq"])
            .args(flags)
            .arg("-o")
            .arg(trace)
            .args(["-e", &format!("trace={}", syscalls.join(","))]);
        for i in injects {
            cmd.args(["-e", &format!("inject={i}")]);
        }
        let child = cmd
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strace");
        let t = Strace(child);
        wait_for("strace to attach", Duration::from_secs(30), || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let mut all = true;
            for t in tasks.flatten() {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                all &= status
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0");
            }
            all.then_some(())
        });
        t
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the thread of `pid` named `name` is held at the entry of a
/// system call whose result a [`Strace`] injects: strace has replaced the
/// call's number with -1 (`/proc/PID/task/TID/syscall`) for the delay.
pub fn held_in_injected_syscall(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
                && std::fs::read_to_string(t.path().join("syscall"))
                    .is_ok_and(|s| s.split(' ').next() == Some("-1"))
        })
    })
}

/// Which of `trusted.NAME` and `user.NAME` the file at `path` carries
/// (`rkfilter.create`, `rkfilter.intent`: the filter's markers).
pub fn markers_on(path: &Path, name: &str) -> Vec<String> {
    use std::os::fd::AsFd;
    let f = std::fs::File::open(path).expect("open for its attributes");
    ["trusted.", "user."]
        .into_iter()
        .map(|ns| format!("{ns}{name}"))
        .filter(|n| {
            let c = std::ffi::CString::new(n.as_str()).expect("a name without NUL");
            libfilter::sys::get_xattr(f.as_fd(), &c)
                .ok()
                .flatten()
                .is_some()
        })
        .collect()
}

/// Pins the calling thread — and the processes it spawns from now on,
/// which inherit it — to CPU 0: a thread that wakes another then
/// usually loses the CPU to it at once, which makes such races the rule.
pub fn pin_to_cpu0() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("CPU 0 is in range");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("sched_setaffinity");
}

#[cfg(test)]
mod tests {
    use super::{MountSlot, MOUNTED_AT_ONCE};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Six threads after a place each, one of them twice over: never more
    /// than MOUNTED_AT_ONCE hold one, and a thread that already holds a
    /// place gets a second without waiting (no deadlock between two
    /// threads each holding one and wanting another).
    #[test]
    fn no_more_than_two_mounted_tests_at_once() {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let (now, most) = (now.clone(), most.clone());
                std::thread::spawn(move || {
                    let _first = MountSlot::take();
                    let _second = (i % 2 == 0).then(MountSlot::take);
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    now.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a slot holder panicked");
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= MOUNTED_AT_ONCE, "{most} held a place at once");
    }
}
