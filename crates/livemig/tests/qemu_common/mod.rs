//! Shared helpers of the QEMU interop tests (`tests/qemu_*.rs`): starting QEMU 7.2 and
//! `livemig vm` side by side, the QMP steps both ends take, reading RAM and bitmaps back, and a
//! generator of migration streams (good or deliberately damaged) built with the `wire` crate's
//! writer.
//!
//! Every test file includes this module and uses part of it, hence `dead_code` is allowed.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{QmpClient, VmProcess};
use wire::bitmap::{write_chunk, BitsData, Chunk, ChunkPayload};
use wire::config::{write_configuration, Configuration};
use wire::ram::{write_eos, write_mem_block, write_mem_size, write_page, BlockTracker, MemBlock};
use wire::section::{
    write_end, write_eof, write_file_header, write_footer, write_full, write_part, write_start,
    write_vmdesc,
};
use wire::vmstate::{vmdesc_json, DeviceDesc, FieldKind, VmsdDesc};
use wire::StreamWriter;

pub mod secure;

/// Guest RAM of every machine in these tests (`-m 32M`): small, so a migration takes
/// milliseconds unless a test throttles it.
pub const RAM: u64 = 32 << 20;
/// `-m` as given on both command lines.
pub const RAM_ARG: &str = "32M";
/// 64 MiB: the size of most test disks.
pub const MIB64: u64 = 64 << 20;

/// Returns a temporary directory when QEMU 7.2 is here; otherwise prints why the test is
/// skipped (or panics under CI, per `testkit::require`) and returns `None`.
pub fn setup(test: &str) -> Option<tempfile::TempDir> {
    if !testkit::require(test, testkit::qemu()) {
        return None;
    }
    Some(testkit::tempdir())
}

/// Starts `livemig vm -M none -m 32M` with `args`.
pub fn livemig(dir: &Path, name: &str, args: &[String]) -> VmProcess {
    let mut v = strings(&["vm", "-M", "none", "-m", RAM_ARG]);
    v.extend_from_slice(args);
    VmProcess::spawn(env!("CARGO_BIN_EXE_livemig"), &v, dir, name)
        .unwrap_or_else(|e| panic!("cannot start livemig: {e}"))
}

/// Starts QEMU 7.2 `-M none -m 32M` (via `testkit::VmProcess::qemu_none`, i.e. TCG) with
/// `args`.
pub fn qemu(dir: &Path, name: &str, args: &[String]) -> VmProcess {
    let mut v = strings(&["-m", RAM_ARG]);
    v.extend_from_slice(args);
    VmProcess::qemu_none(dir, name, &v).unwrap_or_else(|e| panic!("cannot start QEMU: {e}"))
}

/// `&[&str]` to owned strings.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `-blockdev` for a null-co node of `size` bytes (QEMU wants the size as a plain integer).
pub fn null_co(node: &str, size: u64) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=null-co,node-name={node},size={size}"),
    ]
}

/// `-blockdev`s for a raw node `node` over a file node `<node>-file` on `path`, which is created
/// (sparse, `size` bytes) if it does not exist.
pub fn raw_file(node: &str, path: &Path, size: u64) -> Vec<String> {
    if !path.exists() {
        let f = std::fs::File::create(path).expect("create disk image");
        f.set_len(size).expect("size disk image");
    }
    vec![
        "-blockdev".into(),
        format!(
            "driver=file,node-name={node}-file,filename={}",
            path.display()
        ),
        "-blockdev".into(),
        format!("driver=raw,node-name={node},file={node}-file"),
    ]
}

/// `-device loader` putting the file's bytes at guest address `addr` (QEMU only; applied at
/// start-up unless the machine waits for an incoming migration, and again at `system_reset`).
pub fn loader(file: &Path, addr: u64) -> Vec<String> {
    vec![
        "-device".into(),
        format!("loader,file={},addr={addr},force-raw=on", file.display()),
    ]
}

/// Writes `len` bytes of a pattern that differs per `seed` and per byte position (no page of
/// it is zero) and returns them.
pub fn pattern_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| {
            let page = (i / 4096) as u8;
            (i as u8)
                .wrapping_mul(seed | 1)
                .wrapping_add(seed)
                .wrapping_add(page)
                | 1
        })
        .collect();
    std::fs::write(path, &data).expect("write pattern");
    data
}

/// The migration transports the tests cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `unix:PATH`.
    Unix,
    /// `tcp:127.0.0.1:PORT`.
    Tcp,
}

