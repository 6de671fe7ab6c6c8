//! Assembles the guest (`src/guest.S`) into a flat binary with the GNU assembler and linker
//! that every machine building Rust has (binutils come with the C toolchain rustc links
//! with). The layout constants in `src/layout.rs` become `.equ`s, so the guest and the VMM
//! cannot disagree on them.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=src/guest.S");
    println!("cargo:rerun-if-changed=src/layout.rs");
    println!("cargo:rerun-if-env-changed=AS");
    println!("cargo:rerun-if-env-changed=LD");

    let layout = std::fs::read_to_string("src/layout.rs").expect("read src/layout.rs");
    let mut inc = String::new();
    let mut code_addr = None;
    for line in layout.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let (name, value) = rest
            .split_once(": u64 = ")
            .unwrap_or_else(|| panic!("layout.rs: cannot read `{line}`"));
        let value = value.trim_end_matches(';').replace('_', "");
        inc.push_str(&format!("        .equ {name}, {value}\n"));
        if name == "CODE_OFF" {
            code_addr = Some(value);
        }
    }
    let sys_base = layout
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const SYS_BASE: u64 = "))
        .map(|v| v.trim_end_matches(';').replace('_', ""))
        .expect("SYS_BASE in layout.rs");
    let parse = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex");
    let text = parse(&sys_base) + parse(&code_addr.expect("CODE_OFF in layout.rs"));
    std::fs::write(out.join("layout.inc"), inc).expect("write layout.inc");

    let tool = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    let obj = out.join("guest.o");
    let bin = out.join("guest.bin");
    run(Command::new(tool("AS", "as"))
        .arg("--64")
        .arg("-I")
        .arg(&out)
        .arg("-o")
        .arg(&obj)
        .arg("src/guest.S"));
    run(Command::new(tool("LD", "ld"))
        .args(["-nostdlib", "-static", "--oformat", "binary", "-e", "entry"])
        .arg(format!("-Ttext={text:#x}"))
        .arg("-o")
        .arg(&bin)
        .arg(&obj));
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the guest is assembled with binutils' `as` and `ld`)")
    });
    assert!(status.success(), "{cmd:?} failed: {status}");
}
