//! `livemig analyze` on real streams: one written by QEMU 7.2, one written by livemig (both
//! `-M none` with RAM contents and a dirty bitmap), in text and `--json`, and damaged copies
//! of them, where it must say where and why (exit status 1, the byte offset in the message).

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

fn analyze(path: &Path, json_out: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livemig"));
    c.arg("analyze").arg(path);
    if json_out {
        c.arg("--json");
    }
    c.output().expect("run livemig analyze")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs both output forms on an undamaged stream; returns (text, JSON).
fn analyze_ok(path: &Path) -> (String, Value) {
    let t = analyze(path, false);
    assert_eq!(
        t.status.code(),
        Some(0),
        "{}{}",
        text(&t.stdout),
        text(&t.stderr)
    );
    let j = analyze(path, true);
    assert_eq!(j.status.code(), Some(0), "{}", text(&j.stderr));
    let v: Value = serde_json::from_slice(&j.stdout).expect("analyze --json prints JSON");
    assert!(v.get("error").is_none(), "{v}");
    (text(&t.stdout), v)
}

/// Checks what both analyses say about a whole `-M none` stream of 32 MiB with `normal`
/// non-zero pages and one bitmap `node0/bm0` (64 KiB granules, enabled, `set` granules set).
fn check_stream(txt: &str, v: &Value, normal: u64, set: u64) {
    assert!(txt.contains("configuration: machine 'none'"), "{txt}");
    assert!(
        txt.contains(&format!(
            "block 'ram' 0x2000000 (8192 pages): {normal} normal"
        )),
        "{txt}"
    );
    assert!(
        txt.contains(&format!(
            "node0/bm0: granularity 65536, flags 0x1 (enabled), {set} bits set, complete"
        )),
        "{txt}"
    );
    assert_eq!(v["configuration"]["machine"], "none");
    assert_eq!(v["eof"], true);
    let blocks = v["ram"]["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), 1, "{v}");
    assert_eq!(blocks[0]["name"], "ram");
    assert_eq!(blocks[0]["size"], RAM);
    assert_eq!(blocks[0]["normal"], normal);
    let bms = v["dirty_bitmaps"].as_array().expect("bitmaps");
    assert_eq!(bms.len(), 1, "{v}");
    let b = &bms[0];
    assert_eq!(
        (
            &b["node"],
            &b["bitmap"],
            &b["granularity"],
            &b["start_flags"]
        ),
        (&json!("node0"), &json!("bm0"), &json!(65536), &json!(1))
    );
    assert_eq!(
        (&b["complete"], &b["set_bits"]),
        (&json!(true), &json!(set))
    );
    // A 64 MiB node at 64 KiB granules: one chunk of 1024 granules, a 128-byte buffer.
    assert_eq!(b["chunks"][0]["nr_sectors"], 131072);
    assert_eq!(b["chunks"][0]["buf_size"], 128);
    let idstrs: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    for want in ["ram", "dirty-bitmap", "globalstate"] {
        assert!(idstrs.contains(&want), "no {want} section: {idstrs:?}");
    }
    assert_eq!(v["trailer"]["status"], "present", "{}", v["trailer"]);
}

/// The offset of the first item of `kind` for section `name`.
fn item_offset(v: &Value, kind: &str, name: &str) -> u64 {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["kind"] == kind && i["name"] == name)
        .and_then(|i| i["offset"].as_u64())
        .unwrap_or_else(|| panic!("no {kind} {name} item"))
}

/// Damages a copy of `stream` three ways and checks that both output forms report the damage
/// at the right byte, with exit status 1.
fn check_damaged(dir: &Path, stream: &[u8], v: &Value, tag: &str) {
    let end_bitmaps = item_offset(v, "END", "dirty-bitmap") as usize;
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        // The END dirty-bitmap section's type byte replaced with an unknown one.
        (
            {
                let mut s = stream.to_vec();
                s[end_bitmaps] = 0x55;
                s
            },
            end_bitmaps,
            "Unknown savevm section type 85",
        ),
        // Its first chunk's flags byte (after type and be32 id) with an undefined bit.
        (
            {
                let mut s = stream.to_vec();
                s[end_bitmaps + 5] = 0x81;
                s
            },
            end_bitmaps + 5,
            "Unknown dirty bitmap migration flags",
        ),
        // Cut inside that section.
        (
            stream[..end_bitmaps + 10].to_vec(),
            end_bitmaps + 10,
            "unexpected end of stream",
        ),
    ];
    for (i, (bytes, at, why)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("{tag}-damaged-{i}.mig"));
        std::fs::write(&path, &bytes).unwrap();
        let t = analyze(&path, false);
        let err = text(&t.stderr);
        assert_eq!(t.status.code(), Some(1), "{tag} case {i}: {err}");
        assert!(err.contains(why), "{tag} case {i}: {err}");
        // The offset is where the bad item starts, or where the stream ran out.
        let at_item = format!("at byte {at:#x}");
        let near = (at.saturating_sub(12)..=at).any(|o| err.contains(&format!("at byte {o:#x}")));
        assert!(
            err.contains(&at_item) || (why.starts_with("unexpected") && near),
            "{tag} case {i}: {err}"
        );
        // What came before the damage is still decoded.
        assert!(
            text(&t.stdout).contains("configuration: machine 'none'"),
            "{tag} case {i}"
        );

        let j = analyze(&path, true);
        assert_eq!(j.status.code(), Some(1), "{tag} case {i} --json");
        let jv: Value = serde_json::from_slice(&j.stdout).expect("JSON even when damaged");
        let e = &jv["error"];
        assert!(
            e["message"].as_str().unwrap_or_default().contains(why),
            "{e}"
        );
        let off = e["offset"].as_u64().expect("error offset") as usize;
        assert!(
            off <= at && off + 12 >= at,
            "{tag} case {i}: offset {off:#x}, damage at {at:#x}"
        );
        assert_eq!(jv["configuration"]["machine"], "none");
    }
}

