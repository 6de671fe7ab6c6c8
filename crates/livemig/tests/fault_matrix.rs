//! Hand the disks over cleanly (issue 5): a migration that ends in `migrate_cancel`, a killed
//! destination or a cut connection, in each of `setup`, `active`, `pre-switchover` and the
//! switchover (phase `device`: the guest stopped, the status still `active` as in QEMU 7.2,
//! which enters `device` only after `pre-switchover`), leaves the source running with every disk and dirty bitmap exactly as it was —
//! persistent bitmaps inside the qcow2 image included, the QEMU 7.2 bug being that a
//! cancelled migration loses them at the next shutdown — and a new migration succeeds.
//!
//! Every cell runs the same story on an idle guest whose RAM and bitmaps change only when the
//! test changes them:
//! 1. A source on a qcow2 image `d0` with four bitmaps: `pb` and `pn` persistent from the
//!    image (`qemu-img bitmap --add`), `pq` persistent from QMP (128 KiB granules, disabled),
//!    `tb` transient; `block-bitmap-mapping` migrates `pb`, `pq` and `tb` but not `pn`, so at
//!    switchover `pn` is stored to the image and released while the others stay in memory
//!    (`skip_store`). A second node `d1` (null-co, 4 GiB) carries `tz`, a transient bitmap of
//!    512-byte granules that is all set: 1 MiB of bitmap data at switchover, more than the
//!    socket buffers hold. Every bitmap's contents are known: qemu-io writes through the
//!    monitor.
//! 2. The fault (the destination of this first attempt shares the source's image, as with
//!    shared storage; the one of the second attempt below has its own). The migration ends `cancelled` or `failed` with the expected events and
//!    error. The source is `running`, its RAM checksum, bitmaps (sha256, count, flags) and data
//!    are as before, the bitmaps are free (not busy), the image is write-locked again and
//!    writable. The destination, if alive, failed without running the guest or keeping a
//!    bitmap, and its image (after it quit, or was killed) has no bitmaps and checks clean.
//!    In `pre-switchover` a dead destination or connection is noticed, as in QEMU, when
//!    management says `migrate-continue`.
//! 3. `quit`: `qemu-img info` shows every persistent bitmap with its flags and granularity (not
//!    `in-use`), `qemu-img check` is clean, the data reads back with `qemu-io -r`.
//! 4. A new source on the same image gets the persistent bitmaps back bit for bit, suffers the
//!    same fault, and then migrates to a fresh destination: at the stop point RAM, vCPUs and
//!    bitmap hashes agree; the destination's image, once it quits, holds the migrated
//!    persistent bitmaps with the same contents (read back by a third process).
//!
//! How each phase is held: `setup` — a connect that hangs (a unix listener whose backlog is
//! full; "killing the destination" kills the process that owns it, "cutting" closes it);
//! `active` — 1 MiB/s of bandwidth; `pre-switchover` — `pause-before-switchover`; `device` — a
//! proxy that forwards the stream up to the `ram` END section and holds the rest, so the source
//! has inactivated its disks and waits for the destination's `SHUT` on the return path; and
//! `device-blocked` — the same proxy stops reading there, so the source is blocked writing
//! `tz` (checked: its migration thread is in a write system call); `device-paused` — the
//! proxy as in `device`, after a `pause-before-switchover` and `migrate-continue`, so the
//! status is `device` itself (QEMU 7.2's only way into it) and the source fails or is
//! cancelled from there.
//!
//! The stall and flip cells (issue 14) tell it too: in `active`, testkit's relay stops
//! forwarding (`stall`), or flips one bit of a page with `x-livemig-integrity` on at both ends
//! (`flip`); in `device-blocked` the proxy stops reading. Nobody cancels: the stall bound
//! (`x-livemig-stall-timeout`, 1.5 s here) fails a stall within a bound and the guest
//! resumes; the destination's integrity check fails a flip, naming the section, and the
//! source resumes. `flip_without_integrity_completes_with_the_flipped_page` shows the
//! documented behaviour with the capability off (QEMU's): the flip reaches guest RAM.
//!
//! The multifd cells (issue 12) tell the same story with four channels on every migration of
//! the cell: in `active` and `pre-switchover`, a relay (testkit's) carrying the main channel
//! and the four channels cuts all of them, or one channel's connection alone; in `device`
//! and `device-paused`, the proxy holds the main channel as above and forwards the four
//! channels as they are (so every page they carry has arrived, and the destination's channels
//! wait at their last sync point), and the destination is killed, the proxy cuts everything,
//! or it cuts one channel alone (in `device-paused`, a cancel too). That last cut is one the destination cannot tell from a source closing a channel it
//! no longer needs (a QEMU source without a return path does so before the destination has
//! loaded the end of the stream), and the source, waiting for the verdict, has nothing left to
//! write: the destination's stall bound (1.5 s here) ends its wait for the held stream, it
//! fails, and the source, its return path closed without `SHUT`, fails and resumes.

mod common;
mod faults;

use common::*;
use faults::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::relay::{Fault as LinkFault, Plan, Relay as LinkRelay, Target};

/// `x-livemig-stall-timeout` of the stall cells, in ms.
const STALL_MS: u64 = 1500;

/// Where the flip cells flip a bit: 1 MiB into the stream, in the first pass over the 16 MiB
/// the guest filled (a page's payload, unless it lands on one of a record's 8 header bytes
/// out of 4104, which the framing checks refuse instead).
const FLIP_AT: u64 = 1 << 20;

/// Capabilities on both ends of every migration here (the return path is what holds a
/// source in the switchover).
const CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path"];

/// The guest: small RAM, one vCPU, half the RAM filled once and then left alone.
const FILL: &str = "fill=16M,hot=0";
const FILL_PAGES16: u64 = (16 << 20) / 4096;

/// Size of every qcow2 image.
const DISK_SIZE: u64 = 64 << 20;

/// What the test wrote to the disk, as `qemu-io` read commands.
const READS: &[&str] = &["read -P 0x5a 0 1M", "read -P 0x33 8M 64k"];

/// Where the migration is when the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Active,
    PreSwitchover,
    /// Stream stalled after the switchover started; the source waits for `SHUT`.
    Device,
    /// The same after a `pre-switchover` pause and `migrate-continue`: the status is `device`.
    DevicePaused,
    /// Stream stalled after the switchover started; the source is blocked in a write.
    DeviceBlocked,
}

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `migrate_cancel` on the source.
    Cancel,
    /// SIGKILL to the destination process.
    KillDestination,
    /// The connection between the two closes abruptly (with multifd: every channel's).
    CutConnection,
    /// With multifd: one channel's connection closes abruptly, the others stay.
    CutChannel,
    /// The link stops moving bytes, and nobody does anything about it.
    Stall,
    /// One bit of a page flips on the link, `x-livemig-integrity` on at both ends.
    Flip,
}

