//! `livemig vm -M none -accel kvm`: QEMU's `-M none` with livemig's KVM accelerator (RAM in a
//! KVM memslot, hardware dirty logging, no vCPU) still speaks QEMU 7.2's `-M none` stream:
//! QEMU → livemig → QEMU, RAM and dirty bitmaps identical at every step.

mod qemu_common;

use qemu_common::*;
use serde_json::json;

/// Bytes of the pattern QEMU's loader puts at guest address 0.
const PAT_LEN: usize = 2 << 20;

#[test]
fn m_none_accel_kvm_migrates_from_and_to_qemu() {
    let test = "m_none_accel_kvm_migrates_from_and_to_qemu";
    if !testkit::require(test, testkit::kvm()) {
        return;
    }
    let Some(tmp) = setup(test) else { return };
    let dir = tmp.path();
    let pat_file = dir.join("pat.bin");
    let pat = pattern_file(&pat_file, PAT_LEN, 11);

    // QEMU (TCG) -> livemig -accel kvm.
    let mut args = null_co("node0", MIB64);
    args.extend(loader(&pat_file, 0));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    add_bitmap(&mut qa_q, "node0", "bm0", 65536);
    qemu_io(&mut qa_q, "node0", "write 0 64k");
    caps(&mut qa_q, false);
    let uri = Transport::Unix.uri(dir, "m1");
    let mut args = null_co("node0", MIB64);
    args.extend(strings(&["-accel", "kvm", "-incoming", &uri]));
    let l = livemig(dir, "l", &args);
    let mut l_q = l.qmp();
    assert_eq!(
        l_q.ok("query-kvm", json!({})),
        json!({"enabled": true, "present": true})
    );
    caps(&mut l_q, false);
    let (s, d) = migrate(&mut qa_q, &mut l_q, &uri);
    assert_eq!(s["status"], "completed", "QEMU -> livemig: source {s}");
    assert_eq!(d["status"], "completed", "QEMU -> livemig: destination {d}");
    let ram_qa = ram(&mut qa_q, dir, "qa");
    let ram_l = ram(&mut l_q, dir, "l");
    assert_eq!(
        &ram_qa[..PAT_LEN],
        &pat[..],
        "the loader did not fill QEMU's RAM"
    );
    assert_same_ram(&ram_qa, &ram_l, "QEMU -> livemig -accel kvm");
    assert_eq!(
        sha(&mut qa_q, "node0", "bm0"),
        sha(&mut l_q, "node0", "bm0")
    );
    drop(qa);

    // livemig -accel kvm -> QEMU: every page of RAM goes out through KVM's dirty log.
    qemu_io(&mut l_q, "node0", "write 1M 64k");
    let uri = Transport::Unix.uri(dir, "m2");
    let mut args = null_co("node0", MIB64);
    args.extend(strings(&["-incoming", &uri]));
    let qb = qemu(dir, "qb", &args);
    let mut qb_q = qb.qmp();
    caps(&mut qb_q, false);
    let (s, d) = migrate(&mut l_q, &mut qb_q, &uri);
    assert_eq!(s["status"], "completed", "livemig -> QEMU: source {s}");
    assert_eq!(d["status"], "completed", "livemig -> QEMU: destination {d}");
    let ram_qb = ram(&mut qb_q, dir, "qb");
    assert_same_ram(&ram_l, &ram_qb, "livemig -accel kvm -> QEMU");
    assert_eq!(
        sha(&mut l_q, "node0", "bm0"),
        sha(&mut qb_q, "node0", "bm0")
    );
    assert_eq!(qb_q.ok("query-status", json!({}))["status"], "running");
    quit_cleanly(l, l_q);
}
