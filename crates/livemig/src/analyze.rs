//! `livemig analyze FILE|- [--json]`: decodes a migration stream — from QEMU or livemig, e.g.
//! written with `migrate exec:cat>FILE` — into a readable summary or JSON. A damaged stream is
//! decoded up to the damage, and the error says where and why (exit status 1).

use std::io::{Read, Write};

/// Runs the subcommand; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let mut json = false;
    let mut path = None;
    for a in args {
        match a.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("usage: livemig analyze FILE|- [--json]");
                return 0;
            }
            p if path.is_none() => path = Some(p.to_string()),
            other => {
                eprintln!("livemig analyze: unexpected argument '{other}'");
                return 2;
            }
        }
    }
    let Some(path) = path else {
        eprintln!("usage: livemig analyze FILE|- [--json]");
        return 2;
    };
    let input: Box<dyn Read> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("livemig analyze: cannot open {path}: {e}");
                return 1;
            }
        }
    };
    let a = wire::analyze(input);
    let out = if json {
        match serde_json::to_string_pretty(&a.to_json()) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("livemig analyze: {e}");
                return 1;
            }
        }
    } else {
        a.to_string()
    };
    // A reader that stops early (`| head`) is not an error; `print!` would panic on it.
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
    {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("livemig analyze: cannot write the output: {e}");
            return 1;
        }
    }
    match &a.error {
        Some(e) => {
            eprintln!("livemig analyze: the stream is damaged {e}");
            1
        }
        None => 0,
    }
}