/// The second node (besides the qcow2 `d0`).
const D1: &str = "driver=null-co,node-name=d1,size=4294967296";

/// The `block-bitmap-mapping` both ends use: everything but `pn`.
fn mapping() -> Value {
    json!({"block-bitmap-mapping": [{
        "node-name": "d0", "alias": "d0",
        "bitmaps": [
            {"name": "pb", "alias": "pb"},
            {"name": "pq", "alias": "pq"},
            {"name": "tb", "alias": "tb"},
        ],
    }, {
        "node-name": "d1", "alias": "d1",
        "bitmaps": [{"name": "tz", "alias": "tz"}],
    }]})
}

/// `query-named-block-nodes`' view of the bitmaps as the test made them (with their node
/// added), sorted by node and name.
fn expected_bitmaps() -> Vec<Value> {
    let b = |node: &str,
             name: &str,
             count: u64,
             granularity: u64,
             recording: bool,
             persistent: bool| {
        json!({"node": node, "name": name, "count": count, "granularity": granularity,
               "recording": recording, "busy": false, "persistent": persistent})
    };
    vec![
        b("d0", "pb", (1 << 20) + (64 << 10), 65536, true, true),
        b("d0", "pn", (1 << 20) + (64 << 10), 65536, true, true),
        b("d0", "pq", 1 << 20, 131072, false, true),
        b("d0", "tb", 64 << 10, 65536, true, false),
        b("d1", "tz", 4 << 30, 512, true, false),
    ]
}

/// The source image's bitmaps as `qemu-img info` must show them after the source quit
/// without handing the guest over.
fn expected_image_bitmaps() -> Vec<Value> {
    vec![
        json!({"flags": ["auto"], "name": "pb", "granularity": 65536}),
        json!({"flags": ["auto"], "name": "pn", "granularity": 65536}),
        json!({"flags": [], "name": "pq", "granularity": 131072}),
    ]
}

/// What must not change: RAM, and each bitmap's state and contents.
#[derive(Debug, PartialEq, Clone)]
struct Snapshot {
    ram: Value,
    /// `query-named-block-nodes`' entries, each with its `node` added.
    bitmaps: Vec<Value>,
    /// (node, name, sha256).
    sha: Vec<(String, String, String)>,
}

fn bitmaps_of(lm: &mut Lm) -> Vec<Value> {
    let r = lm.ok("query-named-block-nodes", json!({}));
    let mut list: Vec<Value> = Vec::new();
    for n in r.as_array().into_iter().flatten() {
        let node = n["node-name"].as_str().unwrap_or_default();
        if node != "d0" && node != "d1" {
            continue;
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            let mut b = b.clone();
            b["node"] = json!(node);
            list.push(b);
        }
    }
    let key = |b: &Value| format!("{}/{}", b["node"], b["name"]);
    list.sort_by_key(key);
    list
}

fn snapshot(lm: &mut Lm) -> Snapshot {
    let (bitmaps, sha) = bitmap_hashes(lm);
    Snapshot {
        ram: lm.ram_checksum(),
        bitmaps,
        sha,
    }
}

/// The bitmaps of `d0`/`d1` and their hashes (node, name, sha256).
#[allow(clippy::type_complexity)]
fn bitmap_hashes(lm: &mut Lm) -> (Vec<Value>, Vec<(String, String, String)>) {
    let bitmaps = bitmaps_of(lm);
    let mut sha = Vec::new();
    for b in &bitmaps {
        let node = b["node"].as_str().unwrap_or_default().to_string();
        let name = b["name"].as_str().unwrap_or_default().to_string();
        let r = lm.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": node, "name": name}),
        );
        let h = r["sha256"].as_str().unwrap_or_default().to_string();
        sha.push((node, name, h));
    }
    (bitmaps, sha)
}

fn qemu_io_ok(lm: &mut Lm, cmd: &str, expect: &str) {
    let out = lm.qemu_io(cmd);
    assert!(out.starts_with(expect), "{}: qemu-io {cmd}: {out}", lm.name);
}

/// `livemig vm` on `img`. The first start creates `pq` and writes the data; a restart finds
/// the persistent bitmaps in the image and only re-creates the transient `tb` and `tz` (the
/// write to `d0` sets only bits the persistent ones already have).
///
/// With `channels` > 0: capability `multifd` with that many channels.
fn start_source(dir: &Path, name: &str, img: &Path, first: bool, channels: u64) -> Lm {
    let blockdev = qcow2_blockdev(img);
    let mut lm = Lm::start(
        dir,
        name,
        &[
            "-m",
            "32M",
            "-smp",
            "1",
            "-blockdev",
            &blockdev,
            "-blockdev",
            D1,
            "-workload",
            FILL,
        ],
    );
    lm.wait_idle_after(FILL_PAGES16);
    if first {
        lm.ok(
            "block-dirty-bitmap-add",
            json!({"node": "d0", "name": "pq", "granularity": 131072, "persistent": true}),
        );
        qemu_io_ok(&mut lm, "write -P 0x5a 0 1M", "wrote 1048576/1048576");
        lm.ok(
            "block-dirty-bitmap-disable",
            json!({"node": "d0", "name": "pq"}),
        );
    }
    lm.add_bitmap("tb");
    qemu_io_ok(&mut lm, "write -P 0x33 8M 64k", "wrote 65536/65536");
    lm.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d1", "name": "tz", "granularity": 512}),
    );
    for g in 0..4 {
        let before = lm.proc.log().len();
        let out = lm.ok(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io d1 \"write -z {g}G 1G\"") }),
        );
        assert_eq!(out, json!(""));
        let log = lm.proc.log();
        let printed = log.get(before..).unwrap_or_default();
        assert!(printed.starts_with("wrote "), "{printed}");
    }
    lm.caps_on(CAPS);
    lm.set_params(mapping());
    multifd(&mut lm, channels);
    lm
}

/// Capability `multifd` with `channels` channels, unless 0.
fn multifd(lm: &mut Lm, channels: u64) {
    if channels > 0 {
        lm.caps_on(&["multifd"]);
        lm.set_params(json!({ "multifd-channels": channels }));
    }
}

