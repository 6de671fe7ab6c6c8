//! Shared helpers for the integration tests of the `livemig` binary: starting `livemig vm`
//! processes with a QMP client, the small guest every test uses, reading what a user reads
//! (run state, RAM checksums, bitmap hashes, vCPU steps, events), and a unix listener whose
//! connects hang.
//!
//! Every wait polls with a deadline instead of sleeping for a fixed time, so the suite stays
//! fast on a loaded 2-core CI machine and a hang fails the test with what was seen.
#![allow(dead_code)] // each test binary uses a different subset

pub mod postcopy;

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{QmpClient, VmProcess};

/// Longest any single wait in these tests may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A 64 MiB null-co disk `d0` (as in QEMU, `size` takes an integer, not `64M`).
pub const DISK: &str = "driver=null-co,node-name=d0,size=67108864";

/// The guest every migration test uses: 64 MiB, two vCPUs, the disk [`DISK`].
pub const GUEST: &[&str] = &["-m", "64M", "-smp", "2", "-blockdev", DISK];

/// A busy guest: fills 32 MiB, then keeps rewriting a 4 MiB hot set at up to 64 MiB/s and
/// writes to `d0` (which dirties its bitmaps).
pub const BUSY: &str = "fill=32M,hot=4M,dirty-rate=64M,disk=d0";

/// An idle guest: fills 32 MiB once and then writes nothing (no hot set, no disk), so its RAM
/// and bitmaps only change when the test changes them.
pub const IDLE: &str = "fill=32M,hot=0";

/// Pages the [`IDLE`] and [`BUSY`] workloads fill.
pub const FILL_PAGES: u64 = (32 << 20) / 4096;

/// A `livemig vm` process and a QMP client connected to it.
pub struct Lm {
    /// The process (killed when dropped).
    pub proc: VmProcess,
    /// Its monitor.
    pub qmp: QmpClient,
    /// The name it was started with (for messages).
    pub name: String,
}

