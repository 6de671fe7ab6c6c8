//! `livemig bench`: whole-migration figures — total time, downtime, throughput — for a given
//! RAM size, fill, hot set and transport, over several runs (the median is reported, since
//! the machine is shared and noisy).

use crate::opts::ScenarioArgs;
use crate::out::{outln, Closed};
use crate::scenario::{run, size, Outcome, Scenario};
use serde_json::json;

/// `livemig bench`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The guest and the migration.
    #[command(flatten)]
    pub scenario: ScenarioArgs,
    /// Migrations to run
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Also compare both ends after each run
    #[arg(long)]
    pub verify: bool,
    /// One JSON object per run, then the medians
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark; returns the exit status.
pub fn main(args: BenchArgs) -> i32 {
    match bench(args) {
        Ok(status) => status,
        Err(closed) => closed.status(),
    }
}

fn bench(args: BenchArgs) -> Result<i32, Closed> {
    let mut sc = args.scenario.apply(Scenario::default());
    let (runs, json_out, verify) = (args.runs, args.json, args.verify);
    sc.verify = verify;
    if !json_out {
        outln!(
            "livemig bench: {}{} RAM, {} filled, hot set {}, dirty-rate {}/s, {} {} vCPU(s), disk {}, {:?}{}, {} run(s)",
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
            if sc.kvm { "KVM" } else { "software" },
            if sc.disk > 0 { size(sc.disk) } else { "none".to_string() },
            sc.transport,
            if sc.dst_prealloc { ", destination -mem-prealloc" } else { "" },
            runs
        )?;
        if let Some(d) = &sc.tls_creds {
            outln!("TLS: tls-creds-x509 from {} on both ends", d.display())?;
        }
        if let Some(d) = &sc.tls_psk {
            outln!("TLS: tls-creds-psk from {} on both ends", d.display())?;
        }
        if sc.integrity {
            outln!("x-livemig-integrity: on at both ends")?;
        }
        if sc.multifd_channels > 0 {
            outln!(
                "multifd: {} channel(s), compression {}{}",
                sc.multifd_channels,
                sc.multifd_compression,
                if sc.zero_copy { ", zero-copy-send" } else { "" }
            )?;
        }
        outln!(
            "{:>4} {:>10} {:>10} {:>10} {:>12} {:>7}",
            "run",
            "total ms",
            "downtime",
            "setup ms",
            "GB/s",
            "passes"
        )?;
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
                    return Ok(1);
                }
                if json_out {
                    outln!(
                        "{}",
                        json!({"run": i + 1, "total-ms": o.total_ms, "downtime-ms": o.downtime_ms,
                               "setup-ms": o.setup_ms, "transferred": o.transferred,
                               "throughput-bytes-per-s": o.throughput(), "passes": o.passes,
                               "postcopy": o.postcopy})
                    )?;
                } else if let Some(p) = &o.postcopy {
                    outln!(
                        "{:>4} {:>10} {:>10} {:>10} {:>12.2} {:>7}   requests {} ({} in flight) latency p50 {} us p99 {} us (asking {}/{}, answer {}/{}, placing {}/{}), blocktime {:.2} ms (vCPUs {:?} us)",
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
                        p["latency-asking-median-us"],
                        p["latency-asking-p99-us"],
                        p["latency-answer-median-us"],
                        p["latency-answer-p99-us"],
                        p["latency-placing-median-us"],
                        p["latency-placing-p99-us"],
                        p["blocktime-ns"].as_u64().unwrap_or(0) as f64 / 1e6,
                        p["vcpu-blocktime-ns"]
                            .as_array()
                            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0) / 1000).collect::<Vec<_>>())
                            .unwrap_or_default(),
                    )?;
                } else {
                    outln!(
                        "{:>4} {:>10} {:>10} {:>10} {:>12.2} {:>7}",
                        i + 1,
                        o.total_ms,
                        o.downtime_ms,
                        o.setup_ms,
                        o.throughput() / 1e9,
                        o.passes
                    )?;
                }
                outcomes.push(o);
            }
            Err(e) => {
                eprintln!("livemig bench: run {} failed: {e}", i + 1);
                return Ok(1);
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
        outln!(
            "median postcopy: latency p50 {:.0} us, p99 {:.0} us (p50 asking {:.0} us, answer {:.0} us, placing {:.0} us), blocktime {:.2} ms",
            pc("latency-median-us"),
            pc("latency-p99-us"),
            pc("latency-asking-median-us"),
            pc("latency-answer-median-us"),
            pc("latency-placing-median-us"),
            pc("blocktime-ns") / 1e6
        )?;
    }
    if json_out {
        outln!(
            "{}",
            json!({"median": {"total-ms": total, "downtime-ms": down, "throughput-bytes-per-s": tput}})
        )?;
    } else {
        outln!(
            "median: total {total:.0} ms, downtime {down:.0} ms, throughput {:.2} GB/s",
            tput / 1e9
        )?;
    }
    Ok(0)
}
