//! Nothing accepted and ignored (issue 9, bug 5): every command-line option `livemig vm`
//! accepts changes what a user sees, or is one whose job QEMU's `-M none` has nothing to do
//! for either (and then it changes nothing in QEMU too, which is checked); everything else is
//! refused at start-up, with QEMU's words where QEMU has them. Every migration capability and
//! parameter is refused, or configures a refused capability, or is shown acting by a walk of
//! small real migrations run here, each beside one without it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use testkit::VmProcess;

/// `livemig vm ARGS` must refuse to start: exit status 1, `livemig: MSG` on stderr.
fn refused(dir: &Path, args: &[&str], msg: &str) {
    let mut all = vec!["vm".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let mut p = VmProcess::spawn(&livemig().display().to_string(), &all, dir, "refused")
        .expect("spawn livemig");
    let code = p.wait_exit(TIMEOUT);
    let log = p.log();
    assert_eq!(code, Some(1), "{args:?} was not refused: {log}");
    assert_eq!(log, format!("livemig: {msg}\n"), "{args:?}");
}

#[test]
fn options_that_are_not_built_are_refused() {
    let dir = tempdir();
    let cases: &[(&[&str], String)] = &[
        (&["-accel", "hvf"], "-accel hvf: invalid accelerator hvf".into()),
        (&["-machine", "livemig,accel=hvf"], "-accel hvf: invalid accelerator hvf".into()),
        (&["-accel", "tcg,thread=single"], "-accel tcg,thread=single: Property 'tcg-accel.thread' not found".into()),
        (&["-M", "none,dump-guest-core=off"], "Property 'none-machine.dump-guest-core' not found".into()),
        (&["-m", "32M,maxmem=1G"], "-m 32M,maxmem=1G: memory hotplug (maxmem) is not supported".into()),
        (&["-m", "32M,foo=1"], "-m 32M,foo=1: Invalid parameter 'foo'".into()),
        (&["-smp", "2,sockets=2"], "-smp 2,sockets=2: CPU topology (sockets) is not supported: livemig's vCPUs are counted only (-smp N)".into()),
        (&["-M", "none", "-smp", "2"], "Invalid SMP CPUs 2. The max CPUs supported by machine 'none' is 1".into()),
        (&["-workload", "fill=1M", "-M", "none"], "-workload: machine 'none' has no vCPUs to run a workload (use -M livemig)".into()),
        (&["-name", "vm0,debug-threads=on"], "-name vm0,debug-threads=on: Invalid parameter 'debug-threads'".into()),
        (&["-chardev", "socket,id=mon,path=/tmp/mon.sock"], "-chardev socket,id=mon,path=/tmp/mon.sock: nothing uses this chardev (livemig's chardevs serve -mon and -qtest)".into()),
        (&["-chardev", "socket,id=mon,path=/tmp/mon.sock", "-mon", "mon,mode=readline"], "-mon mon,mode=readline: a human monitor on a chardev is not supported: use mode=control, and human-monitor-command for HMP".into()),
        (&["-chardev", "stdio,id=c0"], "-chardev stdio,id=c0: chardev backend 'stdio' is not supported (livemig's chardevs are sockets: -chardev socket,...)".into()),
        (&["-accel", "qtest,x=1"], "-accel qtest,x=1: Property 'qtest-accel.x' not found".into()),
        (&["-drive", "if=ide,file=/x,format=raw"], "-drive if=ide,file=/x,format=raw: -drive if=ide: livemig's machines have no 'ide' bus (if=virtio or if=none)".into()),
        (&["-cpu", "max"], "-cpu max: CPU models are not supported: livemig's vCPUs run a software workload".into()),
        (&["-global", "virtio-blk-pci.share-rw=on"], "-global virtio-blk-pci.share-rw=on: device properties are not supported".into()),
        (&["-display", "gtk"], "-display gtk: Display 'gtk' is not available (livemig has no display: -display none)".into()),
        (&["-vga", "std"], "-vga std: livemig has no VGA card (-vga none)".into()),
        (&["-monitor", "vc"], "-monitor vc: the human monitor is served on stdio only (-monitor stdio), and through QMP's human-monitor-command".into()),
        (&["-monitor", "stdio", "-monitor", "stdio"], "-monitor stdio: cannot use stdio by multiple character devices".into()),
        // `-qmp stdio` acts (qmp_stdio.rs); stdio serves one monitor, as in QEMU.
        (&["-qmp", "stdio", "-monitor", "stdio"], "-monitor stdio: cannot use stdio by multiple character devices".into()),
        (&["-monitor", "stdio", "-qmp", "stdio"], "-qmp stdio: cannot use stdio by multiple character devices".into()),
        (&["-qmp", "stdio", "-qmp", "stdio"], "-qmp stdio: cannot use stdio by multiple character devices".into()),
        (&["-M", "none", "-drive", "file=/x,format=raw"], "-drive file=/x,format=raw: -drive: if= is required here (if=virtio or if=none): livemig has no default disk bus".into()),
        (&["-serial", "stdio"], "-serial stdio: only file:PATH, none and null are supported".into()),
        (&["-device", "virtio-net"], "-device virtio-net: 'virtio-net' is not a valid device model name".into()),
        (&["-frobnicate"], "-frobnicate: invalid option".into()),
    ];
    for (args, msg) in cases {
        refused(dir.path(), args, msg);
    }
}

/// Socket options QEMU 7.2 refuses (`qmp_chardev_validate_socket`, `qemu_chr_parse_socket`)
/// and livemig once took and dropped: `wait` on a connecting socket, `delay` with `nodelay`.
/// QEMU is run with each command line too, and must print the same words.
#[test]
fn socket_options_qemu_refuses_are_refused_with_its_words() {
    let dir = tempdir();
    let sock = dir.path().join("s.sock");
    let sock = sock.display();
    let cases: Vec<(Vec<String>, String)> = [
        (
            "-qmp",
            format!("unix:{sock},wait=off"),
            "'wait' option is incompatible with socket in client connect mode",
        ),
        (
            "-qmp",
            format!("unix:{sock},server=off,wait=on"),
            "'wait' option is incompatible with socket in client connect mode",
        ),
        (
            "-qmp",
            format!("unix:{sock},server=on,wait=off,delay=on,nodelay=on"),
            "'delay' and 'nodelay' are mutually exclusive",
        ),
        (
            "-chardev",
            format!("socket,id=c0,path={sock},wait=off"),
            "'wait' option is incompatible with socket in client connect mode",
        ),
        (
            "-chardev",
            format!("socket,id=c0,path={sock},server=off,wait=on"),
            "'wait' option is incompatible with socket in client connect mode",
        ),
    ]
    .into_iter()
    .map(|(o, v, m)| {
        let mut args = vec![o.to_string(), v.clone()];
        if o == "-chardev" {
            args.extend(["-mon".to_string(), "c0".to_string()]);
        }
        (args, format!("{o} {v}: {m}"))
    })
    .collect();
    for (args, msg) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(dir.path(), &a, msg);
        if testkit::qemu().is_none() {
            let out = std::process::Command::new("qemu-system-x86_64")
                .args(["-M", "none", "-nodefaults", "-display", "none"])
                .args(&a)
                .output()
                .expect("qemu-system-x86_64");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "QEMU {args:?}: {err}");
            assert_eq!(
                err.lines().last().unwrap_or_default(),
                format!("qemu-system-x86_64: {msg}"),
                "QEMU {args:?}"
            );
        }
    }
}

/// Resident memory of a process, in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        << 10
}

