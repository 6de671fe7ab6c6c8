//! Command-line parsing for `livemig vm`, with QEMU's option names where they mean the same,
//! so a QEMU command line for a `-M none` machine runs unchanged.
//!
//! Nothing is accepted and ignored. Every option either acts as QEMU's does or is refused with
//! QEMU's wording where QEMU has one (`-accel foo: invalid accelerator foo`,
//! `Invalid parameter 'x'`, `Property 'none-machine.x' not found`):
//!
//! | option | what it does here |
//! |---|---|
//! | `-name [guest=]NAME[,process=P]` | the name `query-name` reports; `process=` names the process (`/proc/PID/comm`), as QEMU does |
//! | `-M`/`-machine [type=]none\|livemig[,accel=A]` | the machine; `accel=` as `-accel` |
//! | `-m [size=]SIZE` | guest RAM |
//! | `-smp [cpus=]N` | vCPUs of the `livemig` machine (`none` has at most 1, as QEMU's) |
//! | `-accel tcg\|kvm[,dirty-ring-size=N]`, `-enable-kvm` | the vCPUs: software threads (`tcg`, the default) or KVM vCPUs running the workload as guest code |
//! | `-accel qtest` | QEMU's qtest accelerator: vCPUs that never execute, so only QMP (and qtest) change the VM |
//! | `-M help`, `-device help`, `-drive format=help` | the machines, devices and block drivers, in QEMU's format |
//! | `-drive if=virtio\|none,file=,format=,id=,...` | QEMU's legacy disk option: a BlockBackend named `id` over the format and protocol nodes (`block::parse_drive`); `if=virtio` (the `livemig` machine's default, as QEMU's `block_default_type`) is the virtio-blk disk; without `format=` the image's format is probed as QEMU probes it (`block::probe`) |
//! | `-chardev socket,id=ID,path=\|host=,port=\|fd=...`, `-mon chardev=ID,mode=control` | a QMP monitor on a socket livemig connects to, listens on or inherits (`crate::chardev`) |
//! | `-qtest unix:path=P\|chardev:ID` | the qtest protocol's connection; its commands are refused as QEMU refuses unknown ones (`crate::qtest`) |
//! | `-blockdev`, `-object`, `-qmp`, `-incoming`, `-S`, `-mem-prealloc` | as QEMU's |
//! | `-device virtio-blk,drive=NODE[,id=ID]`, `-device help` | the `livemig` machine's virtio-blk disk (which its workload writes); the device list |
//! | `-serial file:PATH\|none\|null` | where the `livemig` machine's serial port writes (`none` has no serial port, so the file is only created, as with QEMU) |
//! | `-workload ...` | livemig's own: what the `livemig` machine's vCPUs do |
//! | `-x-livemig-monitor-clients N` | livemig's own: QMP clients served at once (default 64, 0 for no limit); one more gets an error line and is closed |
//! | `-nodefaults` | QEMU leaves out the default devices (monitor, serial, parallel, VGA, network, drives); livemig never creates any — both machines are what QEMU's `-nodefaults` gives — so the option changes nothing, as it changes nothing for QEMU's `-M none` |
//! | `-no-user-config` | QEMU skips its configuration files; livemig reads none |
//! | `-no-shutdown` | QEMU stops instead of exiting when the guest powers off; livemig's guests never power off (`quit` exits either way, as in QEMU) |
//! | `-display none`, `-vga none`, `-monitor none` | no display, no VGA card, no human monitor; any other value is refused |
//! | `-monitor stdio` | the human monitor on stdin and stdout, as QEMU's (`crate::monitor::hmp::serve_stdio`) |
//! | `-qmp stdio` | a QMP monitor on stdin and stdout, as QEMU's (`qmp::Server::serve_io`): the greeting at start-up, a reply per line, events between them; the end of stdin ends only the reading (the VM runs on, events still come, as QEMU 7.2 does); stdio serves one monitor (a second is refused, as QEMU refuses it) |
//! | `-nographic` | as QEMU's: no display, and the default devices on stdio — here only the human monitor, when no `-monitor`, `-qmp` or `-mon` is given and not `-nodefaults` (neither machine has a default serial port, so QEMU's `mon:stdio` multiplexing never arises) |
//!
//! Refused until built: other chardev backends and uses, `-cpu`, `-global`, CPU topology, memory
//! hotplug, other displays, VGA cards and monitors (a human monitor elsewhere than stdio).