#[test]
fn qemu_analyze_stream_from_qemu() {
    let Some(tmp) = setup("qemu_analyze_stream_from_qemu") else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 64 << 10, 5);
    let mut args = null_co("node0", MIB64);
    args.extend(loader(&pat, 1 << 20));
    let p = qemu(dir, "src", &args);
    let mut q = p.qmp();
    add_bitmap(&mut q, "node0", "bm0", 65536);
    for w in ["write 0 64k", "write 320k 4k", "write 1M 64k"] {
        qemu_io(&mut q, "node0", w);
    }
    caps(&mut q, false);
    let path = dir.join("qemu.mig");
    capture_from_qemu(&mut q, &path);
    let (txt, v) = analyze_ok(&path);
    check_stream(&txt, &v, 16, 3);
    // QEMU's vmdesc names its devices; the timer section is decoded field by field.
    assert!(txt.contains("cpu_ticks_offset"), "{txt}");
    check_damaged(dir, &std::fs::read(&path).unwrap(), &v, "qemu");
}

#[test]
fn qemu_analyze_stream_from_livemig() {
    let Some(tmp) = setup("qemu_analyze_stream_from_livemig") else {
        return;
    };
    let dir = tmp.path();
    // A livemig VM with two non-zero pages (loaded from a generated stream) and a bitmap.
    let spec = StreamSpec {
        pages: marker_pages(),
        ..Default::default()
    };
    let input = write_stream(&dir.join("in.mig"), &spec);
    let mut l = run_into_livemig(dir, "src", &input, &null_co("node0", MIB64), |_| {});
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    add_bitmap(&mut l.q, "node0", "bm0", 65536);
    for w in ["write 0 64k", "write 320k 4k", "write 1M 64k"] {
        qemu_io(&mut l.q, "node0", w);
    }
    let path = dir.join("livemig.mig");
    l.q.ok(
        "migrate",
        json!({"uri": format!("file:{}", path.display())}),
    );
    let st = wait(&mut l.q, &["completed", "failed"]);
    assert_eq!(st["status"], "completed", "{st}");
    let (txt, v) = analyze_ok(&path);
    check_stream(&txt, &v, 2, 3);
    check_damaged(dir, &std::fs::read(&path).unwrap(), &v, "livemig");
}

