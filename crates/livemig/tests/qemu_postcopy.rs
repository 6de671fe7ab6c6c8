//! Postcopy with QEMU 7.2 at the other end (issue 10), `-M none -m 32M`, over unix and TCP.
//!
//! One chain per transport:
//! 1. QEMU "A" (pattern A from `-device loader`) → livemig "L1", precopy throttled to 1 MiB/s,
//!    `migrate-start-postcopy` on QEMU after the first MiB. While L1 is `postcopy-active`, a
//!    `pmemsave` of all its RAM touches every page that has not arrived: each touch faults,
//!    L1 asks QEMU for the page (REQ_PAGES_ID / REQ_PAGES), QEMU sends it ahead of its
//!    background push. Both end `completed`; the RAM images are identical.
//! 2. L1 → QEMU "B" the same way round: livemig is the postcopy source, QEMU's `pmemsave`
//!    during postcopy makes QEMU's fault thread ask livemig for pages.
//!
//! The same chains run with `postcopy-preempt` on every end: QEMU 7.2 opens the preempt
//! channel at setup as a second connection, and requested pages travel on it (counted by
//! livemig's `x-livemig-postcopy` on either end).
//!
//! And over TLS (x509 and PSK, TCP), with preempt, as QEMU 7.2 runs it: every channel —
//! main with its return path, preempt, and those of each recovery — a TLS session, whichever
//! end is QEMU. Each connection then goes through a recording relay, and both directions of
//! every one are TLS records only, with neither the stream's file header nor the guest's pattern
//! in the clear (`testkit::tls_wire`).

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::pki::Creds;
use testkit::relay::{Plan, Relay, Target};
use testkit::{tls_wire, QmpClient};

/// Bytes of pattern A at guest address 0.
const A_LEN: usize = 4 << 20;

/// TLS credentials on every process of a chain (written once under the test's directory):
/// `tls-srv` for when it is a destination, `tls-cli` for when it is a source.
fn tls_args(dir: &Path, tls: Option<Creds>) -> Vec<String> {
    let Some(c) = tls else { return Vec::new() };
    vec![
        "-object".into(),
        c.object("tls-srv", dir, "srv", "server"),
        "-object".into(),
        c.object("tls-cli", dir, "cli", "client"),
    ]
}

/// With `tls`: `tls-creds` for the next migration on `q`, as its `source` or destination.
fn use_tls(q: &mut QmpClient, tls: Option<Creds>, source: bool) {
    if tls.is_some() {
        let id = if source { "tls-cli" } else { "tls-srv" };
        q.ok("migrate-set-parameters", json!({ "tls-creds": id }));
    }
}

/// The connections of one migration, when they are to be looked at (over TLS): each URI the
/// source connects to (the migration's, each recovery's) is then a recording relay in front
/// of the destination's TCP port.
struct Wire {
    record: bool,
    relays: Vec<Relay>,
}

impl Wire {
    fn new(tls: Option<Creds>) -> Wire {
        Wire {
            record: tls.is_some(),
            relays: Vec::new(),
        }
    }

    /// The URI the source connects to for destination address `uri` (`tcp:HOST:PORT`).
    fn route(&mut self, uri: &str) -> String {
        if !self.record {
            return uri.to_string();
        }
        let addr = uri
            .strip_prefix("tcp:")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("a recorded migration goes over TCP: {uri}"));
        let relay = Relay::tcp(Target::Tcp(addr), Plan::none().recording());
        let routed = relay.uri.clone();
        self.relays.push(relay);
        routed
    }

    /// Every connection was TLS (`connections` per relay; the last relay's ended cleanly,
    /// the others by a pause), with neither the stream's file header nor a stretch of the guest's
    /// `pattern` in the clear.
    fn check(&self, what: &str, connections: usize, pattern: &[u8]) {
        if !self.record {
            return;
        }
        let clear: [(&str, &[u8]); 2] = [
            ("a stream header", tls_wire::STREAM_HEADER),
            ("the guest's pattern", &pattern[5 * 4096..5 * 4096 + 64]),
        ];
        for (i, relay) in self.relays.iter().enumerate() {
            let rec = relay.recorded();
            let what = format!("{what}, channels {i}");
            assert_eq!(rec.len(), connections, "{what}: connections");
            let last = i + 1 == self.relays.len();
            tls_wire::assert_all_tls(&what, &rec, !last, &clear);
        }
    }
}