/// Every option livemig takes, each with what a user sees change.
#[test]
fn options_act() {
    let dir = tempdir();
    let serial = dir.path().join("serial.log");
    let serial_opt = format!("file:{}", serial.display());
    let mut a = Lm::start(
        dir.path(),
        "a",
        &[
            "-name",
            "guest=walk0,process=lm-walk0",
            "-M",
            "livemig",
            "-m",
            "48M",
            "-smp",
            "3",
            "-accel",
            "tcg",
            "-blockdev",
            DISK,
            "-serial",
            &serial_opt,
            "-mem-prealloc",
            "-workload",
            "fill=1M,hot=64K,dirty-rate=1M,serial-every=16,seed=5",
        ],
    );
    // -name: query-name and info name; process= names the process.
    assert_eq!(a.ok("query-name", json!({})), json!({"name": "walk0"}));
    assert_eq!(a.qmp.hmp("info name"), "walk0\r\n");
    let pid = a.proc.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim_end(), "lm-walk0");
    // -M, -m, -smp, -workload.
    let vm = a.ok("x-livemig-query-vm", json!({}));
    assert_eq!(vm["machine"], "livemig-1.0", "{vm}");
    assert_eq!(vm["ram-size"], 48 << 20, "{vm}");
    assert_eq!(vm["vcpus"].as_array().map(Vec::len), Some(3), "{vm}");
    assert_eq!(vm["workload"]["seed"], 5, "{vm}");
    // -accel tcg: the software vCPUs run.
    let before = a.steps();
    a.wait_steps_beyond(&before);
    // -blockdev.
    let nodes = a.ok("query-named-block-nodes", json!({}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "d0"),
        "{nodes}"
    );
    // -serial file:PATH: the guest's lines reach the file.
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing reached {}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // -mem-prealloc: all of RAM is resident at once; without it, a `none` machine whose RAM
    // nobody touched has next to nothing resident.
    assert!(rss(pid) >= 48 << 20, "RSS {} with -mem-prealloc", rss(pid));
    let mut b = Lm::start(
        dir.path(),
        "b",
        &["-M", "none", "-m", "48M", "-incoming", "defer"],
    );
    assert!(
        rss(b.proc.child.id()) < 40 << 20,
        "RSS without -mem-prealloc"
    );
    // Without -name there is no name; -incoming: waiting for a migration.
    assert_eq!(b.ok("x-livemig-query-vm", json!({}))["machine"], "none");
    assert_eq!(b.status(), "inmigrate");
    // -S: not started.
    let mut c = Lm::start(dir.path(), "c", &["-M", "none", "-S"]);
    assert_eq!(c.status(), "prelaunch");
    // -qmp stdio: the monitor answers on standard output.
    let mut p = std::process::Command::new(livemig())
        .args(["vm", "-M", "none", "-name", "on-stdio", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("livemig vm -qmp stdio");
    let mut stdin = p.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-name\"}\n")
        .expect("write");
    let lines: Vec<Value> = BufReader::new(p.stdout.take().expect("stdout"))
        .lines()
        .take(3)
        .map(|l| serde_json::from_str(&l.expect("a line")).expect("JSON"))
        .collect();
    let _ = p.kill();
    let _ = p.wait();
    assert!(lines[0]["QMP"]["version"].is_object(), "{lines:?}");
    assert_eq!(lines[1], json!({"return": {}}));
    assert_eq!(lines[2], json!({"return": {"name": "on-stdio"}}));
    // -h lists the options.
    let out = std::process::Command::new(livemig())
        .args(["vm", "-h"])
        .output()
        .expect("livemig vm -h");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && help.contains("-accel tcg"),
        "{help}"
    );
}

/// What a QMP client can see of a VM that does not depend on timing.
fn view(lm: &mut Lm) -> Vec<Value> {
    let mut vm = lm.ok("x-livemig-query-vm", json!({}));
    vm["clock-ns"] = json!(0);
    vec![
        lm.ok("query-commands", json!({})),
        lm.ok("query-status", json!({})),
        lm.ok("query-block", json!({})),
        lm.ok("query-named-block-nodes", json!({})),
        lm.ok("query-migrate-capabilities", json!({})),
        lm.ok("query-migrate-parameters", json!({})),
        vm,
    ]
}

/// `-nodefaults`, `-no-user-config`, `-no-shutdown`, `-display none`, `-vga none` and
/// `-monitor none` ask QEMU to leave out what livemig never has (default devices,
/// configuration files, a guest that powers off, a display, a VGA card, a human monitor). They
/// leave a livemig VM exactly as it is without them — and QEMU's `-M none` too.
#[test]
fn options_with_nothing_to_leave_out_change_nothing_as_in_qemu() {
    let dir = tempdir();
    let base = ["-M", "none", "-m", "16M", "-blockdev", DISK, "-S"];
    let quiet = [
        "-nodefaults",
        "-no-user-config",
        "-no-shutdown",
        "-display",
        "none",
        "-vga",
        "none",
        "-monitor",
        "none",
    ];
    let mut with: Vec<&str> = base.to_vec();
    with.extend(quiet);
    let mut plain = Lm::start(dir.path(), "plain", &base);
    let mut quieted = Lm::start(dir.path(), "quieted", &with);
    assert_eq!(view(&mut plain), view(&mut quieted));

    if !testkit::require(
        "options_with_nothing_to_leave_out_change_nothing_as_in_qemu (QEMU)",
        testkit::qemu(),
    ) {
        return;
    }
    let qemu = |name: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["-M", "none", "-display", "none", "-S"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        args.extend(["-blockdev".to_string(), DISK.to_string()]);
        let p = VmProcess::spawn("qemu-system-x86_64", &args, dir.path(), name).expect("qemu");
        let mut q = p.qmp();
        let mut v: Vec<Value> = ["query-block", "query-named-block-nodes", "query-status"]
            .iter()
            .map(|c| q.ok(c, json!({})))
            .collect();
        // The character devices, by label (their socket paths differ by name).
        let chardevs = q.ok("query-chardev", json!({}));
        v.push(json!(chardevs.as_array().map(|l| l
            .iter()
            .map(|c| c["label"].clone())
            .collect::<Vec<_>>())));
        let _ = q.execute("quit", json!({}));
        v
    };
    let plain = qemu("qemu-plain", &[]);
    let quieted = qemu(
        "qemu-quieted",
        &[
            "-nodefaults",
            "-no-user-config",
            "-no-shutdown",
            "-vga",
            "none",
            "-monitor",
            "none",
        ],
    );
    assert_eq!(plain, quieted, "QEMU's -M none changes with these options");
}

// The walk over capabilities and parameters. Every entry livemig accepts and says acts is
// shown acting here, inside the walk: an experiment runs small real migrations (tiny guests,
// `exec:` streams written to files and decoded with `livemig analyze`, unix and TCP pairs of
// `livemig vm`), each run with the entry at a non-default value and one with it off or at its
// default, and records what a user saw — `query-migrate`, events, the stream, the
// destination's RAM, errors, time. Each entry's check compares the two; the walk also checks
// that the check fails when handed the run without the entry in place of the one with it, so
// an entry that was accepted and ignored could not pass.

/// What one run of an experiment let a user see (replies, events, the decoded stream,
/// errors, times), as JSON.
type Seen = Value;

/// The experiments of the walk. Each starts its own processes, runs once per test process
/// (the two walks share them, and run them side by side) and records each of its runs by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exp {
    /// `exec:` streams of one idle guest, decoded, and loaded back into destinations.
    Stream,
    /// Busy guests whose migrations cannot converge: auto-converge and its throttle.
    Throttle,
    /// Unix and TCP pairs: the return path by default, multifd and its parameters.
    Pair,
    /// TCP pairs with TLS credentials.
    Tls,
    /// Postcopy pairs.
    Postcopy,
}

const EXPS: usize = 5;

