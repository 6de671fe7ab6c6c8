//! The tools around `livemig vm`: a whole migration driven by QEMU's Python QMP client
//! (`qemu.qmp`), `livemig analyze` on a stream a source wrote with `migrate exec:cat > FILE`,
//! and `livemig demo`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

#[test]
fn python_qmp_client_drives_a_whole_migration() {
    if !testkit::require(
        "python_qmp_client_drives_a_whole_migration",
        testkit::python_qmp(),
    ) {
        return;
    }
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    // A second monitor on each VM for the Python client; the test keeps its own.
    let py_qmp = |name: &str| {
        let path = dir.path().join(format!("{name}-py.qmp"));
        (format!("unix:{},server=on,wait=off", path.display()), path)
    };
    let (dst_opt, dst_py) = py_qmp("dst");
    let (src_opt, src_py) = py_qmp("src");
    let mut dst_args = GUEST.to_vec();
    dst_args.extend(["-incoming", &uri, "-S", "-qmp", &dst_opt]);
    let mut dst = Lm::start(dir.path(), "dst", &dst_args);
    let mut src_args = GUEST.to_vec();
    src_args.extend(["-workload", BUSY, "-qmp", &src_opt]);
    let mut src = Lm::start(dir.path(), "src", &src_args);
    src.add_bitmap("b0");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp_migrate.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&src_py)
        .arg(&dst_py)
        .arg(&uri)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "src capabilities: dirty-bitmaps events return-path",
        "dst capabilities: dirty-bitmaps events return-path",
        "source events: setup active completed",
        "destination query-migrate: status completed",
        "OK",
    ] {
        assert!(lines.contains(&want), "no line {want:?} in:\n{stdout}");
    }
    // What the script saw agrees with what the VMs report, and the migration was real.
    let q = src.ok("query-migrate", json!({}));
    let line = format!(
        "source query-migrate: status completed, transferred {}, normal {}, downtime {}",
        q["ram"]["transferred"], q["ram"]["normal"], q["downtime"]
    );
    assert!(
        lines.contains(&line.as_str()),
        "no line {line:?} in:\n{stdout}"
    );
    check_stop_point(&mut src, &mut dst, &["b0"]);
}

