//! `livemig demo`: two VM processes, a busy 1 GiB guest with a disk and a dirty bitmap, a live
//! migration over loopback TCP with a progress bar, then proof: RAM, the bitmap and the vCPU
//! state are identical at the stop point, and the guest carries on at the destination. Exit
//! status 0 only when everything was verified.

use crate::opts::ScenarioArgs;
use crate::out::{out, outln, Closed};
use crate::scenario::{run, size, Scenario, Transport};
use serde_json::Value;
use std::io::IsTerminal;

/// `livemig demo`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The guest and the migration.
    #[command(flatten)]
    pub scenario: ScenarioArgs,
}

/// Runs the demo; returns the exit status.
pub fn main(args: DemoArgs) -> i32 {
    match demo(args) {
        Ok(status) => status,
        Err(closed) => closed.status(),
    }
}

fn demo(args: DemoArgs) -> Result<i32, Closed> {
    let base = Scenario {
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
    let sc = args.scenario.apply(base);
    outln!(
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
    )?;
    outln!(
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
    )?;
    let tty = std::io::stdout().is_terminal();
    // A reader that goes away during the migration stops the progress lines; the migration
    // finishes and its VMs are stopped on the way out.
    let mut closed: Option<Closed> = None;
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
        if closed.is_some() {
            return;
        }
        let shown = if tty {
            out!("\r{line}   ")
        } else if last_line.elapsed().as_millis() >= 500 {
            last_line = std::time::Instant::now();
            outln!("{line}")
        } else {
            Ok(())
        };
        closed = shown.err();
    });
    if let Some(c) = closed {
        return Err(c);
    }
    if tty {
        outln!()?;
    }
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("livemig demo: FAILED: {e}");
            return Ok(1);
        }
    };
    outln!("migration completed")?;
    outln!("  total time    {} ms", o.total_ms)?;
    outln!(
        "  downtime      {} ms (limit {} ms)",
        o.downtime_ms,
        sc.downtime_limit_ms
    )?;
    outln!("  setup         {} ms", o.setup_ms)?;
    outln!("  throughput    {:.2} GB/s", o.throughput() / 1e9)?;
    outln!(
        "  transferred   {} ({} normal pages, {} zero pages; {} while stopped)",
        size(o.transferred),
        o.normal,
        o.duplicate,
        size(o.downtime_bytes)
    )?;
    outln!("  passes        {}", o.passes)?;
    outln!("verification at the stop point")?;
    for (what, detail, ok) in &o.checks {
        outln!(
            "  {what:<16} {detail}  {}",
            if *ok { "OK" } else { "MISMATCH" }
        )?;
    }
    if o.verified() {
        outln!("verified")?;
        Ok(0)
    } else {
        outln!("NOT verified")?;
        Ok(1)
    }
}