use std::path::PathBuf;
use vm::kvm::KvmOptions;

/// `livemig vm -h`.
pub const VM_HELP: &str = "\
usage: livemig vm [options]     a VM controlled over QMP, with QEMU's option names

  -M, -machine [type=]none|livemig[,accel=tcg]
                         the machine: QEMU's empty `none`, or livemig's own with vCPUs running
                         a verifiable workload (default livemig)
  -m [size=]SIZE         guest RAM (a bare number is MiB; default 128M)
  -smp [cpus=]N          vCPUs of the livemig machine (default 1)
  -accel tcg|kvm[,dirty-ring-size=N]|qtest, -enable-kvm
                         software vCPUs (tcg, the default), KVM vCPUs, or vCPUs that never
                         run (qtest)
  -name [guest=]NAME[,process=NAME]
                         the name query-name reports; the process name
  -blockdev OPTIONS      a block node, as QEMU's (keyval or JSON)
  -drive if=virtio|none,file=PATH,format=FMT[,id=ID,readonly=on,cache=writeback|unsafe,...]
                         a disk, as QEMU's legacy option (format=help lists the drivers)
  -chardev socket,id=ID,path=PATH|host=H,port=N|fd=N[,server=on,wait=off]
  -mon chardev=ID,mode=control
                         a QMP monitor on a chardev
  -qtest unix:path=PATH|chardev:ID
                         the qtest protocol's socket (commands are refused: none is built)
  -object OPTIONS        tls-creds-x509, tls-creds-psk, authz-simple, authz-list (keyval or JSON)
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off | stdio
                         a QMP monitor
  -incoming URI|defer    wait for an incoming migration (tcp:, unix:, exec:, file:)
  -S                     do not start the guest
  -mem-prealloc          allocate guest RAM at start-up
  -M help                list the machines
  -device virtio-blk,drive=NODE[,id=ID] | help
                         the livemig machine's virtio-blk disk; the list of devices
  -serial file:PATH|none|null
                         where the livemig machine's serial port writes
  -workload fill=SIZE,hot=SIZE,dirty-rate=BYTES/S,disk=NODE,disk-every=N,serial-every=N,seed=N
                         what the livemig machine's vCPUs do
  -x-livemig-monitor-clients N
                         QMP clients served at once (default 64, 0: no limit); one more is
                         told so and closed
  -monitor stdio|none    the human monitor on stdin/stdout, or none
  -nographic             no display; the human monitor on stdio unless another monitor is given
  -nodefaults, -no-user-config, -no-shutdown, -display none, -vga none
                         accepted as QEMU's: livemig has no default devices, no configuration
                         files, no guest power-off, no display or VGA card
";
use vm::workload::WorkloadConfig;
use vm::{Accel, MachineType};

/// A parsed `livemig vm` command line.
#[derive(Debug, Clone)]
pub struct VmArgs {
    /// `-name guest=`: what `query-name` reports.
    pub name: Option<String>,
    /// `-name process=`: the process name to set.
    pub process_name: Option<String>,
    /// `-M` / `-machine`.
    pub machine: MachineType,
    /// `-m`, in bytes.
    pub ram_size: u64,
    /// `-smp`.
    pub vcpus: u32,
    /// `-accel` / `-enable-kvm`.
    pub accel: Accel,
    /// `-device virtio-blk,drive=NODE`: the node.
    pub virtio_blk: Option<String>,
    /// `-device virtio-blk,...,id=ID`: the device's id.
    pub virtio_blk_id: Option<String>,
    /// `-device help`: list the devices and exit.
    pub device_help: bool,
    /// `-blockdev`, each as given (keyval or JSON).
    pub blockdevs: Vec<String>,
    /// `-object`, each as given (keyval or JSON).
    pub objects: Vec<String>,
    /// `-qmp`, each as given.
    pub qmp: Vec<String>,
    /// `-incoming URI` or `-incoming defer`.
    pub incoming: Option<String>,
    /// `-S`.
    pub start_paused: bool,
    /// `-mem-prealloc`.
    pub mem_prealloc: bool,
    /// `-serial file:PATH`.
    pub serial: Option<PathBuf>,
    /// `-workload ...` (livemig's own).
    pub workload: WorkloadConfig,
    /// `-workload disk=NODE`.
    pub workload_disk: Option<String>,
    /// `-machine help`: list the machines and exit.
    pub machine_help: bool,
    /// `-drive`, each as given (QEMU's legacy disk option; see `block::parse_drive`).
    pub drives: Vec<String>,
    /// `-chardev`, each as given (see `crate::chardev`).
    pub chardevs: Vec<String>,
    /// `-mon`, each as given.
    pub mons: Vec<String>,
    /// `-qtest CHARDEV`: where the qtest protocol is spoken.
    pub qtest: Option<String>,
    /// `-drive format=help`: list the block drivers and exit.
    pub drive_format_help: bool,
    /// `-x-livemig-monitor-clients N` (livemig's own): monitor clients served at once, 0 for
    /// no limit (`qmp::ServerConfig::max_clients`).
    pub monitor_clients: usize,
    /// `-monitor stdio`, or `-nographic` without another monitor: the human monitor on stdio.
    pub monitor_stdio: bool,
    /// `-qmp stdio`: a QMP monitor on stdin and stdout.
    pub qmp_stdio: bool,
}