fn postcopy_caps(q: &mut QmpClient, preempt: bool) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "postcopy-ram", "state": true},
            {"capability": "events", "state": true},
            {"capability": "postcopy-preempt", "state": preempt},
        ]}),
    );
}

/// Starts a migration `src` → `dst` (listening on `uri`, reached through `wire`) throttled
/// to 1 MiB/s, switches to postcopy (at `postcopy_bandwidth` bytes/s) once 1 MiB went
/// through; the destination is `postcopy-active`.
fn start_postcopy(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    uri: &str,
    wire: &mut Wire,
    name: &str,
    postcopy_bandwidth: u64,
) {
    src.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": postcopy_bandwidth}),
    );
    let uri = wire.route(&connect_uri(dst, uri));
    src.ok("migrate", json!({ "uri": uri }));
    wait_under_way(src, 1 << 20, &format!("{name}'s postcopy"));
    src.ok("migrate-start-postcopy", json!({}));
    let d = wait(dst, &["postcopy-active", "completed", "failed"]);
    assert_eq!(d["status"], "postcopy-active", "{name}: destination {d}");
}

/// Starts a throttled migration `src` → `dst`, switches to postcopy once 1 MiB went through,
/// reads the destination's whole RAM while it is in postcopy (pulling pages), and waits for
/// both ends. Returns (source, destination) `query-migrate` replies and the RAM read during
/// postcopy.
fn postcopy(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    uri: &str,
    wire: &mut Wire,
    dir: &Path,
    name: &str,
) -> (Value, Value, Vec<u8>) {
    start_postcopy(src, dst, uri, wire, name, 1 << 20);
    // Most of RAM is still on the source: reading it faults page after page.
    let during = ram(dst, dir, &format!("{name}-during"));
    let s = wait(src, &["completed", "failed", "cancelled"]);
    let d = wait(dst, &["completed", "failed"]);
    (s, d, during)
}

/// QEMU "A" with pattern A of `seed` at 0, and livemig "L1" listening on `transport`, both
/// with the postcopy capabilities (`preempt` or not) and, with `tls`, credentials of that
/// kind on both (written under `dir`) and in use: the first hop of a chain.
struct FirstHop {
    pat_a: Vec<u8>,
    qa: testkit::VmProcess,
    qa_q: QmpClient,
    l1: testkit::VmProcess,
    l1_q: QmpClient,
    uri: String,
}

fn first_hop(
    dir: &Path,
    seed: u8,
    transport: Transport,
    preempt: bool,
    tls: Option<Creds>,
) -> FirstHop {
    let a_file = dir.join("a.bin");
    let pat_a = pattern_file(&a_file, A_LEN, seed);
    if let Some(c) = tls {
        c.write(dir);
    }
    let mut args = loader(&a_file, 0);
    args.extend(tls_args(dir, tls));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    postcopy_caps(&mut qa_q, preempt);
    use_tls(&mut qa_q, tls, true);
    let uri = transport.uri(dir, "mig1");
    let mut args = strings(&["-incoming", &uri]);
    args.extend(tls_args(dir, tls));
    let l1 = livemig(dir, "l1", &args);
    let mut l1_q = l1.qmp();
    postcopy_caps(&mut l1_q, preempt);
    use_tls(&mut l1_q, tls, false);
    FirstHop {
        pat_a,
        qa,
        qa_q,
        l1,
        l1_q,
        uri,
    }
}

/// QEMU "B" listening on `transport` with the postcopy capabilities and, with `tls`, the
/// server credentials of [`first_hop`] in use: the second hop's destination, and its URI.
/// `l1_q`, its source, takes its client credentials.
fn qemu_b(
    dir: &Path,
    transport: Transport,
    preempt: bool,
    tls: Option<Creds>,
    l1_q: &mut QmpClient,
) -> (testkit::VmProcess, QmpClient, String) {
    let uri = transport.uri(dir, "mig2");
    let mut args = strings(&["-incoming", &uri]);
    args.extend(tls_args(dir, tls));
    let qb = qemu(dir, "qb", &args);
    let mut qb_q = qb.qmp();
    postcopy_caps(&mut qb_q, preempt);
    use_tls(&mut qb_q, tls, false);
    use_tls(l1_q, tls, true);
    (qb, qb_q, uri)
}