impl Transport {
    /// A fresh address for one migration, for the destination's `-incoming`. For TCP it is
    /// port 0: the destination binds a port of its own, which [`migrate`] reads back from its
    /// `query-migrate` (`socket-address`), so no other test can take the port in between.
    pub fn uri(self, dir: &Path, name: &str) -> String {
        match self {
            Transport::Unix => format!("unix:{}", dir.join(format!("{name}.sock")).display()),
            Transport::Tcp => "tcp:127.0.0.1:0".to_string(),
        }
    }
}

/// The URI the source connects to for a destination listening on `incoming`: for a TCP port
/// 0, the port the destination reports in `query-migrate`'s `socket-address`.
pub fn connect_uri(dst: &mut QmpClient, incoming: &str) -> String {
    let Some(host) = incoming
        .strip_prefix("tcp:")
        .and_then(|a| a.strip_suffix(":0"))
    else {
        return incoming.to_string();
    };
    let q = dst.ok("query-migrate", json!({}));
    let port = q
        .pointer("/socket-address/0/port")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no listening port in {q}"));
    format!("tcp:{host}:{port}")
}

/// Turns on `dirty-bitmaps` (and `return-path` if asked) on one end.
pub fn caps(q: &mut QmpClient, return_path: bool) {
    let mut list = vec![json!({"capability": "dirty-bitmaps", "state": true})];
    if return_path {
        list.push(json!({"capability": "return-path", "state": true}));
    }
    q.ok("migrate-set-capabilities", json!({ "capabilities": list }));
}

/// Adds a bitmap.
pub fn add_bitmap(q: &mut QmpClient, node: &str, name: &str, granularity: u32) {
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": name, "granularity": granularity}),
    );
}

/// Writes through `qemu-io` on the monitor (dirtying the node's enabled bitmaps). QEMU's
/// output of HMP `qemu-io` goes to its stdout, so the reply may be empty; an error is not.
pub fn qemu_io(q: &mut QmpClient, node: &str, cmd: &str) {
    let out = q.hmp(&format!("qemu-io {node} \"{cmd}\""));
    assert!(
        !out.to_lowercase().contains("error") && !out.contains("No such"),
        "qemu-io {node} {cmd}: {out}"
    );
}

/// `x-debug-block-dirty-bitmap-sha256` of one bitmap.
pub fn sha(q: &mut QmpClient, node: &str, name: &str) -> String {
    q.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": node, "name": name}),
    )["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no sha256 for {node}/{name}"))
        .to_string()
}

/// Every named bitmap per node, from `query-named-block-nodes` (`name` → the bitmap's JSON).
pub fn bitmaps(q: &mut QmpClient) -> BTreeMap<String, BTreeMap<String, Value>> {
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let mut out = BTreeMap::new();
    for n in nodes.as_array().expect("node list") {
        let node = n["node-name"].as_str().unwrap_or_default().to_string();
        let mut m = BTreeMap::new();
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if let Some(name) = b["name"].as_str() {
                m.insert(name.to_string(), b.clone());
            }
        }
        out.insert(node, m);
    }
    out
}

/// Names of the bitmaps on `node`.
pub fn bitmap_names(q: &mut QmpClient, node: &str) -> Vec<String> {
    bitmaps(q)
        .remove(node)
        .map(|m| m.into_keys().collect())
        .unwrap_or_default()
}

/// Guest RAM read back with `pmemsave`.
pub fn ram(q: &mut QmpClient, dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(format!("{name}.ram"));
    q.ok(
        "pmemsave",
        json!({"val": 0, "size": RAM, "filename": path.display().to_string()}),
    );
    let data = std::fs::read(&path).expect("read pmemsave output");
    assert_eq!(data.len() as u64, RAM, "pmemsave of {name}");
    data
}

/// Asserts two RAM images are equal, naming the first differing page.
pub fn assert_same_ram(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: RAM sizes differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!(
            "{what}: RAM differs first at byte {i:#x} (page {:#x}): {:#04x} != {:#04x}",
            i / 4096,
            a[i],
            b[i]
        );
    }
}

/// Polls `query-migrate` until it reports one of `statuses`.
pub fn wait(q: &mut QmpClient, statuses: &[&str]) -> Value {
    q.wait_migration(statuses, Duration::from_secs(60))
}