#[test]
fn qemu_analyze_output_closed_early_is_not_a_crash() {
    // No QEMU needed: the stream is generated.
    let tmp = testkit::tempdir();
    let path = write_stream(
        &tmp.path().join("s.mig"),
        &StreamSpec {
            pages: marker_pages(),
            ..Default::default()
        },
    );
    // As in `livemig analyze FILE | head -1`: the reader is gone before the output is written.
    for json_out in [false, true] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_livemig"));
        c.arg("analyze").arg(&path);
        if json_out {
            c.arg("--json");
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(out.status.code(), Some(0), "{err}");
    }
}

/// Forwards every connection made to `listen` to `target`, both ways, keeping a copy of what
/// the first one (the main migration channel) carried towards the destination: a postcopy
/// stream needs a live destination with a return path, so it cannot be written to a file.
fn tee_relay(listen: &Path, target: std::path::PathBuf) -> Arc<Mutex<Vec<u8>>> {
    let l = UnixListener::bind(listen).expect("bind the relay");
    let copy = Arc::new(Mutex::new(Vec::new()));
    let c = copy.clone();
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().enumerate() {
            let Ok(mut from_src) = conn else { return };
            let Ok(mut to_dst) = UnixStream::connect(&target) else {
                return;
            };
            let (Ok(mut back_src), Ok(mut back_dst)) = (from_src.try_clone(), to_dst.try_clone())
            else {
                return;
            };
            let tee = (i == 0).then(|| c.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = from_src.read(&mut buf) {
                    if let Some(t) = &tee {
                        t.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_dst.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_dst, &mut back_src);
                let _ = back_src.shutdown(Shutdown::Write);
            });
        }
    });
    copy
}