fn chain(test: &str, transport: Transport, preempt: bool) {
    chain_with(test, transport, preempt, None);
}

/// [`chain`], with `tls` credentials on every end when given (over TCP; every connection
/// recorded and checked).
fn chain_with(test: &str, transport: Transport, preempt: bool, tls: Option<Creds>) {
    let Some(tmp) = setup(test) else { return };
    let channels = if preempt { 2 } else { 1 };
    let dir = tmp.path();

    // 1. QEMU A -> livemig L1.
    let FirstHop {
        pat_a,
        qa,
        mut qa_q,
        l1,
        mut l1_q,
        uri,
    } = first_hop(dir, 11, transport, preempt, tls);
    let mut wire = Wire::new(tls);
    let (s, d, during) = postcopy(&mut qa_q, &mut l1_q, &uri, &mut wire, dir, "l1");
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    assert!(
        s["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "livemig asked QEMU for pages: {s}"
    );
    let ram_qa = ram(&mut qa_q, dir, "qa");
    assert_eq!(
        &ram_qa[..A_LEN],
        &pat_a[..],
        "loader A did not fill QEMU's RAM"
    );
    let got = d["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        got > 0,
        preempt,
        "pages on QEMU's preempt channel (preempt {preempt}): {d}"
    );
    assert_same_ram(&ram_qa, &during, "QEMU -> livemig, read during postcopy");
    assert_same_ram(&ram_qa, &ram(&mut l1_q, dir, "l1"), "QEMU -> livemig");
    assert_eq!(l1_q.ok("query-status", json!({}))["status"], "running");
    wire.check("QEMU -> livemig", channels, &pat_a);
    drop(qa);

    // 2. livemig L1 -> QEMU B.
    let (qb, mut qb_q, uri) = qemu_b(dir, transport, preempt, tls, &mut l1_q);
    let mut wire = Wire::new(tls);
    let (s, d, during) = postcopy(&mut l1_q, &mut qb_q, &uri, &mut wire, dir, "qb");
    assert_completed("livemig -> QEMU", &s, &l1, &d, &qb);
    assert!(
        s["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "QEMU asked livemig for pages: {s}"
    );
    let sent = s["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        sent > 0,
        preempt,
        "pages on livemig's preempt channel (preempt {preempt}): {s}"
    );
    assert_same_ram(&ram_qa, &during, "livemig -> QEMU, read during postcopy");
    assert_same_ram(&ram_qa, &ram(&mut qb_q, dir, "qb"), "livemig -> QEMU");
    assert_eq!(qb_q.ok("query-status", json!({}))["status"], "running");
    assert_eq!(l1_q.ok("query-status", json!({}))["status"], "postmigrate");
    wire.check("livemig -> QEMU", channels, &pat_a);
    quit_cleanly(l1, l1_q);
}

#[test]
fn qemu_postcopy_chain_over_unix() {
    chain("qemu_postcopy_chain_over_unix", Transport::Unix, false);
}

#[test]
fn qemu_postcopy_chain_over_tcp() {
    chain("qemu_postcopy_chain_over_tcp", Transport::Tcp, false);
}

#[test]
fn qemu_postcopy_preempt_chain_over_unix() {
    chain(
        "qemu_postcopy_preempt_chain_over_unix",
        Transport::Unix,
        true,
    );
}

#[test]
fn qemu_postcopy_preempt_chain_over_tcp() {
    chain("qemu_postcopy_preempt_chain_over_tcp", Transport::Tcp, true);
}

/// Postcopy with preempt over TLS (x509), QEMU → livemig → QEMU: QEMU 7.2 upgrades its
/// preempt channel to TLS as it does its main channel, and so does livemig; each takes the
/// other's sessions on every channel, and nothing crosses in the clear.
#[test]
fn qemu_postcopy_preempt_chain_over_x509() {
    chain_with(
        "qemu_postcopy_preempt_chain_over_x509",
        Transport::Tcp,
        true,
        Some(Creds::X509),
    );
}

/// The same with pre-shared keys (GnuTLS's PSK against livemig's OpenSSL sessions).
#[test]
fn qemu_postcopy_preempt_chain_over_psk() {
    chain_with(
        "qemu_postcopy_preempt_chain_over_psk",
        Transport::Tcp,
        true,
        Some(Creds::Psk),
    );
}

/// Waits until `q` is `postcopy-paused`.
fn paused(q: &mut QmpClient, who: &str) {
    let st = wait(q, &["postcopy-paused", "completed", "failed"]);
    assert_eq!(st["status"], "postcopy-paused", "{who}: {st}");
}

/// `migrate-recover` on `dst`, `migrate ... resume=true` on `src`, both `postcopy-active`.
/// A TCP `uri` with port 0 has the destination bind a port of its own, read back from its
/// `socket-address` (QEMU 7.2 lists the recovery listener first, livemig reports it).
fn recover(src: &mut QmpClient, dst: &mut QmpClient, uri: &str, wire: &mut Wire) {
    dst.ok("migrate-recover", json!({ "uri": uri }));
    let uri = wire.route(&connect_uri(dst, uri));
    src.ok("migrate", json!({ "uri": uri, "resume": true }));
    let s = wait(src, &["postcopy-active", "completed", "failed"]);
    assert_ne!(s["status"], "failed", "source after resume: {s}");
    let d = wait(dst, &["postcopy-active", "completed", "failed"]);
    assert_ne!(d["status"], "failed", "destination after resume: {d}");
}

/// One postcopy `src` → `dst` with two pauses — `migrate-pause` on the source, then on the
/// destination — each recovered; then the destination's RAM is read (pulling pages). Returns both final `query-migrate` replies.
fn postcopy_with_recoveries(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    uri: &str,
    transport: Transport,
    wire: &mut Wire,
    dir: &Path,
    name: &str,
) -> (Value, Value) {
    start_postcopy(src, dst, uri, wire, name, 64 << 10);
    let s = wait(src, &["postcopy-active", "completed", "failed"]);
    assert_eq!(s["status"], "postcopy-active", "{name}: source {s}");
    let rec = |n: u32| transport.uri(dir, &format!("{name}-rec{n}"));

    src.ok("migrate-pause", json!({}));
    paused(src, "source");
    paused(dst, "destination");
    recover(src, dst, &rec(1), wire);

    dst.ok("migrate-pause", json!({}));
    paused(dst, "destination");
    paused(src, "source");
    recover(src, dst, &rec(2), wire);
    // Reading all of RAM pulls every missing page through the recovered channels.
    let _ = ram(dst, dir, &format!("{name}-after"));
    src.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1u64 << 30}),
    );
    let s = wait(src, &["completed", "failed", "cancelled"]);
    let d = wait(dst, &["completed", "failed"]);
    (s, d)
}