/// Asserts that the process still answers QMP, then quits it and checks it exits with
/// status 0 (no abort, no crash).
pub fn quit_cleanly(mut p: VmProcess, mut q: QmpClient) {
    let st = q.ok("query-status", json!({}));
    assert!(st["status"].is_string(), "{st}");
    let _ = q.execute("quit", json!({}));
    let code = p.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "quit did not end the process cleanly:\n{}",
        p.log()
    );
}

/// How a QEMU process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this status.
    Exit(i32),
    /// Killed by this signal (6 = SIGABRT: an assertion failed).
    Signal(i32),
    /// Still running after the timeout.
    Running,
}

/// Waits up to `timeout` for a process to end.
pub fn ended(p: &mut VmProcess, timeout: Duration) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = p.child.try_wait() {
            return match (st.code(), st.signal()) {
                (Some(c), _) => Ended::Exit(c),
                (None, Some(s)) => Ended::Signal(s),
                _ => Ended::Exit(-1),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ended::Running
}

/// Migrates `src` into `dst` (both already configured) and waits for both ends to finish;
/// returns (source, destination) `query-migrate` replies.
pub fn migrate(src: &mut QmpClient, dst: &mut QmpClient, uri: &str) -> (Value, Value) {
    let uri = connect_uri(dst, uri);
    src.ok("migrate", json!({ "uri": uri }));
    let s = wait(src, &["completed", "failed", "cancelled"]);
    let d = wait(dst, &["completed", "failed"]);
    (s, d)
}

/// Asserts that both ends of the migration `step` completed: `s` is the source's
/// `query-migrate` reply, `d` the destination's. A failure shows both replies and both ends'
/// logs: one end's error is often only the echo of the other's (a destination that gave up
/// leaves the source a "Broken pipe").
pub fn assert_completed(step: &str, s: &Value, src: &VmProcess, d: &Value, dst: &VmProcess) {
    if s["status"] != "completed" || d["status"] != "completed" {
        panic!(
            "{step} did not complete.\nsource: {s}\n{}\ndestination: {d}\n{}",
            src.log(),
            dst.log()
        );
    }
}

/// Waits (30 s at most) until more than `bytes` of the migration from `src` went through; it
/// must still be `setup`, `active` or paused in `pre-switchover` meanwhile — `step` names what
/// it must not end before.
pub fn wait_under_way(src: &mut QmpClient, bytes: u64, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = src.ok("query-migrate", json!({}));
        let status = st["status"].as_str().unwrap_or_default();
        assert!(
            ["setup", "active", "pre-switchover"].contains(&status),
            "the migration ended before {step}: {st}"
        );
        if st["ram"]["transferred"].as_u64().unwrap_or(0) > bytes {
            return;
        }
        assert!(Instant::now() < deadline, "no progress before {step}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last hop of the chains: QEMU `qb` (with `-device loader`s of `pat_b` at 0 and at
/// `addr2`) into livemig `l2`, listening on `uri`, throttled to 1 MiB/s, and `system_reset` on
/// QEMU once 1 MiB went through — its loaders write the two ranges again, and QEMU must send
/// those pages again. Both ends complete, and QEMU's RAM holds `pat_b` in both ranges
/// afterwards. Returns QEMU's `query-migrate` reply and its RAM.
///
/// QEMU pauses before the switchover (`pause-before-switchover`) until the reset is in, so a
/// late reset still comes before the end: the rest of the stream took about a second (and
/// multifd does not keep to `max-bandwidth`), and a reset 1.5 s late — a test thread held off
/// the CPU — came after the migration had completed. A reset in `pre-switchover` is carried
/// too: QEMU syncs the dirty log once more when it completes.
pub fn migrate_across_reset(
    dir: &Path,
    (qb, qb_q): (&VmProcess, &mut QmpClient),
    (l2, l2_q): (&VmProcess, &mut QmpClient),
    uri: &str,
    pat_b: &[u8],
    addr2: u64,
) -> (Value, Vec<u8>) {
    qb_q.ok("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    qb_q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    qb_q.ok("migrate", json!({ "uri": connect_uri(l2_q, uri) }));
    // The first pages go out first; once 1 MiB is through, they have been sent.
    wait_under_way(qb_q, 1 << 20, "the reset");
    qb_q.ok("system_reset", json!({}));
    let p = wait(qb_q, &["pre-switchover", "failed", "cancelled"]);
    assert_eq!(p["status"], "pre-switchover", "{p}\n{}", qb.log());
    qb_q.ok("migrate-continue", json!({"state": "pre-switchover"}));
    let s = wait(qb_q, &["completed", "failed", "cancelled"]);
    let d = wait(l2_q, &["completed", "failed"]);
    assert_completed("QEMU -> livemig with system_reset", &s, qb, &d, l2);
    let ram_qb2 = ram(qb_q, dir, "qb2");
    assert_eq!(
        &ram_qb2[..pat_b.len()],
        pat_b,
        "reset did not rewrite the first range"
    );
    let at = addr2 as usize;
    assert_eq!(
        &ram_qb2[at..at + pat_b.len()],
        pat_b,
        "reset did not rewrite the second range"
    );
    (s, ram_qb2)
}

/// Starts a QEMU 7.2 destination for a stream file (`-incoming defer`, capability
/// `dirty-bitmaps`, `prepare` for anything else, then `migrate-incoming exec:cat FILE`) with
/// the given disks. QEMU exits on any load error; see [`qemu_outcome`].
pub fn qemu_incoming(
    dir: &Path,
    name: &str,
    stream: &Path,
    disks: &[String],
    prepare: impl FnOnce(&mut QmpClient),
) -> (VmProcess, QmpClient) {
    let mut args = disks.to_vec();
    args.extend(strings(&["-incoming", "defer"]));
    let p = qemu(dir, name, &args);
    let mut q = p.qmp();
    caps(&mut q, false);
    prepare(&mut q);
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", stream.display())}),
    );
    (p, q)
}

/// Runs a stream file into QEMU 7.2 (see [`qemu_incoming`]) where QEMU is expected to die:
/// returns how it ended and its log.
pub fn qemu_outcome(
    dir: &Path,
    name: &str,
    stream: &Path,
    disks: &[String],
    prepare: impl FnOnce(&mut QmpClient),
) -> (Ended, String) {
    let (mut p, _q) = qemu_incoming(dir, name, stream, disks, prepare);
    let how = ended(&mut p, Duration::from_secs(15));
    (how, p.log())
}

/// A livemig destination that loaded a stream file: the process, its QMP client, the last
/// `query-migrate` reply and, if its load failed, its exit status (it exits, as QEMU 7.2's
/// does).
pub struct Loaded {
    /// The process.
    pub p: VmProcess,
    /// Its monitor.
    pub q: QmpClient,
    /// `query-migrate` once the incoming migration completed (or the last one before the
    /// process exited).
    pub status: Value,
    /// The exit status of a destination whose load failed.
    pub exit: Option<i32>,
}

impl Loaded {
    /// The error of `livemig: load of migration failed: ERROR` on the destination's stderr.
    pub fn load_error(&self) -> String {
        let log = self.p.log();
        log.lines()
            .find_map(|l| l.strip_prefix("livemig: load of migration failed: "))
            .map(String::from)
            .unwrap_or_else(|| panic!("no 'load of migration failed' on stderr:\n{log}"))
    }
}

/// Waits until a livemig destination's incoming migration ends: `completed` (returns that
/// reply), or failed — the destination then exits (returns the last reply and the status).
pub fn incoming_end(p: &mut VmProcess, q: &mut QmpClient) -> (Value, Option<i32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    loop {
        let reply = q.execute("query-migrate", json!({}));
        match reply.ok().and_then(|r| r.get("return").cloned()) {
            Some(r) if r["status"] == "completed" => return (r, None),
            Some(r) if r["status"] == "failed" => return (r, p.wait_exit(Duration::from_secs(20))),
            Some(r) => last = r,
            // The monitor went away: the process is exiting.
            None => return (last, p.wait_exit(Duration::from_secs(20))),
        }
        assert!(
            Instant::now() < deadline,
            "the incoming migration did not end: {last}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a stream file into a fresh livemig destination (`-incoming defer`, capability
/// `dirty-bitmaps`, `prepare` for anything else, then `migrate-incoming file:FILE`).
pub fn run_into_livemig(
    dir: &Path,
    name: &str,
    stream: &Path,
    disks: &[String],
    prepare: impl FnOnce(&mut QmpClient),
) -> Loaded {
    let mut args = disks.to_vec();
    args.extend(strings(&["-incoming", "defer"]));
    let p = livemig(dir, name, &args);
    let mut q = p.qmp();
    caps(&mut q, false);
    prepare(&mut q);
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", stream.display())}),
    );
    let mut p = p;
    let (status, exit) = incoming_end(&mut p, &mut q);
    Loaded { p, q, status, exit }
}

/// The warnings a livemig destination reported about dropped bitmaps.
pub fn warnings(status: &Value) -> Vec<String> {
    status["x-livemig-warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect()
}

/// Asserts that exactly one warning mentions `'bitmap'` and that it also names the node and
/// contains `reason`; returns it.
pub fn assert_dropped(status: &Value, bitmap: &str, node: &str, reason: &str) -> String {
    let all = warnings(status);
    let hits: Vec<&String> = all
        .iter()
        .filter(|w| w.contains(&format!("'{bitmap}'")))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "one warning about '{bitmap}' expected: {all:?}"
    );
    let w = hits[0];
    assert!(
        w.contains(&format!("'{node}'")) && w.contains(reason),
        "warning should name node '{node}' and say '{reason}': {w}"
    );
    w.clone()
}

/// Captures a stream from a QEMU source into `path` (`migrate exec:cat > FILE`).
pub fn capture_from_qemu(q: &mut QmpClient, path: &Path) {
    q.ok(
        "migrate",
        json!({"uri": format!("exec:cat > {}", path.display())}),
    );
    let st = wait(q, &["completed", "failed"]);
    assert_eq!(st["status"], "completed", "capture: {st}");
}

/// Offset of the first occurrence of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Offset of the granularity field of the START chunk of `node`/`bitmap` in a captured stream,
/// where that chunk names both (flags `0x1c`): flags, counted node, counted bitmap, be32
/// granularity, START flags byte.
pub fn start_chunk_granularity(stream: &[u8], node: &str, bitmap: &str) -> usize {
    let mut pat = vec![0x1c, node.len() as u8];
    pat.extend_from_slice(node.as_bytes());
    pat.push(bitmap.len() as u8);
    pat.extend_from_slice(bitmap.as_bytes());
    let at = find(stream, &pat)
        .unwrap_or_else(|| panic!("no START chunk for {node}/{bitmap} in the capture"));
    at + pat.len()
}

// ---------------------------------------------------------------------------------------------
// Stream generator.

/// Sectors per full BITS chunk: 8192 granules.
fn sectors_per_chunk(granularity: u32) -> u64 {
    8192 * u64::from(granularity) / 512
}

/// A START chunk naming both node and bitmap.
pub fn start(node: &str, bitmap: &str, granularity: u32, flags: u8) -> Chunk {
    named(node, bitmap, ChunkPayload::Start { granularity, flags })
}

/// A BITS chunk naming both node and bitmap.
pub fn bits(node: &str, bitmap: &str, start_sector: u64, nr_sectors: u32, data: BitsData) -> Chunk {
    let payload = ChunkPayload::Bits {
        start_sector,
        nr_sectors,
        data,
    };
    named(node, bitmap, payload)
}

/// A COMPLETE chunk naming both node and bitmap.
pub fn complete(node: &str, bitmap: &str) -> Chunk {
    named(node, bitmap, ChunkPayload::Complete)
}

/// A chunk with `payload` naming both node and bitmap.
fn named(node: &str, bitmap: &str, payload: ChunkPayload) -> Chunk {
    Chunk::new((Some(node.into()), Some(bitmap.into())), payload)
}

/// The BITS chunks QEMU would send for a bitmap of `granularity` on a node of `size` bytes
/// whose dirty granules are `dirty` (granule indexes): 8192 granules per chunk, ZEROES for
/// clear chunks, buffers of little-endian words padded to 32 bytes.
pub fn bits_for(
    node: &str,
    bitmap: &str,
    size: u64,
    granularity: u32,
    dirty: &[u64],
) -> Vec<Chunk> {
    let total_sectors = size.div_ceil(512);
    let per = sectors_per_chunk(granularity);
    let gran_sectors = u64::from(granularity) / 512;
    let mut out = Vec::new();
    let mut sector = 0;
    while sector < total_sectors {
        let nr = per.min(total_sectors - sector);
        let first = sector / gran_sectors;
        let granules = nr.div_ceil(gran_sectors);
        let mut buf = vec![0u8; (granules.div_ceil(64) * 8) as usize];
        let mut any = false;
        for &g in dirty
            .iter()
            .filter(|&&g| g >= first && g < first + granules)
        {
            let i = (g - first) as usize;
            buf[i / 8] |= 1 << (i % 8);
            any = true;
        }
        let data = if any {
            wire::bitmap::pad_buffer(&mut buf);
            BitsData::Buffer(buf)
        } else {
            BitsData::Zeroes
        };
        out.push(bits(node, bitmap, sector, nr as u32, data));
        sector += nr;
    }
    out
}

/// What a generated stream carries.
#[derive(Debug, Clone, Default)]
pub struct StreamSpec {
    /// Guest pages to send (guest address, 4 KiB of contents); the rest of RAM is not sent
    /// (stays zero on a fresh destination).
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Chunks of the dirty-bitmap START section (EOS is appended).
    pub setup: Vec<Chunk>,
    /// Chunks of the dirty-bitmap END section (EOS is appended).
    pub complete: Vec<Chunk>,
}

/// Writes a whole `-M none` stream as QEMU 7.2 lays it out: header, configuration,
/// POSTCOPY_ADVISE, START ram (MEM_SIZE of one 32 MiB block `ram`), START dirty-bitmap, PART
/// ram with the pages, END ram, END dirty-bitmap, FULL timer (zero), FULL globalstate
/// (`running`), EOF and the vmdesc trailer. Chunks are written as given, so a test can damage any of them.
pub fn write_stream(path: &Path, spec: &StreamSpec) -> PathBuf {
    let f = std::fs::File::create(path).expect("create stream");
    let mut w = StreamWriter::new(f);
    write_file_header(&mut w).unwrap();
    write_configuration(&mut w, &Configuration::new("none")).unwrap();
    wire::command::write_command(&mut w, &wire::Command::PostcopyAdvise(None)).unwrap();
    write_start(&mut w, 2, "ram", 0, 4).unwrap();
    write_mem_size(&mut w, RAM).unwrap();
    write_mem_block(
        &mut w,
        &MemBlock {
            name: "ram".into(),
            used_length: RAM,
            page_size: None,
            addr: None,
        },
    )
    .unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_start(&mut w, 3, "dirty-bitmap", 0, 1).unwrap();
    for c in &spec.setup {
        write_chunk(&mut w, c).unwrap();
    }
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    write_part(&mut w, 2).unwrap();
    let mut blocks = BlockTracker::new();
    for (addr, page) in &spec.pages {
        write_page(&mut w, blocks.encode("ram"), *addr, page).unwrap();
    }
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_end(&mut w, 2).unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_end(&mut w, 3).unwrap();
    for c in &spec.complete {
        write_chunk(&mut w, c).unwrap();
    }
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    // `-M none`'s one device: a destination must not run a guest whose clock never came.
    write_full(&mut w, 4, "timer", 0, 2).unwrap();
    w.put_bytes(&[0; 24]).unwrap();
    write_footer(&mut w, 4).unwrap();
    write_full(&mut w, 5, "globalstate", 0, 1).unwrap();
    w.put_be32(8).unwrap();
    let mut rs = [0u8; 100];
    rs[..7].copy_from_slice(b"running");
    w.put_bytes(&rs).unwrap();
    write_footer(&mut w, 5).unwrap();
    write_eof(&mut w).unwrap();
    let timer = VmsdDesc::new("timer", 2)
        .minimum(1)
        .field("cpu_ticks_offset", FieldKind::I64)
        .field("unused", FieldKind::Unused(8))
        .field_since("cpu_clock_offset", FieldKind::I64, 2);
    let gs = VmsdDesc::new("globalstate", 1)
        .field("size", FieldKind::U32)
        .field("runstate", FieldKind::Buffer(100));
    let devices = [
        DeviceDesc {
            idstr: "timer".into(),
            instance_id: 0,
            vmsd: timer,
        },
        DeviceDesc {
            idstr: "globalstate".into(),
            instance_id: 0,
            vmsd: gs,
        },
    ];
    write_vmdesc(&mut w, vmdesc_json(4096, &devices, None).as_bytes()).unwrap();
    w.flush().unwrap();
    path.to_path_buf()
}

/// Two pages of recognisable content at 0 and 1 MiB, so a test can check that RAM arrived.
pub fn marker_pages() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, vec![0x5a; 4096]),
        (1 << 20, (0..4096).map(|i| (i % 251) as u8 + 1).collect()),
    ]
}

/// Asserts the destination's RAM holds `pages` (and zero elsewhere).
pub fn assert_ram_holds(ram: &[u8], pages: &[(u64, Vec<u8>)]) {
    let mut want = vec![0u8; ram.len()];
    for (addr, p) in pages {
        want[*addr as usize..*addr as usize + p.len()].copy_from_slice(p);
    }
    assert_same_ram(ram, &want, "destination RAM vs the pages in the stream");
}