/// A destination for `uri` on a fresh empty image `NAME.qcow2`; with `paused` (`-S`) it stays
/// paused after the migration, otherwise it would start the guest.
///
/// With `shared`, it opens that image instead — the source's own, as with shared storage (it
/// opens it inactive, without locks, for the incoming migration). `channels` as for
/// [`start_source`].
fn start_destination(
    dir: &Path,
    name: &str,
    uri: &str,
    paused: bool,
    shared: Option<&Path>,
    channels: u64,
) -> Lm {
    let img = match shared {
        Some(i) => i.to_path_buf(),
        None => {
            let i = dir.join(format!("{name}.qcow2"));
            create_qcow2(&i, DISK_SIZE, &[]);
            i
        }
    };
    let blockdev = qcow2_blockdev(&img);
    let mut args = vec![
        "-m",
        "32M",
        "-smp",
        "1",
        "-blockdev",
        &blockdev,
        "-blockdev",
        D1,
        "-incoming",
        uri,
    ];
    if paused {
        args.push("-S");
    }
    let mut lm = Lm::start(dir, name, &args);
    lm.caps_on(CAPS);
    lm.set_params(mapping());
    multifd(&mut lm, channels);
    lm
}

/// A fresh source image `src.qcow2` in `dir` with the persistent bitmaps `pb` and `pn` (64 KiB
/// granules) made by `qemu-img`.
fn source_image(dir: &Path) -> PathBuf {
    let img = dir.join("src.qcow2");
    create_qcow2(&img, DISK_SIZE, &[("pb", 65536), ("pn", 65536)]);
    img
}

/// A source on a fresh [`source_image`] (its first start) with its snapshot, and a
/// destination on an image of its own listening on the unix socket `target` (`paused` as
/// for [`start_destination`]).
struct Pair {
    img: PathBuf,
    src: Lm,
    before: Snapshot,
    target: PathBuf,
    dst: Lm,
}

fn pair(dir: &Path, paused: bool) -> Pair {
    let img = source_image(dir);
    let mut src = start_source(dir, "src", &img, true, 0);
    let before = snapshot(&mut src);
    let target = dir.join("mig.sock");
    let uri = format!("unix:{}", target.display());
    let dst = start_destination(dir, "dst", &uri, paused, None, 0);
    Pair {
        img,
        src,
        before,
        target,
        dst,
    }
}

/// `quit`, and the process exits with status 0.
fn quit(mut lm: Lm) {
    let _ = lm.qmp.execute("quit", json!({}));
    assert_eq!(
        lm.proc.wait_exit(TIMEOUT),
        Some(0),
        "{} did not quit cleanly: {}",
        lm.name,
        lm.proc.log()
    );
}

/// The `MIGRATION` statuses (with `STOP` and `RESUME`) the source reports for this cell.
fn expected_events(phase: Phase, fault: Fault) -> Vec<&'static str> {
    let mut v = vec!["setup"];
    match phase {
        Phase::Setup => {}
        Phase::Active => v.push("active"),
        Phase::PreSwitchover => v.extend(["active", "STOP", "pre-switchover"]),
        // No `device` state without `pause-before-switchover`: the switchover runs in `active`.
        Phase::Device | Phase::DeviceBlocked => v.extend(["active", "STOP"]),
        Phase::DevicePaused => v.extend(["active", "STOP", "pre-switchover", "device"]),
    }
    let stopped = !matches!(phase, Phase::Setup | Phase::Active);
    // Other faults add no state: with the return path open, even in pre-switchover the
    // source notices the destination is gone and fails before the switchover goes on.
    if fault == Fault::Cancel {
        v.push("cancelling");
    }
    if stopped {
        v.push("RESUME");
    }
    v.push(if fault == Fault::Cancel {
        "cancelled"
    } else {
        "failed"
    });
    v
}

/// Part of `error-desc` a failed migration of this cell reports.
fn expected_error(phase: Phase, fault: Fault) -> &'static str {
    match fault {
        Fault::Stall => {
            return "the migration stream stalled: the destination took nothing for 1500 ms (x-livemig-stall-timeout)"
        }
        // The destination's load fails and it exits: the source's next write finds the
        // socket closed, as when the destination is killed.
        Fault::Flip => return "Unable to write to socket",
        _ => {}
    }
    match phase {
        Phase::Setup => "Connection refused",
        Phase::Active | Phase::DeviceBlocked => "Unable to write to socket",
        Phase::PreSwitchover => {
            "the destination went away while the source waited in pre-switchover"
        }
        Phase::Device | Phase::DevicePaused => {
            "the destination closed the return path before reporting success"
        }
    }
}

fn stall_phase(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Device | Phase::DevicePaused | Phase::DeviceBlocked
    )
}