/// Recovery with QEMU 7.2 at either end (issue 10): QEMU → livemig paused from each end and
/// recovered, then livemig → QEMU the same; RAM identical at every step. Over unix sockets.
#[test]
fn qemu_postcopy_recovery_both_ways() {
    recovery_both_ways("qemu_postcopy_recovery_both_ways", Transport::Unix);
}

/// The same over TCP: the migration and each `migrate-recover` listen on a port of the
/// destination's choosing (port 0), which the source reads back from `socket-address`.
#[test]
fn qemu_postcopy_recovery_both_ways_over_tcp() {
    recovery_both_ways("qemu_postcopy_recovery_both_ways_over_tcp", Transport::Tcp);
}

fn recovery_both_ways(test: &str, transport: Transport) {
    recovery_both_ways_with(test, transport, false, None);
}

/// [`recovery_both_ways`] with `preempt`, and with `tls` credentials on every end when given
/// (over TCP; every connection of the migration and of each recovery recorded and
/// checked).
fn recovery_both_ways_with(test: &str, transport: Transport, preempt: bool, tls: Option<Creds>) {
    let Some(tmp) = setup(test) else {
        return;
    };
    let channels = if preempt { 2 } else { 1 };
    let dir = tmp.path();
    let FirstHop {
        pat_a,
        qa,
        mut qa_q,
        l1,
        mut l1_q,
        uri,
    } = first_hop(dir, 23, transport, preempt, tls);
    let mut wire = Wire::new(tls);
    let (s, d) =
        postcopy_with_recoveries(&mut qa_q, &mut l1_q, &uri, transport, &mut wire, dir, "l1");
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    let ram_qa = ram(&mut qa_q, dir, "qa");
    assert_eq!(&ram_qa[..A_LEN], &pat_a[..]);
    assert_same_ram(
        &ram_qa,
        &ram(&mut l1_q, dir, "l1"),
        "QEMU -> livemig, recovered twice",
    );
    wire.check("QEMU -> livemig", channels, &pat_a);
    drop(qa);

    let (qb, mut qb_q, uri) = qemu_b(dir, transport, preempt, tls, &mut l1_q);
    let mut wire = Wire::new(tls);
    let (s, d) =
        postcopy_with_recoveries(&mut l1_q, &mut qb_q, &uri, transport, &mut wire, dir, "qb");
    assert_completed("livemig -> QEMU", &s, &l1, &d, &qb);
    assert_same_ram(
        &ram_qa,
        &ram(&mut qb_q, dir, "qb"),
        "livemig -> QEMU, recovered twice",
    );
    wire.check("livemig -> QEMU", channels, &pat_a);
    quit_cleanly(l1, l1_q);
}

