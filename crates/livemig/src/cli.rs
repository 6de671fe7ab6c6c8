//! Command-line parsing for `livemig vm`, with QEMU's option names where they mean the same
//! (`-M`, `-m`, `-smp`, `-blockdev`, `-object`, `-qmp`, `-incoming`, `-S`, `-name`, `-serial`), so a
//! QEMU command line for a `-M none` machine runs unchanged. Options QEMU accepts that do not
//! change anything here (`-nodefaults`, `-display none`) are accepted and ignored. `-accel kvm`
//! (and `-enable-kvm`) runs the vCPUs under KVM; `-accel tcg` is the default software vCPUs.

use std::path::PathBuf;
use vm::kvm::KvmOptions;
use vm::workload::WorkloadConfig;
use vm::{Accel, MachineType};

/// A parsed `livemig vm` command line.
#[derive(Debug, Clone)]
pub struct VmArgs {
    /// `-name`.
    pub name: String,
    /// `-M` / `-machine`.
    pub machine: MachineType,
    /// `-m`, in bytes.
    pub ram_size: u64,
    /// `-smp`.
    pub vcpus: u32,
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
    /// `-accel` / `-enable-kvm`.
    pub accel: Accel,
    /// `-device virtio-blk,drive=NODE`: the node.
    pub virtio_blk: Option<String>,
    /// `-device help`: list the devices and exit.
    pub device_help: bool,
}

impl Default for VmArgs {
    fn default() -> Self {
        VmArgs {
            name: String::new(),
            machine: MachineType::Livemig,
            ram_size: 128 << 20,
            vcpus: 1,
            blockdevs: Vec::new(),
            objects: Vec::new(),
            qmp: Vec::new(),
            incoming: None,
            start_paused: false,
            mem_prealloc: false,
            serial: None,
            workload: WorkloadConfig::default(),
            workload_disk: None,
            accel: Accel::Tcg,
            virtio_blk: None,
            device_help: false,
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

/// Splits `a=b,c=d` into pairs; a leading bare word becomes the value of `first_key`.
fn keyvals<'a>(s: &'a str, first_key: &'a str) -> Vec<(&'a str, &'a str)> {
    s.split(',')
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => (first_key, p),
            None => (p, "on"),
        })
        .collect()
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
        other => Err(format!("-accel {v}: invalid accelerator {other}")),
    }
}

