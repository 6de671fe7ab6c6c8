//! One whole migration between two `livemig vm` processes, driven over QMP the way a
//! management tool drives QEMU: start the destination with `-incoming` and `-S`, start the
//! source with a workload, enable capabilities on both, migrate, watch `query-migrate`, then
//! compare both ends at the stop point. `demo` and `bench` are built on it.

use qmp::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The transport between the two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Loopback TCP.
    Tcp,
    /// A unix socket.
    Unix,
}

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// vCPUs running the workload.
    pub vcpus: u32,
    /// Bytes of RAM the guest fills before the migration starts.
    pub fill: u64,
    /// Bytes the guest keeps rewriting (0: idle after the fill).
    pub hot: u64,
    /// Cap on the guest's dirtying rate in bytes per second (0: none).
    pub dirty_rate: u64,
    /// Size of the disk carrying a dirty bitmap the guest writes to (0: no disk).
    pub disk: u64,
    /// KVM vCPUs (`-accel kvm`) on both ends instead of software ones.
    pub kvm: bool,
    /// The transport.
    pub transport: Transport,
    /// `downtime-limit` in ms.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth` in bytes/s (0: no limit).
    pub max_bandwidth: u64,
    /// Compare RAM, bitmaps and vCPU state at the stop point, and check the guest resumes.
    pub verify: bool,
    /// Start the destination with `-mem-prealloc` (its RAM allocated before the migration, so
    /// the load pays no page faults).
    pub dst_prealloc: bool,
    /// Postcopy: `migrate-start-postcopy` right after `migrate`, and the destination runs its
    /// guest as soon as postcopy starts (its vCPUs pull the pages they touch).
    pub postcopy: bool,
    /// With `postcopy`: capability `postcopy-preempt` on both ends.
    pub preempt: bool,
    /// Capability `multifd` with this many channels on both ends (0: one stream).
    pub multifd_channels: u8,
    /// With multifd: `multifd-compression` (`none`, `zlib`, `zstd`) on both ends.
    pub multifd_compression: String,
    /// With multifd: capability `zero-copy-send` on the source.
    pub zero_copy: bool,
    /// TLS: the directory both ends load `tls-creds-x509` from (tcp only: the source checks
    /// the destination's certificate against 127.0.0.1).
    pub tls_creds: Option<std::path::PathBuf>,
    /// TLS with a pre-shared key: the directory both ends load `tls-creds-psk` from (its
    /// `keys.psk` has the line of the source's username, `qemu`).
    pub tls_psk: Option<std::path::PathBuf>,
    /// Capability `x-livemig-integrity` on both ends.
    pub integrity: bool,
}

impl Default for Scenario {
    /// A 1 GiB guest that fills all its RAM and then idles, no disk, over loopback TCP, with
    /// QEMU's downtime limit and no bandwidth cap.
    fn default() -> Self {
        Scenario {
            ram: 1 << 30,
            vcpus: 1,
            fill: u64::MAX,
            hot: 0,
            dirty_rate: 0,
            disk: 0,
            kvm: false,
            transport: Transport::Tcp,
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            verify: false,
            dst_prealloc: false,
            postcopy: false,
            preempt: false,
            multifd_channels: 0,
            multifd_compression: "none".into(),
            zero_copy: false,
            tls_creds: None,
            tls_psk: None,
            integrity: false,
        }
    }
}

/// Figures and findings of one migration.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// `total-time` in ms.
    pub total_ms: u64,
    /// `downtime` in ms.
    pub downtime_ms: u64,
    /// `setup-time` in ms.
    pub setup_ms: u64,
    /// Bytes sent.
    pub transferred: u64,
    /// Normal pages sent.
    pub normal: u64,
    /// Zero pages sent.
    pub duplicate: u64,
    /// Dirty-log synchronisations (passes).
    pub passes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Verification lines (what was compared and the result), when asked for.
    pub checks: Vec<(String, String, bool)>,
    /// Postcopy: the destination's `x-livemig-postcopy` (page requests, fault → placement
    /// latency, blocktime in ns) and QEMU's `postcopy-blocktime` (ms).
    pub postcopy: Option<Value>,
}