/// A postcopy-ram migration `src` → relay → `dst` (`-M none`, 32 MiB): precopy throttled to
/// 1 MiB/s, `migrate-start-postcopy` after the first MiB, the destination's RAM read once in
/// postcopy (pulling pages); both must complete. Returns the main channel's bytes.
///
/// That the destination went `postcopy-active` is read from its `MIGRATION` events: its
/// postcopy lasts under a second here, and a poll of `query-migrate` from a test thread held
/// off the CPU that long saw `completed` instead.
fn postcopy_through_tee(
    src: &mut testkit::QmpClient,
    dst: &mut testkit::QmpClient,
    dir: &Path,
    name: &str,
) -> Vec<u8> {
    for q in [&mut *src, &mut *dst] {
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
        );
    }
    dst.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    let relay = dir.join(format!("{name}-relay.sock"));
    let copy = tee_relay(&relay, dir.join(format!("{name}.sock")));
    src.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 4 << 20}),
    );
    src.ok(
        "migrate",
        json!({"uri": format!("unix:{}", relay.display())}),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while src.ok("query-migrate", json!({}))["ram"]["transferred"]
        .as_u64()
        .unwrap_or(0)
        < 1 << 20
    {
        assert!(std::time::Instant::now() < deadline, "{name}: no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    src.ok("migrate-start-postcopy", json!({}));
    let ended = |e: &Value| {
        e["event"] == "MIGRATION"
            && ["postcopy-active", "completed", "failed"]
                .contains(&e["data"]["status"].as_str().unwrap_or_default())
    };
    let d = dst
        .wait_event(std::time::Duration::from_secs(60), ended)
        .unwrap_or_else(|| panic!("{name}: the destination did not leave precopy"));
    assert_eq!(d["data"]["status"], "postcopy-active", "{name}: {d}");
    let _ = ram(dst, dir, &format!("{name}-during"));
    let s = wait(src, &["completed", "failed"]);
    assert_eq!(s["status"], "completed", "{name}: source {s}");
    let d = wait(dst, &["completed", "failed"]);
    assert_eq!(d["status"], "completed", "{name}: destination {d}");
    let bytes = copy.lock().unwrap().clone();
    bytes
}

/// What `livemig analyze` must show of a postcopy stream: ADVISE with page sizes, the
/// discards, the PACKAGED device state with LISTEN first and RUN last inside it (depth 1),
/// then RAM PART sections (the postcopy push), and the EOF.
fn check_postcopy_stream(dir: &Path, stream: &[u8], tag: &str) {
    let path = dir.join(format!("{tag}-postcopy.mig"));
    std::fs::write(&path, stream).unwrap();
    let (txt, v) = analyze_ok(&path);
    for name in [
        "POSTCOPY_ADVISE",
        "POSTCOPY_RAM_DISCARD",
        "PACKAGED",
        "POSTCOPY_LISTEN",
        "POSTCOPY_RUN",
    ] {
        assert!(txt.contains(name), "{tag}: no {name} in\n{txt}");
    }
    let items = v["items"].as_array().expect("items");
    let pos = |name: &str| {
        items
            .iter()
            .position(|i| i["kind"] == "COMMAND" && i["name"] == name)
            .unwrap_or_else(|| panic!("{tag}: no {name} command"))
    };
    let (advise, discard, packaged, listen, run) = (
        pos("POSTCOPY_ADVISE"),
        pos("POSTCOPY_RAM_DISCARD"),
        pos("PACKAGED"),
        pos("POSTCOPY_LISTEN"),
        pos("POSTCOPY_RUN"),
    );
    assert!(
        advise < discard && discard < packaged && packaged < listen && listen < run,
        "{tag}: order {advise} {discard} {packaged} {listen} {run}"
    );
    assert_eq!(
        items[advise]["detail"], "pagesize summary 0x1000, target page size 0x1000",
        "{tag}"
    );
    for i in [listen, run] {
        assert_eq!(items[i]["depth"], 1, "{tag}: {}", items[i]);
    }
    // Device state inside the package, the postcopy push after it.
    assert!(
        items[listen..run]
            .iter()
            .any(|i| i["kind"] == "FULL" && i["depth"] == 1),
        "{tag}: no device section in the package"
    );
    assert!(
        items[run..]
            .iter()
            .any(|i| i["kind"] == "PART" && i["name"] == "ram" && i.get("depth").is_none()),
        "{tag}: no RAM PART after the package"
    );
    assert_eq!(v["eof"], true, "{tag}");
}

/// `livemig analyze` on real postcopy streams (issue 10): QEMU 7.2's, captured on its way to
/// livemig, and livemig's, captured on its way to QEMU 7.2.
#[test]
fn qemu_analyze_postcopy_streams() {
    let Some(tmp) = setup("qemu_analyze_postcopy_streams") else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 4 << 20, 9);
    let qa = qemu(dir, "qa", &loader(&pat, 0));
    let mut qa_q = qa.qmp();
    let l1 = livemig(
        dir,
        "l1",
        &strings(&[
            "-incoming",
            &format!("unix:{}", dir.join("l1.sock").display()),
        ]),
    );
    let mut l1_q = l1.qmp();
    let from_qemu = postcopy_through_tee(&mut qa_q, &mut l1_q, dir, "l1");
    check_postcopy_stream(dir, &from_qemu, "qemu");
    drop(qa);

    let qb = qemu(
        dir,
        "qb",
        &strings(&[
            "-incoming",
            &format!("unix:{}", dir.join("qb.sock").display()),
        ]),
    );
    let mut qb_q = qb.qmp();
    let from_livemig = postcopy_through_tee(&mut l1_q, &mut qb_q, dir, "qb");
    check_postcopy_stream(dir, &from_livemig, "livemig");
}
