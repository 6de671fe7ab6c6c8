//! Nothing accepted and ignored (issue 9, bug 5): every command-line option `livemig vm`
//! accepts changes what a user sees, or is one whose job QEMU's `-M none` has nothing to do
//! for either (and then it changes nothing in QEMU too, which is checked); everything else is
//! refused at start-up, with QEMU's words where QEMU has them.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
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
        (&["-monitor", "stdio"], "-monitor stdio: livemig has no human monitor of its own; use -qmp, and human-monitor-command for HMP (-monitor none)".into()),
        (&["-nographic"], "-nographic: not supported (it puts the serial port and a human monitor on stdio); use -display none with -serial file:PATH and -qmp".into()),
        (&["-serial", "stdio"], "-serial stdio: only file:PATH, none and null are supported".into()),
        (&["-device", "virtio-net"], "-device virtio-net: 'virtio-net' is not a valid device model name".into()),
        (&["-frobnicate"], "-frobnicate: invalid option".into()),
    ];
    for (args, msg) in cases {
        refused(dir.path(), args, msg);
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