impl Default for VmArgs {
    fn default() -> Self {
        VmArgs {
            name: None,
            process_name: None,
            machine: MachineType::Livemig,
            ram_size: 128 << 20,
            vcpus: 1,
            accel: Accel::Tcg,
            virtio_blk: None,
            virtio_blk_id: None,
            device_help: false,
            blockdevs: Vec::new(),
            objects: Vec::new(),
            qmp: Vec::new(),
            incoming: None,
            start_paused: false,
            mem_prealloc: false,
            serial: None,
            workload: WorkloadConfig::default(),
            workload_disk: None,
            machine_help: false,
            drives: Vec::new(),
            chardevs: Vec::new(),
            mons: Vec::new(),
            qtest: None,
            drive_format_help: false,
            monitor_clients: qmp::DEFAULT_MAX_CLIENTS,
            monitor_stdio: false,
            qmp_stdio: false,
        }
    }
}

/// Parses a size with an optional binary suffix (`k`, `M`, `G`, `T`); a bare number is in
/// units of `default_unit` (QEMU's `-m 512` means MiB).
pub fn parse_size(s: &str, default_unit: u64) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        Some('b' | 'B') => (&s[..s.len() - 1], 1),
        _ => (s, default_unit),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    n.checked_mul(unit)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Splits QEMU's option syntax `a=b,c=d` into pairs; a leading bare word is the value of the
/// option's implied key, a later bare word `k` means `k=on`.
fn keyvals<'a>(s: &'a str, implied: &'a str) -> Vec<(&'a str, &'a str)> {
    s.split(',')
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => (implied, p),
            None => (p, "on"),
        })
        .collect()
}

/// The pairs of `-OPT VALUE`, or QEMU's `-OPT VALUE: Invalid parameter 'k'` for a key not in
/// `known`.
fn known_keyvals<'a>(
    opt: &str,
    value: &'a str,
    implied: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    let kv = keyvals(value, implied);
    match kv.iter().find(|(k, _)| !known.contains(k)) {
        Some((k, _)) => Err(format!("-{opt} {value}: Invalid parameter '{k}'")),
        None => Ok(kv),
    }
}

fn parse_workload(s: &str, args: &mut VmArgs) -> Result<(), String> {
    for (k, v) in keyvals(s, "fill") {
        let w = &mut args.workload;
        match k {
            "fill" => w.fill = parse_size(v, 1)?,
            "hot" => w.hot = parse_size(v, 1)?,
            "dirty-rate" => w.dirty_rate = parse_size(v, 1)? / 4096,
            "disk" => args.workload_disk = Some(v.to_string()),
            "disk-every" => w.disk_every = v.parse().map_err(|_| format!("invalid disk-every '{v}'"))?,
            "serial-every" => {
                w.serial_every = v.parse().map_err(|_| format!("invalid serial-every '{v}'"))?
            }
            "seed" => w.seed = v.parse().map_err(|_| format!("invalid seed '{v}'"))?,
            _ => return Err(format!("-workload: unknown option '{k}' (fill, hot, dirty-rate, disk, disk-every, serial-every, seed)")),
        }
    }
    if args.workload_disk.is_some() && args.workload.disk_every == 0 {
        args.workload.disk_every = 64;
    }
    Ok(())
}

