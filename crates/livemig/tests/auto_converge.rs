//! `auto-converge`: a guest that dirties memory faster than the link carries it never
//! converges without the capability, and converges with it — the source throttles its vCPUs
//! harder every second time a second of migration sees more dirtied than half of what was sent
//! (QEMU 7.2's `throttle-trigger-threshold` rule), `query-migrate` shows the throttle
//! (`cpu-throttle-percentage`) as it rises, and the throttle is lifted when the migration ends.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A guest that fills 16 MiB and then rewrites random pages of that 16 MiB at 28 MiB/s (its
/// vCPUs' running time; a throttled vCPU writes less).
const HOT: &str = "fill=16M,hot=16M,dirty-rate=28M";
/// Pages [`HOT`] fills before it rewrites.
const HOT_FILL_PAGES: u64 = (16 << 20) / 4096;
/// The link: 16 MiB/s. Left alone, [`HOT`] keeps about 70 % of its hot set dirty from one
/// pass to the next (11 MiB, 0.7 s at this rate) — more than the 300 ms `downtime-limit`
/// allows (4.8 MiB). At 30-40 % throttle it keeps only a few hundred pages dirty.
const LINK: u64 = 16 << 20;
/// QEMU's default `downtime-limit`, ms.
const DOWNTIME_LIMIT: u64 = 300;

fn pages_written(lm: &mut Lm) -> u64 {
    lm.ok("x-livemig-query-vm", json!({}))["pages-written"]
        .as_u64()
        .unwrap_or_default()
}

