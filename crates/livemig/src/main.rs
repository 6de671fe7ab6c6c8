//! `livemig`: the reference VM process and the tools around it.
//!
//! ```text
//! livemig vm [QEMU-style options]     a VM controlled over QMP (-qmp unix:PATH,server=on,wait=off)
//! livemig demo [options]              migrate a busy 1 GiB VM between two processes, verified
//! livemig bench [options]             whole-migration figures
//! livemig analyze FILE|- [--json]     decode a migration stream from QEMU or livemig
//! ```

mod analyze;
mod bench;
mod cli;
mod client;
mod demo;
mod logger;
mod monitor;
mod scenario;
mod vmproc;

const USAGE: &str = "\
usage: livemig <command> [options]

commands:
  vm [options]            run a VM controlled over QMP; options as QEMU's where they mean the same:
                            -M none|livemig  -m SIZE  -smp N  -name NAME  -blockdev OPTS
                            -qmp unix:PATH,server=on,wait=off  -incoming URI|defer  -S
                            -serial file:PATH
                            -workload fill=SIZE,hot=SIZE,dirty-rate=BYTES/S,disk=NODE,disk-every=N,seed=N
  demo [options]          start two VMs, migrate a busy one over loopback TCP, verify, summarize
                          (livemig demo --help for options)
  bench [options]         measure whole migrations (livemig bench --help)
  analyze FILE|- [--json] decode a migration stream (e.g. written with migrate exec:cat>FILE)
";

fn main() {
    logger::init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &argv[1..];
    let code = match cmd.as_str() {
        "vm" => match cli::parse_vm_args(rest).and_then(vmproc::run) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("livemig vm: {e}");
                1
            }
        },
        "demo" => demo::main(rest),
        "bench" => bench::main(rest),
        "analyze" => analyze::main(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            0
        }
        "-V" | "--version" => {
            println!("livemig {}", env!("CARGO_PKG_VERSION"));
            0
        }
        other => {
            eprintln!("livemig: unknown command '{other}'\n");
            eprint!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
