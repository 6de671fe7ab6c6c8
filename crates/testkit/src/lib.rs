//! Test support shared by the workspace's integration tests: the rule for skipping tests whose
//! tools are missing, a QEMU process with a QMP socket, a small blocking QMP client, and a
//! seeded generator (`rng`).
//!
//! The skip rule matters in CI: `.ci/run` installs QEMU, so there a missing tool is a broken
//! machine, not a reason to skip. When the `CI` environment variable is set, [`require`] fails
//! the test instead of skipping it.
#![forbid(unsafe_code)]

pub mod pki;
pub mod relay;
pub mod rng;
pub mod tls_wire;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a test cannot run here, or `None` when it can.
pub type Missing = Option<String>;

/// Checks that every named program is on `PATH`.
pub fn programs(names: &[&str]) -> Missing {
    for n in names {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(n).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{n} is not installed"));
        }
    }
    None
}

/// Checks that `qemu-system-x86_64`, `qemu-img` and `qemu-io` are installed and are 7.2, the
/// version the interop tests are written against.
pub fn qemu() -> Missing {
    if let Some(m) = programs(&["qemu-system-x86_64", "qemu-img", "qemu-io"]) {
        return Some(m);
    }
    let out = Command::new("qemu-system-x86_64").arg("--version").output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("version 7.2") => None,
        Ok(o) => Some(format!(
            "qemu-system-x86_64 is not QEMU 7.2: {}",
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
        )),
        Err(e) => Some(format!("qemu-system-x86_64 does not run: {e}")),
    }
}

/// Checks that python3 can import the `qemu.qmp` client.
pub fn python_qmp() -> Missing {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        None
    } else {
        Some("python3 module qemu.qmp is not installed (pip install qemu.qmp)".into())
    }
}

/// Checks that `/dev/kvm` can be opened read-write.
pub fn kvm() -> Missing {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable: {e}")),
    }
}

/// Returns true when the test may run. Otherwise prints why it is skipped and returns false —
/// or, under CI (`CI` set), panics, because CI installs everything the tests need.
pub fn require(test: &str, missing: Missing) -> bool {
    match missing {
        None => true,
        Some(why) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: cannot run under CI: {why}");
            }
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

/// The QMP client of the tree ([`qmp::Client`]) with what tests add to it: commands that must
/// succeed or fail (a test fails otherwise), waiting for a migration state, HMP as text. It
/// dereferences to the client (`execute`, `wait_event`, `events`, `greeting`).
pub struct QmpClient(qmp::Client);

impl std::ops::Deref for QmpClient {
    type Target = qmp::Client;
    fn deref(&self) -> &qmp::Client {
        &self.0
    }
}

impl std::ops::DerefMut for QmpClient {
    fn deref_mut(&mut self) -> &mut qmp::Client {
        &mut self.0
    }
}

impl QmpClient {
    /// Connects, retrying until `timeout` while the server creates its socket, and
    /// negotiates; a reply that takes more than two minutes fails the test rather than hang it.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let mut c = qmp::Client::connect(path, timeout)?;
        c.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(QmpClient(c))
    }

    /// Sends a command that must succeed and returns its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let r = self
            .execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"));
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{cmd} {args} failed: {r}"),
        }
    }

    /// Sends a command that must fail and returns its error `desc`.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        let r = self
            .execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"));
        match r.pointer("/error/desc").and_then(Value::as_str) {
            Some(d) => d.to_string(),
            None => panic!("{cmd} {args} was expected to fail: {r}"),
        }
    }

    /// Polls `query-migrate` until its status is one of `statuses`, returning the last reply.
    pub fn wait_migration(&mut self, statuses: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.ok("query-migrate", json!({}));
            let s = r.get("status").and_then(Value::as_str).unwrap_or("");
            if statuses.contains(&s) {
                return r;
            }
            if Instant::now() > deadline {
                panic!("migration did not reach {statuses:?} in {timeout:?}: {r}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a human monitor command and returns its text output.
    pub fn hmp(&mut self, cmdline: &str) -> String {
        self.ok("human-monitor-command", json!({ "command-line": cmdline }))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A child process (QEMU or livemig) with a QMP socket, killed when dropped.
pub struct VmProcess {
    /// The child.
    pub child: Child,
    /// Where its QMP socket lives.
    pub qmp_path: PathBuf,
    /// Its stderr, captured to a file so failures can be shown.
    pub log_path: PathBuf,
}

impl VmProcess {
    /// Starts `program` with `args`, appending `-qmp unix:<dir>/<name>.qmp,server=on,wait=off`,
    /// with stdout/stderr sent to `<dir>/<name>.log`.
    pub fn spawn(program: &str, args: &[String], dir: &Path, name: &str) -> std::io::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        Ok(VmProcess {
            child,
            qmp_path,
            log_path,
        })
    }

    /// Starts QEMU 7.2's `-M none` machine (RAM and disks, no CPU) with `extra` arguments
    /// appended. Debian's QEMU 7.2 has no qtest accelerator, and qtest memory writes need a CPU
    /// that `-M none` cannot have on x86, so tests put data into QEMU's RAM with `-device
    /// loader` (applied at start-up and again by `system_reset`) or by migrating it in.
    pub fn qemu_none(dir: &Path, name: &str, extra: &[String]) -> std::io::Result<Self> {
        let mut args: Vec<String> = [
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        Self::spawn("qemu-system-x86_64", &args, dir, name)
    }

    /// Connects a QMP client to this process.
    pub fn qmp(&self) -> QmpClient {
        QmpClient::connect(&self.qmp_path, Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "cannot connect to {}: {e}\nlog:\n{}",
                self.qmp_path.display(),
                self.log()
            )
        })
    }

    /// Everything the process wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temporary directory for one test (removed when dropped).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("livemig-test-")
        .tempdir()
        .expect("tempdir")
}

/// Path of the `livemig` binary built by cargo for integration tests of the `livemig` crate;
/// other crates' tests locate it under the target directory.
pub fn livemig_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_livemig") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/test-binary -> target/<profile>/livemig
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    profile_dir.join("livemig")
}

/// A TCP port on 127.0.0.1 that refuses connections for as long as this lives: a socket is
/// bound to it but never listens, so a connect gets `ECONNREFUSED` and no other test can
/// take the port meanwhile (a port merely found free can be reused by a parallel test).
pub struct RefusedPort {
    /// Held, never read: while it is open the port stays bound and not listening.
    _socket: std::os::fd::OwnedFd,
    port: u16,
}

impl RefusedPort {
    /// Binds a fresh socket to an ephemeral port on 127.0.0.1.
    pub fn new() -> RefusedPort {
        use nix::sys::socket::{
            bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let fd_ref = std::os::fd::AsRawFd::as_raw_fd(&fd);
        bind(fd_ref, &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind");
        let port = getsockname::<SockaddrIn>(fd_ref)
            .expect("getsockname")
            .port();
        RefusedPort { _socket: fd, port }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for RefusedPort {
    fn default() -> Self {
        RefusedPort::new()
    }
}