/// Parses `-accel NAME[,prop=value...]` as QEMU does: `kvm` (with `dirty-ring-size`) or `tcg`.
fn parse_accel(v: &str) -> Result<Accel, String> {
    let mut parts = keyvals(v, "accel").into_iter();
    let name = match parts.next() {
        Some(("accel", name)) => name,
        _ => return Err(format!("-accel {v}: Parameter 'accel' is missing")),
    };
    match name {
        "kvm" => {
            let mut opts = KvmOptions::default();
            for (k, val) in parts {
                match k {
                    "dirty-ring-size" => {
                        opts.dirty_ring_size = val.parse().map_err(|_| {
                            format!("-accel {v}: Parameter 'dirty-ring-size' expects uint32_t")
                        })?
                    }
                    _ => return Err(format!("-accel {v}: Property 'kvm-accel.{k}' not found")),
                }
            }
            opts.check().map_err(|e| format!("-accel {v}: {e}"))?;
            Ok(Accel::Kvm(opts))
        }
        "tcg" => match parts.next() {
            None => Ok(Accel::Tcg),
            Some((k, _)) => Err(format!("-accel {v}: Property 'tcg-accel.{k}' not found")),
        },
        // QEMU's qtest accelerator: vCPUs that never execute (see `vm::Accel::Qtest`).
        "qtest" => match parts.next() {
            None => Ok(Accel::Qtest),
            Some((k, _)) => Err(format!("-accel {v}: Property 'qtest-accel.{k}' not found")),
        },
        other => Err(format!("-accel {v}: invalid accelerator {other}")),
    }
}

/// What `-device help` prints: QEMU's format (`name "...", bus ..., alias "...", desc "..."`
/// under a category heading), which tools such as QEMU's iotests read.
pub const DEVICE_HELP: &str = "Storage devices:
name \"virtio-blk-device\", bus virtio-bus, alias \"virtio-blk\", desc \"virtio-blk on virtio-mmio, one queue per vCPU\"
";

/// What `-machine help` prints: QEMU's format (`NAME<padding>DESCRIPTION`, the default
/// marked ` (default)`), which QEMU's iotests read to find the default machine.
pub const MACHINE_HELP: &str = "Supported machines are:
livemig              livemig's reference machine: vCPUs running a verifiable workload, a virtio-blk disk (default)
none                 empty machine
";

/// Parses `-device DRIVER,prop=value...`: only virtio-blk (QEMU's `virtio-blk-device`, or its
/// alias `virtio-blk`) with `drive` (and an optional `id`).
fn parse_device(v: &str, a: &mut VmArgs) -> Result<(), String> {
    let mut parts = keyvals(v, "driver").into_iter();
    let driver = match parts.next() {
        Some(("driver", d)) => d,
        _ => return Err(format!("-device {v}: Parameter 'driver' is missing")),
    };
    if driver == "help" || driver == "?" {
        a.device_help = true;
        return Ok(());
    }
    if driver != "virtio-blk" && driver != "virtio-blk-device" {
        return Err(format!(
            "-device {v}: '{driver}' is not a valid device model name"
        ));
    }
    let mut drive = None;
    let mut id = None;
    for (k, val) in parts {
        match k {
            "drive" => drive = Some(val.to_string()),
            // QemuOpts checks the id before the device is created.
            "id" if !qmp::id_wellformed(val) => {
                return Err(format!("-device {v}: Parameter 'id' expects an identifier"))
            }
            "id" => id = Some(val.to_string()),
            _ => {
                return Err(format!(
                    "-device {v}: Property 'virtio-blk-device.{k}' not found"
                ))
            }
        }
    }
    let Some(drive) = drive else {
        return Err(format!("-device {v}: drive property not set"));
    };
    if a.virtio_blk.is_some() {
        return Err(format!(
            "-device {v}: this machine has one virtio-blk slot, already taken"
        ));
    }
    a.virtio_blk = Some(drive);
    a.virtio_blk_id = id;
    Ok(())
}

