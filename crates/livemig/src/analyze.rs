//! `livemig analyze FILE|- [--json]`: decodes a migration stream — from QEMU or livemig, e.g.
//! written with `migrate exec:cat>FILE` — into a readable summary or JSON. A damaged stream is
//! decoded up to the damage, and the error says where and why (exit status 1).

use crate::out::{out, Closed};
use std::io::Read;

/// `livemig analyze`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalyzeArgs {
    /// The stream: a file, or - for standard input
    #[arg(value_name = "FILE|-")]
    pub file: String,
    /// JSON instead of the readable summary
    #[arg(long)]
    pub json: bool,
}

/// Runs the subcommand; returns the exit status.
pub fn main(args: AnalyzeArgs) -> i32 {
    match analyze(args) {
        Ok(status) => status,
        Err(closed) => closed.status(),
    }
}

fn analyze(args: AnalyzeArgs) -> Result<i32, Closed> {
    let path = args.file;
    let input: Box<dyn Read> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("livemig analyze: cannot open {path}: {e}");
                return Ok(1);
            }
        }
    };
    let a = wire::analyze(input);
    let text = if args.json {
        match serde_json::to_string_pretty(&a.to_json()) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("livemig analyze: {e}");
                return Ok(1);
            }
        }
    } else {
        a.to_string()
    };
    // A reader that stops early (`| head`) ends the output, not the report of damage.
    let written = out!("{text}");
    if let Some(e) = &a.error {
        eprintln!("livemig analyze: the stream is damaged {e}");
        return Ok(1);
    }
    written.map(|()| 0)
}
