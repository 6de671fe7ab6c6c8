//! The embedding example builds and migrates its KVM guest (skipped without /dev/kvm).

#[test]
fn the_example_migrates_a_kvm_guest() {
    if !testkit::require("the_example_migrates_a_kvm_guest", testkit::kvm()) {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvm-embed"))
        .output()
        .expect("run kvm-embed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("migrated: 16 MiB identical"), "{text}");
}