/// Options whose only value livemig has is `none`.
fn only_none(opt: &str, value: &str) -> Result<(), String> {
    if value == "none" {
        return Ok(());
    }
    Err(match opt {
        "display" => format!("-display {value}: Display '{value}' is not available (livemig has no display: -display none)"),
        "vga" => format!("-vga {value}: livemig has no VGA card (-vga none)"),
        _ => format!(
            "-monitor {value}: the human monitor is served on stdio only (-monitor stdio), \
             and through QMP's human-monitor-command"
        ),
    })
}

/// QEMU's stdio chardev can be opened once: a second monitor on stdio (`-monitor stdio`,
/// `-qmp stdio`) is refused with QEMU's words.
fn stdio_free(a: &VmArgs, opt: &str, value: &str) -> Result<(), String> {
    if a.monitor_stdio || a.qmp_stdio {
        return Err(format!(
            "-{opt} {value}: cannot use stdio by multiple character devices"
        ));
    }
    Ok(())
}

/// Parses the arguments after `livemig vm`.
pub fn parse_vm_args(argv: &[String]) -> Result<VmArgs, String> {
    let mut a = VmArgs::default();
    let mut workload_given = false;
    // QEMU's `default_monitor`: cleared by any monitor option and by -nodefaults.
    let mut default_monitor = true;
    let mut nographic = false;
    let mut it = argv.iter();
    while let Some(opt) = it.next() {
        // QEMU accepts --opt as -opt.
        let o = opt
            .strip_prefix('-')
            .map(|s| s.strip_prefix('-').unwrap_or(s));
        let Some(o) = o else {
            return Err(format!("{opt}: invalid option"));
        };
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("-{name}: requires an argument"))
        };
        match o {
            "name" => {
                let v = value(o)?;
                for (k, val) in known_keyvals(o, &v, "guest", &["guest", "process"])? {
                    match k {
                        "guest" => a.name = Some(val.to_string()),
                        _ => a.process_name = Some(val.to_string()),
                    }
                }
            }
            "M" | "machine" => {
                let v = value(o)?;
                if v == "help" || v == "?" {
                    a.machine_help = true;
                    continue;
                }
                let kv = keyvals(&v, "type");
                let ty = kv
                    .iter()
                    .find(|(k, _)| *k == "type")
                    .map(|(_, v)| *v)
                    .unwrap_or("");
                a.machine = MachineType::parse(ty).ok_or_else(|| {
                    format!("-{o} {v}: unsupported machine type '{ty}' (use 'none' or 'livemig')")
                })?;
                for (k, val) in &kv {
                    match *k {
                        "type" => {}
                        "accel" => a.accel = parse_accel(val)?,
                        other => return Err(format!("Property '{ty}-machine.{other}' not found")),
                    }
                }
            }
            "m" => {
                let v = value(o)?;
                let kv = known_keyvals(o, &v, "size", &["size", "slots", "maxmem"])?;
                if let Some((k, _)) = kv.iter().find(|(k, _)| *k != "size") {
                    return Err(format!("-m {v}: memory hotplug ({k}) is not supported"));
                }
                let size = kv.first().map(|(_, s)| *s).unwrap_or("");
                a.ram_size = parse_size(size, 1 << 20)?;
                if a.ram_size == 0 || a.ram_size % 4096 != 0 {
                    return Err(format!(
                        "-m {v}: RAM size must be a positive multiple of 4 KiB"
                    ));
                }
            }
            "smp" => {
                let v = value(o)?;
                const TOPOLOGY: [&str; 6] =
                    ["sockets", "dies", "clusters", "cores", "threads", "maxcpus"];
                let mut known = vec!["cpus"];
                known.extend(TOPOLOGY);
                let kv = known_keyvals(o, &v, "cpus", &known)?;
                if let Some((k, _)) = kv.iter().find(|(k, _)| *k != "cpus") {
                    return Err(format!(
                        "-smp {v}: CPU topology ({k}) is not supported: livemig's vCPUs are \
                         counted only (-smp N)"
                    ));
                }
                let n = kv.first().map(|(_, n)| *n).unwrap_or("");
                a.vcpus = n
                    .parse()
                    .map_err(|_| format!("-smp {v}: invalid number of CPUs"))?;
                if a.vcpus == 0 || a.vcpus > 256 {
                    return Err(format!("-smp {v}: between 1 and 256 vCPUs"));
                }
            }
            "accel" => a.accel = parse_accel(&value(o)?)?,
            "enable-kvm" => a.accel = Accel::Kvm(KvmOptions::default()),
            "blockdev" => a.blockdevs.push(value(o)?),
            "drive" => {
                let v = value(o)?;
                if v.split(',')
                    .any(|kv| kv == "format=help" || kv == "format=?")
                {
                    a.drive_format_help = true;
                }
                a.drives.push(v);
            }
            "mon" => {
                a.mons.push(value(o)?);
                default_monitor = false;
            }
            "qtest" => a.qtest = Some(value(o)?),
            "object" => a.objects.push(value(o)?),
            "device" => parse_device(&value(o)?, &mut a)?,
            "qmp" => {
                let v = value(o)?;
                default_monitor = false;
                if v == "stdio" {
                    stdio_free(&a, o, &v)?;
                    a.qmp_stdio = true;
                } else {
                    a.qmp.push(v);
                }
            }
            "incoming" => a.incoming = Some(value(o)?),
            "S" => a.start_paused = true,
            "mem-prealloc" => a.mem_prealloc = true,
            "x-livemig-monitor-clients" => {
                let v = value(o)?;
                a.monitor_clients = v
                    .parse()
                    .map_err(|_| format!("-x-livemig-monitor-clients {v}: not a number"))?;
            }
            "serial" => {
                let v = value(o)?;
                if let Some(p) = v.strip_prefix("file:") {
                    a.serial = Some(PathBuf::from(p));
                } else if v != "none" && v != "null" {
                    return Err(format!(
                        "-serial {v}: only file:PATH, none and null are supported"
                    ));
                }
            }
            "workload" => {
                let v = value(o)?;
                parse_workload(&v, &mut a)?;
                workload_given = true;
            }
            // Acting as QEMU's: see the module documentation for why each changes nothing.
            "nodefaults" => default_monitor = false,
            "no-user-config" | "no-shutdown" => {}
            "monitor" => {
                let v = value(o)?;
                default_monitor = false;
                if v == "stdio" {
                    stdio_free(&a, o, &v)?;
                    a.monitor_stdio = true;
                } else {
                    only_none(o, &v)?;
                }
            }
            "display" | "vga" => only_none(o, &value(o)?)?,
            // Sockets for -mon and -qtest (crate::chardev).
            "chardev" => a.chardevs.push(value(o)?),
            "cpu" => {
                return Err(format!(
                    "-cpu {}: CPU models are not supported: livemig's vCPUs run a software \
                     workload",
                    value(o)?
                ))
            }
            "global" => {
                return Err(format!(
                    "-global {}: device properties are not supported",
                    value(o)?
                ))
            }
            // No display (livemig has none); the default monitor goes to stdio below.
            "nographic" => nographic = true,
            _ => return Err(format!("{opt}: invalid option")),
        }
    }
    // QEMU's `qemu_create_default_devices` under -nographic: neither machine has a default
    // serial or parallel port, so only the default monitor is left to put on stdio.
    if nographic && default_monitor {
        a.monitor_stdio = true;
    }
    // The workload writes to the virtio-blk disk.
    if let Some(node) = &a.virtio_blk {
        match &a.workload_disk {
            Some(w) if w != node => {
                return Err(format!(
                    "-workload disk={w} and -device virtio-blk,drive={node} name different nodes"
                ))
            }
            _ => a.workload_disk = Some(node.clone()),
        }
        if a.workload.disk_every == 0 {
            a.workload.disk_every = 64;
        }
    }
    if a.machine == MachineType::None {
        if a.vcpus > 1 {
            return Err(format!(
                "Invalid SMP CPUs {}. The max CPUs supported by machine 'none' is 1",
                a.vcpus
            ));
        }
        if workload_given {
            return Err(
                "-workload: machine 'none' has no vCPUs to run a workload (use -M livemig)".into(),
            );
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn refused(s: &str) -> String {
        parse_vm_args(&args(s)).expect_err(s)
    }

    #[test]
    fn qemu_command_line_for_m_none_parses() {
        let a = parse_vm_args(&args(
            "-M none -m 32M -nodefaults -no-user-config -no-shutdown -display none -vga none -monitor none -accel tcg -blockdev driver=null-co,node-name=n0,size=64M -qmp unix:/tmp/q,server=on,wait=off -incoming defer -S -mem-prealloc -name vm0,process=lm0",
        ))
        .unwrap();
        assert!(a.mem_prealloc);
        assert_eq!(a.machine, MachineType::None);
        assert_eq!(a.ram_size, 32 << 20);
        assert_eq!(a.blockdevs, vec!["driver=null-co,node-name=n0,size=64M"]);
        assert_eq!(a.qmp.len(), 1);
        assert_eq!(a.incoming.as_deref(), Some("defer"));
        assert!(a.start_paused);
        assert_eq!(a.name.as_deref(), Some("vm0"));
        assert_eq!(a.process_name.as_deref(), Some("lm0"));
        let a = parse_vm_args(&args("-machine type=none,accel=tcg -name guest=g")).unwrap();
        assert_eq!(a.machine, MachineType::None);
        assert_eq!(a.name.as_deref(), Some("g"));
    }

    #[test]
    fn sizes_and_workload() {
        assert_eq!(parse_size("512", 1 << 20).unwrap(), 512 << 20);
        assert_eq!(parse_size("1G", 1).unwrap(), 1 << 30);
        assert!(parse_size("x", 1).is_err());
        let a = parse_vm_args(&args(
            "-m size=1G -smp 2 -workload fill=512M,hot=64M,disk=d0,seed=7",
        ))
        .unwrap();
        assert_eq!(a.ram_size, 1 << 30);
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.workload.fill, 512 << 20);
        assert_eq!(a.workload.hot, 64 << 20);
        assert_eq!(a.workload.seed, 7);
        assert_eq!(a.workload_disk.as_deref(), Some("d0"));
        assert_eq!(a.workload.disk_every, 64);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        assert!(refused("-M pc").contains("'pc'"));
        assert!(parse_vm_args(&args("-m 1000")).is_ok());
        assert!(refused("-m 1001k").contains("4 KiB"));
        assert_eq!(refused("-frobnicate"), "-frobnicate: invalid option");
        assert_eq!(refused("-qmp"), "-qmp: requires an argument");
        assert!(refused("-workload speed=9").contains("speed"));
    }

    #[test]
    fn accelerators_parse_as_qemu_parses_them() {
        let a = parse_vm_args(&args("-accel kvm,dirty-ring-size=4096")).unwrap();
        assert_eq!(
            a.accel,
            Accel::Kvm(KvmOptions {
                dirty_ring_size: 4096
            })
        );
        assert_eq!(
            parse_vm_args(&args("-accel tcg")).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(
            parse_vm_args(&args("-enable-kvm")).unwrap().accel,
            Accel::Kvm(KvmOptions::default())
        );
        assert_eq!(
            parse_vm_args(&args("-accel qtest")).unwrap().accel,
            Accel::Qtest
        );
        assert_eq!(
            parse_vm_args(&args("-accel xen")).unwrap_err(),
            "-accel xen: invalid accelerator xen"
        );
        assert_eq!(
            parse_vm_args(&args("-accel qtest,x=1")).unwrap_err(),
            "-accel qtest,x=1: Property 'qtest-accel.x' not found"
        );
        assert_eq!(
            parse_vm_args(&args("-accel kvm,dirty-ring-size=1000")).unwrap_err(),
            "-accel kvm,dirty-ring-size=1000: dirty-ring-size must be a power of two."
        );
        assert!(parse_vm_args(&args("-accel kvm,kernel-irqchip=off"))
            .unwrap_err()
            .contains("'kvm-accel.kernel-irqchip' not found"));
    }

    #[test]
    fn devices_parse_as_qemu_parses_them() {
        let a = parse_vm_args(&args("-device virtio-blk,drive=d0,id=disk0")).unwrap();
        assert_eq!(a.virtio_blk.as_deref(), Some("d0"));
        assert_eq!(a.virtio_blk_id.as_deref(), Some("disk0"));
        assert_eq!(
            parse_vm_args(&args("-device virtio-blk,drive=d0,id=0d")).unwrap_err(),
            "-device virtio-blk,drive=d0,id=0d: Parameter 'id' expects an identifier"
        );
        assert_eq!(a.workload_disk.as_deref(), Some("d0"));
        assert_eq!(a.workload.disk_every, 64);
        assert!(parse_vm_args(&args("-device help")).unwrap().device_help);
        assert_eq!(
            parse_vm_args(&args("-device virtio-blk-device")).unwrap_err(),
            "-device virtio-blk-device: drive property not set"
        );
        assert_eq!(
            parse_vm_args(&args("-device e1000")).unwrap_err(),
            "-device e1000: 'e1000' is not a valid device model name"
        );
        assert!(
            parse_vm_args(&args("-workload disk=d1 -device virtio-blk,drive=d0"))
                .unwrap_err()
                .contains("different nodes")
        );
        // QEMU's iotests look for the device by name in `-device help`.
        assert!(DEVICE_HELP
            .lines()
            .any(|l| l.starts_with("name \"virtio-blk")));
    }

    /// `-nographic` puts the human monitor on stdio as QEMU's does: only when no other
    /// monitor is given and defaults are not turned off.
    #[test]
    fn nographic_puts_the_default_monitor_on_stdio() {
        let stdio = |l: &str| parse_vm_args(&args(l)).unwrap().monitor_stdio;
        assert!(stdio("-nographic"));
        assert!(stdio("-nographic -serial none"));
        assert!(stdio("-monitor stdio"));
        assert!(stdio("-nographic -serial none -monitor stdio"));
        assert!(!stdio("-nographic -monitor none"));
        assert!(!stdio("-nographic -nodefaults"));
        assert!(!stdio("-nographic -qmp unix:/tmp/q,server=on,wait=off"));
        assert!(!stdio(
            "-nographic -chardev socket,id=m,path=/tmp/m -mon m,mode=control"
        ));
        assert!(!stdio("-display none"));
        assert!(!stdio("-nographic -qmp stdio"));
    }

    /// Every option that is not built is refused, in QEMU's words where QEMU has them.
    #[test]
    fn what_is_not_built_is_refused() {
        let cases = [
            ("-accel foo", "-accel foo: invalid accelerator foo"),
            ("-machine none,accel=hvf", "-accel hvf: invalid accelerator hvf"),
            ("-accel tcg,thread=single", "-accel tcg,thread=single: Property 'tcg-accel.thread' not found"),
            ("-machine none,foo=1", "Property 'none-machine.foo' not found"),
            ("-m 32M,foo=1", "-m 32M,foo=1: Invalid parameter 'foo'"),
            ("-m 32M,slots=2", "-m 32M,slots=2: memory hotplug (slots) is not supported"),
            ("-name x,foo=1", "-name x,foo=1: Invalid parameter 'foo'"),
            ("-name x,debug-threads=on", "-name x,debug-threads=on: Invalid parameter 'debug-threads'"),
            ("-smp 2,sockets=2", "-smp 2,sockets=2: CPU topology (sockets) is not supported: livemig's vCPUs are counted only (-smp N)"),
            ("-smp 2,foo=1", "-smp 2,foo=1: Invalid parameter 'foo'"),
            ("-M none -smp 2", "Invalid SMP CPUs 2. The max CPUs supported by machine 'none' is 1"),
            ("-workload fill=1M -M none", "-workload: machine 'none' has no vCPUs to run a workload (use -M livemig)"),
            ("-accel qtest,x=1", "-accel qtest,x=1: Property 'qtest-accel.x' not found"),
            ("-cpu max", "-cpu max: CPU models are not supported: livemig's vCPUs run a software workload"),
            ("-global virtio-blk-pci.x=1", "-global virtio-blk-pci.x=1: device properties are not supported"),
            ("-display gtk", "-display gtk: Display 'gtk' is not available (livemig has no display: -display none)"),
            ("-vga std", "-vga std: livemig has no VGA card (-vga none)"),
            ("-monitor vc", "-monitor vc: the human monitor is served on stdio only (-monitor stdio), and through QMP's human-monitor-command"),
            ("-monitor stdio -monitor stdio", "-monitor stdio: cannot use stdio by multiple character devices"),
            ("-qmp stdio -monitor stdio", "-monitor stdio: cannot use stdio by multiple character devices"),
            ("-monitor stdio -qmp stdio", "-qmp stdio: cannot use stdio by multiple character devices"),
            ("-qmp stdio -qmp stdio", "-qmp stdio: cannot use stdio by multiple character devices"),
            ("-serial stdio", "-serial stdio: only file:PATH, none and null are supported"),
        ];
        for (line, msg) in cases {
            assert_eq!(refused(line), msg, "{line}");
        }
    }
}