/// Recovery with preempt over TLS (x509), QEMU 7.2 at either end: each pause drops every
/// channel, and each recovery's main channel (with its return path) and new preempt channel
/// are TLS sessions again — QEMU's `migrate ... resume=true` connects through its TLS
/// upgrade and sets its preempt channel up anew, its `migrate-recover` listener takes only
/// TLS. RAM identical at every step.
#[test]
fn qemu_postcopy_preempt_recovery_over_x509_both_ways() {
    recovery_both_ways_with(
        "qemu_postcopy_preempt_recovery_over_x509_both_ways",
        Transport::Tcp,
        true,
        Some(Creds::X509),
    );
}

/// Dirty bitmaps in postcopy (issue 10, seed 001) from `src` to `dst` (one of them QEMU
/// 7.2, both with a 4 GiB null-co `d0`): the bitmaps follow the switch, while the destination
/// already runs the guest; they are busy there until their COMPLETE, the guest's writes made
/// on the destination meanwhile are recorded (the successor of each enabled bitmap) and
/// merged in: the final bitmap is the source's ∪ the destination's writes; a disabled one
/// arrives as it was.
///
/// With `ram_postcopy` false it is a bitmap-only postcopy (`dirty-bitmaps` alone):
/// `migrate-start-postcopy` comes at once, RAM converges in precopy first (a 10 ms
/// `downtime-limit` keeps the 1 MiB of bitmap bits out of the downtime), and only the
/// bitmaps follow the switch.
fn bitmaps_in_postcopy(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    uri: &str,
    dir: &Path,
    name: &str,
    ram_postcopy: bool,
) -> (Value, Value) {
    for q in [&mut *src, &mut *dst] {
        if ram_postcopy {
            postcopy_caps(q, false);
        } else {
            q.ok(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events", "state": true}]}),
            );
        }
        caps(q, false);
    }
    add_bitmap(src, "d0", "b0", 512);
    add_bitmap(src, "d0", "b1", 65536);
    src.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "d0", "name": "b1"}),
    );
    // Written on the source before the migration (b1 is disabled: it stays empty). The
    // 512 MiB run makes b0 carry 128 KiB of bits, two seconds at the postcopy bandwidth
    // below: the bitmaps are still on their way when the test looks.
    let source_writes = ["write 0 64k", "write 1G 1M", "write 3G 512M"];
    for w in source_writes {
        qemu_io(src, "d0", w);
    }
    let src_b0 = sha(src, "d0", "b0");
    let src_b1 = sha(src, "d0", "b1");
    if ram_postcopy {
        src.ok(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 1 << 20}),
        );
        src.ok("migrate", json!({ "uri": uri }));
        // Under way: a first pass over RAM done (this guest's RAM is all zero pages, so
        // that is quick and then little more goes until the switch), or a megabyte sent.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = src.ok("query-migrate", json!({}));
            let ram = &q["ram"];
            if ram["transferred"].as_u64().unwrap_or(0) >= 1 << 20
                || ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
            {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: no progress: {q}");
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        src.ok(
            "migrate-set-parameters",
            json!({"max-bandwidth": 8 << 20, "downtime-limit": 10,
                   "max-postcopy-bandwidth": 64 << 10}),
        );
        src.ok("migrate", json!({ "uri": uri }));
    }
    src.ok("migrate-start-postcopy", json!({}));
    let d = wait(dst, &["postcopy-active", "completed", "failed"]);
    assert_eq!(d["status"], "postcopy-active", "{name}: destination {d}");
    if !ram_postcopy {
        // All of RAM came in precopy: the guest runs here on it while the bits still come.
        let s = src.ok("query-migrate", json!({}));
        assert_eq!(s["status"], "postcopy-active", "{name}: source {s}");
        assert_eq!(
            s["ram"]["remaining"], 0,
            "{name}: RAM is not postcopied: {s}"
        );
    }
    // The bits come only in postcopy and COMPLETE at the very end: the bitmaps exist here,
    // busy, while the guest runs.
    let b = bitmaps(dst);
    assert_eq!(b["d0"]["b0"]["busy"], true, "{name}: {b:?}");
    // The guest writes on this side during postcopy.
    let dest_write = "write 2G 64k";
    qemu_io(dst, "d0", dest_write);
    // Pull the rest of RAM, then let the push go.
    let _ = ram(dst, dir, &format!("{name}-during"));
    src.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1u64 << 30}),
    );
    let s = wait(src, &["completed", "failed", "cancelled"]);
    let d = wait(dst, &["completed", "failed"]);
    if s["status"] != "completed" || d["status"] != "completed" {
        return (s, d);
    }
    let b = bitmaps(dst);
    assert_eq!(b["d0"]["b0"]["busy"], false, "{name}: {b:?}");
    assert_eq!(b["d0"]["b0"]["recording"], true, "{name}: {b:?}");
    assert_eq!(b["d0"]["b1"]["recording"], false, "{name}: {b:?}");
    // b1 came as it was; b0 is the source's bits plus the write made here. The reference is
    // a fresh bitmap on this node that sees exactly those writes.
    assert_eq!(sha(dst, "d0", "b1"), src_b1, "{name}");
    assert_ne!(
        sha(dst, "d0", "b0"),
        src_b0,
        "{name}: the write here is missing"
    );
    add_bitmap(dst, "d0", "want", 512);
    for w in source_writes.iter().chain([&dest_write]) {
        qemu_io(dst, "d0", w);
    }
    assert_eq!(
        sha(dst, "d0", "b0"),
        sha(dst, "d0", "want"),
        "{name}: b0 = the source's bits ∪ the destination's writes"
    );
    (s, d)
}