fn wait_hot(lm: &mut Lm) {
    let deadline = Instant::now() + TIMEOUT;
    while pages_written(lm) < HOT_FILL_PAGES {
        assert!(Instant::now() < deadline, "{}: not filled", lm.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pages the guest writes per second, over `d`.
fn write_rate(lm: &mut Lm, d: Duration) -> f64 {
    let (t0, p0) = (Instant::now(), pages_written(lm));
    std::thread::sleep(d);
    (pages_written(lm) - p0) as f64 / t0.elapsed().as_secs_f64()
}

fn source(dir: &std::path::Path, name: &str) -> Lm {
    source_with(dir, name, &[])
}

fn source_with(dir: &std::path::Path, name: &str, extra: &[&str]) -> Lm {
    let mut a = GUEST.to_vec();
    a.extend(["-workload", HOT]);
    a.extend(extra);
    Lm::start(dir, name, &a)
}

fn throttle(r: &Value) -> Option<u64> {
    r.get("cpu-throttle-percentage").and_then(Value::as_u64)
}

#[test]
fn a_guest_that_outruns_the_link_converges_only_with_auto_converge() {
    let dir = tempdir();
    let (plain_uri, ac_uri) = (
        unix_uri(dir.path(), "plain.sock"),
        unix_uri(dir.path(), "ac.sock"),
    );
    let plain_dst = Lm::destination(dir.path(), "plain-dst", &plain_uri);
    let mut ac_dst = Lm::destination(dir.path(), "ac-dst", &ac_uri);
    let mut plain = source(dir.path(), "plain");
    let mut ac = source(dir.path(), "ac");
    ac.caps_on(&["auto-converge"]);
    // QEMU's defaults, which the migration reads.
    let p = ac.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (
            &p["throttle-trigger-threshold"],
            &p["cpu-throttle-initial"],
            &p["cpu-throttle-increment"],
            &p["cpu-throttle-tailslow"],
            &p["max-cpu-throttle"],
            &p["downtime-limit"],
        ),
        (
            &json!(50),
            &json!(20),
            &json!(10),
            &json!(false),
            &json!(99),
            &json!(DOWNTIME_LIMIT)
        )
    );
    for lm in [&mut plain, &mut ac] {
        lm.set_params(json!({ "max-bandwidth": LINK }));
        wait_hot(lm);
    }
    // Side by side, so a busy host slows both alike.
    plain.migrate(&plain_uri);
    ac.migrate(&ac_uri);

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let done = loop {
        let r = ac.ok("query-migrate", json!({}));
        if let Some(t) = throttle(&r) {
            if seen.last() != Some(&t) {
                seen.push(t);
            }
        }
        match r["status"].as_str().unwrap_or_default() {
            "completed" => break r,
            "active" | "setup" | "device" => {}
            other => panic!("ac: migration {other}: {r}\n{}", ac.proc.log()),
        }
        let rp = plain.ok("query-migrate", json!({}));
        assert!(
            ["setup", "active"].contains(&rp["status"].as_str().unwrap_or_default()),
            "without auto-converge: {rp}"
        );
        assert_eq!(throttle(&rp), None, "throttled without auto-converge: {rp}");
        assert!(
            Instant::now() < deadline,
            "auto-converge did not converge: {r}\nthrottle seen: {seen:?}\n{}",
            ac.proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The throttle started at cpu-throttle-initial and rose by cpu-throttle-increment.
    assert!(!seen.is_empty(), "no cpu-throttle-percentage seen: {done}");
    eprintln!("throttle seen: {seen:?}; completed: {done}");
    assert_eq!(seen[0], 20, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]) && seen.iter().all(|t| t % 10 == 0 && *t < 100),
        "{seen:?}"
    );
    // Lifted once the migration ended, and the downtime within the limit.
    assert_eq!(throttle(&done), None, "{done}");
    let downtime = done["downtime"].as_u64().expect("downtime");
    assert!(downtime <= DOWNTIME_LIMIT, "downtime {downtime} ms: {done}");
    check_stop_point(&mut ac, &mut ac_dst, &[]);
    check_carries_on(&mut ac_dst);

    // Meanwhile, without auto-converge, several passes later, still iterating.
    let rp = plain.ok("query-migrate", json!({}));
    assert_eq!(rp["status"], "active", "{rp}");
    let passes = rp["ram"]["dirty-sync-count"].as_u64().unwrap_or_default();
    assert!(passes >= 4, "{rp}");
    plain.ok("migrate_cancel", json!({}));
    plain.wait_migration(&["cancelled"]);
    assert_eq!(plain.status(), "running");
    drop(plain_dst);
}

#[test]
fn the_throttle_holds_at_max_cpu_throttle_and_is_lifted_when_the_migration_ends() {
    held_then_lifted(&[]);
}

#[test]
fn kvm_vcpus_are_throttled_too() {
    if testkit::require("kvm_vcpus_are_throttled_too", testkit::kvm()) {
        held_then_lifted(&["-accel", "kvm"]);
    }
}

/// A throttle of 60 % slows the guest's writes to well under 60 % of its free speed, holds
/// there at `max-cpu-throttle`, and is gone, with the guest back to full speed, once the
/// migration is cancelled.
fn held_then_lifted(accel: &[&str]) {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dargs = GUEST.to_vec();
    dargs.extend(["-incoming", &uri, "-S"]);
    dargs.extend(accel);
    let _dst = Lm::start(dir.path(), "dst", &dargs);
    let mut src = source_with(dir.path(), "src", accel);
    src.caps_on(&["auto-converge"]);
    // A first step straight to 60 %, and no further. At 40 % of its speed the guest still
    // dirties pages faster (11 MiB/s) than this link carries them (8 MiB/s), so it never
    // meets a 1 ms downtime limit: the migration runs until cancelled.
    src.set_params(json!({
        "max-bandwidth": LINK / 2,
        "downtime-limit": 1,
        "cpu-throttle-initial": 60,
        "max-cpu-throttle": 60,
    }));
    wait_hot(&mut src);
    let free = write_rate(&mut src, Duration::from_secs(1));

    src.migrate(&uri);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = src.ok("query-migrate", json!({}));
        assert!(
            ["setup", "active"].contains(&r["status"].as_str().unwrap_or_default()),
            "{r}"
        );
        match throttle(&r) {
            None => {}
            Some(60) => break,
            Some(t) => panic!("throttle {t} %: {r}"),
        }
        assert!(Instant::now() < deadline, "never throttled: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The vCPUs run 40 % of the time, so the guest writes about 40 % as fast.
    let throttled = write_rate(&mut src, Duration::from_secs(1));
    assert!(
        throttled < free * 0.6,
        "throttled at 60 %: {throttled:.0} pages/s, free: {free:.0}"
    );
    // Still at the maximum two more seconds on, though the guest still outruns the link.
    std::thread::sleep(Duration::from_secs(2));
    let r = src.ok("query-migrate", json!({}));
    assert_eq!(throttle(&r), Some(60), "{r}");

    src.ok("migrate_cancel", json!({}));
    let r = src.wait_migration(&["cancelled"]);
    assert_eq!(throttle(&r), None, "{r}");
    assert_eq!(src.status(), "running");
    let after = write_rate(&mut src, Duration::from_secs(1));
    assert!(
        after > free * 0.8,
        "after the migration: {after:.0} pages/s, before: {free:.0}"
    );
}
