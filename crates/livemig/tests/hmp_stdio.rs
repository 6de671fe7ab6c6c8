//! The human monitor on stdio (`-monitor stdio`, `-nographic`), as QEMU's bash iotests drive
//! it: the bytes a terminal gets (banner, prompts, the readline echo, replies and QEMU's
//! messages) side by side with QEMU 7.2, a postcopy migration run through it between two
//! `livemig vm` processes, and the HMP commands of a migration through
//! `human-monitor-command`.

mod common;

use common::{Lm, TIMEOUT};
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the monitor tests type, mistakes included; `x-colo` is left out (livemig's QMP refuses
/// that capability, so the replies differ on purpose).
const TYPED: &str = r#"info status
migrate_set_parameter max-bandwidth 4k
migrate_set_parameter max-bandwidth 4
migrate_set_parameter max-bandwidth 4x
migrate_set_parameter max-bandwidth 1.5k
migrate_set_parameter downtime-limit 500
migrate_set_parameter downtime-limit abc
migrate_set_parameter compress-level 300
migrate_set_parameter compress-level x
migrate_set_parameter compress-level 0x5
migrate_set_parameter multifd-compression foo
migrate_set_parameter multifd-compression zstd
migrate_set_parameter cpu-throttle-tailslow maybe
migrate_set_parameter cpu-throttle-tailslow yes
migrate_set_parameter tls-creds ""
migrate_set_parameter block-bitmap-mapping x
migrate_set_parameter xbzrle-cache-size 1M
migrate_set_parameter bogus 1
migrate_set_parameter max-bandwidth
migrate_set_parameter max-bandwidth 1 2
info migrate_parameters
migrate_set_capability postcopy-ram on
migrate_set_capability postcopy-ram maybe
migrate_set_capability foo on
migrate_set_capability
migrate_set_capability postcopy-ram on extra
info migrate_capabilities
migrate_start_postcopy
migrate_start_postcopy now
migrate -x unix:/x
migrate

quit
"#;

/// Runs `program ARGS -M none -nographic -serial none -monitor stdio`, types [`TYPED`] and
/// returns all it wrote to stdout (it must exit by itself, on `quit`, with status 0). The
/// version in the banner is cut to `X.Y.Z`.
fn session(program: &Path, pre: &[&str]) -> String {
    let mut child = Command::new(program)
        .args(pre)
        .args([
            "-M",
            "none",
            "-nographic",
            "-serial",
            "none",
            "-monitor",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // A line at a time, each once the monitor has prompted for it, as a person types (and as
    // iotest 181 sends its commands). Typed all at once, the lines outran the echo: QEMU 7.2
    // queues monitor output its stdout does not take at once, and exits on `quit` without
    // writing what is still queued, so on a loaded machine its session came out cut short.
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    for (typed, line) in TYPED.lines().enumerate() {
        const PROMPT: &[u8] = b"(qemu) ";
        while out.windows(PROMPT.len()).filter(|w| *w == PROMPT).count() <= typed {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => out.extend(chunk),
                Err(e) => panic!(
                    "{program:?}: no prompt for {line:?} ({e}): {}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    // The rest, up to the end of the output.
    out.extend(rx.iter().flatten());
    let out = String::from_utf8(out).expect("UTF-8");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{program:?} did not exit on quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{program:?}: {status}");
    let (banner, rest) = out.split_once(" monitor").expect("a banner");
    assert!(banner.starts_with("QEMU 7.2."), "{banner}");
    format!("QEMU X.Y.Z monitor{rest}")
}

/// The terminal's bytes, escape sequences and `\r\n` included, are QEMU's.
#[test]
fn stdio_monitor_writes_what_qemu_writes() {
    let lm = session(&common::livemig(), &["vm"]);
    // What 181 and a person see, whether or not QEMU is here to compare with.
    assert!(lm.starts_with(
        "QEMU X.Y.Z monitor - type 'help' for more information\r\n(qemu) i\x1b[K\x1b[Din\x1b[K"
    ));
    assert!(lm.contains("info status\x1b[K\r\nVM status: running\r\n(qemu) "));
    assert!(lm.contains("\r\nError: Invalid size 4x\r\n(qemu) "));
    assert!(lm.contains("\r\nmax-bandwidth: 1536 bytes/second\r\n"));
    assert!(lm.contains("\r\npostcopy-ram: on\r\n"));
    assert!(lm.contains("\r\nError: Postcopy must be started after migration has been started\r\n"));
    assert!(
        lm.ends_with("quit\x1b[K\r\n"),
        "no prompt after quit: {lm:?}"
    );
    if !testkit::require("stdio_monitor_writes_what_qemu_writes", testkit::qemu()) {
        return;
    }
    let qemu = session(Path::new("qemu-system-x86_64"), &[]);
    // `info migrate_capabilities` lists livemig's own capabilities after QEMU's.
    assert_eq!(lm.replace("x-livemig-integrity: off\r\n", ""), qemu);
}

/// A `livemig vm` whose stdout is collected as it comes.
struct Hmp {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    /// The thread that collects stdout into `out`; it ends at the end of the output.
    reader: JoinHandle<()>,
    name: &'static str,
}

impl Hmp {
    fn start(name: &'static str, args: &[&str]) -> Hmp {
        let mut child = Command::new(common::livemig())
            .arg("vm")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn livemig");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut h = Hmp {
            child,
            stdin,
            out,
            reader,
            name,
        };
        h.wait_for("(qemu) ");
        h
    }

    /// Types `line` and returns what the monitor wrote up to its next prompt, the echo
    /// (with its escape sequences) left out.
    fn cmd(&mut self, line: &str) -> String {
        self.out.lock().unwrap().clear();
        writeln!(self.stdin, "{line}").unwrap();
        let text = self.wait_for("\r\n(qemu) ");
        let (_, reply) = text.split_once("\x1b[K\r\n").expect("an echoed line");
        reply.trim_end_matches("(qemu) ").to_string()
    }

    fn wait_for(&mut self, what: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let o = self.out.lock().unwrap().clone();
            if o.ends_with(what) {
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "{}: waited for {what:?}, have {o:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `quit`: the process exits with status 0 and writes no prompt after it.
    fn quit(mut self) {
        self.out.lock().unwrap().clear();
        writeln!(self.stdin, "quit").unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{}: quit did not exit",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{}: {status}", self.name);
        // All it wrote is in `out` once the reader has seen the end of its output. (A fixed
        // 100 ms sleep here assumed the reader had got there, which a loaded machine need not
        // give it.)
        while !self.reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{}: its output did not end",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reader.join().unwrap();
        let o = self.out.lock().unwrap().clone();
        assert!(o.ends_with("quit\x1b[K\r\n"), "{}: {o:?}", self.name);
    }
}

/// QEMU's iotest 181 in small: postcopy between two VMs driven only through their human
/// monitors on stdio, the destination's being there because of `-nographic` alone.
#[test]
fn postcopy_through_the_stdio_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let guest = ["-m", "64M", "-workload", "fill=16M,hot=1M,dirty-rate=8M"];
    let mut src = Hmp::start("src", &[&guest[..], &["-nographic"]].concat());
    let mut dst = Hmp::start(
        "dst",
        &[&guest[..], &["-nographic", "-incoming", &uri]].concat(),
    );
    assert_eq!(dst.cmd("migrate_set_capability postcopy-ram on"), "");
    assert_eq!(src.cmd("migrate_set_parameter max-bandwidth 4k"), "");
    assert_eq!(src.cmd("migrate_set_capability postcopy-ram on"), "");
    assert_eq!(src.cmd(&format!("migrate -d {uri}")), "");
    // `migrate -d` returns with the migration in `setup`; it goes `active` once connected,
    // which a loaded machine may take a while to get to.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = src.cmd("info migrate");
        if info.contains("Migration status: active\r\n") {
            break;
        }
        assert!(
            info.contains("Migration status: setup\r\n") && Instant::now() < deadline,
            "{info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(src.cmd("migrate_start_postcopy"), "");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = src.cmd("info migrate");
        if info.contains("Migration status: completed\r\n") {
            break;
        }
        assert!(
            !info.contains("failed") && Instant::now() < deadline,
            "{info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dst.cmd("info status"), "VM status: running\r\n");
    assert_eq!(
        src.cmd("info status"),
        "VM status: paused (postmigrate)\r\n"
    );
    // A second migration is refused as QMP's `migrate` refuses it, in HMP's words.
    let again = src.cmd(&format!("migrate -d {uri}"));
    assert!(again.starts_with("Error: "), "{again}");
    src.quit();
    dst.quit();
}

/// Under `human-monitor-command`, `migrate` without `-d` cannot wait (QEMU's monitor cannot
/// be suspended there) and says so, as QEMU's does; `quit` ends the VM.
#[test]
fn hmp_migrate_and_quit_through_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let Lm {
        mut proc, mut qmp, ..
    } = Lm::start(dir.path(), "lm", &["-M", "none", "-m", "32M"]);
    let hmp = |q: &mut testkit::QmpClient, line: &str| {
        q.ok("human-monitor-command", json!({ "command-line": line }))
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hmp(&mut qmp, "migrate_set_parameter max-bandwidth 1"), "");
    assert_eq!(
        qmp.ok("query-migrate-parameters", json!({}))["max-bandwidth"],
        json!(1 << 20)
    );
    let out = dir.path().join("stream");
    assert_eq!(
        hmp(
            &mut qmp,
            &format!("migrate \"exec:cat > {}\"", out.display())
        ),
        "terminal does not allow synchronous migration, continuing detached\r\n"
    );
    assert_eq!(
        hmp(&mut qmp, "migrate -b exec:true"),
        "Error: Block migration (blk/inc) is not supported; use blockdev-mirror with an NBD export\r\n"
    );
    assert_eq!(hmp(&mut qmp, "quit"), "");
    assert_eq!(proc.wait_exit(TIMEOUT), Some(0), "livemig exits on quit");
}

/// A `-drive` without `if=` (as 181 passes it) goes on the machine's default bus, as with
/// QEMU's `block_default_type`: on the `livemig` machine that is its virtio-blk disk, so the
/// drive's BlockBackend is a guest device's.
#[test]
fn a_drive_without_if_is_the_livemig_machines_virtio_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let drive = format!("file={},driver=raw,id=disk", img.display());
    let Lm {
        proc: _proc,
        mut qmp,
        ..
    } = Lm::start(
        dir.path(),
        "lm",
        &["-accel", "qtest", "-m", "32M", "-drive", &drive],
    );
    let blocks = qmp.ok("query-block", json!({}));
    let disk = &blocks.as_array().unwrap()[0];
    assert_eq!(disk["device"], json!("disk"), "{blocks}");
    // The machine's disk device, as `if=virtio` gives.
    assert_eq!(
        disk["qdev"],
        json!("/machine/peripheral-anon/livemig-disk"),
        "{blocks}"
    );
}
