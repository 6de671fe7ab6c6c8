//! Prints the analysis of a migration stream file: `analyze FILE [--json]`.
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: analyze FILE [--json]");
        return ExitCode::from(2);
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(2);
        }
    };
    let a = wire::analyze(file);
    if args.iter().any(|a| a == "--json") {
        println!("{:#}", a.to_json());
    } else {
        print!("{a}");
    }
    if a.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
