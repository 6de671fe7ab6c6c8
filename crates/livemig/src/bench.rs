//! `livemig bench`: whole-migration figures — total time, downtime, throughput — for a given
//! RAM size, fill, hot set and transport, over several runs (the median is reported, since
//! the machine is shared and noisy).

use crate::demo::parse_common;
use crate::scenario::{run, size, Outcome, Scenario};
use serde_json::json;

const HELP: &str = "\
usage: livemig bench [options]
  --ram SIZE             guest RAM (default 1G)
  --vcpus N              vCPUs running the workload (default 1)
  --fill SIZE            RAM filled with data before the migration (default: all of it)
  --hot SIZE             RAM rewritten during the migration (default 0: idle guest)
  --dirty-rate SIZE      cap on the guest's dirtying, bytes/s (default 0: none)
  --disk SIZE            a null-co disk with a dirty bitmap the guest writes to, migrated
                         with the RAM (default 0: none)
  --transport tcp|unix   (default tcp)
  --downtime-limit MS    (default 300)
  --runs N               migrations to run (default 3)
  --verify               also compare both ends after each run
  --mem-prealloc         start the destination with -mem-prealloc (default: off, so the load
                         pays the destination's first-touch page faults)
  --no-mem-prealloc      the default
  --postcopy             switch to postcopy at once; the destination's guest runs on the
                         pages it pulls; adds page-request latency (fault to placement,
                         median and p99) and blocktime
  --preempt              with --postcopy: postcopy-preempt (requested pages on a channel of
                         their own)
  --json                 one JSON object per run, then the medians
";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{HELP}");
        return 0;
    }
    let mut sc = Scenario::default();
    let mut runs = 3usize;
    let mut json_out = false;
    let mut verify = false;
    let r = parse_common(args, &mut sc, &mut |opt, next| match opt {
        "--runs" => {
            runs = next
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| "--runs: a number".to_string())?;
            Ok(Some(1))
        }
        "--json" => {
            json_out = true;
            Ok(Some(0))
        }
        "--verify" => {
            verify = true;
            Ok(Some(0))
        }
        _ => Ok(None),
    });
    if let Err(e) = r {
        eprintln!("livemig bench: {e}\n\n{HELP}");
        return 2;
    }
    sc.verify = verify;
    if !json_out {
        println!(
            "livemig bench: {}{} RAM, {} filled, hot set {}, dirty-rate {}/s, {} vCPU(s), disk {}, {:?}{}, {} run(s)",
            match (sc.postcopy, sc.preempt) {
                (true, true) => "postcopy+preempt, ",
                (true, false) => "postcopy, ",
                _ => "",
            },
            size(sc.ram),
            size(sc.fill),
            size(sc.hot),
            size(sc.dirty_rate),
            sc.vcpus,
            if sc.disk > 0 { size(sc.disk) } else { "none".to_string() },
            sc.transport,
            if sc.dst_prealloc { ", destination -mem-prealloc" } else { "" },
            runs
        );
        println!(
            "{:>4} {:>10} {:>10} {:>10} {:>12} {:>7}",
            "run", "total ms", "downtime", "setup ms", "GB/s", "passes"
        );
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    for i in 0..runs {
        match run(&sc, |_| {}) {
            Ok(o) => {
                if !o.verified() {
                    eprintln!(
                        "livemig bench: run {} was not verified: {:?}",
                        i + 1,
                        o.checks
                    );
                    return 1;
                }
                if json_out {
                    println!(
                        "{}",
                        json!({"run": i + 1, "total-ms": o.total_ms, "downtime-ms": o.downtime_ms,
                               "setup-ms": o.setup_ms, "transferred": o.transferred,
                               "throughput-bytes-per-s": o.throughput(), "passes": o.passes,
                               "postcopy": o.postcopy})
                    );
                } else if let Some(p) = &o.postcopy {
                    println!(
                        "{:>4} {:>10} {:>10} {:>10} {:>12.2} {:>7}   requests {} ({} in flight) latency p50 {} us p99 {} us, blocktime {:.2} ms (vCPUs {:?} us)",
                        i + 1,
                        o.total_ms,
                        o.downtime_ms,
                        o.setup_ms,
                        o.throughput() / 1e9,
                        o.passes,
                        p["requests"],
                        p["source"]["requested-in-flight"],
                        p["latency-median-us"],
                        p["latency-p99-us"],
                        p["blocktime-ns"].as_u64().unwrap_or(0) as f64 / 1e6,
                        p["vcpu-blocktime-ns"]
                            .as_array()
                            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0) / 1000).collect::<Vec<_>>())
                            .unwrap_or_default(),
                    );
                } else {
                    println!(
                        "{:>4} {:>10} {:>10} {:>10} {:>12.2} {:>7}",
                        i + 1,
                        o.total_ms,
                        o.downtime_ms,
                        o.setup_ms,
                        o.throughput() / 1e9,
                        o.passes
                    );
                }
                outcomes.push(o);
            }
            Err(e) => {
                eprintln!("livemig bench: run {} failed: {e}", i + 1);
                return 1;
            }
        }
    }
    let total = median(outcomes.iter().map(|o| o.total_ms as f64).collect());
    let down = median(outcomes.iter().map(|o| o.downtime_ms as f64).collect());
    let tput = median(outcomes.iter().map(Outcome::throughput).collect());
    let pc = |k: &str| {
        median(
            outcomes
                .iter()
                .filter_map(|o| o.postcopy.as_ref()?.get(k)?.as_f64())
                .collect(),
        )
    };
    if sc.postcopy && !json_out {
        println!(
            "median postcopy: latency p50 {:.0} us, p99 {:.0} us, blocktime {:.2} ms",
            pc("latency-median-us"),
            pc("latency-p99-us"),
            pc("blocktime-ns") / 1e6
        );
    }
    if json_out {
        println!(
            "{}",
            json!({"median": {"total-ms": total, "downtime-ms": down, "throughput-bytes-per-s": tput}})
        );
    } else {
        println!(
            "median: total {total:.0} ms, downtime {down:.0} ms, throughput {:.2} GB/s",
            tput / 1e9
        );
    }
    0
}
