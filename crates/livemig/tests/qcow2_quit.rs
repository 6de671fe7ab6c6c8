//! `quit` closes the block layer as QEMU's `bdrv_close_all` does: a qcow2 image livemig wrote
//! keeps its data and persistent bitmaps, and `qemu-img check` finds nothing wrong.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::VmProcess;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn livemig_with(dir: &Path, img: &Path) -> VmProcess {
    let args: Vec<String> = [
        "vm",
        "-M",
        "none",
        "-m",
        "16M",
        "-blockdev",
        &format!(
            "driver=qcow2,node-name=d0,file.driver=file,file.filename={}",
            img.display()
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = VmProcess::spawn(env!("CARGO_BIN_EXE_livemig"), &args, dir, "lm").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.qmp_path.exists() {
        assert!(p.alive(), "livemig exited: {}", p.log());
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    p
}

#[test]
fn quit_stores_persistent_bitmaps_and_qcow2_metadata() {
    if !testkit::require(
        "quit_stores_persistent_bitmaps_and_qcow2_metadata",
        testkit::qemu(),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]).0);
    let mut vm = livemig_with(dir.path(), &img);
    let mut q = vm.qmp();
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b0", "persistent": true}),
    );
    q.hmp("qemu-io d0 \"write -P 0x5a 0 64k\"");
    let _ = q.execute("quit", json!({}));
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        vm.log()
    );
    let (clean, out) = qemu_img(&["check", p]);
    assert!(clean && out.contains("No errors were found"), "{out}");
    let (_, info) = qemu_img(&["info", "--output=json", p]);
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v.pointer("/format-specific/data/bitmaps"),
        Some(&json!([{"flags": ["auto"], "name": "b0", "granularity": 65536}])),
        "{info}"
    );
    let out = dir.path().join("q.raw");
    assert!(qemu_img(&["convert", "-O", "raw", p, out.to_str().unwrap()]).0);
    let data = std::fs::read(&out).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0x5a));
}