/// The runs of `exp`, started the first time they are asked for.
fn seen(exp: Exp) -> &'static HashMap<&'static str, Seen> {
    static CELLS: [OnceLock<HashMap<&'static str, Seen>>; EXPS] = [const { OnceLock::new() }; EXPS];
    CELLS[exp as usize].get_or_init(|| match exp {
        Exp::Stream => stream_exp(),
        Exp::Throttle => (1..=3)
            .find_map(|_| throttle_exp())
            .expect("three times the host starved the guest without auto-converge into converging"),
        Exp::Pair => pair_exp(),
        Exp::Tls => tls_exp(),
        Exp::Postcopy => postcopy_exp(),
    })
}

/// An acting capability or parameter and how the walk shows it.
struct Shown {
    /// The capability or parameter.
    name: &'static str,
    /// The run with it on, or at a value other than its default.
    on: (Exp, &'static str),
    /// A run with it off or at its default.
    off: (Exp, &'static str),
    /// Whether `on`, beside `off`, shows it acting; why not, if not.
    check: fn(&Seen, &Seen) -> Result<(), String>,
}

/// `Err(message)` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Runs the experiments `entries` need, side by side, then every entry's check; and checks
/// that each check, handed the run without its entry in place of the one with it, fails.
fn walk(entries: &[Shown]) {
    let mut exps: Vec<Exp> = Vec::new();
    for e in entries {
        for x in [e.on.0, e.off.0] {
            if !exps.contains(&x) {
                exps.push(x);
            }
        }
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        for x in &exps {
            s.spawn(move || {
                let t = Instant::now();
                seen(*x);
                eprintln!("experiment {x:?}: {:?}", t.elapsed());
            });
        }
    });
    eprintln!("experiments {exps:?}: {:?}", started.elapsed());
    let run = |(x, name): (Exp, &str)| -> &'static Seen {
        seen(x)
            .get(name)
            .unwrap_or_else(|| panic!("experiment {x:?} has no run {name}"))
    };
    let mut failures = Vec::new();
    for e in entries {
        let (on, off) = (run(e.on), run(e.off));
        if let Err(why) = (e.check)(on, off) {
            let (on, off) = (brief(on), brief(off));
            failures.push(format!("{}: {why}\n  on: {on}\n  off: {off}", e.name));
        }
        if (e.check)(off, off).is_ok() {
            let off = brief(off);
            failures.push(format!(
                "{}: its check passes on the run without it: {off}",
                e.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `v` with long strings (decoded streams) cut short, for messages.
fn brief(v: &Value) -> Value {
    match v {
        Value::String(s) if s.len() > 300 => {
            json!(format!("{}...", s.chars().take(300).collect::<String>()))
        }
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), brief(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(brief).collect()),
        v => v.clone(),
    }
}

// What the experiments share.

/// QEMU 7.2's default `max-bandwidth` (32 MiB/s).
const DEFAULT_MAX_BANDWIDTH: u64 = 32 << 20;

/// A tiny guest: `-M livemig -m 16M -smp 1` with the disk `d0`, and `extra`.
fn tiny(dir: &Path, name: &str, extra: &[&str]) -> Lm {
    let mut a = vec!["-M", "livemig", "-m", "16M", "-smp", "1", "-blockdev", DISK];
    a.extend_from_slice(extra);
    Lm::start(dir, name, &a)
}

/// A tiny destination: no workload of its own, `-incoming URI` (`-S` when `paused`).
fn tiny_destination(dir: &Path, name: &str, incoming: &str, paused: bool) -> Lm {
    let mut a = vec!["-incoming", incoming];
    if paused {
        a.push("-S");
    }
    tiny(dir, name, &a)
}

/// Waits until the workload has written at least `pages` pages.
fn wait_pages(lm: &mut Lm, pages: u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = lm.ok("x-livemig-query-vm", json!({}));
        if r["pages-written"].as_u64().unwrap_or_default() >= pages {
            return;
        }
        assert!(Instant::now() < deadline, "{}: not filled: {r}", lm.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the migration to end, whichever way; the final `query-migrate`.
fn ended(lm: &mut Lm) -> Value {
    lm.wait_migration(&["completed", "failed", "cancelled"])
}

/// After a migration: the source's guest runs again (`cont` after a completed one).
fn resume(lm: &mut Lm) {
    if lm.status() == "postmigrate" {
        lm.ok("cont", json!({}));
    }
    lm.wait_runstate("running");
}

/// The `MIGRATION` statuses the monitor sent, once the one with status `last` came (or a
/// second passed without it).
fn migration_events(lm: &mut Lm, last: &str) -> Vec<String> {
    let came = lm.qmp.wait_event(Duration::from_secs(1), |e| {
        e["event"] == "MIGRATION" && e["data"]["status"] == last
    });
    // Whatever is still queued came before it.
    let mut all: Vec<String> = lm
        .qmp
        .events
        .drain(..)
        .filter(|e| e["event"] == "MIGRATION")
        .filter_map(|e| e["data"]["status"].as_str().map(String::from))
        .collect();
    if came.is_some() {
        all.push(last.to_string());
    }
    all
}

/// `livemig analyze FILE`: the readable summary, and what it said on stderr.
fn analyze(file: &Path) -> String {
    let out = std::process::Command::new(livemig())
        .arg("analyze")
        .arg(file)
        .output()
        .expect("livemig analyze");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The sockets a process holds open (each once, however many descriptors it has for it).
fn sockets(pid: u32) -> usize {
    let mut inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect();
    inodes.sort();
    inodes.dedup();
    inodes.len()
}

/// How an incoming migration ended: `completed` with the destination's page check, or
/// `failed` with the error.
fn load_outcome(dst: &mut Lm) -> Value {
    match dst.incoming_outcome() {
        Ok(_) => json!({"status": "completed", "corrupt": dst.verify_ram()["corrupt"]}),
        Err(e) => json!({"status": "failed", "error": e}),
    }
}

/// `s` as a string ("" when it is not one).
fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// `v` as a number (0 when it is not one).
fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_default()
}

/// Pages of the stream experiment's guest (`fill=1M`).
const STREAM_PAGES: u64 = 256;

/// One idle guest migrated again and again into files (`exec:cat > FILE`), each time with
/// other capabilities and parameters; each stream decoded; two of them loaded back with a
/// bit flipped; one loaded by destinations with and without `late-block-activate`.
fn stream_exp() -> HashMap<&'static str, Seen> {
    let dir = tempdir();
    let d = dir.path();
    let mut src = tiny(d, "stream-src", &["-workload", "fill=1M,hot=0"]);
    src.add_bitmap("b0");
    wait_pages(&mut src, STREAM_PAGES);
    let used = [
        "events",
        "dirty-bitmaps",
        "x-livemig-integrity",
        "return-path",
        "pause-before-switchover",
    ];
    let mapping = json!([{"node-name": "d0", "alias": "n0",
                          "bitmaps": [{"name": "b0", "alias": "a0"}]}]);
    let plan: Vec<(&'static str, &[&str], Value)> = vec![
        ("base", &[], json!({})),
        ("events", &["events"], json!({})),
        ("dirty-bitmaps", &["dirty-bitmaps"], json!({})),
        (
            "mapping",
            &["dirty-bitmaps"],
            json!({ "block-bitmap-mapping": mapping }),
        ),
        ("integrity", &["x-livemig-integrity"], json!({})),
        ("return-path", &["return-path"], json!({})),
        ("pause", &["events", "pause-before-switchover"], json!({})),
        ("max-bandwidth", &[], json!({"max-bandwidth": 1 << 20})),
    ];
    let mut runs = HashMap::new();
    for (name, caps, params) in plan {
        src.set_caps(&used.map(|c| (c, caps.contains(&c))));
        src.set_params(json!({ "max-bandwidth": DEFAULT_MAX_BANDWIDTH }));
        src.set_params(params);
        src.qmp.events.clear();
        let file = d.join(name);
        src.migrate(&format!("exec:cat > {}", file.display()));
        let mut held = Value::Null;
        if caps.contains(&"pause-before-switchover") {
            src.wait_migration(&["pre-switchover"]);
            std::thread::sleep(Duration::from_millis(300));
            held = json!({
                "status": src.ok("query-migrate", json!({}))["status"],
                "runstate": src.status(),
            });
            src.ok("migrate-continue", json!({"state": "pre-switchover"}));
        }
        let q = ended(&mut src);
        // The events of the runs that show them, and of the one that shows none.
        let events = match name {
            "base" | "events" | "pause" => json!(migration_events(&mut src, text(&q["status"]))),
            _ => Value::Null,
        };
        runs.insert(
            name,
            json!({"query": q, "events": events, "held": held, "stream": analyze(&file)}),
        );
        resume(&mut src);
    }

    // x-livemig-stall-timeout: a command that never reads its stdin.
    src.set_caps(&used.map(|c| (c, false)));
    src.set_params(json!({"x-livemig-stall-timeout": 1000}));
    let t = Instant::now();
    src.migrate("exec:sleep 10");
    let q = ended(&mut src);
    let ms = t.elapsed().as_millis() as u64;
    runs.insert("stall", json!({"query": q, "ms": ms}));
    resume(&mut src);
    // The default bound (30 s): three times the other's later, still waiting. (Left there: the
    // source's last migration.)
    src.set_params(json!({"x-livemig-stall-timeout": 30_000}));
    src.migrate("exec:sleep 10");
    std::thread::sleep(Duration::from_millis(3000));
    let q = src.ok("query-migrate", json!({}));
    runs.insert("stall-default", json!({ "query": q }));
    src.ok("migrate_cancel", json!({}));

    // A byte flipped in the first page of a stream: loaded without integrity, with it.
    for (name, cap) in [("base", false), ("integrity", true)] {
        let mut bytes = std::fs::read(d.join(name)).expect("stream");
        let magic = vm_page_magic();
        let at = bytes
            .windows(8)
            .position(|w| w == magic)
            .unwrap_or_else(|| panic!("no page in stream {name}"));
        bytes[at + 100] ^= 0x40;
        let flipped = d.join(format!("{name}.flipped"));
        std::fs::write(&flipped, bytes).expect("write");
        let mut dst = tiny_destination(d, &format!("load-{name}"), "defer", true);
        dst.set_caps(&[("x-livemig-integrity", cap)]);
        dst.ok(
            "migrate-incoming",
            json!({ "uri": format!("exec:cat {}", flipped.display()) }),
        );
        let outcome = load_outcome(&mut dst);
        if let Some(r) = runs.get_mut(name) {
            r["flipped-load"] = outcome;
        }
    }

    // late-block-activate: a paused destination's disk, written before and after `cont`.
    for (name, late) in [("load-late", true), ("load-plain", false)] {
        let mut dst = tiny_destination(d, name, "defer", true);
        dst.set_caps(&[("late-block-activate", late)]);
        let base = d.join("base");
        dst.ok(
            "migrate-incoming",
            json!({ "uri": format!("exec:cat {}", base.display()) }),
        );
        dst.wait_completed();
        let paused = dst.qemu_io("write -P 0x11 0 4k");
        dst.ok("cont", json!({}));
        let running = dst.qemu_io("write -P 0x11 0 4k");
        runs.insert(
            name,
            json!({"paused-write": paused, "running-write": running}),
        );
    }
    runs
}

/// The first eight bytes of every page the workload writes, as they lie in memory.
fn vm_page_magic() -> [u8; 8] {
    0x4c4d_4947_5041_4745u64.to_le_bytes()
}

/// Busy guests that dirty more than their link carries, side by side: without
/// auto-converge, with it, and with each throttle parameter changed. None converges in a
/// 1 ms `downtime-limit` unless throttled hard; the one without auto-converge then gets
/// QEMU's default limit. `None` when the premise failed: a host so loaded that the guest
/// without auto-converge, starved of CPU, dirtied less than its link carries and converged
/// (seen at a load average of 20); the caller runs the experiment again.
fn throttle_exp() -> Option<HashMap<&'static str, Seen>> {
    let dir = tempdir();
    let d = dir.path();
    // 4 MiB filled in a quarter of a second; then 64 hot pages rewritten 4096 times a
    // second: faster than the 2 MiB/s link carries them even with the vCPU throttled to
    // 70 % (or starved on a loaded host), so only a throttle of 90 % lets it converge.
    const WORKLOAD: &str = "fill=4M,hot=256K,dirty-rate=16M";
    let plan: [(&'static str, bool, Value); 5] = [
        ("off", false, json!({})),
        ("on", true, json!({})),
        (
            "low-threshold",
            true,
            json!({"throttle-trigger-threshold": 2}),
        ),
        ("max", true, json!({"max-cpu-throttle": 70})),
        ("tailslow", true, json!({"cpu-throttle-tailslow": true})),
    ];
    let mut lms: Vec<Lm> = plan
        .iter()
        .map(|(name, ac, params)| {
            let mut lm = tiny(d, name, &["-workload", WORKLOAD]);
            lm.set_caps(&[("auto-converge", *ac)]);
            // Pass 1 takes two seconds at 2 MiB/s; then the hot set keeps it going.
            lm.set_params(json!({"max-bandwidth": 2 << 20, "downtime-limit": 1,
                                 "cpu-throttle-initial": 30, "cpu-throttle-increment": 60}));
            lm.set_params(params.clone());
            lm
        })
        .collect();
    for lm in &mut lms {
        wait_pages(lm, 1024);
    }
    for lm in &mut lms {
        lm.migrate("exec:cat > /dev/null");
    }
    let t0 = Instant::now();
    // Each run's throttle, as it changes, and when it first came.
    let mut seq: Vec<Vec<u64>> = vec![Vec::new(); plan.len()];
    let mut first: Vec<Option<u64>> = vec![None; plan.len()];
    let deadline = t0 + Duration::from_secs(30);
    loop {
        for (i, lm) in lms.iter_mut().enumerate() {
            let r = lm.ok("query-migrate", json!({}));
            // A guest throttled hard may leave nothing dirty at the end of a pass, and
            // switch over; the one without auto-converge never does.
            let st = text(&r["status"]);
            if i == 0 && st == "completed" {
                eprintln!("throttle experiment: the guest without auto-converge converged; again");
                return None;
            }
            let ok = ["setup", "active"].contains(&st) || (i > 0 && st == "completed");
            assert!(ok, "{}: {r}", lm.name);
            if let Some(t) = r["cpu-throttle-percentage"].as_u64() {
                first[i].get_or_insert(t0.elapsed().as_millis() as u64);
                if seq[i].last() != Some(&t) {
                    seq[i].push(t);
                }
            }
        }
        // Two steps of each run that has the default threshold, and the low one's first.
        if seq[1].len() >= 2 && seq[3].len() >= 2 && seq[4].len() >= 2 && !seq[2].is_empty() {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut runs = HashMap::new();
    for (i, (name, ..)) in plan.iter().enumerate() {
        let q = lms[i].ok("query-migrate", json!({}));
        runs.insert(
            *name,
            json!({"throttle": seq[i], "first-ms": first[i], "query": q}),
        );
    }
    for lm in lms.iter_mut().skip(1) {
        if lm.ok("query-migrate", json!({}))["status"] == "active" {
            lm.ok("migrate_cancel", json!({}));
        }
    }
    // QEMU's default downtime-limit: the guest without auto-converge switches over.
    let off = &mut lms[0];
    off.set_params(json!({"downtime-limit": 300}));
    let q = ended(off);
    runs.insert("off-default-downtime", json!({ "query": q }));
    Some(runs)
}

/// One guest migrated over unix and TCP to fresh destinations: the return path that
/// livemig opens by default, multifd with its channels, zero copy, compression and levels.
fn pair_exp() -> HashMap<&'static str, Seen> {
    let dir = tempdir();
    let d = dir.path();
    let mut src = tiny(d, "pair-src", &["-workload", "fill=1M,hot=0"]);
    wait_pages(&mut src, STREAM_PAGES);
    let caps_used = ["multifd", "zero-copy-send", "pause-before-switchover"];
    let defaults = json!({"x-livemig-auto-return-path": true, "multifd-channels": 2,
                          "multifd-compression": "none", "multifd-zlib-level": 1,
                          "multifd-zstd-level": 1});
    // (run, unix rather than tcp, source caps, source params, destination caps and params)
    type Plan = (&'static str, bool, &'static [&'static str], Value, Value);
    let plan: Vec<Plan> = vec![
        ("plain", true, &[], json!({}), json!({})),
        (
            "no-auto-return-path",
            true,
            &[],
            json!({"x-livemig-auto-return-path": false}),
            json!({}),
        ),
        (
            "multifd",
            false,
            &["multifd", "pause-before-switchover"],
            json!({}),
            json!({}),
        ),
        (
            "channels-4",
            false,
            &["multifd", "pause-before-switchover"],
            json!({"multifd-channels": 4}),
            json!({"multifd-channels": 4}),
        ),
        (
            "zero-copy",
            false,
            &["multifd", "zero-copy-send"],
            json!({}),
            json!({}),
        ),
        (
            "zlib",
            false,
            &["multifd"],
            json!({"multifd-compression": "zlib"}),
            json!({"multifd-compression": "zlib"}),
        ),
        (
            "zlib-level-0",
            false,
            &["multifd"],
            json!({"multifd-compression": "zlib", "multifd-zlib-level": 0}),
            json!({"multifd-compression": "zlib"}),
        ),
        (
            "zlib-to-none",
            false,
            &["multifd"],
            json!({"multifd-compression": "zlib"}),
            json!({}),
        ),
        (
            "zstd",
            false,
            &["multifd"],
            json!({"multifd-compression": "zstd"}),
            json!({"multifd-compression": "zstd"}),
        ),
        (
            "zstd-level-19",
            false,
            &["multifd"],
            json!({"multifd-compression": "zstd", "multifd-zstd-level": 19}),
            json!({"multifd-compression": "zstd"}),
        ),
    ];
    let mut runs = HashMap::new();
    for (name, unix, caps, params, dparams) in plan {
        // Capabilities off first: zero-copy-send refuses compression while it is on.
        src.set_caps(&caps_used.map(|c| (c, false)));
        src.set_params(defaults.clone());
        src.set_params(params);
        src.set_caps(&caps_used.map(|c| (c, caps.contains(&c))));
        let incoming = if unix {
            unix_uri(d, &format!("{name}.sock"))
        } else {
            "tcp:127.0.0.1:0".to_string()
        };
        let mut dst = tiny_destination(d, name, &incoming, true);
        dst.set_caps(&[("multifd", caps.contains(&"multifd"))]);
        dst.set_params(dparams);
        let uri = if unix {
            incoming
        } else {
            format!("tcp:127.0.0.1:{}", dst.incoming_port())
        };
        src.migrate(&uri);
        let mut sockets_held = Value::Null;
        if caps.contains(&"pause-before-switchover") {
            src.wait_migration(&["pre-switchover"]);
            sockets_held = json!(sockets(src.proc.child.id()));
            src.ok("migrate-continue", json!({"state": "pre-switchover"}));
        }
        let q = ended(&mut src);
        let load = if q["status"] == "completed" {
            load_outcome(&mut dst)
        } else {
            Value::Null
        };
        runs.insert(
            name,
            json!({"query": q, "sockets": sockets_held, "load": load}),
        );
        drop(dst);
        resume(&mut src);
    }
    // The zlib source to a destination that expects uncompressed packets.
    let refused = runs.remove("zlib-to-none").unwrap_or_default();
    if let Some(r) = runs.get_mut("zlib") {
        r["to-uncompressed"] = refused["query"].clone();
    }
    runs
}

/// `-M none` guests migrated over TCP with and without TLS credentials, host names and
/// authorization.
fn tls_exp() -> HashMap<&'static str, Seen> {
    let dir = tempdir();
    let d = dir.path();
    testkit::pki::Creds::X509.write(d);
    let creds =
        |sub: &str, endpoint: &str| testkit::pki::Creds::X509.object("tls0", d, sub, endpoint);
    let (ccreds, screds) = (creds("cli", "client"), creds("srv", "server"));
    let other = "authz-simple,id=other,identity=O=livemig test,,CN=other.example.org";
    let mine = format!(
        "authz-simple,id=mine,identity={}",
        testkit::pki::source_dn_option()
    );
    let mut src = Lm::start(
        d,
        "tls-src",
        &["-M", "none", "-m", "16M", "-object", &ccreds],
    );
    let mut n = 0;
    // Migrates to a fresh destination (TLS with `authz`, or plaintext); the outcome.
    let mut attempt = |src: &mut Lm, tls: Option<&str>| -> Value {
        n += 1;
        let name = format!("tls-dst{n}");
        let mut a = vec![
            "-M",
            "none",
            "-m",
            "16M",
            "-incoming",
            "tcp:127.0.0.1:0",
            "-S",
        ];
        if tls.is_some() {
            a.extend(["-object", &screds, "-object", other, "-object", &mine]);
        }
        let mut dst = Lm::start(d, &name, &a);
        if let Some(authz) = tls {
            dst.set_params(json!({"tls-creds": "tls0", "tls-authz": authz}));
        }
        let port = dst.incoming_port();
        src.migrate(&format!("tcp:127.0.0.1:{port}"));
        let q = ended(src);
        resume(src);
        json!({"status": q["status"], "error": q["error-desc"]})
    };
    let mut runs = HashMap::new();
    // tls-creds, unset and set: to a plaintext destination and to a TLS one.
    for (name, creds) in [("plain", ""), ("tls", "tls0")] {
        src.set_params(json!({ "tls-creds": creds }));
        let plain = attempt(&mut src, None);
        let tls = attempt(&mut src, Some(""));
        runs.insert(name, json!({"to-plain": plain, "to-tls": tls}));
    }
    // tls-hostname: the name checked against the destination's certificate.
    src.set_params(json!({"tls-creds": "tls0", "tls-hostname": "elsewhere.example.org"}));
    let wrong = attempt(&mut src, Some(""));
    src.set_params(json!({"tls-hostname": "dest.example.org"}));
    let right = attempt(&mut src, Some(""));
    src.set_params(json!({"tls-hostname": ""}));
    runs.insert("hostname", json!({"other": wrong, "its own": right}));
    // tls-authz on the destination: an identity that is not the source's, and the source's.
    let other = attempt(&mut src, Some("other"));
    let mine = attempt(&mut src, Some("mine"));
    runs.insert("authz", json!({"other": other, "its own": mine}));
    runs
}

/// Postcopy pairs: a guest whose hot pages the destination's running guest pulls, while the
/// rest comes in the background — with postcopy alone, and with blocktime, preempt and a
/// background bandwidth.
fn postcopy_exp() -> HashMap<&'static str, Seen> {
    let dir = tempdir();
    let d = dir.path();
    let mut runs = HashMap::new();
    // 4 MiB filled in a second, then rewritten at random, 1024 pages a second: the
    // destination's guest asks for pages all over it.
    const WORKLOAD: &str = "fill=4M,hot=4M,dirty-rate=4M";
    let plan: [(&'static str, &[&str], u64); 2] = [
        ("postcopy", &[], 0),
        (
            "postcopy-all",
            &["postcopy-blocktime", "postcopy-preempt"],
            2 << 20,
        ),
    ];
    for (name, extra, bw) in plan {
        let uri = unix_uri(d, &format!("{name}.sock"));
        let mut dst = tiny_destination(d, &format!("{name}-dst"), &uri, false);
        let mut src = tiny(d, &format!("{name}-src"), &["-workload", WORKLOAD]);
        if name == "postcopy" {
            // Without the capability.
            let e = src.err("migrate-start-postcopy", json!({}));
            runs.insert("postcopy-off", json!({ "start-postcopy": e }));
        }
        let mut caps = vec!["events", "postcopy-ram"];
        caps.extend_from_slice(extra);
        dst.caps_on(&caps);
        src.caps_on(
            &caps
                .iter()
                .copied()
                .filter(|c| *c != "postcopy-blocktime")
                .collect::<Vec<_>>(),
        );
        // Precopy crawls, so nearly all of RAM is left for postcopy.
        src.set_params(json!({"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": bw}));
        wait_pages(&mut src, 1024);
        src.migrate(&uri);
        src.wait_migration(&["active"]);
        src.ok("migrate-start-postcopy", json!({}));
        let t = Instant::now();
        let q = ended(&mut src);
        let ms = t.elapsed().as_millis() as u64;
        let events = migration_events(&mut src, text(&q["status"]));
        dst.wait_completed();
        dst.ok("stop", json!({}));
        let dq = dst.ok("query-migrate", json!({}));
        let v = dst.verify_ram();
        runs.insert(
            name,
            json!({"events": events, "query": q, "postcopy-ms": ms,
                   "destination": dq, "verify": v}),
        );
    }
    runs
}

// The entries.

/// Whether `v` (an `analyze` summary) contains `what`.
fn has(v: &Value, what: &str) -> bool {
    text(v).contains(what)
}

/// The capabilities livemig implements, each with what the walk sees it change.
const CAPS_SHOWN: &[Shown] = &[
    Shown {
        name: "events",
        on: (Exp::Stream, "events"),
        off: (Exp::Stream, "base"),
        check: |on, off| {
            // As QEMU 7.2: `device` only with pause-before-switchover.
            let want = json!(["setup", "active", "completed"]);
            ensure!(
                on["events"] == want,
                "MIGRATION events {}, not {want}",
                on["events"]
            );
            ensure!(off["events"] == json!([]), "events without the capability");
            Ok(())
        },
    },
    Shown {
        name: "auto-converge",
        on: (Exp::Throttle, "on"),
        off: (Exp::Throttle, "off"),
        check: |on, off| {
            ensure!(
                !on["throttle"].as_array().is_none_or(Vec::is_empty),
                "never throttled"
            );
            ensure!(
                off["throttle"] == json!([]),
                "throttled without auto-converge"
            );
            Ok(())
        },
    },
    Shown {
        name: "postcopy-ram",
        on: (Exp::Postcopy, "postcopy"),
        off: (Exp::Postcopy, "postcopy-off"),
        check: |on, off| {
            let want = json!(["setup", "active", "postcopy-active", "completed"]);
            ensure!(on["events"] == want, "events {}", on["events"]);
            ensure!(on["query"]["status"] == "completed", "not completed");
            ensure!(
                num(&on["query"]["ram"]["postcopy-bytes"]) > 0,
                "nothing sent in postcopy"
            );
            ensure!(on["verify"]["corrupt"] == 0, "destination RAM");
            ensure!(
                off["start-postcopy"]
                    == "Enable postcopy with migrate_set_capability before the start of migration",
                "without the capability: {}",
                off["start-postcopy"]
            );
            Ok(())
        },
    },
    Shown {
        name: "postcopy-blocktime",
        on: (Exp::Postcopy, "postcopy-all"),
        off: (Exp::Postcopy, "postcopy"),
        check: |on, off| {
            let (a, b) = (&on["destination"], &off["destination"]);
            ensure!(a["postcopy-blocktime"].is_u64(), "no postcopy-blocktime");
            ensure!(
                a["postcopy-vcpu-blocktime"].as_array().map(Vec::len) == Some(1),
                "no blocktime for the vCPU"
            );
            ensure!(
                b.get("postcopy-blocktime").is_none(),
                "blocktime without the capability"
            );
            Ok(())
        },
    },
    Shown {
        name: "postcopy-preempt",
        on: (Exp::Postcopy, "postcopy-all"),
        off: (Exp::Postcopy, "postcopy"),
        check: |on, off| {
            let pages = |s: &Value| num(&s["query"]["x-livemig-postcopy"]["preempt-pages"]);
            ensure!(pages(on) > 0, "no page went on the preempt channel");
            ensure!(pages(off) == 0, "preempt pages without the capability");
            Ok(())
        },
    },
    Shown {
        name: "return-path",
        on: (Exp::Stream, "return-path"),
        off: (Exp::Stream, "base"),
        check: |on, off| {
            ensure!(
                has(&on["stream"], "COMMAND OPEN_RETURN_PATH"),
                "no OPEN_RETURN_PATH"
            );
            // `cat > FILE` answers nothing: the source waits for a verdict that never comes.
            ensure!(
                on["query"]["status"] == "failed",
                "completed with nobody to confirm"
            );
            ensure!(
                text(&on["query"]["error-desc"]).contains("return path"),
                "{}",
                on["query"]["error-desc"]
            );
            ensure!(
                !has(&off["stream"], "OPEN_RETURN_PATH"),
                "a return path without it"
            );
            ensure!(off["query"]["status"] == "completed", "without it");
            Ok(())
        },
    },
    Shown {
        name: "pause-before-switchover",
        on: (Exp::Stream, "pause"),
        off: (Exp::Stream, "events"),
        check: |on, off| {
            ensure!(
                on["held"] == json!({"status": "pre-switchover", "runstate": "finish-migrate"}),
                "not held in pre-switchover"
            );
            let want = json!(["setup", "active", "pre-switchover", "device", "completed"]);
            ensure!(on["events"] == want, "events {}", on["events"]);
            ensure!(
                !off["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e == "pre-switchover"),
                "pre-switchover without it"
            );
            Ok(())
        },
    },
    Shown {
        name: "dirty-bitmaps",
        on: (Exp::Stream, "dirty-bitmaps"),
        off: (Exp::Stream, "base"),
        check: |on, off| {
            ensure!(
                has(&on["stream"], "START dirty-bitmap"),
                "no dirty-bitmap section"
            );
            ensure!(
                has(&on["stream"], "d0/b0: granularity 65536"),
                "no bitmap b0 of d0"
            );
            ensure!(
                !has(&off["stream"], "dirty-bitmap"),
                "bitmaps without the capability"
            );
            Ok(())
        },
    },
    Shown {
        name: "multifd",
        on: (Exp::Pair, "multifd"),
        off: (Exp::Pair, "plain"),
        check: |on, off| {
            let bytes = |s: &Value| num(&s["query"]["ram"]["multifd-bytes"]);
            ensure!(
                bytes(on) >= STREAM_PAGES * 4096,
                "multifd-bytes {}",
                bytes(on)
            );
            ensure!(on["load"]["corrupt"] == 0, "destination RAM");
            ensure!(bytes(off) == 0, "multifd bytes without multifd");
            Ok(())
        },
    },
    Shown {
        name: "zero-copy-send",
        on: (Exp::Pair, "zero-copy"),
        off: (Exp::Pair, "multifd"),
        check: |on, off| {
            // Over loopback the kernel copies what it was asked not to, and says so.
            let missed = |s: &Value| num(&s["query"]["ram"]["dirty-sync-missed-zero-copy"]);
            ensure!(on["query"]["status"] == "completed", "not completed");
            ensure!(missed(on) > 0, "no zero-copy send was attempted");
            ensure!(missed(off) == 0, "zero copy without the capability");
            Ok(())
        },
    },
    Shown {
        name: "late-block-activate",
        on: (Exp::Stream, "load-late"),
        off: (Exp::Stream, "load-plain"),
        check: |on, off| {
            ensure!(
                !has(&on["paused-write"], "wrote"),
                "an inactive disk took a write"
            );
            ensure!(
                has(&on["running-write"], "wrote"),
                "cont did not activate the disk"
            );
            ensure!(
                has(&off["paused-write"], "wrote"),
                "inactive without the capability"
            );
            Ok(())
        },
    },
    Shown {
        name: "x-livemig-integrity",
        on: (Exp::Stream, "integrity"),
        off: (Exp::Stream, "base"),
        check: |on, off| {
            ensure!(
                has(&on["stream"], "capabilities [x-livemig-integrity]"),
                "not announced in the stream"
            );
            let (a, b) = (&on["flipped-load"], &off["flipped-load"]);
            ensure!(a["status"] == "failed", "a flipped bit loaded: {a}");
            ensure!(
                b["status"] == "completed" && num(&b["corrupt"]) >= 1,
                "without it: {b}"
            );
            Ok(())
        },
    },
];

/// The parameters that act, each with what the walk sees it change.
const PARAMS_SHOWN: &[Shown] = &[
    Shown {
        name: "throttle-trigger-threshold",
        on: (Exp::Throttle, "low-threshold"),
        off: (Exp::Throttle, "on"),
        check: |on, off| {
            // Pass 1 sends 4 MiB while 0.25 MiB gets dirty again (6 %): over a 2 % threshold,
            // not over QEMU's 50 %. Both are over it once the pass is done, a period later.
            let (Some(a), Some(b)) = (on["first-ms"].as_u64(), off["first-ms"].as_u64()) else {
                return Err("never throttled".into());
            };
            ensure!(
                a + 500 < b,
                "first throttle at {a} ms with 2 %, {b} ms with 50 %"
            );
            Ok(())
        },
    },
    Shown {
        name: "cpu-throttle-initial",
        on: (Exp::Throttle, "on"),
        off: (Exp::Throttle, "off"),
        check: |on, _| {
            // QEMU's default is 20.
            ensure!(on["throttle"][0] == 30, "first step {}", on["throttle"][0]);
            Ok(())
        },
    },
    Shown {
        name: "cpu-throttle-increment",
        on: (Exp::Throttle, "on"),
        off: (Exp::Throttle, "off"),
        check: |on, _| {
            // QEMU's default is 10.
            ensure!(
                on["throttle"] == json!([30, 90]),
                "steps {}",
                on["throttle"]
            );
            Ok(())
        },
    },
    Shown {
        name: "cpu-throttle-tailslow",
        on: (Exp::Throttle, "tailslow"),
        off: (Exp::Throttle, "on"),
        check: |on, off| {
            // The second step adds no more than would bring the dirty rate down to the
            // threshold: with the guest dirtying about what is sent, about 35 %, not 60 %.
            let second = num(&on["throttle"][1]);
            ensure!(second > 30 && second < 90, "steps {}", on["throttle"]);
            ensure!(off["throttle"][1] == 90, "without it: {}", off["throttle"]);
            Ok(())
        },
    },
    Shown {
        name: "max-cpu-throttle",
        on: (Exp::Throttle, "max"),
        off: (Exp::Throttle, "on"),
        check: |on, off| {
            ensure!(
                on["throttle"] == json!([30, 70]),
                "steps {}",
                on["throttle"]
            );
            ensure!(off["throttle"][1] == 90, "without it: {}", off["throttle"]);
            Ok(())
        },
    },
    Shown {
        name: "downtime-limit",
        on: (Exp::Throttle, "off"),
        off: (Exp::Throttle, "off-default-downtime"),
        check: |on, off| {
            // With 1 ms nothing the hot guest leaves fits: pass after pass, still active.
            ensure!(
                on["query"]["status"] == "active",
                "switched over within 1 ms"
            );
            ensure!(
                num(&on["query"]["ram"]["dirty-sync-count"]) >= 4,
                "few passes"
            );
            ensure!(
                off["query"]["status"] == "completed",
                "not with QEMU's 300 ms"
            );
            Ok(())
        },
    },
    Shown {
        name: "tls-creds",
        on: (Exp::Tls, "tls"),
        off: (Exp::Tls, "plain"),
        check: |on, off| {
            ensure!(
                on["to-tls"]["status"] == "completed",
                "to a TLS destination"
            );
            ensure!(
                on["to-plain"]["status"] == "failed",
                "a plaintext destination read it"
            );
            ensure!(
                off["to-plain"]["status"] == "completed",
                "plaintext without it"
            );
            ensure!(
                off["to-tls"]["status"] == "failed",
                "a TLS destination took plaintext"
            );
            Ok(())
        },
    },
    Shown {
        name: "tls-hostname",
        on: (Exp::Tls, "hostname"),
        off: (Exp::Tls, "tls"),
        check: |on, off| {
            ensure!(
                on["other"]["status"] == "failed",
                "another name passed the check"
            );
            ensure!(on["its own"]["status"] == "completed", "its own name");
            // Unset, the address is checked (the certificate names 127.0.0.1).
            ensure!(off["to-tls"]["status"] == "completed", "without it");
            Ok(())
        },
    },
    Shown {
        name: "tls-authz",
        on: (Exp::Tls, "authz"),
        off: (Exp::Tls, "tls"),
        check: |on, off| {
            ensure!(
                on["other"]["status"] == "failed",
                "an unauthorized source got in"
            );
            ensure!(
                on["its own"]["status"] == "completed",
                "the authorized source"
            );
            ensure!(off["to-tls"]["status"] == "completed", "without it");
            Ok(())
        },
    },
    Shown {
        name: "max-bandwidth",
        on: (Exp::Stream, "max-bandwidth"),
        off: (Exp::Stream, "base"),
        check: |on, off| {
            // 1 MiB of pages at 1 MiB/s; QEMU's default of 32 MiB/s takes ~30 ms.
            let (a, b) = (
                num(&on["query"]["total-time"]),
                num(&off["query"]["total-time"]),
            );
            ensure!(a >= 800 && b * 2 < a, "{a} ms capped, {b} ms by default");
            Ok(())
        },
    },
    Shown {
        name: "multifd-channels",
        on: (Exp::Pair, "channels-4"),
        off: (Exp::Pair, "multifd"),
        check: |on, off| {
            // Held open in pre-switchover: two more connections than QEMU's default 2.
            let (a, b) = (num(&on["sockets"]), num(&off["sockets"]));
            ensure!(a == b + 2, "{a} sockets with 4 channels, {b} with 2");
            ensure!(on["load"]["corrupt"] == 0, "destination RAM");
            Ok(())
        },
    },
    Shown {
        name: "max-postcopy-bandwidth",
        on: (Exp::Postcopy, "postcopy-all"),
        off: (Exp::Postcopy, "postcopy"),
        check: |on, off| {
            // Nearly 4 MiB left for the background push, at 2 MiB/s; unlimited by default.
            let (a, b) = (num(&on["postcopy-ms"]), num(&off["postcopy-ms"]));
            ensure!(
                a >= 1000 && b * 2 < a,
                "postcopy took {a} ms capped, {b} ms not"
            );
            Ok(())
        },
    },
    Shown {
        name: "multifd-compression",
        on: (Exp::Pair, "zlib"),
        off: (Exp::Pair, "multifd"),
        check: |on, off| {
            let bytes = |s: &Value| num(&s["query"]["ram"]["multifd-bytes"]);
            ensure!(on["load"]["corrupt"] == 0, "zlib to zlib: {}", on["load"]);
            let refused = &on["to-uncompressed"];
            ensure!(
                refused["status"] == "failed",
                "read uncompressed: {refused}"
            );
            // The guest's pages are random: deflate's framing makes them a little larger.
            ensure!(
                bytes(on) > bytes(off),
                "{} zlib, {} plain",
                bytes(on),
                bytes(off)
            );
            Ok(())
        },
    },
    Shown {
        name: "multifd-zlib-level",
        on: (Exp::Pair, "zlib-level-0"),
        off: (Exp::Pair, "zlib"),
        check: |on, off| {
            let bytes = |s: &Value| num(&s["query"]["ram"]["multifd-bytes"]);
            ensure!(on["load"]["corrupt"] == 0, "destination RAM");
            // Level 0 stores; level 1 frames the same random bytes in more, smaller blocks.
            ensure!(
                bytes(on) < bytes(off),
                "{} at 0, {} at 1",
                bytes(on),
                bytes(off)
            );
            Ok(())
        },
    },
    Shown {
        name: "multifd-zstd-level",
        on: (Exp::Pair, "zstd-level-19"),
        off: (Exp::Pair, "zstd"),
        check: |on, off| {
            let bytes = |s: &Value| num(&s["query"]["ram"]["multifd-bytes"]);
            ensure!(on["load"]["corrupt"] == 0, "destination RAM");
            // Level 19 finds the pages' headers alike; level 1 stores the pages raw.
            ensure!(
                bytes(on) < bytes(off),
                "{} at 19, {} at 1",
                bytes(on),
                bytes(off)
            );
            Ok(())
        },
    },
    Shown {
        name: "x-livemig-stall-timeout",
        on: (Exp::Stream, "stall"),
        off: (Exp::Stream, "stall-default"),
        check: |on, off| {
            ensure!(on["query"]["status"] == "failed", "not failed");
            ensure!(
                text(&on["query"]["error-desc"]).contains("1000 ms (x-livemig-stall-timeout)"),
                "{}",
                on["query"]["error-desc"]
            );
            ensure!(num(&on["ms"]) < 10_000, "noticed after {} ms", on["ms"]);
            ensure!(
                off["query"]["status"] == "active",
                "the default bound is 30 s"
            );
            Ok(())
        },
    },
    Shown {
        name: "x-livemig-auto-return-path",
        on: (Exp::Pair, "no-auto-return-path"),
        off: (Exp::Pair, "plain"),
        check: |on, off| {
            // Off, no return path over a socket: nobody confirms the destination loaded it.
            ensure!(on["query"]["status"] == "completed", "not completed");
            ensure!(
                on["query"]["x-livemig-handover"] == "unconfirmed",
                "confirmed"
            );
            ensure!(
                off["query"]["x-livemig-handover"] == "confirmed",
                "by default"
            );
            Ok(())
        },
    },
    Shown {
        name: "block-bitmap-mapping",
        on: (Exp::Stream, "mapping"),
        off: (Exp::Stream, "dirty-bitmaps"),
        check: |on, off| {
            ensure!(
                has(&on["stream"], "n0/a0: granularity 65536"),
                "not under its aliases"
            );
            ensure!(!has(&on["stream"], "d0/b0"), "under its own names");
            ensure!(
                has(&off["stream"], "d0/b0: granularity 65536"),
                "without it"
            );
            Ok(())
        },
    },
];

/// QEMU 7.2's capabilities, in `query-migrate-capabilities` order.
const QEMU_CAPS: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

/// livemig's own capabilities, listed after QEMU's.
const LIVEMIG_CAPS: &[&str] = &["x-livemig-integrity"];

/// Every capability `query-migrate-capabilities` lists is either shown acting by the walk
/// ([`CAPS_SHOWN`]) — turned on and off, with what it needs, as QEMU takes it — or refused
/// when turned on, with nothing changed.
#[test]
fn every_capability_acts_or_is_refused() {
    let dir = tempdir();
    let mut a = Lm::start(dir.path(), "a", &["-M", "none", "-m", "16M"]);
    let listed: Vec<String> = a
        .ok("query-migrate-capabilities", json!({}))
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| {
            assert_eq!(c["state"], false, "off by default: {c}");
            c["capability"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    let all: Vec<&str> = QEMU_CAPS.iter().chain(LIVEMIG_CAPS).copied().collect();
    assert_eq!(listed, all);
    for cap in &all {
        let on = json!({"capabilities": [{"capability": cap, "state": true}]});
        if CAPS_SHOWN.iter().any(|s| s.name == *cap) {
            // postcopy-preempt is refused without postcopy-ram, zero-copy-send without
            // multifd, in QEMU's words.
            let needs = match *cap {
                "postcopy-preempt" => {
                    Some(("postcopy-ram", "Postcopy preempt requires postcopy-ram"))
                }
                "zero-copy-send" => Some((
                    "multifd",
                    "Zero copy only available for non-compressed non-TLS multifd migration",
                )),
                _ => None,
            };
            let needs_msg = needs.map(|(_, m)| m);
            let needs = needs.map(|(c, _)| c);
            if let (Some(first), Some(msg)) = (needs, needs_msg) {
                assert_eq!(a.err("migrate-set-capabilities", on.clone()), msg);
                let both = json!({"capabilities": [
                    {"capability": first, "state": true},
                    {"capability": cap, "state": true},
                ]});
                a.ok("migrate-set-capabilities", both);
            } else {
                a.ok("migrate-set-capabilities", on);
            }
            let caps = a.ok("query-migrate-capabilities", json!({}));
            let mut on_now: Vec<&str> = caps
                .as_array()
                .expect("a list")
                .iter()
                .filter(|c| c["state"] == true)
                .filter_map(|c| c["capability"].as_str())
                .collect();
            let mut want = vec![*cap];
            want.extend(needs);
            want.sort_unstable();
            on_now.sort_unstable();
            assert_eq!(on_now, want, "{cap} on");
            let off = json!({"capabilities": [
                {"capability": cap, "state": false},
                {"capability": needs.unwrap_or(cap), "state": false},
            ]});
            a.ok("migrate-set-capabilities", off);
        } else {
            assert_eq!(
                a.err("migrate-set-capabilities", on),
                format!("Capability '{cap}' is not supported by livemig"),
            );
            let caps = a.ok("query-migrate-capabilities", json!({}));
            assert!(
                caps.as_array()
                    .expect("a list")
                    .iter()
                    .all(|c| c["state"] == false),
                "{cap} refused yet on: {caps}"
            );
        }
    }
    for s in CAPS_SHOWN {
        assert!(all.contains(&s.name), "{} is no capability", s.name);
    }
    walk(CAPS_SHOWN);
}

/// What each migration parameter does in livemig.
enum Does {
    /// Acts: shown by the walk ([`PARAMS_SHOWN`]).
    Acts,
    /// Configures this capability, which is refused, so it can change nothing.
    Configures(&'static str),
    /// Times something QEMU's `-M none` does not have either (NIC self-announcements).
    NothingToTime,
}

/// Every QEMU 7.2 migration parameter (and livemig's own), with what it does and a valid
/// value other than its default.
fn params() -> Vec<(&'static str, Does, Value)> {
    use Does::*;
    vec![
        ("announce-initial", NothingToTime, json!(60)),
        ("announce-max", NothingToTime, json!(600)),
        ("announce-rounds", NothingToTime, json!(6)),
        ("announce-step", NothingToTime, json!(110)),
        ("compress-level", Configures("compress"), json!(2)),
        ("compress-threads", Configures("compress"), json!(4)),
        ("compress-wait-thread", Configures("compress"), json!(false)),
        ("decompress-threads", Configures("compress"), json!(3)),
        ("throttle-trigger-threshold", Acts, json!(60)),
        ("cpu-throttle-initial", Acts, json!(30)),
        ("cpu-throttle-increment", Acts, json!(15)),
        ("cpu-throttle-tailslow", Acts, json!(true)),
        ("tls-creds", Acts, json!("creds0")),
        ("tls-hostname", Acts, json!("host0")),
        ("tls-authz", Acts, json!("authz0")),
        ("max-bandwidth", Acts, json!(1 << 20)),
        ("downtime-limit", Acts, json!(1234)),
        ("x-checkpoint-delay", Configures("x-colo"), json!(1000)),
        ("block-incremental", Configures("block"), json!(true)),
        ("multifd-channels", Acts, json!(4)),
        ("xbzrle-cache-size", Configures("xbzrle"), json!(1 << 20)),
        ("max-postcopy-bandwidth", Acts, json!(1 << 20)),
        ("max-cpu-throttle", Acts, json!(50)),
        ("multifd-compression", Acts, json!("zlib")),
        ("multifd-zlib-level", Acts, json!(5)),
        ("multifd-zstd-level", Acts, json!(5)),
        ("x-livemig-stall-timeout", Acts, json!(5000)),
        ("x-livemig-auto-return-path", Acts, json!(false)),
        ("block-bitmap-mapping", Acts, json!([])),
    ]
}

/// Every parameter `query-migrate-parameters` lists is taken and reported back as QEMU does,
/// and either acts (shown by the walk, [`PARAMS_SHOWN`]), configures a capability that is
/// refused, or times NIC announcements, which a machine without NICs (QEMU's `-M none` too)
/// never sends.
#[test]
fn every_parameter_acts_or_feeds_a_refused_capability() {
    let dir = tempdir();
    let mut a = Lm::start(dir.path(), "a", &["-M", "none", "-m", "16M"]);
    let reported = a.ok("query-migrate-parameters", json!({}));
    let names: Vec<&str> = reported
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    let table = params();
    // As in QEMU, block-bitmap-mapping is listed only once it has been set.
    let mut expected: Vec<&str> = table
        .iter()
        .map(|(n, _, _)| *n)
        .filter(|n| *n != "block-bitmap-mapping")
        .collect();
    let mut got = names.clone();
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, expected, "the parameters listed");
    for (name, does, value) in &table {
        match does {
            Does::Acts => assert!(
                PARAMS_SHOWN.iter().any(|s| s.name == *name),
                "{name} acts, yet the walk does not show it"
            ),
            Does::Configures(cap) => {
                let on = json!({"capabilities": [{"capability": cap, "state": true}]});
                assert_eq!(
                    a.err("migrate-set-capabilities", on),
                    format!("Capability '{cap}' is not supported by livemig"),
                    "{name} configures {cap}"
                );
            }
            Does::NothingToTime => {}
        }
        a.set_params(json!({ *name: value.clone() }));
        let now = a.ok("query-migrate-parameters", json!({}));
        assert_eq!(&now[*name], value, "{name} reported back");
    }
    for s in PARAMS_SHOWN {
        assert!(
            table
                .iter()
                .any(|(n, d, _)| n == &s.name && matches!(d, Does::Acts)),
            "{} is not an acting parameter",
            s.name
        );
    }
    walk(PARAMS_SHOWN);
}