const DISK: u64 = 4 << 30;

/// The ends of [`bitmaps_qemu_to_livemig`].
struct IntoLivemig {
    qa: testkit::VmProcess,
    qa_q: QmpClient,
    l1: testkit::VmProcess,
    l1_q: QmpClient,
    /// Pattern A, loaded at 0 in QEMU A.
    pat_a: Vec<u8>,
}

/// QEMU A (pattern A of `seed` at 0, `d0`) → livemig L1 (`d0`) over unix, with
/// [`bitmaps_in_postcopy`]: both end `completed`, L1 without warnings.
fn bitmaps_qemu_to_livemig(dir: &Path, seed: u8, ram_postcopy: bool) -> IntoLivemig {
    let a_file = dir.join("a.bin");
    let pat_a = pattern_file(&a_file, A_LEN, seed);
    let mut qa_args = loader(&a_file, 0);
    qa_args.extend(null_co("d0", DISK));
    let qa = qemu(dir, "qa", &qa_args);
    let mut qa_q = qa.qmp();
    let uri = Transport::Unix.uri(dir, "mig1");
    let mut l_args = strings(&["-incoming", &uri]);
    l_args.extend(null_co("d0", DISK));
    let l1 = livemig(dir, "l1", &l_args);
    let mut l1_q = l1.qmp();
    let (s, d) = bitmaps_in_postcopy(
        &mut qa_q,
        &mut l1_q,
        &uri,
        dir,
        "qemu->livemig",
        ram_postcopy,
    );
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    assert!(warnings(&d).is_empty(), "{d}");
    IntoLivemig {
        qa,
        qa_q,
        l1,
        l1_q,
        pat_a,
    }
}

