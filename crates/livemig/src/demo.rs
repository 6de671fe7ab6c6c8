//! `livemig demo`: two VM processes, a busy 1 GiB guest with a disk and a dirty bitmap, a live
//! migration over loopback TCP with a progress bar, then proof: RAM, the bitmap and the vCPU
//! state are identical at the stop point, and the guest carries on at the destination. Exit
//! status 0 only when everything was verified.

use crate::cli::parse_size;
use crate::scenario::{run, size, Scenario, Transport};
use serde_json::Value;
use std::io::{IsTerminal, Write};

const HELP: &str = "\
usage: livemig demo [options]
  --ram SIZE             guest RAM (default 1G)
  --vcpus N              vCPUs running the workload (default 1)
  --fill SIZE            RAM the guest fills before the migration (default: all of it)
  --hot SIZE             RAM the guest keeps rewriting during the migration (default 64M)
  --dirty-rate SIZE      cap on the guest's dirtying, bytes/s (default 256M; 0: none)
  --disk SIZE            a null-co disk with a dirty bitmap the guest writes to (default 1G;
                         0: none)
  --transport tcp|unix   (default tcp)
  --downtime-limit MS    (default 300)
  --mem-prealloc         start the destination with -mem-prealloc (the default)
  --no-mem-prealloc      let the destination fault its RAM in while the migration loads it
  --postcopy             switch to postcopy at once; the destination's guest runs and pulls
                         the pages it touches (RAM verified page by page afterwards)
  --preempt              with --postcopy: postcopy-preempt (requested pages on a channel of
                         their own)
";

/// A caller's handler for its own options: given one and the argument after it, it returns
/// how many values it consumed (0 or 1), or `None` for an option it does not know.
pub type ExtraOptions<'a> = dyn FnMut(&str, Option<&String>) -> Result<Option<usize>, String> + 'a;

/// Parses the options shared with `bench`, starting from `sc`. `extra` handles the caller's
/// own options: given one and the argument after it, it returns how many values it consumed
/// (0 or 1), or `None` for an option it does not know.
pub fn parse_common(
    args: &[String],
    sc: &mut Scenario,
    extra: &mut ExtraOptions,
) -> Result<(), String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--ram" => sc.ram = parse_size(&val(a)?, 1 << 20)?,
            "--vcpus" => {
                sc.vcpus = val(a)?
                    .parse()
                    .map_err(|_| "--vcpus: a number".to_string())?
            }
            "--fill" => sc.fill = parse_size(&val(a)?, 1)?,
            "--hot" => sc.hot = parse_size(&val(a)?, 1)?,
            "--dirty-rate" => sc.dirty_rate = parse_size(&val(a)?, 1)?,
            "--disk" => sc.disk = parse_size(&val(a)?, 1 << 20)?,
            "--transport" => {
                sc.transport = match val(a)?.as_str() {
                    "tcp" => Transport::Tcp,
                    "unix" => Transport::Unix,
                    t => return Err(format!("--transport: tcp or unix, not '{t}'")),
                }
            }
            "--downtime-limit" => {
                sc.downtime_limit_ms = val(a)?
                    .parse()
                    .map_err(|_| "--downtime-limit: milliseconds".to_string())?
            }
            "--postcopy" => sc.postcopy = true,
            "--preempt" => sc.preempt = true,
            "--mem-prealloc" => sc.dst_prealloc = true,
            "--no-mem-prealloc" => sc.dst_prealloc = false,
            other => match extra(other, it.clone().next())? {
                Some(consumed) => {
                    for _ in 0..consumed {
                        it.next();
                    }
                }
                None => return Err(format!("unknown option '{other}'")),
            },
        }
    }
    if sc.fill > sc.ram {
        sc.fill = sc.ram;
    }
    Ok(())
}

/// Runs the demo; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{HELP}");
        return 0;
    }
    let mut sc = Scenario {
        hot: 64 << 20,
        dirty_rate: 256 << 20,
        disk: 1 << 30,
        verify: true,
        // As a production destination is started (libvirt's immediate allocation): its RAM
        // is allocated before the migration, so the figures show the migration and not the
        // kernel's first-touch faults, which cost 1-4 s per GiB on this nested machine.
        dst_prealloc: true,
        ..Scenario::default()
    };
    if let Err(e) = parse_common(args, &mut sc, &mut |_, _| Ok(None)) {
        eprintln!("livemig demo: {e}\n\n{HELP}");
        return 2;
    }
    println!(
        "livemig demo: a {} guest ({} vCPU{}, {} filled, {} hot set rewritten at up to {}/s{})",
        size(sc.ram),
        sc.vcpus,
        if sc.vcpus == 1 { "" } else { "s" },
        size(sc.fill),
        size(sc.hot),
        size(sc.dirty_rate),
        if sc.disk > 0 {
            format!(", a {} disk with a dirty bitmap", size(sc.disk))
        } else {
            String::new()
        },
    );
    println!(
        "migrating live over {} (downtime limit {} ms, no bandwidth cap){}",
        if sc.transport == Transport::Tcp {
            "loopback TCP"
        } else {
            "a unix socket"
        },
        sc.downtime_limit_ms,
        if sc.dst_prealloc {
            "; destination started with -mem-prealloc"
        } else {
            ""
        }
    );
    let tty = std::io::stdout().is_terminal();
    let mut last_line = std::time::Instant::now();
    let outcome = run(&sc, |q: &Value| {
        let total = q
            .pointer("/ram/total")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .max(1);
        let remaining = q
            .pointer("/ram/remaining")
            .and_then(Value::as_u64)
            .unwrap_or(total);
        let sent = q
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let pass = q
            .pointer("/ram/dirty-sync-count")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mbps = q
            .pointer("/ram/mbps")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let done = 1.0 - remaining as f64 / total as f64;
        let width = 30;
        let filled = ((done * width as f64) as usize).min(width);
        let line = format!(
            "[{}{}] {:3.0}%  sent {:>10}  pass {pass}  {:.2} GB/s  {}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            done * 100.0,
            size(sent),
            mbps / 8000.0,
            q["status"].as_str().unwrap_or("")
        );
        if tty {
            print!("\r{line}   ");
            let _ = std::io::stdout().flush();
        } else if last_line.elapsed().as_millis() >= 500 {
            println!("{line}");
            last_line = std::time::Instant::now();
        }
    });
    if tty {
        println!();
    }
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("livemig demo: FAILED: {e}");
            return 1;
        }
    };
    println!("migration completed");
    println!("  total time    {} ms", o.total_ms);
    println!(
        "  downtime      {} ms (limit {} ms)",
        o.downtime_ms, sc.downtime_limit_ms
    );
    println!("  setup         {} ms", o.setup_ms);
    println!("  throughput    {:.2} GB/s", o.throughput() / 1e9);
    println!(
        "  transferred   {} ({} normal pages, {} zero pages; {} while stopped)",
        size(o.transferred),
        o.normal,
        o.duplicate,
        size(o.downtime_bytes)
    );
    println!("  passes        {}", o.passes);
    println!("verification at the stop point");
    for (what, detail, ok) in &o.checks {
        println!(
            "  {what:<16} {detail}  {}",
            if *ok { "OK" } else { "MISMATCH" }
        );
    }
    if o.verified() {
        println!("verified");
        0
    } else {
        println!("NOT verified");
        1
    }
}
