//! README's first command, `cargo run --release -- demo`, must reach livemig: cargo runs the
//! one binary among the workspace's default members and refuses when there are several
//! ("could not determine which binary to run"), which is what it did once the example VMM
//! (`examples/kvm-embed`, a binary) joined the workspace.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

#[test]
fn cargo_run_in_the_workspace_runs_livemig() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(
        readme.contains("    cargo run --release -- demo\n"),
        "README no longer gives `cargo run --release -- demo`: update this test with it"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let defaults: Vec<&Value> = meta["workspace_default_members"]
        .as_array()
        .expect("workspace_default_members")
        .iter()
        .collect();
    let bins: Vec<&str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| defaults.contains(&&p["id"]))
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        bins,
        ["livemig"],
        "binaries a bare `cargo run` chooses from"
    );
}