/// What `-device help` prints: QEMU's format (`name "...", bus ..., alias "...", desc "..."`
/// under a category heading), which tools such as QEMU's iotests read.
pub const DEVICE_HELP: &str = "Storage devices:
name \"virtio-blk-device\", bus virtio-bus, alias \"virtio-blk\", desc \"virtio-blk on virtio-mmio, one queue per vCPU\"
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
    for (k, val) in parts {
        match k {
            "drive" => drive = Some(val.to_string()),
            "id" => {}
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
    Ok(())
}

/// Parses the arguments after `livemig vm`.
pub fn parse_vm_args(argv: &[String]) -> Result<VmArgs, String> {
    let mut a = VmArgs::default();
    let mut it = argv.iter();
    while let Some(opt) = it.next() {
        // QEMU accepts --opt as -opt.
        let o = opt
            .strip_prefix('-')
            .map(|s| s.strip_prefix('-').unwrap_or(s));
        let Some(o) = o else {
            return Err(format!("unexpected argument '{opt}'"));
        };
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("option -{name} requires an argument"))
        };
        match o {
            "name" => {
                let v = value(o)?;
                a.name = keyvals(&v, "guest")
                    .into_iter()
                    .find(|(k, _)| *k == "guest")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
            }
            "M" | "machine" => {
                let v = value(o)?;
                let ty = keyvals(&v, "type")
                    .into_iter()
                    .find(|(k, _)| *k == "type")
                    .map(|(_, v)| v)
                    .unwrap_or("");
                a.machine = MachineType::parse(ty).ok_or_else(|| {
                    format!("unsupported machine type '{ty}' (use 'none' or 'livemig')")
                })?;
            }
            "m" => {
                let v = value(o)?;
                let size = keyvals(&v, "size")
                    .into_iter()
                    .find(|(k, _)| *k == "size")
                    .map(|(_, v)| v)
                    .unwrap_or("");
                a.ram_size = parse_size(size, 1 << 20)?;
                if a.ram_size == 0 || a.ram_size % 4096 != 0 {
                    return Err(format!(
                        "-m {v}: RAM size must be a positive multiple of 4 KiB"
                    ));
                }
            }
            "smp" => {
                let v = value(o)?;
                let n = keyvals(&v, "cpus")
                    .into_iter()
                    .find(|(k, _)| *k == "cpus")
                    .map(|(_, v)| v)
                    .unwrap_or("");
                a.vcpus = n.parse().map_err(|_| format!("invalid -smp '{v}'"))?;
                if a.vcpus == 0 || a.vcpus > 256 {
                    return Err(format!("-smp {v}: between 1 and 256 vCPUs"));
                }
            }
            "blockdev" => a.blockdevs.push(value(o)?),
            "object" => a.objects.push(value(o)?),
            "qmp" => a.qmp.push(value(o)?),
            "incoming" => a.incoming = Some(value(o)?),
            "S" => a.start_paused = true,
            "mem-prealloc" => a.mem_prealloc = true,
            "serial" => {
                let v = value(o)?;
                if let Some(p) = v.strip_prefix("file:") {
                    a.serial = Some(PathBuf::from(p));
                } else if v != "none" && v != "null" {
                    return Err(format!(
                        "-serial {v}: only file:PATH and none are supported"
                    ));
                }
            }
            "workload" => {
                let v = value(o)?;
                parse_workload(&v, &mut a)?;
            }
            "nodefaults" | "no-user-config" | "no-shutdown" => {}
            "accel" => {
                let v = value(o)?;
                a.accel = parse_accel(&v)?;
            }
            "enable-kvm" => a.accel = Accel::Kvm(KvmOptions::default()),
            "device" => {
                let v = value(o)?;
                parse_device(&v, &mut a)?;
            }
            "display" | "cpu" | "vga" | "monitor" | "chardev" | "global" => {
                value(o)?;
            }
            _ => return Err(format!("unsupported option '{opt}'")),
        }
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
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn qemu_command_line_for_m_none_parses() {
        let a = parse_vm_args(&args(
            "-M none -m 32M -nodefaults -display none -accel kvm -blockdev driver=null-co,node-name=n0,size=64M -qmp unix:/tmp/q,server=on,wait=off -incoming defer -S -mem-prealloc",
        ))
        .unwrap();
        assert!(a.mem_prealloc);
        assert_eq!(a.machine, MachineType::None);
        assert_eq!(a.ram_size, 32 << 20);
        assert_eq!(a.blockdevs, vec!["driver=null-co,node-name=n0,size=64M"]);
        assert_eq!(a.qmp.len(), 1);
        assert_eq!(a.incoming.as_deref(), Some("defer"));
        assert!(a.start_paused);
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
            parse_vm_args(&args("-accel qtest")).unwrap_err(),
            "-accel qtest: invalid accelerator qtest"
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
        assert!(parse_vm_args(&args("-M pc")).unwrap_err().contains("'pc'"));
        assert!(parse_vm_args(&args("-m 1000")).is_ok());
        assert!(parse_vm_args(&args("-m 1001k"))
            .unwrap_err()
            .contains("4 KiB"));
        assert!(parse_vm_args(&args("-frobnicate"))
            .unwrap_err()
            .contains("-frobnicate"));
        assert!(parse_vm_args(&args("-qmp"))
            .unwrap_err()
            .contains("requires an argument"));
        assert!(parse_vm_args(&args("-workload speed=9"))
            .unwrap_err()
            .contains("speed"));
    }
}