/// Waits until the source's migration thread sits in a socket write (x86-64 numbers; other
/// architectures skip the check).
fn wait_blocked_in_write(src: &mut Lm) {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let pid = src.proc.child.id();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let sc = thread_syscall(pid, "migration-out");
        if sc.is_some_and(|n| WRITE_SYSCALLS.contains(&n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the migration thread is not blocked in a write (syscall {sc:?})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a migration from `src`, holds it in `phase`, applies `fault`, and checks how it
/// ended. `round` keeps the files of repeated attempts apart.
///
/// With `shared`, the destination opens the source's image (shared storage); otherwise it has
/// an empty image of its own. With `channels` > 0 both ends use multifd (the source has it
/// on already), and a cut goes through a relay that carries every channel.
#[allow(clippy::too_many_arguments)]
fn attempt(
    dir: &Path,
    src: &mut Lm,
    img: &Path,
    phase: Phase,
    fault: Fault,
    round: u32,
    shared: bool,
    channels: u64,
) {
    let sock = |what: &str| dir.join(format!("{what}{round}.sock"));
    let default_bandwidth = src.ok("query-migrate-parameters", json!({}))["max-bandwidth"].clone();
    // Whatever stands for the other end; dropped at the end of the attempt.
    let mut dst: Option<Lm> = None;
    let mut proxy: Option<Proxy> = None;
    let mut relay: Option<LinkRelay> = None;
    let mut foreign: Option<ForeignListener> = None;
    let mut local = None;

    if phase == Phase::Setup {
        let path = sock("hang");
        if fault == Fault::KillDestination {
            foreign = Some(ForeignListener::start(&path));
        } else {
            local = Some(hanging_listener(&path));
        }
        src.migrate(&format!("unix:{}", path.display()));
        assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
        // Let the migration thread block in connect(), the case this is about.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
    } else {
        let target = sock("dst");
        let target_uri = format!("unix:{}", target.display());
        // Without -S: had it taken the guest over, it would be running it.
        dst = Some(start_destination(
            dir,
            &format!("attempt{round}-dst"),
            &target_uri,
            false,
            shared.then_some(img),
            channels,
        ));
        let stall = match phase {
            Phase::Device | Phase::DevicePaused => Stall::Hold,
            Phase::DeviceBlocked => Stall::Block,
            _ => Stall::No,
        };
        let cut = matches!(fault, Fault::CutConnection | Fault::CutChannel);
        match fault {
            Fault::Stall => {
                src.set_params(json!({"x-livemig-stall-timeout": STALL_MS}));
                // The destination's bound is longer, so the source's is what fails the
                // migration (a destination that gave up first would exit, and the source
                // would fail on the closed socket instead); it fails once the link closes.
                dst.as_mut()
                    .expect("destination")
                    .set_params(json!({"x-livemig-stall-timeout": 4 * STALL_MS}));
            }
            Fault::CutChannel if stall == Stall::Hold => {
                // Nothing is left to move on the channels: the destination's bound on the
                // held stream is what ends the migration (see the module doc).
                dst.as_mut()
                    .expect("destination")
                    .set_params(json!({"x-livemig-stall-timeout": STALL_MS}));
            }
            Fault::Flip => {
                src.caps_on(&["x-livemig-integrity"]);
                dst.as_mut()
                    .expect("destination")
                    .caps_on(&["x-livemig-integrity"]);
            }
            _ => {}
        }
        let link_fault = matches!(fault, Fault::Stall | Fault::Flip) && stall == Stall::No;
        let uri = if link_fault {
            let plan = match fault {
                Fault::Flip => Plan::one(LinkFault::Flip {
                    at: FLIP_AT,
                    mask: 0x04,
                }),
                _ => Plan::none(),
            };
            let r = LinkRelay::unix(&sock("relay"), Target::Unix(target.clone()), plan);
            let uri = r.uri.clone();
            relay = Some(r);
            uri
        } else if channels > 0 && cut && stall == Stall::No {
            let r = LinkRelay::unix(&sock("relay"), Target::Unix(target.clone()), Plan::none());
            let uri = r.uri.clone();
            relay = Some(r);
            uri
        } else if stall != Stall::No || fault == Fault::CutConnection {
            let listen = sock("proxy");
            proxy = Some(Proxy::start(&listen, &target, stall));
            format!("unix:{}", listen.display())
        } else {
            target_uri
        };
        match phase {
            // 1 MiB/s for 16 MiB of RAM: it stays active for as long as the test needs.
            Phase::Active => src.set_params(json!({"max-bandwidth": 1 << 20})),
            Phase::PreSwitchover | Phase::DevicePaused => src.caps_on(&["pause-before-switchover"]),
            _ => {}
        }
        src.migrate(&uri);
        match phase {
            Phase::Active => {
                src.wait_migration(&["active"]);
                let info = src.bitmap_info("pb");
                assert_eq!(info["busy"], true, "a migrating bitmap is busy: {info}");
                assert_eq!(src.bitmap_info("pn")["busy"], false, "pn is not migrated");
            }
            Phase::PreSwitchover => {
                src.wait_migration(&["pre-switchover"]);
                assert_eq!(src.status(), "finish-migrate");
            }
            Phase::Device | Phase::DevicePaused | Phase::DeviceBlocked => {
                let p = proxy.as_ref().expect("proxy");
                if phase == Phase::DevicePaused {
                    src.wait_migration(&["pre-switchover"]);
                    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
                }
                p.wait_stalled(TIMEOUT);
                // Without a pause the switchover runs in `active` (no `device` without one):
                // the guest stopped for it is what shows it began.
                src.wait_runstate("finish-migrate");
                let status = if phase == Phase::DevicePaused {
                    "device"
                } else {
                    "active"
                };
                assert_eq!(src.wait_migration(&[status])["status"], status);
                if phase == Phase::DeviceBlocked {
                    wait_blocked_in_write(src);
                } else {
                    p.wait_source_done(TIMEOUT);
                }
                // Blocked or not, the monitor answers, bitmaps included (the migration thread
                // holds no lock across I/O).
                let tz = src.ok(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": "d1", "name": "tz"}),
                );
                assert!(tz["sha256"].is_string(), "{tz}");
                // The disks are inactive: the image is unlocked, and the bitmap that does not
                // migrate has been stored to it (the migrating ones stay in memory).
                let stored = image_bitmaps(img);
                let pn = stored.iter().find(|b| b["name"] == "pn");
                assert_eq!(
                    pn,
                    Some(&json!({"flags": ["auto"], "name": "pn", "granularity": 65536})),
                    "at switchover: {stored:?}"
                );
                // What a destination on shared storage would open now: flushed and consistent.
                assert_image_clean(img);
                assert_image_reads(img, READS);
            }
            Phase::Setup => unreachable!(),
        }
        // Several channels open: the main one and every multifd channel.
        let want = 1 + channels as usize;
        if let Some(r) = &relay {
            r.wait(TIMEOUT, "every channel connected", |rep| {
                rep.connections >= want
            });
        }
        if let (Some(p), true) = (&proxy, channels > 0) {
            p.wait_connections(want, TIMEOUT);
        }
        // Connected is not yet accepted: the destination reads each channel's first packet
        // before it goes `active`. A channel cut before that fails the incoming migration
        // before the stream is loaded, where a destination (QEMU's too) does not exit —
        // another cell than this one.
        if let (Some(d), true) = (dst.as_mut(), channels > 0 && phase == Phase::Active) {
            d.wait_migration(&["active"]);
        }
    }

    match fault {
        Fault::Cancel => {
            src.ok("migrate_cancel", json!({}));
        }
        Fault::KillDestination => {
            if let Some(f) = foreign.as_mut() {
                f.kill();
            }
            if let Some(d) = dst.as_mut() {
                d.proc.child.kill().expect("kill the destination");
                let _ = d.proc.child.wait();
            }
        }
        Fault::CutConnection => {
            local = None;
            if let Some(p) = &proxy {
                p.cut();
            }
            if let Some(r) = &relay {
                r.cut();
            }
        }
        Fault::CutChannel => {
            // The first multifd channel (connection 0 is the main one).
            match (&relay, &proxy) {
                (Some(r), _) => r.cut_one(1),
                (None, Some(p)) => p.cut_one(1),
                (None, None) => panic!("nothing carries the channels"),
            }
        }
        // In `device-blocked` the proxy already reads nothing more.
        Fault::Stall => {
            if let Some(r) = &relay {
                r.stall();
            }
        }
        Fault::Flip => {
            relay
                .as_ref()
                .expect("relay")
                .wait(TIMEOUT, "the flip", |rep| !rep.flipped.is_empty());
        }
    }
    let struck = Instant::now();
    drop(local);
    // In pre-switchover no `migrate-continue` is needed: with the return path open, the
    // source sees the destination go and fails by itself (QEMU would wait for one).

    let q = src.wait_migration(&["cancelled", "failed", "completed"]);
    let want = if fault == Fault::Cancel {
        "cancelled"
    } else {
        "failed"
    };
    assert_eq!(q["status"], want, "{phase:?}/{fault:?}: {q}");
    if fault == Fault::Stall {
        // The bound, plus the socket buffers filling on a loaded machine.
        let took = struck.elapsed();
        assert!(took < Duration::from_secs(15), "noticed after {took:?}");
    }
    if fault != Fault::Cancel {
        let desc = q["error-desc"].as_str().unwrap_or_default();
        assert!(
            desc.contains(expected_error(phase, fault)),
            "{phase:?}/{fault:?}: {q}"
        );
    }
    assert_eq!(
        src.migration_events_until(want),
        expected_events(phase, fault),
        "{phase:?}/{fault:?}"
    );
    drop(relay);
    if let Some(p) = proxy.take() {
        if stall_phase(phase) {
            assert!(p.held() > 0, "the proxy held back nothing");
        }
        // Closes the connection: a destination still waiting for the stream sees it end.
        drop(p);
    }
    if let Some(mut d) = dst.take() {
        if fault == Fault::Flip {
            // The check, and the section, in the destination's last words.
            let e = d.wait_load_failed();
            assert!(
                e.contains("in section 'ram' (id ")
                    && (e.contains("integrity check failed: the batch of RAM records")
                        || e.contains("Unknown combination of migration flags")),
                "{}: {e}",
                d.name
            );
        }
        let own = (!shared).then(|| dir.join(format!("attempt{round}-dst.qcow2")));
        check_failed_destination(d, fault == Fault::KillDestination, own);
    }
    src.set_params(json!({ "max-bandwidth": default_bandwidth }));
    src.set_params(json!({ "x-livemig-stall-timeout": 30_000 }));
    src.set_caps(&[
        ("pause-before-switchover", false),
        ("x-livemig-integrity", false),
    ]);
}

/// The destination of a failed attempt did not take the guest over: unless it was killed, its
/// load failed and it exited with status 1, the error on stderr, as QEMU 7.2's does
/// (`process_incoming_migration_co`); and its own image (if it has one) is untouched: no
/// bitmaps, nothing to repair. (A destination on the source's image is checked by the
/// source's image checks.)
fn check_failed_destination(mut d: Lm, killed: bool, img: Option<std::path::PathBuf>) {
    if !killed {
        let e = d.wait_load_failed();
        assert!(!e.is_empty(), "{}: an empty error", d.name);
    }
    drop(d);
    if let Some(img) = img {
        assert_eq!(
            image_bitmaps(&img),
            Vec::<Value>::new(),
            "{}",
            img.display()
        );
        assert_image_clean(&img);
    }
}

/// After the attempt: the guest runs, nothing changed, the bitmaps are free, and the disk is
/// the source's again — locked against other writers, readable, writable.
fn check_put_back(src: &mut Lm, before: &Snapshot, img: &Path) {
    assert_eq!(src.status(), "running", "{}", src.name);
    assert_eq!(&snapshot(src), before, "the attempt changed the source");
    assert_image_locked(img);
    for r in READS {
        let out = src.qemu_io(r);
        assert!(out.starts_with("read "), "qemu-io {r}: {out}");
    }
    // A write where every recording bitmap already has its bit: the data and the bitmaps stay
    // as they were, and the write proves the node is active and writable.
    qemu_io_ok(src, "write -P 0x33 8M 64k", "wrote 65536/65536");
    assert_eq!(&snapshot(src), before, "{}", src.name);
    // The bitmaps take commands again (a busy one refuses them); these change nothing.
    src.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "d0", "name": "pq"}),
    );
    for b in ["pb", "pn", "tb"] {
        src.ok(
            "block-dirty-bitmap-enable",
            json!({"node": "d0", "name": b}),
        );
    }
    assert_eq!(&snapshot(src), before, "{}", src.name);
}