/// livemig `l1` → a new QEMU B (`d0`) over `transport`, with [`bitmaps_in_postcopy`]: both
/// end `completed` (a failure shows both logs) and B's RAM is `ram_l1`.
fn bitmaps_livemig_to_qemu(
    dir: &Path,
    l1: &testkit::VmProcess,
    l1_q: &mut QmpClient,
    transport: Transport,
    ram_l1: &[u8],
    ram_postcopy: bool,
) {
    let uri = transport.uri(dir, "mig2");
    let mut q_args = strings(&["-incoming", &uri]);
    q_args.extend(null_co("d0", DISK));
    let qb = qemu(dir, "qb", &q_args);
    let mut qb_q = qb.qmp();
    let uri = connect_uri(&mut qb_q, &uri);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bitmaps_in_postcopy(l1_q, &mut qb_q, &uri, dir, "livemig->qemu", ram_postcopy)
    }));
    let (s, d) = r.unwrap_or_else(|_| panic!("QEMU:\n{}\nlivemig:\n{}", qb.log(), l1.log()));
    assert_completed("livemig -> QEMU", &s, l1, &d, &qb);
    assert_same_ram(ram_l1, &ram(&mut qb_q, dir, "qb"), "livemig -> QEMU");
}

/// QEMU 7.2 → livemig: QEMU sends its bitmaps after the switch. (Before, livemig dropped
/// every bitmap still to come when the guest started.)
#[test]
fn qemu_postcopy_dirty_bitmaps_into_livemig() {
    let Some(tmp) = setup("qemu_postcopy_dirty_bitmaps_into_livemig") else {
        return;
    };
    let dir = tmp.path();
    let mut h = bitmaps_qemu_to_livemig(dir, 31, true);
    assert_eq!(&ram(&mut h.qa_q, dir, "qa")[..A_LEN], &h.pat_a[..]);
    quit_cleanly(h.l1, h.l1_q);
}

/// livemig → QEMU 7.2: livemig sends the bitmaps after the switch as QEMU's source does
/// (PART sections at `max-postcopy-bandwidth`, COMPLETE in the END), and QEMU's destination
/// merges its own writes in. (Before, livemig sent them in the downtime.)
#[test]
fn livemig_postcopy_dirty_bitmaps_into_qemu() {
    let Some(tmp) = setup("livemig_postcopy_dirty_bitmaps_into_qemu") else {
        return;
    };
    let dir = tmp.path();
    let l1 = livemig(dir, "l1", &null_co("d0", DISK));
    let mut l1_q = l1.qmp();
    let ram_l1 = ram(&mut l1_q, dir, "l1");
    bitmaps_livemig_to_qemu(dir, &l1, &mut l1_q, Transport::Unix, &ram_l1, true);
    quit_cleanly(l1, l1_q);
}

/// Bitmap-only postcopy (`dirty-bitmaps` without `postcopy-ram`, as QEMU 7.2 allows it),
/// QEMU 7.2 → livemig over unix, then livemig → QEMU 7.2 over TCP: RAM converges in precopy,
/// the bitmaps follow the switch while the destination runs the guest, and both ends'
/// bitmaps hash equal (the destination's writes merged in). Before, livemig refused
/// `migrate-start-postcopy` without `postcopy-ram`, and its destination refused LISTEN after
/// a 0-byte ADVISE.
#[test]
fn qemu_bitmap_only_postcopy_both_ways() {
    let Some(tmp) = setup("qemu_bitmap_only_postcopy_both_ways") else {
        return;
    };
    let dir = tmp.path();
    let mut h = bitmaps_qemu_to_livemig(dir, 37, false);
    let ram_l1 = ram(&mut h.l1_q, dir, "l1");
    assert_eq!(&ram_l1[..A_LEN], &h.pat_a[..]);
    assert_same_ram(&ram(&mut h.qa_q, dir, "qa"), &ram_l1, "QEMU -> livemig");
    drop(h.qa);

    // livemig (the destination above, its bitmaps now its own) → QEMU over TCP.
    for b in ["b0", "b1", "want"] {
        h.l1_q.ok(
            "block-dirty-bitmap-remove",
            json!({"node": "d0", "name": b}),
        );
    }
    bitmaps_livemig_to_qemu(dir, &h.l1, &mut h.l1_q, Transport::Tcp, &ram_l1, false);
    quit_cleanly(h.l1, h.l1_q);
}