/// Runs `livemig ARGS`, returning (exit code, stdout, stderr).
fn run_livemig(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(livemig())
        .args(args)
        .output()
        .expect("run livemig");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn analyze_decodes_a_stream_written_by_exec() {
    let dir = tempdir();
    let file = dir.path().join("stream");
    let mut src = Lm::source(dir.path(), "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(&["dirty-bitmaps"]);
    src.wait_filled();
    src.migrate(&format!("exec:cat > {}", file.display()));
    src.wait_completed();
    let steps = src.steps();
    let count = src.bitmap_info("b0")["count"].as_u64().unwrap_or(0);
    assert!(count > 0);
    let file = file.display().to_string();

    let (code, text, err) = run_livemig(&["analyze", &file]);
    assert_eq!(code, 0, "{text}\n{err}");
    for want in [
        "QEMU migration stream, file version 3,",
        "configuration: machine 'livemig-1.0'",
        "START ram (id 2, instance 0, version 4): MEM_SIZE 0x4000000 (1 block)",
        "block 'ram' 0x4000000 (16384 pages)",
        &format!(
            "d0/b0: granularity 65536, flags 0x1 (enabled), {} bits set, complete",
            count / 65536
        ),
        "livemig-workload (id",
        "fill = 33554432",
        "hot = 4194304",
        &format!("steps = {}", steps[0]),
        &format!("steps = {}", steps[1]),
        "trailer: vmdesc JSON,",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    assert!(!text.contains("error"), "{text}");

    let (code, out, err) = run_livemig(&["analyze", &file, "--json"]);
    assert_eq!(code, 0, "{err}");
    let a: Value = serde_json::from_str(&out).expect("analyze --json prints JSON");
    assert!(a.get("error").is_none(), "{}", a["error"]);
    assert_eq!(a["eof"], true);
    assert_eq!(a["file_version"], 3);
    assert_eq!(a["trailing_bytes"], 0);
    assert_eq!(a["bytes"], std::fs::metadata(&file).expect("stream").len());

    let blocks = a["ram"]["blocks"].as_array().expect("ram blocks");
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["name"], "ram");
    assert_eq!(blocks[0]["size"], 64 << 20);
    let sent = blocks[0]["normal"].as_u64().unwrap_or(0) + blocks[0]["zero"].as_u64().unwrap_or(0);
    assert!(
        sent >= 16384,
        "every page goes at least once: {}",
        blocks[0]
    );
    assert!(
        blocks[0]["normal"].as_u64().unwrap_or(0) >= FILL_PAGES,
        "{}",
        blocks[0]
    );

    let bitmaps = a["dirty_bitmaps"].as_array().expect("dirty_bitmaps");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    let b = &bitmaps[0];
    assert_eq!(
        (b["node"].as_str(), b["bitmap"].as_str()),
        (Some("d0"), Some("b0"))
    );
    assert_eq!(b["granularity"], 65536);
    assert_eq!(b["complete"], true);
    assert_eq!(b["set_bits"], count / 65536);
    let chunks = b["chunks"].as_array().expect("chunks");
    assert!(!chunks.is_empty());
    let chunk_bits: u64 = chunks
        .iter()
        .map(|c| c["set_bits"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(chunk_bits, count / 65536);

    let devices = a["devices"].as_array().expect("devices");
    let fields = |idstr: &str, instance: u64| -> Value {
        devices
            .iter()
            .find(|d| d["idstr"] == idstr && d["instance_id"] == instance)
            .unwrap_or_else(|| panic!("no device {idstr}.{instance} in {devices:?}"))["fields"]
            .clone()
    };
    assert_eq!(fields("livemig-workload", 0)["fill"], 32 << 20);
    assert_eq!(fields("livemig-workload", 0)["hot"], 4 << 20);
    for (i, s) in steps.iter().enumerate() {
        let f = fields("livemig-vcpu", i as u64);
        assert_eq!(
            (f["id"].as_u64(), f["steps"].as_u64()),
            (Some(i as u64), Some(*s))
        );
    }
    // The run state as its NUL-padded buffer, in hex: "running\0...".
    let runstate = fields("globalstate", 0)["runstate"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(runstate.starts_with("72756e6e696e6700"), "{runstate}");
    for d in devices {
        assert!(d.get("decode_error").is_none(), "{d}");
        assert!(d["fields"].is_object(), "undecoded device section {d}");
    }
    let trailer = &a["trailer"];
    assert_eq!(trailer["status"], "present", "{trailer}");
    let described = trailer["json"]["devices"]
        .as_array()
        .expect("vmdesc devices");
    assert_eq!(described.len(), devices.len(), "{trailer}");
    assert_eq!(trailer["json"]["page_size"], 4096);
}

#[test]
fn demo_migrates_and_verifies() {
    let (code, out, err) = run_livemig(&["demo", "--ram", "64M", "--hot", "8M"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for line in [
        "a 1.0 GiB disk with a dirty bitmap",
        "destination started with -mem-prealloc",
        "migration completed",
        "bitmap0 sha256",
        "guest resumed",
    ] {
        assert!(
            out.contains(line),
            "no '{line}' in stdout:\n{out}\nstderr:\n{err}"
        );
    }
    assert_eq!(out.lines().last(), Some("verified"), "stdout:\n{out}");
    assert!(!out.contains("FAIL"), "stdout:\n{out}");

    // Without a disk and without preallocation: nothing claims either.
    let (code, out, err) = run_livemig(&[
        "demo",
        "--ram",
        "32M",
        "--hot",
        "4M",
        "--disk",
        "0",
        "--no-mem-prealloc",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("disk") && !out.contains("bitmap0"), "{out}");
    assert!(!out.contains("-mem-prealloc"), "{out}");
    assert_eq!(out.lines().last(), Some("verified"), "stdout:\n{out}");
}

/// `livemig bench --postcopy --json`: each run reports the destination's page requests, their
/// fault -> placement latency (whole and in stages) and blocktime; `--verify` checks the destination's RAM page by
/// page and that its guest ran on.
#[test]
fn bench_postcopy_reports_page_request_latency() {
    let (code, out, err) = run_livemig(&[
        "bench",
        "--postcopy",
        "--ram",
        "64M",
        "--hot",
        "16M",
        "--vcpus",
        "2",
        "--runs",
        "1",
        "--verify",
        "--json",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let run: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    let p = &run["postcopy"];
    for k in [
        "requests",
        "latency-count",
        "latency-median-us",
        "latency-p99-us",
        "latency-asking-median-us",
        "latency-answer-median-us",
        "latency-placing-median-us",
        "blocktime-ns",
    ] {
        assert!(p[k].is_u64(), "{k}: {run}");
    }
    assert!(
        p["vcpu-blocktime-ns"].as_array().map(Vec::len) == Some(2),
        "{run}"
    );
    assert!(run["postcopy"]["postcopy-requests"].is_u64(), "{run}");
}

/// `livemig bench --accel kvm`: both ends run KVM vCPUs (the guest code writing RAM and, with
/// `--disk`, its virtio-blk disk on both ends); precopy with a disk and postcopy each verify.
#[test]
fn bench_with_kvm_vcpus() {
    if !testkit::require("bench_with_kvm_vcpus", testkit::kvm()) {
        return;
    }
    for extra in [&["--disk", "16M"][..], &["--postcopy"][..]] {
        let mut args = vec![
            "bench", "--accel", "kvm", "--ram", "64M", "--hot", "8M", "--runs", "1", "--verify",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = run_livemig(&args);
        assert_eq!(code, 0, "{extra:?}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains(", 1 KVM vCPU(s),"), "{out}");
        assert!(out.contains("median: total"), "{out}");
    }
}

/// `livemig bench --json`: one object per run with the whole-migration figures, then the
/// medians; with `--verify` every run is also checked end to end (exit status 0).
#[test]
fn bench_reports_each_run_and_the_medians() {
    let (code, out, err) = run_livemig(&[
        "bench",
        "--ram",
        "32M",
        "--hot",
        "4M",
        "--disk",
        "16M",
        "--runs",
        "2",
        "--verify",
        "--mem-prealloc",
        "--json",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (i, run) in lines[..2].iter().enumerate() {
        assert_eq!(run["run"], i + 1, "{run}");
        // All of the 32 MiB of RAM went over at least once.
        assert!(run["transferred"].as_u64().unwrap() >= 32 << 20, "{run}");
        assert!(run["passes"].as_u64().unwrap() >= 1, "{run}");
        assert!(
            run["throughput-bytes-per-s"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        for k in ["total-ms", "downtime-ms", "setup-ms"] {
            assert!(run[k].is_u64(), "{k}: {run}");
        }
    }
    let m = &lines[2]["median"];
    for k in ["total-ms", "downtime-ms", "throughput-bytes-per-s"] {
        assert!(m[k].is_f64(), "{k}: {m}");
    }

    let (code, _, err) = run_livemig(&["bench", "--transport", "pigeon"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'pigeon' for '--transport <KIND>'")
            && err.contains("[possible values: tcp, unix]"),
        "{err}"
    );

    // --preempt means something only with --postcopy: alone it is refused, not ignored.
    let (code, _, err) = run_livemig(&["bench", "--preempt"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("the following required arguments were not provided")
            && err.contains("--postcopy"),
        "{err}"
    );
}

/// A reader that stops reading (`livemig bench --json | head -1`) ends every tool quietly:
/// exit status 0, nothing on stderr (no panic about a broken pipe), and no VM process left
/// behind.
#[test]
fn tools_end_quietly_when_their_reader_goes_away() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let cases: [&[&str]; 3] = [
        &["bench", "--ram", "16M", "--runs", "3", "--json"],
        &["bench", "--ram", "16M", "--runs", "3"],
        &["demo", "--ram", "16M", "--hot", "1M", "--disk", "0"],
    ];
    for args in cases {
        let mut child = Command::new(livemig())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run livemig");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("the first line");
        assert!(!first.is_empty(), "{args:?}: no first line");
        drop(out); // `| head -1` is done
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("stderr");
        let pid = child.id();
        let status = child.wait().expect("wait");
        assert!(status.success(), "{args:?}: {status}; stderr:\n{err}");
        assert!(err.is_empty(), "{args:?}: stderr:\n{err}");
        // Its VMs ran in a directory named after it; none may outlive it.
        let marker = format!("livemig-{pid}-");
        let left: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect();
        assert!(left.is_empty(), "{args:?}: VMs left running: {left:?}");
    }
}

/// `bench --ram 32M --runs 1` with `flag DIR`: with `good`, over each of `transports`, with two
/// multifd channels and `--verify`, the run succeeds and says both ends loaded `kind` from
/// `good`; with `bad`, it fails with `refusal` on stderr.
fn bench_secured(
    flag: &str,
    kind: &str,
    good: &Path,
    transports: &[&str],
    bad: &Path,
    refusal: &str,
) {
    let good_arg = good.display().to_string();
    for transport in transports {
        let (code, out, err) = run_livemig(&[
            "bench",
            "--ram",
            "32M",
            "--runs",
            "1",
            "--transport",
            transport,
            "--multifd",
            "2",
            "--verify",
            flag,
            &good_arg,
        ]);
        assert_eq!(code, 0, "{transport}: stdout:\n{out}\nstderr:\n{err}");
        assert!(
            out.contains(&format!("TLS: {kind} from {good_arg} on both ends")),
            "{out}"
        );
    }

    let bad_arg = bad.display().to_string();
    let (code, out, err) = run_livemig(&["bench", "--ram", "32M", "--runs", "1", flag, &bad_arg]);
    assert_ne!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(refusal), "{err}");
}

/// `bench --tls-creds DIR`: both ends load their credentials from DIR and every channel
/// (here the main one and two multifd channels) is a TLS session — a server certificate
/// that does not name 127.0.0.1 fails the run with the source's hostname check, so TLS is
/// not merely configured. Unix sockets are refused (no address to check).
#[test]
fn bench_over_tls() {
    use testkit::pki::{Ca, Subject};
    let dir = tempdir();
    let ca = Ca::new("bench CA");
    let good = dir.path().join("good");
    ca.write_server(&good, &Subject::new("dest", &["127.0.0.1"]));
    ca.write_client(&good, &Subject::new("source", &[]));
    let other = dir.path().join("other");
    ca.write_server(&other, &Subject::new("dest", &["other.example.org"]));
    ca.write_client(&other, &Subject::new("source", &[]));
    bench_secured(
        "--tls-creds",
        "tls-creds-x509",
        &good,
        &["tcp"],
        &other,
        "Certificate does not match the hostname 127.0.0.1",
    );

    let good_arg = good.display().to_string();
    let (code, _, err) = run_livemig(&["bench", "--transport", "unix", "--tls-creds", &good_arg]);
    assert_ne!(code, 0);
    assert!(err.contains("--tls-creds needs --transport tcp"), "{err}");
}

/// `bench --tls-psk DIR`: both ends load `tls-creds-psk` from DIR and every channel (the main
/// one and two multifd channels) is a PSK session, over tcp and over unix (no hostname to
/// check); a `keys.psk` without the source's username fails the run with QEMU's message, so
/// the key is really used.
#[test]
fn bench_over_tls_psk() {
    let dir = tempdir();
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::write(
        good.join("keys.psk"),
        "qemu:9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9\n",
    )
    .unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keys.psk"), "admin:00112233\n").unwrap();
    bench_secured(
        "--tls-psk",
        "tls-creds-psk",
        &good,
        &["tcp", "unix"],
        &other,
        &format!(
            "Username qemu not found in PSK file {}/keys.psk",
            other.display()
        ),
    );
}