impl Outcome {
    /// Bytes per second over the whole migration.
    pub fn throughput(&self) -> f64 {
        self.transferred as f64 / (self.total_ms.max(1) as f64 / 1000.0)
    }

    /// Whether every check passed (true when none were made).
    pub fn verified(&self) -> bool {
        self.checks.iter().all(|(_, _, ok)| *ok)
    }
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two running VM processes and their monitors.
pub struct Pair {
    dir: PathBuf,
    src: Proc,
    dst: Proc,
    /// The source's monitor.
    pub src_qmp: Client,
    /// The destination's monitor.
    pub dst_qmp: Client,
    /// The migration URI.
    pub uri: String,
    /// Switch to postcopy right after the migration starts.
    postcopy: bool,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.src_qmp.call("quit", json!({}));
        let _ = self.dst_qmp.call("quit", json!({}));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Human-readable binary size.
pub fn size(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> Result<Proc, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the livemig binary: {e}"))?;
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .arg("vm")
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().map_err(|e| e.to_string())?)
        .stderr(f)
        .spawn()
        .map_err(|e| format!("cannot start the {name} VM: {e}"))?;
    Ok(Proc { child, log })
}

impl Pair {
    /// Starts both VMs and prepares them (capabilities, parameters, the bitmap).
    pub fn start(sc: &Scenario) -> Result<Pair, String> {
        if sc.tls_creds.is_some() && sc.transport != Transport::Tcp {
            return Err("--tls-creds needs --transport tcp: the source checks the \
                        destination's certificate against 127.0.0.1"
                .into());
        }
        let dir = std::env::temp_dir().join(format!("livemig-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let common = |name: &str| -> Vec<String> {
            let mut a: Vec<String> = vec![
                "-name".into(),
                name.into(),
                "-m".into(),
                format!("{}k", sc.ram >> 10),
                "-smp".into(),
                sc.vcpus.to_string(),
                "-qmp".into(),
                format!("unix:{}/{name}.qmp,server=on,wait=off", dir.display()),
            ];
            if sc.kvm {
                a.extend(["-accel".into(), "kvm".into()]);
            }
            if sc.disk > 0 {
                a.push("-blockdev".into());
                a.push(format!("driver=null-co,node-name=disk0,size={}", sc.disk));
                if sc.kvm {
                    // KVM guest code writes its disk through the virtio-blk device, whose
                    // state migrates: both ends need it.
                    a.extend(["-device".into(), "virtio-blk,drive=disk0".into()]);
                }
            }
            a
        };
        let creds = |endpoint: &str| -> Vec<String> {
            let (kind, d) = match (&sc.tls_creds, &sc.tls_psk) {
                (Some(d), _) => ("x509", d),
                (None, Some(d)) => ("psk", d),
                (None, None) => return Vec::new(),
            };
            vec![
                "-object".into(),
                format!(
                    "tls-creds-{kind},id=tls0,dir={},endpoint={endpoint}",
                    std::path::absolute(d)
                        .unwrap_or_else(|_| d.clone())
                        .display()
                ),
            ]
        };
        let listen = match sc.transport {
            Transport::Tcp => "tcp:127.0.0.1:0".to_string(),
            Transport::Unix => format!("unix:{}/migrate.sock", dir.display()),
        };
        let mut dst_args = common("dst");
        dst_args.extend(creds("server"));
        dst_args.extend(["-incoming".into(), listen.clone()]);
        if !sc.postcopy {
            // Paused at the stop point, for the comparison; in postcopy the guest runs there.
            dst_args.push("-S".into());
        }
        if sc.dst_prealloc {
            dst_args.push("-mem-prealloc".into());
        }
        let mut src_args = common("src");
        src_args.extend(creds("client"));
        let mut wl = format!(
            "fill={},hot={},dirty-rate={}",
            sc.fill, sc.hot, sc.dirty_rate
        );
        if sc.disk > 0 {
            wl.push_str(",disk=disk0,disk-every=256");
        }
        src_args.extend(["-workload".into(), wl]);
        let dst = spawn(&dir, "dst", &dst_args)?;
        let src = spawn(&dir, "src", &src_args)?;
        let connect = |name: &str, p: &Proc| {
            let path = dir.join(format!("{name}.qmp"));
            Client::connect(&path, Duration::from_secs(20)).map_err(|e| {
                format!(
                    "cannot connect to {}: {e}\n{name} log:\n{}",
                    path.display(),
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                )
            })
        };
        let mut dst_qmp = connect("dst", &dst)?;
        let mut src_qmp = connect("src", &src)?;
        let uri = match sc.transport {
            Transport::Tcp => {
                let q = dst_qmp.call("query-migrate", json!({}))?;
                let port = q
                    .pointer("/socket-address/0/port")
                    .and_then(Value::as_str)
                    .ok_or("the destination did not report its port")?
                    .to_string();
                format!("tcp:127.0.0.1:{port}")
            }
            Transport::Unix => listen,
        };
        let caps = json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "dirty-bitmaps", "state": true},
            {"capability": "return-path", "state": true},
            {"capability": "postcopy-ram", "state": sc.postcopy},
            {"capability": "postcopy-preempt", "state": sc.postcopy && sc.preempt},
            {"capability": "x-livemig-integrity", "state": sc.integrity},
        ]});
        src_qmp.call("migrate-set-capabilities", caps.clone())?;
        dst_qmp.call("migrate-set-capabilities", caps)?;
        if sc.multifd_channels > 0 {
            let params = json!({"multifd-channels": sc.multifd_channels,
                                "multifd-compression": sc.multifd_compression});
            let caps = json!({"capabilities": [{"capability": "multifd", "state": true}]});
            for q in [&mut src_qmp, &mut dst_qmp] {
                q.call("migrate-set-parameters", params.clone())?;
                q.call("migrate-set-capabilities", caps.clone())?;
            }
            if sc.zero_copy {
                src_qmp.call(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "zero-copy-send", "state": true}]}),
                )?;
            }
        }
        if sc.postcopy {
            dst_qmp.call(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
            )?;
        }
        if sc.tls_creds.is_some() || sc.tls_psk.is_some() {
            for q in [&mut src_qmp, &mut dst_qmp] {
                q.call("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
            }
        }
        src_qmp.call(
            "migrate-set-parameters",
            json!({"downtime-limit": sc.downtime_limit_ms, "max-bandwidth": sc.max_bandwidth}),
        )?;
        if sc.disk > 0 {
            src_qmp.call(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": "bitmap0", "granularity": 65536}),
            )?;
        }
        Ok(Pair {
            dir,
            src,
            dst,
            src_qmp,
            dst_qmp,
            uri,
            postcopy: sc.postcopy,
        })
    }

    /// The VMs' logs, for a failure report.
    pub fn logs(&self) -> String {
        format!(
            "source log:\n{}\ndestination log:\n{}",
            std::fs::read_to_string(&self.src.log).unwrap_or_default(),
            std::fs::read_to_string(&self.dst.log).unwrap_or_default()
        )
    }

    /// Waits until the source's guest has filled `fill` bytes.
    pub fn wait_fill(&mut self, sc: &Scenario, timeout: Duration) -> Result<(), String> {
        let pages = sc.fill.min(sc.ram) / 4096;
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.src_qmp.call("x-livemig-query-vm", json!({}))?;
            let steps: u64 = v["vcpus"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c["steps"].as_u64()).sum())
                .unwrap_or(0);
            if steps >= pages {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the guest filled only {steps} of {pages} pages in {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Migrates, calling `progress` with each `query-migrate` reply while it runs.
    pub fn migrate(&mut self, mut progress: impl FnMut(&Value)) -> Result<Value, String> {
        self.src_qmp.call("migrate", json!({"uri": self.uri}))?;
        if self.postcopy {
            self.src_qmp.call("migrate-start-postcopy", json!({}))?;
        }
        loop {
            let q = self.src_qmp.call("query-migrate", json!({}))?;
            match q["status"].as_str().unwrap_or("") {
                "completed" => return Ok(q),
                "failed" | "cancelled" => {
                    return Err(format!(
                        "migration {}: {}",
                        q["status"].as_str().unwrap_or(""),
                        q["error-desc"].as_str().unwrap_or("")
                    ))
                }
                _ => progress(&q),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the destination to report the incoming migration completed.
    pub fn wait_destination(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.dst_qmp.call("query-migrate", json!({}))?;
            match q["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" => {
                    return Err(format!(
                        "the destination failed: {}",
                        q["error-desc"].as_str().unwrap_or("")
                    ))
                }
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "the destination did not complete in {timeout:?}: {q}"
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Compares both ends at the stop point, then resumes the destination and checks the guest
    /// carries on.
    pub fn verify(&mut self, sc: &Scenario) -> Result<Vec<(String, String, bool)>, String> {
        if sc.postcopy {
            return self.verify_postcopy();
        }
        let mut checks = Vec::new();
        let s = self.src_qmp.call("x-livemig-ram-checksum", json!({}))?["checksum"].clone();
        let d = self.dst_qmp.call("x-livemig-ram-checksum", json!({}))?["checksum"].clone();
        checks.push((
            "RAM checksum".to_string(),
            format!("source {} destination {}", short(&s), short(&d)),
            s == d,
        ));
        let v = self.dst_qmp.call("x-livemig-verify-ram", json!({}))?;
        let corrupt = v["corrupt"].as_u64().unwrap_or(u64::MAX);
        checks.push((
            "RAM pages".to_string(),
            format!(
                "{} valid, {} zero, {corrupt} corrupt",
                v["valid"], v["zero"]
            ),
            corrupt == 0,
        ));
        if sc.disk > 0 {
            let a = json!({"node": "disk0", "name": "bitmap0"});
            let s = self
                .src_qmp
                .call("x-debug-block-dirty-bitmap-sha256", a.clone())?["sha256"]
                .clone();
            let d = self.dst_qmp.call("x-debug-block-dirty-bitmap-sha256", a)?["sha256"].clone();
            checks.push((
                "bitmap0 sha256".to_string(),
                format!("source {} destination {}", short(&s), short(&d)),
                s == d,
            ));
        }
        let sv = steps(&self.src_qmp.call("x-livemig-query-vm", json!({}))?);
        let dv = steps(&self.dst_qmp.call("x-livemig-query-vm", json!({}))?);
        checks.push((
            "vCPU state".to_string(),
            format!("steps {sv:?} / {dv:?}"),
            sv == dv,
        ));
        let st = self.src_qmp.call("query-status", json!({}))?;
        checks.push((
            "source stopped".to_string(),
            format!("status {}", st["status"]),
            st["status"] == "postmigrate",
        ));
        self.dst_qmp.call("cont", json!({}))?;
        std::thread::sleep(Duration::from_millis(300));
        let after = steps(&self.dst_qmp.call("x-livemig-query-vm", json!({}))?);
        let st = self.dst_qmp.call("query-status", json!({}))?;
        let advanced = sc.hot == 0 || after.iter().zip(&dv).all(|(a, b)| a > b);
        checks.push((
            "guest resumed".to_string(),
            format!("status {}, steps {after:?}", st["status"]),
            st["status"] == "running" && advanced,
        ));
        Ok(checks)
    }
}

/// Each vCPU's steps in an `x-livemig-query-vm` reply.
fn steps(v: &Value) -> Vec<u64> {
    v["vcpus"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["steps"].as_u64()).collect())
        .unwrap_or_default()
}

impl Pair {
    /// After a postcopy the destination's guest has run on: its RAM must verify page by page,
    /// its vCPUs must have gone past the source's stop point, and the source must be stopped.
    fn verify_postcopy(&mut self) -> Result<Vec<(String, String, bool)>, String> {
        let mut checks = Vec::new();
        let sv = steps(&self.src_qmp.call("x-livemig-query-vm", json!({}))?);
        // Pages are checked with the guest stopped: a page read while a vCPU rewrites it
        // would look torn.
        self.dst_qmp.call("stop", json!({}))?;
        let v = self.dst_qmp.call("x-livemig-verify-ram", json!({}))?;
        let corrupt = v["corrupt"].as_u64().unwrap_or(u64::MAX);
        checks.push((
            "RAM pages".to_string(),
            format!(
                "{} valid, {} zero, {corrupt} corrupt {}",
                v["valid"], v["zero"], v["corrupt-pages"]
            ),
            corrupt == 0,
        ));
        let dv = steps(&self.dst_qmp.call("x-livemig-query-vm", json!({}))?);
        self.dst_qmp.call("cont", json!({}))?;
        let st = self.dst_qmp.call("query-status", json!({}))?;
        checks.push((
            "guest ran on".to_string(),
            format!("status {}, steps {sv:?} -> {dv:?}", st["status"]),
            st["status"] == "running" && dv.iter().zip(&sv).all(|(d, s)| d >= s),
        ));
        let st = self.src_qmp.call("query-status", json!({}))?;
        checks.push((
            "source stopped".to_string(),
            format!("status {}", st["status"]),
            st["status"] == "postmigrate",
        ));
        Ok(checks)
    }
}

fn short(v: &Value) -> String {
    v.as_str()
        .map(|s| s.chars().take(16).collect())
        .unwrap_or_default()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Runs a whole scenario: start, fill, migrate, verify (if asked). `progress` sees every
/// `query-migrate` reply during the migration.
pub fn run(sc: &Scenario, progress: impl FnMut(&Value)) -> Result<Outcome, String> {
    let mut pair = Pair::start(sc)?;
    let result = run_pair(&mut pair, sc, progress);
    result.map_err(|e| format!("{e}\n{}", pair.logs()))
}

fn run_pair(
    pair: &mut Pair,
    sc: &Scenario,
    progress: impl FnMut(&Value),
) -> Result<Outcome, String> {
    pair.wait_fill(sc, Duration::from_secs(120))?;
    let q = pair.migrate(progress)?;
    pair.wait_destination(Duration::from_secs(60))?;
    let n = |p: &str| q.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let mut out = Outcome {
        total_ms: n("/total-time"),
        downtime_ms: n("/downtime"),
        setup_ms: n("/setup-time"),
        transferred: n("/ram/transferred"),
        normal: n("/ram/normal"),
        duplicate: n("/ram/duplicate"),
        passes: n("/ram/dirty-sync-count"),
        downtime_bytes: n("/ram/downtime-bytes"),
        checks: Vec::new(),
        postcopy: None,
    };
    if sc.postcopy {
        let d = pair.dst_qmp.call("query-migrate", json!({}))?;
        let mut x = d["x-livemig-postcopy"].clone();
        if let Some(o) = x.as_object_mut() {
            o.insert("postcopy-blocktime".into(), d["postcopy-blocktime"].clone());
            o.insert(
                "postcopy-requests".into(),
                q.pointer("/ram/postcopy-requests")
                    .cloned()
                    .unwrap_or_default(),
            );
            // The source's view: requests answered on the preempt channel, and requests for
            // pages already queued on the main channel.
            o.insert("source".into(), q["x-livemig-postcopy"].clone());
        }
        out.postcopy = Some(x);
    }
    if sc.verify {
        out.checks = pair.verify(sc)?;
    }
    Ok(out)
}