/// Path of the binary under test.
pub fn livemig() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livemig"))
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl Lm {
    /// Starts `livemig vm ARGS -qmp unix:DIR/NAME.qmp,...` and connects to its monitor.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Lm {
        let mut all = vec!["vm".to_string(), "-name".into(), name.into()];
        all.extend(strs(args));
        let bin = livemig();
        let mut proc = VmProcess::spawn(&bin.display().to_string(), &all, dir, name)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // Fail at once, with its message, if the process rejects its command line.
        let deadline = Instant::now() + TIMEOUT;
        while !proc.qmp_path.exists() {
            assert!(proc.alive(), "{name} exited at start-up: {}", proc.log());
            assert!(
                Instant::now() < deadline,
                "{name} made no QMP socket: {}",
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let qmp = proc.qmp();
        Lm {
            proc,
            qmp,
            name: name.to_string(),
        }
    }

    /// A source: [`GUEST`] running `workload`.
    pub fn source(dir: &Path, name: &str, workload: &str) -> Lm {
        let mut a = GUEST.to_vec();
        a.extend(["-workload", workload]);
        Lm::start(dir, name, &a)
    }

    /// A destination: [`GUEST`] with `-incoming URI -S`, so it stays paused at the stop
    /// point after the migration.
    pub fn destination(dir: &Path, name: &str, incoming: &str) -> Lm {
        let mut a = GUEST.to_vec();
        a.extend(["-incoming", incoming, "-S"]);
        Lm::start(dir, name, &a)
    }

    /// A command that must succeed; its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        match self.qmp.execute(cmd, args.clone()) {
            Ok(r) => match r.get("return") {
                Some(v) => v.clone(),
                None => panic!(
                    "{}: {cmd} {args} failed: {r}\nlog:\n{}",
                    self.name,
                    self.proc.log()
                ),
            },
            Err(e) => panic!(
                "{}: {cmd} {args}: {e}\nlog:\n{}",
                self.name,
                self.proc.log()
            ),
        }
    }

    /// A command that must fail; its error `desc`.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        self.qmp.err(cmd, args)
    }

    /// Waits for the migration to end: it must have `failed`. Returns its error.
    pub fn migration_failed(&mut self) -> String {
        let r = self.wait_migration(&["failed", "completed", "cancelled"]);
        assert_eq!(
            r["status"],
            "failed",
            "{}: {r}\n{}",
            self.name,
            self.proc.log()
        );
        r["error-desc"].as_str().unwrap_or_default().to_string()
    }

    /// A source's attempt [failed](Self::migration_failed) with an error containing `want`,
    /// and its guest runs on.
    pub fn failed_and_runs(&mut self, want: &str) {
        let e = self.migration_failed();
        assert!(e.contains(want), "source: '{e}' lacks '{want}'");
        assert_eq!(self.status(), "running", "the source runs on");
    }

    /// `query-status`'s `status`, checking that `running` agrees with it.
    pub fn status(&mut self) -> String {
        let r = self.ok("query-status", json!({}));
        let st = r["status"].as_str().unwrap_or_default().to_string();
        assert_eq!(r["running"], json!(st == "running"), "{}: {r}", self.name);
        st
    }

    /// Turns the named capabilities on.
    pub fn caps_on(&mut self, caps: &[&str]) {
        self.set_caps(&caps.iter().map(|c| (*c, true)).collect::<Vec<_>>());
    }

    /// `migrate-set-capabilities`.
    pub fn set_caps(&mut self, caps: &[(&str, bool)]) {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.ok("migrate-set-capabilities", json!({ "capabilities": list }));
    }

    /// `migrate-set-parameters`.
    pub fn set_params(&mut self, params: Value) {
        self.ok("migrate-set-parameters", params);
    }

    /// `migrate URI`, which must be accepted.
    pub fn migrate(&mut self, uri: &str) {
        self.ok("migrate", json!({ "uri": uri }));
    }

    /// Polls `query-migrate` until its status is one of `statuses`; returns the reply.
    pub fn wait_migration(&mut self, statuses: &[&str]) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.ok("query-migrate", json!({}));
            let s = r["status"].as_str().unwrap_or_default();
            if statuses.contains(&s) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: migration did not reach {statuses:?}: {r}\nlog:\n{}",
                    self.name,
                    self.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a destination whose incoming migration failed to exit as QEMU 7.2's does:
    /// status 1, with `load of migration failed: ERROR` on stderr. Returns ERROR.
    pub fn wait_load_failed(&mut self) -> String {
        let code = self.proc.wait_exit(TIMEOUT);
        let log = self.proc.log();
        assert_eq!(code, Some(1), "{}: exit status; log:\n{log}", self.name);
        load_failure(&log).unwrap_or_else(|| {
            panic!(
                "{}: no 'load of migration failed' on stderr:\n{log}",
                self.name
            )
        })
    }

    /// How a destination's incoming migration ended: `Ok(query-migrate)` once `completed`,
    /// or `Err(the error)` once its load failed and it exited ([`Lm::wait_load_failed`]).
    pub fn incoming_outcome(&mut self) -> Result<Value, String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.qmp.execute("query-migrate", json!({}));
            match r.ok().and_then(|r| r.get("return").cloned()) {
                Some(r) if r["status"] == "completed" => return Ok(r),
                Some(r) if r["status"] != "failed" => {}
                // Failed, or the monitor already went away with the process.
                _ => return Err(self.wait_load_failed()),
            }
            assert!(
                Instant::now() < deadline,
                "{}: the incoming migration did not end\nlog:\n{}",
                self.name,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `query-status` until the run state is `status`.
    pub fn wait_runstate(&mut self, status: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let st = self.status();
            if st == status {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: run state did not become {status}: {st}\nlog:\n{}",
                    self.name,
                    self.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the migration to end and checks it completed.
    pub fn wait_completed(&mut self) -> Value {
        let r = self.wait_migration(&["completed", "failed", "cancelled"]);
        assert_eq!(
            r["status"],
            "completed",
            "{}: {r}\nlog:\n{}",
            self.name,
            self.proc.log()
        );
        r
    }

    /// The TCP port a destination listens on (`query-migrate`'s `socket-address`).
    pub fn incoming_port(&mut self) -> u16 {
        let r = self.ok("query-migrate", json!({}));
        r.pointer("/socket-address/0/port")
            .and_then(Value::as_str)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{}: no listening port in {r}", self.name))
    }

    /// `x-livemig-ram-checksum`.
    pub fn ram_checksum(&mut self) -> Value {
        self.ok("x-livemig-ram-checksum", json!({}))["checksum"].clone()
    }

    /// `x-livemig-verify-ram`.
    pub fn verify_ram(&mut self) -> Value {
        self.ok("x-livemig-verify-ram", json!({}))
    }

    /// Each vCPU's `steps` from `x-livemig-query-vm`.
    pub fn steps(&mut self) -> Vec<u64> {
        let r = self.ok("x-livemig-query-vm", json!({}));
        r["vcpus"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no vcpus in {r}", self.name))
            .iter()
            .map(|v| v["steps"].as_u64().unwrap_or_default())
            .collect()
    }

    /// Waits until an [`IDLE`] workload has filled its pages and stopped writing.
    pub fn wait_idle(&mut self) {
        self.wait_idle_after(FILL_PAGES);
    }

    /// Waits until a workload without a hot set has written its `fill_pages` and stopped
    /// writing.
    pub fn wait_idle_after(&mut self, fill_pages: u64) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        loop {
            let r = self.ok("x-livemig-query-vm", json!({}));
            let written = r["pages-written"].as_u64().unwrap_or_default();
            if written >= fill_pages && last == Some(written) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still writing: {r}",
                self.name
            );
            last = Some(written);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the workload has written at least its fill (a busy guest goes on writing
    /// its hot set).
    pub fn wait_filled(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.ok("x-livemig-query-vm", json!({}));
            if r["pages-written"].as_u64().unwrap_or_default() >= FILL_PAGES {
                return;
            }
            assert!(Instant::now() < deadline, "{}: not filled: {r}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every vCPU has taken more steps than in `before`.
    pub fn wait_steps_beyond(&mut self, before: &[u64]) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = self.steps();
            assert_eq!(now.len(), before.len(), "{}", self.name);
            if now.iter().zip(before).all(|(a, b)| a > b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the guest does not run: steps {before:?} -> {now:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `block-dirty-bitmap-add` on `d0`.
    pub fn add_bitmap(&mut self, name: &str) {
        self.ok(
            "block-dirty-bitmap-add",
            json!({"node": "d0", "name": name, "granularity": 65536}),
        );
    }

    /// `x-debug-block-dirty-bitmap-sha256` of a bitmap on `d0`.
    pub fn bitmap_sha(&mut self, name: &str) -> String {
        let r = self.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "d0", "name": name}),
        );
        r["sha256"].as_str().unwrap_or_default().to_string()
    }

    /// The `dirty-bitmaps` entry of a bitmap on `d0` in `query-named-block-nodes`.
    pub fn bitmap_info(&mut self, name: &str) -> Value {
        let r = self.ok("query-named-block-nodes", json!({}));
        r.as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["node-name"] == "d0")
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{}: no bitmap {name} on d0 in {r}", self.name))
    }

    /// Waits until bitmap `name` on `d0` has a dirty bit: the guest has written to its disk
    /// (a busy guest does so every few hundred steps, which a loaded machine can delay).
    pub fn wait_bitmap_dirty(&mut self, name: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.bitmap_info(name);
            if info["count"].as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {name} stays clean: {info}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `qemu-io d0 "CMD"` through the human monitor; returns the reply followed by what
    /// the process printed meanwhile (qemu-io prints on the process's standard output, as
    /// QEMU's does, and the reply comes after it).
    pub fn qemu_io(&mut self, cmd: &str) -> String {
        let before = self.proc.log().len();
        let out = self.ok(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io d0 \"{cmd}\"") }),
        );
        let log = self.proc.log();
        format!(
            "{}{}",
            out.as_str().unwrap_or_default(),
            log.get(before..).unwrap_or_default()
        )
    }

    /// Takes the queued events up to and including the first one for which `pred` holds,
    /// waiting for it if it has not arrived yet.
    pub fn events_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        if let Some(i) = self.qmp.events.iter().position(&pred) {
            return self.qmp.events.drain(..=i).collect();
        }
        let Some(last) = self.qmp.wait_event(TIMEOUT, &pred) else {
            panic!(
                "{}: the awaited event did not come; got {:?}",
                self.name, self.qmp.events
            );
        };
        // Everything read while waiting came before `last`.
        let mut all: Vec<Value> = self.qmp.events.drain(..).collect();
        all.push(last);
        all
    }

    /// The `MIGRATION` statuses (and `STOP`/`RESUME`) up to the `MIGRATION` event with status
    /// `last`, in order; `MIGRATION_PASS` and other events are left out.
    pub fn migration_events_until(&mut self, last: &str) -> Vec<String> {
        self.events_until(|e| e["event"] == "MIGRATION" && e["data"]["status"] == last)
            .iter()
            .filter_map(|e| match e["event"].as_str() {
                Some("MIGRATION") => e["data"]["status"].as_str().map(String::from),
                Some(n @ ("STOP" | "RESUME")) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    }
}

/// The error of `livemig: load of migration failed: ERROR` in a destination's stderr.
pub fn load_failure(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("livemig: load of migration failed: "))
        .map(String::from)
}

/// Checks what a user checks at the stop point of a completed migration: both ends report
/// `completed`, the source is `postmigrate` and the destination (`-S`) `paused`, their RAM is
/// identical and the destination's verifies page by page, every bitmap in `bitmaps` hashes the
/// same on both ends, and the vCPUs stopped at the same step. Returns the destination's
/// `x-livemig-verify-ram` report.
pub fn check_stop_point(src: &mut Lm, dst: &mut Lm, bitmaps: &[&str]) -> Value {
    src.wait_completed();
    dst.wait_completed();
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    let sum = src.ram_checksum();
    assert_eq!(sum, dst.ram_checksum(), "RAM differs at the stop point");
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert_eq!(
        v,
        src.verify_ram(),
        "RAM verification differs between the ends"
    );
    for b in bitmaps {
        let info = src.bitmap_info(b);
        assert!(
            info["count"].as_u64().unwrap_or(0) > 0,
            "bitmap {b} is empty: {info}"
        );
        assert_eq!(src.bitmap_sha(b), dst.bitmap_sha(b), "bitmap {b} differs");
        assert_eq!(info["count"], dst.bitmap_info(b)["count"], "bitmap {b}");
    }
    assert_eq!(
        src.steps(),
        dst.steps(),
        "vCPU state differs at the stop point"
    );
    v
}

/// `cont` on a destination paused at the stop point: the guest carries on from there.
pub fn check_carries_on(dst: &mut Lm) {
    let before = dst.steps();
    dst.ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
    dst.wait_steps_beyond(&before);
}

/// A unix listener that never accepts, with a backlog of zero already filled by one waiting
/// client: the next connect to `path` blocks, as towards a destination that does not answer.
/// Keep both values alive for as long as connects should hang.
pub fn hanging_listener(path: &Path) -> (OwnedFd, UnixStream) {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &UnixAddr::new(path).expect("address")).expect("bind");
    listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
    let filler = UnixStream::connect(path).expect("filler connect");
    (fd, filler)
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    testkit::tempdir()
}

/// `unix:DIR/NAME`.
pub fn unix_uri(dir: &Path, name: &str) -> String {
    format!("unix:{}", dir.join(name).display())
}

/// `downtime-limit` of [`downtime_behind_a_slow_link`], in ms.
pub const SLOW_LINK_LIMIT_MS: u64 = 100;

/// An [`IDLE`] guest migrated over TCP through testkit's relay held to `link` bytes per
/// second (every connection together), with `downtime-limit` [`SLOW_LINK_LIMIT_MS`], `max-bandwidth` lifted,
/// the return path on, and with `channels` > 0 multifd with that many channels. Whatever the
/// source writes beyond what the link has carried waits in the sockets' buffers: megabytes,
/// seconds of this link. Checks the stop point and returns the source's `query-migrate`.
pub fn downtime_behind_a_slow_link(channels: u64, link: u64) -> Value {
    use testkit::relay::{Plan, Relay, Target};
    let dir = tempdir();
    let mut caps = vec!["events", "return-path"];
    if channels > 0 {
        caps.push("multifd");
    }
    let mut dst = Lm::destination(dir.path(), "dst", "tcp:127.0.0.1:0");
    dst.caps_on(&caps);
    let port = dst.incoming_port();
    let relay = Relay::tcp(
        Target::Tcp(([127, 0, 0, 1], port).into()),
        Plan::none().throttled(link),
    );
    let mut src = Lm::source(dir.path(), "src", IDLE);
    src.caps_on(&caps);
    src.set_params(json!({
        "downtime-limit": SLOW_LINK_LIMIT_MS,
        "max-bandwidth": 8u64 << 30,
    }));
    if channels > 0 {
        for lm in [&mut src, &mut dst] {
            lm.set_params(json!({ "multifd-channels": channels }));
        }
    }
    src.wait_filled();
    src.migrate(&relay.uri);
    check_stop_point(&mut src, &mut dst, &[]);
    let q = src.ok("query-migrate", json!({}));
    eprintln!(
        "{channels} channel(s), link {link} B/s: downtime {} ms, total {} ms, {} passes",
        q["downtime"], q["total-time"], q["ram"]["dirty-sync-count"]
    );
    q
}