/// The image after the source quit without handing over: every persistent bitmap stored with
/// its flags, nothing wrong, the data there.
fn check_image_after_quit(img: &Path) {
    assert_eq!(image_bitmaps(img), expected_image_bitmaps());
    assert_image_clean(img);
    assert_image_reads(img, READS);
}

/// The new migration from `src` to a fresh destination completes and carries what the source
/// had; once the destination quits, its image holds the migrated persistent bitmaps with the
/// same contents.
fn second_migration(dir: &Path, src: &mut Lm, before: &Snapshot, channels: u64) {
    let uri = unix_uri(dir, "final.sock");
    let mut dst = start_destination(dir, "final-dst", &uri, true, None, channels);
    src.migrate(&uri);
    check_stop_point(src, &mut dst, &["pb", "pq", "tb"]);
    assert_eq!(dst.ram_checksum(), before.ram);
    // Every bitmap but `pn` arrived, with the same state and bits.
    let arrived = snapshot(&mut dst);
    let keep = |name: &str| name != "pn";
    let migrated: Vec<Value> = before
        .bitmaps
        .iter()
        .filter(|b| keep(b["name"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    assert_eq!(arrived.bitmaps, migrated, "the destination's bitmaps");
    let hashes: Vec<_> = before
        .sha
        .iter()
        .filter(|(_, name, _)| keep(name))
        .cloned()
        .collect();
    assert_eq!(arrived.sha, hashes, "the destination's bitmaps");
    quit(dst);
    let dst_img = dir.join("final-dst.qcow2");
    assert_eq!(
        image_bitmaps(&dst_img),
        vec![
            json!({"flags": ["auto"], "name": "pb", "granularity": 65536}),
            json!({"flags": [], "name": "pq", "granularity": 131072}),
        ]
    );
    assert_image_clean(&dst_img);
    // Read the stored bitmaps back: the same bits the source had.
    let blockdev = qcow2_blockdev(&dst_img);
    let mut reader = Lm::start(
        dir,
        "final-dst-reader",
        &["-M", "none", "-m", "16M", "-blockdev", &blockdev],
    );
    for (_, name, sha) in &before.sha {
        if name == "pb" || name == "pq" {
            assert_eq!(
                &reader.bitmap_sha(name),
                sha,
                "{name} in the destination's image"
            );
        }
    }
    quit(reader);
    assert_image_clean(&dst_img);
}

/// One `#[test]` per cell, named as the cell: `name => the call that runs it;`.
macro_rules! cells {
    ($($name:ident => $run:expr;)*) => {
        $(
            #[test]
            fn $name() {
                $run;
            }
        )*
    };
}

fn run_cell(phase: Phase, fault: Fault) {
    run_cell_with(phase, fault, 0);
}

/// A cell; with `channels` > 0 every migration of it (the faulty ones and the last) uses
/// multifd with that many channels.
fn run_cell_with(phase: Phase, fault: Fault, channels: u64) {
    let test = format!("{phase:?}/{fault:?}");
    let mut missing = testkit::qemu();
    if fault == Fault::KillDestination && phase == Phase::Setup {
        missing = missing.or_else(|| testkit::programs(&["python3"]));
    }
    if !testkit::require(&test, missing) {
        return;
    }
    let dir = tempdir();
    let img = source_image(dir.path());

    // Round 1: the fault, then quit — the image keeps everything.
    let mut src = start_source(dir.path(), "src1", &img, true, channels);
    let s0 = snapshot(&mut src);
    assert_eq!(s0.bitmaps, expected_bitmaps());
    attempt(dir.path(), &mut src, &img, phase, fault, 1, true, channels);
    check_put_back(&mut src, &s0, &img);
    quit(src);
    check_image_after_quit(&img);

    // Round 2: a new source on the image has the same bitmaps, bit for bit; the same fault;
    // then a migration from that process succeeds.
    let mut src = start_source(dir.path(), "src2", &img, false, channels);
    let s1 = snapshot(&mut src);
    assert_eq!(s1.bitmaps, s0.bitmaps);
    assert_eq!(
        s1.sha, s0.sha,
        "the persistent bitmaps did not come back as they were"
    );
    attempt(dir.path(), &mut src, &img, phase, fault, 2, false, channels);
    check_put_back(&mut src, &s1, &img);
    second_migration(dir.path(), &mut src, &s1, channels);
    quit(src);
    // The source handed the guest over: its image is consistent and has the data; `pn`, which
    // did not migrate, was stored at the switchover.
    assert_image_clean(&img);
    assert_image_reads(&img, READS);
    let left = image_bitmaps(&img);
    assert!(
        left.contains(&json!({"flags": ["auto"], "name": "pn", "granularity": 65536})),
        "{left:?}"
    );
}

cells! {
    setup_cancel => run_cell(Phase::Setup, Fault::Cancel);
    setup_kill_destination => run_cell(Phase::Setup, Fault::KillDestination);
    setup_cut_connection => run_cell(Phase::Setup, Fault::CutConnection);
    active_cancel => run_cell(Phase::Active, Fault::Cancel);
    active_kill_destination => run_cell(Phase::Active, Fault::KillDestination);
    active_cut_connection => run_cell(Phase::Active, Fault::CutConnection);
    pre_switchover_cancel => run_cell(Phase::PreSwitchover, Fault::Cancel);
    pre_switchover_kill_destination => run_cell(Phase::PreSwitchover, Fault::KillDestination);
    pre_switchover_cut_connection => run_cell(Phase::PreSwitchover, Fault::CutConnection);
    active_stall => run_cell(Phase::Active, Fault::Stall);
    device_blocked_stall => run_cell(Phase::DeviceBlocked, Fault::Stall);
    active_flip => run_cell(Phase::Active, Fault::Flip);
}

/// The flip cell with `x-livemig-integrity` off (the default, and QEMU's behaviour): the
/// migration completes, and the flipped bit is in the destination's RAM. The bitmaps, which
/// the flip did not touch, arrive whole.
#[test]
fn flip_without_integrity_completes_with_the_flipped_page() {
    if !testkit::require("flip without integrity", testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let Pair {
        img: _,
        mut src,
        before,
        target,
        mut dst,
    } = pair(dir.path(), true);
    let relay = LinkRelay::unix(
        &dir.path().join("relay.sock"),
        Target::Unix(target),
        Plan::one(LinkFault::Flip {
            at: FLIP_AT,
            mask: 0x04,
        }),
    );
    src.migrate(&relay.uri);
    let s = src.wait_migration(&["completed", "failed", "cancelled"]);
    let d = dst.incoming_outcome();
    assert_eq!(relay.report().flipped.len(), 1, "the relay flipped no bit");
    if let Err(e) = d {
        // The bit fell on a record header: the framing checks refused it.
        assert!(e.contains("in section 'ram'"), "{e}");
        return;
    }
    assert_eq!(s["status"], "completed", "{s}");
    assert_ne!(dst.ram_checksum(), before.ram, "the flip did not reach RAM");
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 1, "one corrupt page: {v}");
    assert_eq!(bitmap_hashes(&mut dst).1, migrated_sha(&before));
    assert_eq!(src.status(), "postmigrate");
    quit(dst);
    quit(src);
}

cells! {
    device_blocked_cancel => run_cell(Phase::DeviceBlocked, Fault::Cancel);
    device_blocked_kill_destination => run_cell(Phase::DeviceBlocked, Fault::KillDestination);
    device_blocked_cut_connection => run_cell(Phase::DeviceBlocked, Fault::CutConnection);
    device_cancel => run_cell(Phase::Device, Fault::Cancel);
    device_kill_destination => run_cell(Phase::Device, Fault::KillDestination);
    device_cut_connection => run_cell(Phase::Device, Fault::CutConnection);
}

// ---- Multifd (issue 12): the same story with four channels open, the link cut whole or one
// channel's connection alone, while the source iterates, while it waits in pre-switchover and
// in the switchover (`device`; there a killed destination too). (Cancel and a killed destination with four channels open:
// `multifd.rs`.)

/// Channels of the multifd cells.
const CHANNELS: u64 = 4;

cells! {
    multifd_active_cut_connection => run_cell_with(Phase::Active, Fault::CutConnection, CHANNELS);
    multifd_active_cut_channel => run_cell_with(Phase::Active, Fault::CutChannel, CHANNELS);
    multifd_pre_switchover_cut_connection => run_cell_with(Phase::PreSwitchover, Fault::CutConnection, CHANNELS);
    multifd_pre_switchover_cut_channel => run_cell_with(Phase::PreSwitchover, Fault::CutChannel, CHANNELS);
    device_paused_cancel => run_cell(Phase::DevicePaused, Fault::Cancel);
    multifd_device_paused_cancel => run_cell_with(Phase::DevicePaused, Fault::Cancel, CHANNELS);
    device_paused_kill_destination => run_cell(Phase::DevicePaused, Fault::KillDestination);
    device_paused_cut_connection => run_cell(Phase::DevicePaused, Fault::CutConnection);
    multifd_device_paused_kill_destination => run_cell_with(Phase::DevicePaused, Fault::KillDestination, CHANNELS);
    multifd_device_paused_cut_connection => run_cell_with(Phase::DevicePaused, Fault::CutConnection, CHANNELS);
    multifd_device_paused_cut_channel => run_cell_with(Phase::DevicePaused, Fault::CutChannel, CHANNELS);
    multifd_device_kill_destination => run_cell_with(Phase::Device, Fault::KillDestination, CHANNELS);
    multifd_device_cut_connection => run_cell_with(Phase::Device, Fault::CutConnection, CHANNELS);
    multifd_device_cut_channel => run_cell_with(Phase::Device, Fault::CutChannel, CHANNELS);
}

// ---- Postcopy (issue 10) ----
//
// The same source (qcow2 `d0` with its bitmaps, `d1`), migrated with `postcopy-ram` through a
// relay to a destination on its own image that runs the guest as soon as postcopy starts; the
// background push is slowed down so the fault strikes with most of RAM still on the source.
// Nothing that can be kept is lost: a cut pauses both ends and a recovery completes the
// migration (RAM verifies page by page, every migrated bitmap has the source's bits); a dead
// end leaves the other paused, serving QMP, saying what a retry can do, and quitting cleanly;
// `migrate_cancel` is refused and the migration goes on.

/// What strikes during postcopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostcopyFault {
    /// The relay breaks every connection.
    Cut,
    /// SIGKILL to the source.
    KillSource,
    /// SIGKILL to the destination.
    KillDestination,
    /// `migrate_cancel` on the source.
    Cancel,
}

/// The migrated bitmaps' hashes of `s` (all but `pn`).
fn migrated_sha(s: &Snapshot) -> Vec<(String, String, String)> {
    s.sha
        .iter()
        .filter(|(_, n, _)| n != "pn")
        .cloned()
        .collect()
}

/// Waits for both ends to be `postcopy-active` again after a recovery, then lets the push go
/// and checks the outcome: both `completed`, the destination's RAM valid page by page and
/// its bitmaps the source's.
fn postcopy_completes(src: &mut Lm, dst: &mut Lm, before: &Snapshot) {
    src.set_params(json!({"max-postcopy-bandwidth": 0}));
    src.wait_completed();
    dst.wait_completed();
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES16, "{v}");
    let got = bitmap_hashes(dst).1;
    assert_eq!(got, migrated_sha(before), "the destination's bitmaps");
}

fn run_postcopy_cell(fault: PostcopyFault) {
    if !testkit::require(&format!("postcopy/{fault:?}"), testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let Pair {
        img,
        mut src,
        before,
        target,
        mut dst,
    } = pair(dir.path(), false);
    let relay_path = dir.path().join("relay.sock");
    let relay = Relay::start(&relay_path, &target);
    for lm in [&mut src, &mut dst] {
        lm.caps_on(&["postcopy-ram"]);
    }
    src.set_params(json!({"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 256 << 10}));
    src.migrate(&format!("unix:{}", relay_path.display()));
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    let paused = |lm: &mut Lm| {
        let q = lm.wait_migration(&["postcopy-paused", "failed", "completed"]);
        assert_eq!(q["status"], "postcopy-paused", "{}: {q}", lm.name);
        q["error-desc"].as_str().unwrap_or_default().to_string()
    };
    match fault {
        PostcopyFault::Cut => {
            relay.cut();
            paused(&mut src);
            paused(&mut dst);
            assert_eq!(dst.status(), "running");
            assert_eq!(src.status(), "finish-migrate");
            let rec = format!("unix:{}", dir.path().join("rec.sock").display());
            dst.ok("migrate-recover", json!({ "uri": rec }));
            src.ok("migrate", json!({ "uri": rec, "resume": true }));
            src.wait_migration(&["postcopy-active", "completed"]);
            postcopy_completes(&mut src, &mut dst, &before);
            quit(dst);
            quit(src);
        }
        PostcopyFault::Cancel => {
            assert_eq!(
                src.err("migrate_cancel", json!({})),
                "Postcopy migration in progress, cannot cancel."
            );
            postcopy_completes(&mut src, &mut dst, &before);
            quit(dst);
            quit(src);
        }
        PostcopyFault::KillSource => {
            let _ = src.proc.child.kill();
            let why = paused(&mut dst);
            assert!(why.contains("migrate-recover"), "{why}");
            assert_eq!(dst.status(), "running");
            // Reading all of RAM would wait for pages that are on the dead source: refused
            // rather than hanging the monitor.
            let e = dst.err("x-livemig-ram-checksum", json!({}));
            assert!(e.contains("still on the source"), "{e}");
            // The bitmaps follow the switch: they are here, busy, kept for a recovery that
            // would complete them.
            // (The enabled ones' anonymous successors, recording the guest's writes here,
            // are listed too, without a name.)
            let kept: Vec<(String, bool)> = bitmaps_of(&mut dst)
                .iter()
                .filter(|b| b["name"].is_string())
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or_default().to_string(),
                        b["busy"] == true,
                    )
                })
                .collect();
            let want: Vec<(String, bool)> = migrated_sha(&before)
                .into_iter()
                .map(|(_, n, _)| (n, true))
                .collect();
            assert_eq!(kept, want, "the destination's bitmaps");
            quit(dst);
        }
        PostcopyFault::KillDestination => {
            let _ = dst.proc.child.kill();
            let why = paused(&mut src);
            assert!(
                why.contains("same destination process")
                    && why.contains("a new destination cannot"),
                "{why}"
            );
            assert_eq!(src.status(), "finish-migrate");
            // The source keeps the bitmaps it was migrating as they were (`pn`, which does
            // not migrate, was stored to the image at the switch and released, as in every
            // hand-over), and its RAM.
            assert_eq!(bitmap_hashes(&mut src).1, migrated_sha(&before));
            assert_eq!(src.ram_checksum(), before.ram);
            quit(src);
            assert_image_clean(&img);
            let left = image_bitmaps(&img);
            assert!(
                left.contains(&json!({"flags": ["auto"], "name": "pn", "granularity": 65536})),
                "{left:?}"
            );
        }
    }
}

cells! {
    postcopy_cut_connection => run_postcopy_cell(PostcopyFault::Cut);
    postcopy_kill_source => run_postcopy_cell(PostcopyFault::KillSource);
    postcopy_kill_destination => run_postcopy_cell(PostcopyFault::KillDestination);
    postcopy_cancel => run_postcopy_cell(PostcopyFault::Cancel);
}

// ---- Bitmap-only postcopy (issue 10) ----
//
// The same source and bitmaps, `dirty-bitmaps` without `postcopy-ram`: RAM converges in
// precopy (a 10 ms `downtime-limit` keeps the 1 MiB of `tz` out of the downtime), the
// destination runs the guest on all of its RAM at the switch, and the bitmaps follow at
// 64 KiB/s, so the fault strikes while every one of them is still in flight.

/// What strikes during a bitmap-only postcopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitmapOnlyFault {
    /// SIGKILL to the source.
    KillSource,
    /// SIGKILL to the destination.
    KillDestination,
}

fn run_bitmap_only_cell(fault: BitmapOnlyFault) {
    if !testkit::require(&format!("bitmap-only/{fault:?}"), testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let Pair {
        img,
        mut src,
        before,
        target,
        mut dst,
    } = pair(dir.path(), false);
    src.set_params(json!({"max-bandwidth": 32 << 20, "downtime-limit": 10,
                          "max-postcopy-bandwidth": 64 << 10}));
    src.migrate(&format!("unix:{}", target.display()));
    src.ok("migrate-start-postcopy", json!({}));
    dst.wait_migration(&["postcopy-active"]);
    // RUN comes after LISTEN (postcopy-active) and the device state.
    let deadline = Instant::now() + TIMEOUT;
    while dst.status() != "running" {
        assert!(
            Instant::now() < deadline,
            "the destination never ran the guest"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = src.ok("query-migrate", json!({}));
    assert_eq!(s["status"], "postcopy-active", "{s}");
    assert_eq!(s["ram"]["remaining"], 0, "RAM moved in precopy: {s}");
    // Every migrated bitmap is on its way: busy on both ends.
    for b in bitmaps_of(&mut dst)
        .iter()
        .filter(|b| b["name"].is_string())
    {
        assert_eq!(b["busy"], true, "destination: {b}");
    }
    match fault {
        BitmapOnlyFault::KillSource => {
            let _ = src.proc.child.kill();
            // The guest has everything but the bitmaps: the migration completes here, and
            // says which bitmaps it lost (QEMU: "Some dirty bitmaps may be lost").
            let q = dst.wait_completed();
            let mut dropped: Vec<String> = q["x-livemig-warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str())
                .filter(|w| w.contains("dropped: the bitmap-only postcopy ended early"))
                .map(String::from)
                .collect();
            dropped.sort();
            let want: Vec<String> = migrated_sha(&before)
                .iter()
                .map(|(node, name, _)| format!("Bitmap '{name}' on node '{node}' dropped"))
                .collect();
            assert_eq!(dropped.len(), want.len(), "{q}");
            for (got, want) in dropped.iter().zip(&want) {
                assert!(got.starts_with(want), "{got} / {want}");
            }
            let events = dst
                .events_until(|e| e["event"] == "MIGRATION" && e["data"]["status"] == "completed");
            let mut named: Vec<(String, String)> = events
                .iter()
                .filter(|e| e["event"] == "X_LIVEMIG_BITMAP_DROPPED")
                .map(|e| {
                    (
                        e["data"]["node"].as_str().unwrap_or_default().to_string(),
                        e["data"]["name"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            named.sort();
            let want: Vec<(String, String)> = migrated_sha(&before)
                .into_iter()
                .map(|(node, name, _)| (node, name))
                .collect();
            assert_eq!(named, want, "X_LIVEMIG_BITMAP_DROPPED events");
            // None is left half-made, and the guest runs on RAM that is whole.
            let left: Vec<Value> = bitmaps_of(&mut dst);
            assert!(left.is_empty(), "{left:?}");
            assert_eq!(dst.status(), "running");
            assert!(
                dst.proc.log().contains("These dirty bitmaps are lost: "),
                "{}",
                dst.proc.log()
            );
            dst.ok("stop", json!({}));
            assert_eq!(dst.ram_checksum(), before.ram);
            let v = dst.verify_ram();
            assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
            assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES16, "{v}");
            quit(dst);
        }
        BitmapOnlyFault::KillDestination => {
            let _ = dst.proc.child.kill();
            let q = src.wait_migration(&["failed", "completed"]);
            assert_eq!(q["status"], "failed", "{q}");
            let why = q["error-desc"].as_str().unwrap_or_default();
            assert!(why.contains("bitmap-only postcopy was running"), "{why}");
            // The destination may run the guest: the source does not take it back, and keeps
            // its RAM and bitmaps (free again).
            assert_eq!(src.status(), "paused");
            assert_eq!(src.ram_checksum(), before.ram);
            let (list, sha) = bitmap_hashes(&mut src);
            assert_eq!(sha, migrated_sha(&before));
            assert!(list.iter().all(|b| b["busy"] == false), "{list:?}");
            quit(src);
            // The disks stay inactive after the hand-over (the destination may have
            // written to a shared disk), so nothing more is written to the image: `pn`, which
            // does not migrate, was stored at the switch; `pb` stays marked in-use, so a
            // later open takes it as inconsistent rather than trusting it (as QEMU leaves it).
            assert_image_clean(&img);
            assert_eq!(
                image_bitmaps(&img),
                vec![
                    json!({"flags": ["in-use", "auto"], "name": "pb", "granularity": 65536}),
                    json!({"flags": ["auto"], "name": "pn", "granularity": 65536}),
                ]
            );
        }
    }
}

cells! {
    bitmap_only_postcopy_kill_source => run_bitmap_only_cell(BitmapOnlyFault::KillSource);
    bitmap_only_postcopy_kill_destination => run_bitmap_only_cell(BitmapOnlyFault::KillDestination);
}

/// The destination quits during a bitmap-only postcopy (QEMU's iotest
/// `migrate-bitmaps-postcopy-test`, `test_early_shutdown_destination`): the bitmaps still
/// being loaded are dropped, not stored to its image, even when the rest of the stream is
/// already buffered on its side (`exec:` through a FIFO, unlimited postcopy bandwidth, large
/// bitmaps that take a while to load). Before, the loader went on through the buffered
/// stream while the VM shut down, and the half-migrated bitmaps ended up in the image.
#[test]
fn bitmap_only_postcopy_quit_destination() {
    if !testkit::require("bitmap-only/quit-destination", testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let (src_img, dst_img) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for i in [&src_img, &dst_img] {
        create_qcow2(i, 64 << 30, &[]);
    }
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let (a_dev, b_dev) = (qcow2_blockdev(&src_img), qcow2_blockdev(&dst_img));
    let mut src = Lm::start(dir.path(), "src", &["-blockdev", &a_dev]);
    let incoming = format!("exec:cat '{}'", fifo.display());
    let mut dst = Lm::start(
        dir.path(),
        "dst",
        &["-blockdev", &b_dev, "-incoming", &incoming],
    );
    for i in 0..8 {
        src.ok(
            "block-dirty-bitmap-add",
            json!({"node": "d0", "name": format!("b{i}"), "granularity": 512,
                   "persistent": true}),
        );
    }
    for (off, len) in [(0u64, 1u64 << 30), (40 << 30, 1 << 30)] {
        qemu_io_ok(&mut src, &format!("discard {off} {len}"), "discard ");
    }
    for lm in [&mut src, &mut dst] {
        lm.caps_on(&["dirty-bitmaps", "events"]);
    }
    src.migrate(&format!("exec:cat > '{}'", fifo.display()));
    src.ok("migrate-start-postcopy", json!({}));
    let d = dst.wait_migration(&["postcopy-active", "completed", "failed"]);
    assert_eq!(d["status"], "postcopy-active", "{d}");
    quit(dst);
    assert_eq!(image_bitmaps(&dst_img), Vec::<Value>::new());
    assert_image_clean(&dst_img);
    // The source handed the guest over: it stays stopped, its bitmaps free.
    let s = src.wait_migration(&["completed", "failed"]);
    assert_ne!(s["status"], "active", "{s}");
    quit(src);
}