/// A postcopy `src` → `dst` with preempt, begun in the clear, paused from the source; x509
/// credentials are then added (`object-add`) and set on both ends, and the recovery (through
/// a recording relay) runs over TLS on every channel; the destination's RAM is read (pulling
/// pages through the recovered channels) and both complete; the guest's `pattern` never
/// crossed in the clear after the recovery. Returns both final `query-migrate` replies.
fn tls_set_while_paused(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    uri: &str,
    dir: &Path,
    name: &str,
    pattern: &[u8],
) -> (Value, Value) {
    start_postcopy(src, dst, uri, &mut Wire::new(None), name, 64 << 10);
    let s = wait(src, &["postcopy-active", "completed", "failed"]);
    assert_eq!(s["status"], "postcopy-active", "{name}: source {s}");
    src.ok("migrate-pause", json!({}));
    paused(src, "source");
    paused(dst, "destination");
    for (q, id, sub, endpoint) in [
        (&mut *src, "tls-cli", "cli", "client"),
        (&mut *dst, "tls-srv", "srv", "server"),
    ] {
        q.ok(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": id, "endpoint": endpoint,
                   "dir": dir.join(sub).display().to_string()}),
        );
    }
    use_tls(src, Some(Creds::X509), true);
    use_tls(dst, Some(Creds::X509), false);
    let mut wire = Wire::new(Some(Creds::X509));
    recover(src, dst, "tcp:127.0.0.1:0", &mut wire);
    let _ = ram(dst, dir, &format!("{name}-after"));
    src.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 1u64 << 30}),
    );
    let s = wait(src, &["completed", "failed", "cancelled"]);
    let d = wait(dst, &["completed", "failed"]);
    wire.check(&format!("{name}'s recovery"), 2, pattern);
    (s, d)
}

/// QEMU 7.2 decides whether a channel is TLS when it connects or accepts it, from the
/// parameters as they are then: `tls-creds` set while postcopy is paused secures the
/// recovery. QEMU → livemig and livemig → QEMU, each begun in the clear and recovered over
/// TLS — livemig resumes and listens the same way.
#[test]
fn qemu_tls_set_while_paused_secures_the_recovery_both_ways() {
    let Some(tmp) = setup("qemu_tls_set_while_paused_secures_the_recovery_both_ways") else {
        return;
    };
    let dir = tmp.path();
    Creds::X509.write(dir);
    let FirstHop {
        pat_a,
        qa,
        mut qa_q,
        l1,
        mut l1_q,
        uri,
    } = first_hop(dir, 29, Transport::Tcp, true, None);
    let (s, d) = tls_set_while_paused(&mut qa_q, &mut l1_q, &uri, dir, "l1", &pat_a);
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    let ram_qa = ram(&mut qa_q, dir, "qa");
    assert_eq!(&ram_qa[..A_LEN], &pat_a[..]);
    assert_same_ram(&ram_qa, &ram(&mut l1_q, dir, "l1"), "QEMU -> livemig");
    drop(qa);

    let (qb, mut qb_q, uri) = qemu_b(dir, Transport::Tcp, true, None, &mut l1_q);
    // L1 was the destination: its credentials are the server's; the client's come now.
    l1_q.ok("migrate-set-parameters", json!({"tls-creds": ""}));
    l1_q.ok("object-del", json!({"id": "tls-srv"}));
    let (s, d) = tls_set_while_paused(&mut l1_q, &mut qb_q, &uri, dir, "qb", &pat_a);
    assert_completed("livemig -> QEMU", &s, &l1, &d, &qb);
    assert_same_ram(&ram_qa, &ram(&mut qb_q, dir, "qb"), "livemig -> QEMU");
    quit_cleanly(l1, l1_q);
}
