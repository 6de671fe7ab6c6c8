//! The options `demo` and `bench` share: what guest to migrate and how (a [`Scenario`]).
//! Each tool has its own defaults for some of them, given in the help text.

use crate::cli::parse_size;
use crate::scenario::{Scenario, Transport};

/// A size in bytes (`64M`, `1G`, `4096`).
fn bytes(s: &str) -> Result<u64, String> {
    parse_size(s, 1)
}

/// A size in MiB when it has no suffix (`512` is 512 MiB), as QEMU's `-m`.
fn mib(s: &str) -> Result<u64, String> {
    parse_size(s, 1 << 20)
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// Loopback TCP.
    Tcp,
    /// A unix socket.
    Unix,
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// Software vCPUs running the workload in Rust.
    Tcg,
    /// KVM vCPUs running the workload as guest code (needs /dev/kvm).
    Kvm,
}

/// `--multifd-compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    /// Pages as they are.
    None,
    /// zlib, QEMU's framing.
    Zlib,
    /// zstd, QEMU's framing.
    Zstd,
}

/// The guest and the migration, for `demo` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScenarioArgs {
    /// Guest RAM (a bare number is MiB) [default: 1G]
    #[arg(long, value_name = "SIZE", value_parser = mib)]
    pub ram: Option<u64>,
    /// vCPUs running the workload [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: Option<u32>,
    /// RAM the guest fills before the migration [default: all of it]
    #[arg(long, value_name = "SIZE", value_parser = bytes)]
    pub fill: Option<u64>,
    /// RAM the guest keeps rewriting during the migration [demo: 64M; bench: 0, an idle guest]
    #[arg(long, value_name = "SIZE", value_parser = bytes)]
    pub hot: Option<u64>,
    /// Cap on the guest's dirtying in bytes/s, 0 for none [demo: 256M; bench: 0]
    #[arg(long, value_name = "SIZE", value_parser = bytes)]
    pub dirty_rate: Option<u64>,
    /// A null-co disk with a dirty bitmap the guest writes to, migrated with the RAM (a bare
    /// number is MiB), 0 for none [demo: 1G; bench: 0]
    #[arg(long, value_name = "SIZE", value_parser = mib)]
    pub disk: Option<u64>,
    /// What runs the guest's vCPUs, on both ends [default: tcg]
    #[arg(long, value_enum, value_name = "ACCEL")]
    pub accel: Option<AccelArg>,
    /// The channel between the two processes [default: tcp]
    #[arg(long, value_enum, value_name = "KIND")]
    pub transport: Option<TransportArg>,
    /// QEMU's downtime-limit, in ms [default: 300]
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,
    /// Start the destination with -mem-prealloc, as a production destination is, so the
    /// figures leave out the kernel's first-touch page faults [demo: on; bench: off]
    #[arg(long, overrides_with = "no_mem_prealloc")]
    pub mem_prealloc: bool,
    /// Let the destination fault its RAM in while the migration loads it
    #[arg(long, overrides_with = "mem_prealloc")]
    pub no_mem_prealloc: bool,
    /// Switch to postcopy at once: the destination's guest runs and pulls the pages it touches
    /// (RAM verified page by page afterwards; bench adds page-request latency, median and p99,
    /// and blocktime)
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: postcopy-preempt (requested pages on a channel of their own)
    #[arg(long, requires = "postcopy")]
    pub preempt: bool,
    /// Capability multifd with N channels on both ends (refused with --postcopy)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..),
          conflicts_with = "postcopy")]
    pub multifd: Option<u8>,
    /// With --multifd: multifd-compression on both ends [default: none]
    #[arg(long, value_enum, value_name = "METHOD", requires = "multifd")]
    pub multifd_compression: Option<CompressionArg>,
    /// With --multifd: zero-copy-send on the source (tcp, no compression)
    #[arg(long, requires = "multifd")]
    pub zero_copy: bool,
    /// TLS on every channel: both ends load tls-creds-x509 from DIR (QEMU's file names:
    /// ca-cert.pem, server-cert.pem and server-key.pem for the destination, client-cert.pem
    /// and client-key.pem for the source); the server certificate must name 127.0.0.1 (tcp
    /// only)
    #[arg(long, value_name = "DIR", conflicts_with = "zero_copy")]
    pub tls_creds: Option<std::path::PathBuf>,
    /// TLS with a pre-shared key on every channel: both ends load tls-creds-psk from DIR
    /// (keys.psk with a line `qemu:HEXKEY`, QEMU's format; tcp or unix)
    #[arg(long, value_name = "DIR", conflicts_with_all = ["zero_copy", "tls_creds"])]
    pub tls_psk: Option<std::path::PathBuf>,
    /// Capability x-livemig-integrity on both ends: a digest per batch of pages and per
    /// bitmap chunk, checked by the destination (refused with --postcopy and --multifd)
    #[arg(long, conflicts_with_all = ["postcopy", "multifd"])]
    pub integrity: bool,
}

impl ScenarioArgs {
    /// The scenario: `base` (the tool's defaults) with the options given.
    pub fn apply(&self, base: Scenario) -> Scenario {
        let mut sc = base;
        if let Some(v) = self.ram {
            sc.ram = v;
        }
        if let Some(v) = self.vcpus {
            sc.vcpus = v;
        }
        if let Some(v) = self.fill {
            sc.fill = v;
        }
        if let Some(v) = self.hot {
            sc.hot = v;
        }
        if let Some(v) = self.dirty_rate {
            sc.dirty_rate = v;
        }
        if let Some(v) = self.disk {
            sc.disk = v;
        }
        if let Some(a) = self.accel {
            sc.kvm = a == AccelArg::Kvm;
        }
        if let Some(t) = self.transport {
            sc.transport = match t {
                TransportArg::Tcp => Transport::Tcp,
                TransportArg::Unix => Transport::Unix,
            };
        }
        if let Some(v) = self.downtime_limit {
            sc.downtime_limit_ms = v;
        }
        if self.mem_prealloc {
            sc.dst_prealloc = true;
        }
        if self.no_mem_prealloc {
            sc.dst_prealloc = false;
        }
        if self.postcopy {
            sc.postcopy = true;
        }
        if self.preempt {
            sc.preempt = true;
        }
        if let Some(n) = self.multifd {
            sc.multifd_channels = n;
        }
        if let Some(c) = self.multifd_compression {
            sc.multifd_compression = match c {
                CompressionArg::None => "none",
                CompressionArg::Zlib => "zlib",
                CompressionArg::Zstd => "zstd",
            }
            .into();
        }
        sc.zero_copy = self.zero_copy;
        sc.tls_creds.clone_from(&self.tls_creds);
        sc.tls_psk.clone_from(&self.tls_psk);
        sc.integrity = self.integrity;
        sc.fill = sc.fill.min(sc.ram);
        sc
    }
}
