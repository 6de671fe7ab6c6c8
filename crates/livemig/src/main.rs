//! `livemig`: the reference VM process and the tools around it.
//!
//! ```text
//! livemig vm [QEMU-style options]     a VM controlled over QMP (-qmp unix:PATH,server=on,wait=off)
//! livemig demo [options]              migrate a busy 1 GiB VM between two processes, verified
//! livemig bench [options]             whole-migration figures
//! livemig analyze FILE|- [--json]     decode a migration stream from QEMU or livemig
//! ```
//!
//! `vm` takes QEMU's command-line syntax (`-M none -m 256M ...`, parsed in [`cli`]); the tools
//! take ordinary long options (clap).

mod analyze;
mod bench;
mod chardev;
mod cli;
mod demo;
mod inherited_fd;
mod logger;
mod monitor;
mod opts;
mod out;
mod qtest;
mod scenario;
mod vmproc;

use clap::{Parser, Subcommand};

/// Live migration of virtual machines, speaking QEMU's migration stream and QMP.
#[derive(Debug, Parser)]
#[command(name = "livemig", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a VM controlled over QMP, with QEMU's options (livemig vm -h lists them)
    #[command(disable_help_flag = true)]
    Vm {
        /// QEMU-style options: -M none|livemig -m SIZE -blockdev ... -qmp ... -incoming ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        options: Vec<String>,
    },
    /// Start two VMs, migrate a busy one live over loopback TCP, verify both ends, summarize
    Demo(demo::DemoArgs),
    /// Measure whole migrations: total time, downtime, throughput (median of several runs)
    Bench(bench::BenchArgs),
    /// Decode a migration stream from QEMU or livemig (e.g. written with migrate exec:cat>FILE)
    Analyze(analyze::AnalyzeArgs),
}

fn main() {
    logger::init();
    let argv: Vec<String> = std::env::args().collect();
    // `vm` keeps QEMU's syntax (`-M none`, `-m 256M`), which is not clap's; the tools are.
    if argv.get(1).map(String::as_str) == Some("vm") {
        std::process::exit(vm(argv.get(2..).unwrap_or_default()));
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout (status 0), mistakes to stderr (status 2); a
            // reader that went away is not worth a panic.
            let _ = e.print();
            std::process::exit(e.exit_code());
        }
    };
    let code = match cli.command {
        Command::Vm { options } => vm(&options),
        Command::Demo(a) => demo::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Analyze(a) => analyze::main(a),
    };
    std::process::exit(code);
}

/// `livemig vm`: returns the exit status of a VM that could not start (one that starts exits
/// from `quit` or a termination signal).
fn vm(options: &[String]) -> i32 {
    if options
        .iter()
        .any(|o| matches!(o.as_str(), "-h" | "-help" | "--help"))
    {
        return match out::write(format_args!("{}", cli::VM_HELP)) {
            Ok(()) => 0,
            Err(closed) => closed.status(),
        };
    }
    match cli::parse_vm_args(options).and_then(vmproc::run) {
        Ok(()) => 0,
        Err(e) => {
            // Printed whatever LIVEMIG_LOG says: the VM did not start.
            eprintln!("livemig: {e}");
            1
        }
    }
}
