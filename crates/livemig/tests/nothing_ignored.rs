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
    cited("qmp_stdio.rs", "fn qmp_on_stdio_answers_as_qemu_does");
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

/// Asserts that `file` (under this crate's `tests/`) contains `what`: a test named as the proof
/// that an option acts must exist.
fn cited(file: &str, what: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(text.contains(what), "{file} has no {what}");
}

/// The capabilities livemig implements, each with the test (file, what to find there) that
/// shows it changing what a user sees.
const ACTING_CAPS: &[(&str, &str, &str)] = &[
    // MIGRATION events on the destination only once turned on.
    (
        "events",
        "incoming_caps.rs",
        "a_destination_takes_capabilities_while_listening_and_loading_and_they_act",
    ),
    (
        "auto-converge",
        "auto_converge.rs",
        "a_guest_that_outruns_the_link_converges_only_with_auto_converge",
    ),
    (
        "postcopy-ram",
        "postcopy.rs",
        "the_destination_guest_runs_on_pages_it_pulls",
    ),
    (
        "postcopy-blocktime",
        "postcopy.rs",
        "assert!(q[\"postcopy-blocktime\"].is_u64()",
    ),
    (
        "postcopy-preempt",
        "postcopy.rs",
        "every page sent on the preempt channel was read there",
    ),
    // The source fails when the destination closes the return path before its SHUT.
    (
        "return-path",
        "fault_matrix.rs",
        "the destination closed the return path before reporting success",
    ),
    (
        "pause-before-switchover",
        "switchover.rs",
        "pause_before_switchover_waits_for_migrate_continue",
    ),
    (
        "dirty-bitmaps",
        "migrate.rs",
        "m_none_machines_migrate_ram_and_bitmaps",
    ),
    (
        "multifd",
        "multifd.rs",
        "fn multifd_over_unix_with_four_channels",
    ),
    (
        "zero-copy-send",
        "multifd.rs",
        "fn multifd_zero_copy_send_over_tcp",
    ),
    (
        "late-block-activate",
        "late_block_activate.rs",
        "late_block_activate_keeps_a_paused_destinations_disks_inactive_until_cont",
    ),
    (
        "x-livemig-integrity",
        "integrity.rs",
        "fn a_flipped_bit_fails_cleanly_with_integrity_and_the_source_resumes",
    ),
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

/// Every capability `query-migrate-capabilities` lists either acts (the test that shows it is
/// named in [`ACTING_CAPS`], and checked to exist) or is refused when turned on, with nothing
/// changed.
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
        match ACTING_CAPS.iter().find(|(c, _, _)| c == cap) {
            Some((_, file, what)) => {
                cited(file, what);
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
                let on_now: Vec<&str> = caps
                    .as_array()
                    .expect("a list")
                    .iter()
                    .filter(|c| c["state"] == true)
                    .filter_map(|c| c["capability"].as_str())
                    .collect();
                let mut want = vec![*cap];
                want.extend(needs);
                want.sort_unstable();
                let mut on_sorted = on_now.clone();
                on_sorted.sort_unstable();
                assert_eq!(on_sorted, want, "{cap} on");
                let off = json!({"capabilities": [
                    {"capability": cap, "state": false},
                    {"capability": needs.unwrap_or(cap), "state": false},
                ]});
                a.ok("migrate-set-capabilities", off);
            }
            None => {
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
    }
}

/// What each migration parameter does in livemig.
enum Does {
    /// Acts; the test (file, what to find there) that shows it.
    Acts(&'static str, &'static str),
    /// Configures this capability, which is refused, so it can change nothing.
    Configures(&'static str),
    /// Times something QEMU's `-M none` does not have either (NIC self-announcements).
    NothingToTime,
}

/// Every QEMU 7.2 migration parameter, with what it does and a valid value other than its
/// default.
fn params() -> Vec<(&'static str, Does, Value)> {
    use Does::*;
    let tls = Acts("qemu_tls.rs", "tls_qemu_to_livemig_to_qemu");
    // The throttle starts at cpu-throttle-initial and rises by cpu-throttle-increment once the
    // dirtied bytes pass throttle-trigger-threshold; tailslow is only read there.
    let ac = Acts(
        "auto_converge.rs",
        "a_guest_that_outruns_the_link_converges_only_with_auto_converge",
    );
    let ac_tailslow = Acts("auto_converge.rs", "&p[\"cpu-throttle-tailslow\"]");
    let ac_max = Acts(
        "auto_converge.rs",
        "the_throttle_holds_at_max_cpu_throttle_and_is_lifted_when_the_migration_ends",
    );
    vec![
        ("announce-initial", NothingToTime, json!(60)),
        ("announce-max", NothingToTime, json!(600)),
        ("announce-rounds", NothingToTime, json!(6)),
        ("announce-step", NothingToTime, json!(110)),
        ("compress-level", Configures("compress"), json!(2)),
        ("compress-threads", Configures("compress"), json!(4)),
        ("compress-wait-thread", Configures("compress"), json!(false)),
        ("decompress-threads", Configures("compress"), json!(3)),
        ("throttle-trigger-threshold", ac, json!(60)),
        (
            "cpu-throttle-initial",
            Acts("auto_converge.rs", "cpu-throttle-initial"),
            json!(30),
        ),
        (
            "cpu-throttle-increment",
            Acts("auto_converge.rs", "rose by cpu-throttle-increment"),
            json!(15),
        ),
        ("cpu-throttle-tailslow", ac_tailslow, json!(true)),
        ("tls-creds", tls, json!("creds0")),
        (
            "tls-hostname",
            Acts("qemu_tls.rs", "tls-hostname"),
            json!("host0"),
        ),
        (
            "tls-authz",
            Acts("qemu_tls.rs", "tls-authz"),
            json!("authz0"),
        ),
        (
            "max-bandwidth",
            Acts(
                "migrate.rs",
                "max_bandwidth_caps_the_rate_and_can_be_raised_mid_migration",
            ),
            json!(1 << 20),
        ),
        (
            "downtime-limit",
            Acts(
                "nothing_ignored.rs",
                "fn downtime_limit_decides_when_to_switch_over",
            ),
            json!(1234),
        ),
        ("x-checkpoint-delay", Configures("x-colo"), json!(1000)),
        ("block-incremental", Configures("block"), json!(true)),
        (
            "multifd-channels",
            Acts("multifd.rs", "fn multifd_over_unix_with_four_channels"),
            json!(4),
        ),
        ("xbzrle-cache-size", Configures("xbzrle"), json!(1 << 20)),
        (
            "max-postcopy-bandwidth",
            Acts("postcopy.rs", "\"max-postcopy-bandwidth\": 8 << 20"),
            json!(1 << 20),
        ),
        ("max-cpu-throttle", ac_max, json!(50)),
        (
            "multifd-compression",
            Acts("multifd.rs", "fn multifd_zlib_over_tcp"),
            json!("zlib"),
        ),
        (
            "multifd-zlib-level",
            Acts("multifd.rs", "compressed(\"zlib\""),
            json!(5),
        ),
        (
            "multifd-zstd-level",
            Acts("multifd.rs", "compressed(\"zstd\""),
            json!(5),
        ),
        (
            "x-livemig-stall-timeout",
            Acts("link_faults.rs", "\"x-livemig-stall-timeout\": STALL_MS"),
            json!(5000),
        ),
        (
            "x-livemig-auto-return-path",
            Acts("link_faults.rs", "x-livemig-auto-return-path"),
            json!(false),
        ),
        (
            "block-bitmap-mapping",
            Acts("qemu_mapping.rs", "qemu_mapping_qemu_to_livemig"),
            json!([]),
        ),
    ]
}

/// Every parameter `query-migrate-parameters` lists is taken and reported back as QEMU does,
/// and either acts (the test that shows it is named, and checked to exist), configures a
/// capability that is refused, or times NIC announcements, which a machine without NICs
/// (QEMU's `-M none` too) never sends.
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
            Does::Acts(file, what) => cited(file, what),
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
}

/// `downtime-limit` decides when the source stops the guest to switch over: with 1 ms nothing
/// a busy guest leaves fits, so the migration goes on pass after pass; raised, it completes.
#[test]
fn downtime_limit_decides_when_to_switch_over() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    let mut src = Lm::source(dir.path(), "src", "fill=16M,hot=8M,dirty-rate=0");
    src.wait_filled();
    src.set_params(json!({"downtime-limit": 1, "max-bandwidth": 64 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    // Several passes (the fill alone takes one) and still active.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let q = src.ok("query-migrate", json!({}));
        assert_eq!(q["status"], "active", "switched over within 1 ms? {q}");
        if q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no passes: {q}");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.set_params(json!({"downtime-limit": 2_000_000}));
    src.wait_completed();
    dst.wait_completed();
    assert_eq!(dst.verify_ram()["corrupt"], 0);
}
