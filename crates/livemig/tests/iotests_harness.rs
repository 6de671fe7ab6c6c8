//! What QEMU's own iotests (`tests/iotests/run.sh`) pass to `livemig vm`, and what they read
//! back, each checked here on its own so a regression shows without the suite: the probes
//! (`-machine help`, `-drive format=help`), a VM started as QEMU's Python test library starts
//! one (`-chardev socket` + `-mon mode=control`, `-qtest`, `-accel qtest`, `-drive if=virtio`),
//! `-drive` with `backing.node-name`, `-blockdev` with its implied `driver` key, and backing
//! files named `json:{...}`.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::{QmpClient, VmProcess};

fn livemig(args: &[&str]) -> std::process::Output {
    Command::new(testkit::livemig_bin())
        .arg("vm")
        .args(args)
        .output()
        .expect("run livemig")
}

fn qemu_img(args: &[&str]) -> bool {
    Command::new("qemu-img")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `qemu-img create -f qcow2 IMG 1M`, over the qcow2 `backing` file if given.
fn create_qcow2(img: &Path, backing: Option<&str>) {
    let mut args = vec!["create", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([img.to_str().unwrap(), "1M"]);
    assert!(qemu_img(&args), "qemu-img {args:?}");
}

fn lm(dir: &Path, name: &str, args: &[&str]) -> (VmProcess, QmpClient) {
    let args: Vec<String> = ["vm", "-nodefaults", "-display", "none", "-accel", "qtest"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let p = VmProcess::spawn(testkit::livemig_bin().to_str().unwrap(), &args, dir, name)
        .expect("spawn livemig");
    let q = p.qmp();
    (p, q)
}

#[test]
fn probes_list_machines_and_formats_as_qemu_does() {
    let out = livemig(&["-machine", "help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // QEMU's iotests take the first word of the line that ends in " (default)".
    let default = text
        .lines()
        .find(|l| l.ends_with(" (default)"))
        .and_then(|l| l.split(' ').next());
    assert_eq!(default, Some("livemig"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("none ")), "{text}");

    let out = livemig(&["-drive", "format=help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, head) in lines
        .iter()
        .zip(["Supported formats:", "Supported formats (read-only):"])
    {
        let list = line.strip_prefix(head).expect(head);
        let formats: Vec<&str> = list.split_whitespace().collect();
        assert!(
            formats.contains(&"qcow2") && formats.contains(&"raw"),
            "{line}"
        );
    }
}

/// QEMU's Python library listens and lets the VM connect: the monitor on a `-chardev socket`
/// without `server`, the qtest protocol on `-qtest unix:path=...`.
#[test]
fn monitor_and_qtest_connect_to_the_harness() {
    let dir = testkit::tempdir();
    let mon_path = dir.path().join("mon.sock");
    let qtest_path = dir.path().join("qtest.sock");
    let mon = UnixListener::bind(&mon_path).unwrap();
    let qtest = UnixListener::bind(&qtest_path).unwrap();
    let mut child = Command::new(testkit::livemig_bin())
        .args([
            "vm",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "qtest",
            "-chardev",
            &format!("socket,id=mon,path={}", mon_path.display()),
            "-mon",
            "chardev=mon,mode=control",
            "-qtest",
            &format!("unix:path={}", qtest_path.display()),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (m, _) = mon.accept().unwrap();
    m.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = String::new();
    BufReader::new(m.try_clone().unwrap())
        .read_line(&mut greeting)
        .unwrap();
    let g: Value = serde_json::from_str(&greeting).unwrap();
    assert!(g["QMP"]["version"].is_object(), "{greeting}");

    let (mut q, _) = qtest.accept().unwrap();
    q.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    q.write_all(b"clock_step 1000\n").unwrap();
    let mut reply = String::new();
    BufReader::new(q.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    // Not built: refused in QEMU's words, never a fake "OK".
    assert_eq!(reply, "FAIL Unknown command 'clock_step'\n");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn chardevs_livemig_cannot_use_are_refused() {
    for (args, want) in [
        (
            vec!["-chardev", "socket,id=c0,path=/nonexistent/x"],
            "nothing uses this chardev",
        ),
        (
            vec![
                "-chardev",
                "socket,id=c0,path=/nonexistent/x",
                "-mon",
                "chardev=c0,mode=readline",
            ],
            "human monitor",
        ),
        (vec!["-qtest", "tcp:localhost:1"], "unix socket"),
        (vec!["-drive", "if=ide,file=/x,format=raw"], "no 'ide' bus"),
        (
            vec![
                "-drive",
                "if=virtio,file=/x,format=qcow2,cache=writethrough",
            ],
            "write-through",
        ),
    ] {
        let out = livemig(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `-drive if=virtio,id=drive0,...` as `iotests.VM.add_drive` writes it: QMP commands find the
/// disk by the drive's id, and `backing.node-name` names the backing node the image opens.
#[test]
fn drive_is_found_by_its_id_and_names_its_backing_node() {
    if !testkit::require(
        "drive_is_found_by_its_id_and_names_its_backing_node",
        testkit::programs(&["qemu-img"]),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, None);
    create_qcow2(&top, Some(base.to_str().unwrap()));
    let drive = format!(
        "if=virtio,id=drive0,file={},format=qcow2,cache=writeback,aio=threads,backing.node-name=base",
        top.display()
    );
    let (_p, mut q) = lm(dir.path(), "vm", &["-drive", &drive]);
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "b0", "granularity": 512}),
    );
    let blk = q.ok("query-block", json!({}));
    assert_eq!(blk[0]["device"], "drive0", "{blk}");
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(names.contains(&"base"), "{names:?}");
    // The top node's name is generated, as QEMU's is.
    assert!(names.iter().any(|n| n.starts_with("#block")), "{names:?}");
}

/// Bugs the iotests found: `-blockdev file,filename=...` (the implied `driver` key) was
/// refused, and a backing file named `json:{...}` was opened as a file of that name.
#[test]
fn blockdev_implied_driver_and_json_backing_names_open() {
    if !testkit::require(
        "blockdev_implied_driver_and_json_backing_names_open",
        testkit::programs(&["qemu-img"]),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, None);
    let backing = json!({"driver": "qcow2", "file": {"driver": "file", "filename": base}});
    create_qcow2(&top, Some(&format!("json:{backing}")));
    let file = format!("file,filename={},node-name=top-file", top.display());
    let (_p, mut q) = lm(
        dir.path(),
        "vm",
        &[
            "-blockdev",
            &file,
            "-blockdev",
            "qcow2,file=top-file,node-name=top",
        ],
    );
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let base_node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["file"].as_str() == Some(base.to_str().unwrap()));
    assert!(
        base_node.is_some(),
        "the json: backing file is not open: {nodes}"
    );
}

/// Bug the iotests found (migrate-bitmaps-test): a bitmap on a `-drive id=drive0` disk, whose
/// node's name is generated, was refused ("in a node with auto-generated name '#block...'");
/// QEMU migrates it under the drive's name, as the destination's `drive0` receives it.
#[test]
fn bitmap_on_a_drive_migrates_under_the_drive_name() {
    if !testkit::require(
        "bitmap_on_a_drive_migrates_under_the_drive_name",
        testkit::programs(&["qemu-img"]),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for img in [&a, &b] {
        create_qcow2(img, None);
    }
    let mig = dir.path().join("mig");
    let drive = |img: &Path| {
        format!(
            "if=virtio,id=drive0,file={},format=qcow2,cache=writeback,aio=threads",
            img.display()
        )
    };
    let caps = json!({"capabilities": [{"capability": "events", "state": true},
                                       {"capability": "dirty-bitmaps", "state": true}]});
    let (_pa, mut qa) = lm(dir.path(), "a", &["-drive", &drive(&a)]);
    qa.ok(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "bitmap0", "granularity": 512}),
    );
    qa.hmp("qemu-io drive0 \"write 0 65536\"");
    let sha = qa.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "drive0", "name": "bitmap0"}),
    )["sha256"]
        .clone();
    qa.ok("migrate-set-capabilities", caps.clone());
    qa.ok(
        "migrate",
        json!({"uri": format!("exec: cat > {}", mig.display())}),
    );
    let done = qa.wait_migration(&["completed", "failed"], Duration::from_secs(60));
    assert_eq!(done["status"], "completed", "{done}");

    let incoming = format!("exec: cat {}", mig.display());
    let (_pb, mut qb) = lm(
        dir.path(),
        "b",
        &["-drive", &drive(&b), "-incoming", &incoming],
    );
    qb.ok("migrate-set-capabilities", caps);
    let done = qb.wait_migration(&["completed", "failed"], Duration::from_secs(60));
    assert_eq!(done["status"], "completed", "{done}");
    let got = qb.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "drive0", "name": "bitmap0"}),
    );
    assert_eq!(got["sha256"], sha, "{got}");
}

/// `-drive` without `format=` (iotest 156's `_launch_qemu -drive if=none,id=source,file=IMG`):
/// livemig probes the image as QEMU 7.2 does — qcow2 by its header, raw otherwise with QEMU's
/// warning on stderr — and QEMU started the same way shows the same formats and the same
/// warning.
#[test]
fn drives_without_a_format_are_probed_as_qemu_probes_them() {
    if !testkit::require(
        "drives_without_a_format_are_probed_as_qemu_probes_them",
        testkit::programs(&["qemu-img", "qemu-system-x86_64"]),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let top = dir.path().join("top.qcow2");
    let raw = dir.path().join("disk.img");
    create_qcow2(&top, None);
    assert!(qemu_img(&[
        "create",
        "-f",
        "raw",
        raw.to_str().unwrap(),
        "1M"
    ]));
    let drives: Vec<String> = [("q", &top), ("r", &raw)]
        .iter()
        .flat_map(|(id, f)| {
            [
                "-drive".to_string(),
                format!("if=none,id={id},file={}", f.display()),
            ]
        })
        .collect();
    let formats = |q: &mut QmpClient| -> Vec<(String, String)> {
        q.ok("query-block", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["device"].as_str().unwrap().to_string(),
                    b["inserted"]["drv"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let warning = format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions.\n",
        raw.display()
    );
    let want = vec![
        ("q".to_string(), "qcow2".to_string()),
        ("r".into(), "raw".into()),
    ];

    let args: Vec<&str> = drives.iter().map(String::as_str).collect();
    {
        let (p, mut q) = lm(dir.path(), "vm", &args);
        assert_eq!(formats(&mut q), want);
        assert_eq!(p.log().matches(&warning).count(), 1, "{}", p.log());
    }

    let qemu = VmProcess::qemu_none(dir.path(), "qemu", &drives).unwrap();
    let mut qq = qemu.qmp();
    assert_eq!(formats(&mut qq), want);
    assert_eq!(qemu.log().matches(&warning).count(), 1, "{}", qemu.log());
}

/// `qemu-io -d DEVICE` (iotests' `hmp_qemu_io(..., qdev=True)`) names the guest device by its
/// QOM path or id, as QEMU's `blk_by_qdev_id` resolves it: the write through the virtio disk
/// reads back through its drive. Before, `-d` was accepted and ignored (the name was looked up
/// as a drive's).
#[test]
fn qemu_io_d_names_the_guest_device() {
    let dir = testkit::tempdir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("if=virtio,id=drive0,file={},format=raw", img.display());
    let (p, mut q) = lm(dir.path(), "vm", &["-drive", &drive]);
    let dev = "/machine/peripheral-anon/livemig-disk";
    let before = p.log().len();
    assert_eq!(
        q.hmp(&format!(r#"qemu-io -d {dev} "write -P 0x5a 0 4k""#)),
        ""
    );
    assert_eq!(q.hmp(r#"qemu-io drive0 "read -P 0x5a 0 4k""#), "");
    assert_eq!(
        q.hmp(r#"qemu-io -d drive0 "read 0 4k""#),
        "Error: Device 'drive0' not found\r\n"
    );
    let log = p.log();
    let printed: Vec<&str> = log[before..]
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .collect();
    assert_eq!(
        printed,
        [
            "wrote 4096/4096 bytes at offset 0",
            "read 4096/4096 bytes at offset 0"
        ]
    );
}

/// `-device virtio-blk,drive=NODE,id=ID`: QEMU reports the id as the BlockBackend's `qdev`
/// (`blk_get_attached_dev_id` prefers it to the QOM path) and `qemu-io -d` finds the disk by
/// the id or by `/machine/peripheral/ID`. livemig took the id and dropped it: the disk was
/// `/machine/peripheral-anon/livemig-disk` and `-d vd0` found nothing. Side by side with
/// QEMU 7.2's `microvm`, whose virtio-mmio bus takes the same device.
#[test]
fn a_devices_id_names_its_disk_as_in_qemu() {
    let dir = testkit::tempdir();
    let disk = [
        "-blockdev",
        "driver=null-co,node-name=d0,size=1048576",
        "-device",
    ];
    let (_lp, mut l) = lm(
        dir.path(),
        "vm",
        &[&disk[..], &["virtio-blk,drive=d0,id=vd0"]].concat(),
    );
    let mut seen = vec![(
        "livemig",
        [
            json!(l.ok("query-block", json!({}))[0]["qdev"]),
            json!(l.hmp(r#"qemu-io -d vd0 "read 0 512""#)),
            json!(l.hmp(r#"qemu-io -d /machine/peripheral/vd0 "read 0 512""#)),
            json!(l.hmp(r#"qemu-io -d vd1 "read 0 512""#)),
        ],
    )];
    if testkit::qemu().is_none() {
        let args: Vec<String> = ["-M", "microvm", "-S", "-nodefaults", "-display", "none"]
            .iter()
            .chain(&disk)
            .chain(&["virtio-blk-device,drive=d0,id=vd0"])
            .map(|s| s.to_string())
            .collect();
        let qp = VmProcess::spawn("qemu-system-x86_64", &args, dir.path(), "qemu").unwrap();
        let mut q = qp.qmp();
        seen.push((
            "QEMU",
            [
                json!(q.ok("query-block", json!({}))[0]["qdev"]),
                json!(q.hmp(r#"qemu-io -d vd0 "read 0 512""#)),
                json!(q.hmp(r#"qemu-io -d /machine/peripheral/vd0 "read 0 512""#)),
                json!(q.hmp(r#"qemu-io -d vd1 "read 0 512""#)),
            ],
        ));
    }
    for (who, s) in seen {
        assert_eq!(
            s,
            [
                json!("vd0"),
                json!(""),
                json!(""),
                json!("Error: Device 'vd1' not found\r\n")
            ],
            "{who}"
        );
    }
}
