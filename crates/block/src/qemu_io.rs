//! The subset of `qemu-io` that tests drive through `human-monitor-command "qemu-io NODE
//! \"CMD\""`: `read`, `write` and `discard` (aliases `r`, `w`, `d`), with qemu-io's option
//! parsing (GNU getopt, options anywhere), size suffixes (`qemu_strtosz`: `k`, `M`, `G`, `T`,
//! `P`, `E`, `b`, fractions with a suffix, `0x` hex) and its output, message for message.
//!
//! Supported options: `write [-CfpquzP pattern] off len`, `read [-CpqvP pattern -s off -l len]
//! off len`, `discard [-Cq] off len`. qemu-io's `-b` (vmstate), `-c` (compressed), `-n` (no
//! fallback) and `-s source_file` for write are refused with a message of ours.
//!
//! [`run`] returns everything qemu-io would print, including its own failures ("write failed:
//! Input/output error", parse errors, "Block node is read-only"), split by where QEMU prints
//! it ([`Output`]: standard output, standard error or the monitor); it is an `Err` only when
//! the node does not exist, which QEMU's HMP reports as `Error: <desc>`. The timing line has
//! qemu-io's shape with our own measurement. `read -v` dumps at most the first 1 MiB.

use crate::error::BlockError;
use crate::layer::BlockLayer;
use crate::node::{for_each_piece, BlockNode};
use crate::options::parse_c_i64;
use nix::errno::Errno;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// `BDRV_REQUEST_MAX_BYTES`: longest request qemu-io accepts.
pub const REQUEST_MAX_BYTES: u64 = 2_147_483_136;

/// Most bytes `read -v` dumps (ours: qemu-io dumps everything, which over a monitor could be
/// gigabytes of text).
const DUMP_LIMIT: u64 = 1 << 20;

const WRITE_USAGE: &str = "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
const READ_USAGE: &str = "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

/// Why [`strtosz`] refused a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown suffix (`-EINVAL`).
    Invalid,
    /// Too large (`-ERANGE`).
    Range,
}

fn suffix_mul(c: Option<char>) -> Option<u64> {
    Some(match c? {
        'b' | 'B' => 1,
        'k' | 'K' => 1 << 10,
        'm' | 'M' => 1 << 20,
        'g' | 'G' => 1 << 30,
        't' | 'T' => 1 << 40,
        'p' | 'P' => 1 << 50,
        'e' | 'E' => 1 << 60,
        _ => return None,
    })
}

/// QEMU's `qemu_strtosz`: a decimal (or `0x` hex) number with an optional binary suffix; a
/// fraction is allowed only with a suffix larger than bytes, and rounds half up.
pub fn strtosz(s: &str) -> Result<u64, SizeError> {
    let body = s.trim_start();
    let unsigned = match body.strip_prefix('+') {
        Some(b) => b,
        None if body.starts_with('-') => return Err(SizeError::Invalid),
        None => body,
    };
    let digits_end = unsigned
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unsigned.len());
    let (int_part, mut rest) = unsigned.split_at(digits_end);
    if int_part.is_empty() {
        return Err(SizeError::Invalid);
    }
    let mut val: u64 = int_part.parse().map_err(|_| SizeError::Range)?;
    let mut frac = 0f64;
    if val == 0 && rest.starts_with(['x', 'X']) {
        let hex = rest.get(1..).unwrap_or_default();
        let hex_end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        let (h, after) = hex.split_at(hex_end);
        if h.is_empty() {
            return Err(SizeError::Invalid);
        }
        val = u64::from_str_radix(h, 16).map_err(|_| SizeError::Range)?;
        if after.starts_with('.') || suffix_mul(after.chars().next()).is_some() {
            return Err(SizeError::Invalid);
        }
        rest = after;
    } else if let Some(f) = rest.strip_prefix('.') {
        let fend = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        let (fd, after) = f.split_at(fend);
        if after.starts_with(['e', 'E'])
            && after.get(1..).is_some_and(|a| {
                a.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-')
            })
        {
            return Err(SizeError::Invalid);
        }
        frac = format!("0.{fd}0").parse().map_err(|_| SizeError::Invalid)?;
        rest = after;
    }
    let mut chars = rest.chars();
    let mul = match suffix_mul(chars.clone().next()) {
        Some(m) => {
            chars.next();
            m
        }
        None => 1,
    };
    if !chars.as_str().is_empty() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 {
        if frac != 0.0 {
            return Err(SizeError::Invalid);
        }
        return Ok(val);
    }
    // 64.64 fixed point, as QEMU computes it.
    let valf = (frac * 18_446_744_073_709_551_616.0) as u64;
    let whole = u128::from(val) * u128::from(mul);
    let part = u128::from(valf) * u128::from(mul);
    let total = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// qemu-io's `cvtnum`: [`strtosz`] limited to `INT64_MAX`.
pub fn cvtnum(s: &str) -> Result<u64, SizeError> {
    let v = strtosz(s)?;
    if v > i64::MAX as u64 {
        return Err(SizeError::Range);
    }
    Ok(v)
}

fn cvtnum_err(e: SizeError, arg: &str) -> String {
    match e {
        SizeError::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        ),
        SizeError::Range => format!("Parsing error: argument too large -- {arg}\n"),
    }
}

/// qemu-io's `cvtstr`: a byte count with a binary unit, three decimals unless they are zero.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1_152_921_504_606_846_976.0, " EiB"),
        (1_125_899_906_842_624.0, " PiB"),
        (1_099_511_627_776.0, " TiB"),
        (1_073_741_824.0, " GiB"),
        (1_048_576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (v, suffix) = UNITS
        .iter()
        .find(|(u, _)| value >= *u)
        .map(|(u, s)| (value / u, *s))
        .unwrap_or((value, " bytes"));
    let s = format!("{v:.3}");
    match s.find(".000") {
        Some(i) => format!("{}{suffix}", s.get(..i).unwrap_or_default()),
        None => format!("{s}{suffix}"),
    }
}

/// qemu-io's `timestr`: `SS.ss sec` under a second... and `H:MM:SS.ss` otherwise (always with
/// `-C`).
fn timestr(t: Duration, fixed: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if fixed || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

fn report(op: &str, t: Duration, offset: u64, count: u64, total: u64, cflag: bool) -> String {
    let secs = t.as_secs_f64().max(1e-9);
    let cnt = 1u32;
    if cflag {
        format!(
            "{total},{cnt},{},{:.3},{:.3}\n",
            timestr(t, true),
            total as f64 / secs,
            f64::from(cnt) / secs
        )
    } else {
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {cnt} ops; {} ({}/sec and {:.4} ops/sec)\n",
            cvtstr(total as f64),
            timestr(t, false),
            cvtstr(total as f64 / secs),
            f64::from(cnt) / secs
        )
    }
}

/// One getopt event, in command-line order.
enum Opt<'a> {
    Flag(char, Option<&'a str>),
    Positional(&'a str),
}

/// GNU getopt with permutation: `spec` as in C (`"P:q"`). Errors are printed text.
fn getopt<'a>(
    cmd: &str,
    args: &[&'a str],
    spec: &str,
    usage: &str,
) -> Result<Vec<Opt<'a>>, String> {
    let takes_arg = |c: char| -> Option<bool> {
        if c == ':' {
            return None;
        }
        let i = spec.find(c)?;
        Some(
            spec.get(i + c.len_utf8()..)
                .is_some_and(|r| r.starts_with(':')),
        )
    };
    let mut out = Vec::new();
    let mut i = 0;
    let mut only_positional = false;
    while let Some(&a) = args.get(i) {
        i += 1;
        if only_positional || a.len() < 2 || !a.starts_with('-') {
            out.push(Opt::Positional(a));
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        let cluster = a.get(1..).unwrap_or_default();
        for (j, c) in cluster.char_indices() {
            match takes_arg(c) {
                None => return Err(format!("{cmd}: invalid option -- '{c}'\n{usage}\n")),
                Some(false) => out.push(Opt::Flag(c, None)),
                Some(true) => {
                    let inline = cluster.get(j + c.len_utf8()..).unwrap_or_default();
                    let arg = if !inline.is_empty() {
                        inline
                    } else if let Some(&next) = args.get(i) {
                        i += 1;
                        next
                    } else {
                        return Err(format!(
                            "{cmd}: option requires an argument -- '{c}'\n{usage}\n"
                        ));
                    };
                    out.push(Opt::Flag(c, Some(arg)));
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// qemu-io's `parse_pattern`: a byte value, C base prefixes allowed.
fn parse_pattern(arg: &str) -> Result<u8, String> {
    parse_c_i64(arg)
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| format!("{arg} is not a valid pattern byte\n"))
}

fn check_range(node: &BlockNode, offset: u64, len: u64) -> Result<(), BlockError> {
    let size = node.size()?;
    if offset > size || len > size - offset {
        return Err(BlockError::Io(Errno::EIO));
    }
    Ok(())
}

/// What one qemu-io command printed, by where QEMU 7.2's HMP `qemu-io` sends it: qemu-io's
/// `printf`s go to the process's standard output (not to the monitor: the HMP reply is empty),
/// getopt's complaints, "command not found" and a bad argument count to standard error, and
/// `error_report`s (a permission qemu-io could not take: "Block node is read-only") to the
/// monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// For the process's standard output.
    pub stdout: String,
    /// For the process's standard error.
    pub stderr: String,
    /// For the monitor (the HMP reply), with `\n` line ends.
    pub monitor: String,
}

impl Output {
    fn stdout(text: String) -> Output {
        Output {
            stdout: text,
            ..Output::default()
        }
    }

    /// Everything printed, in the order qemu-io prints it (standard error first: getopt
    /// complains before the usage is printed).
    pub fn text(&self) -> String {
        format!("{}{}{}", self.stderr, self.monitor, self.stdout)
    }
}

/// Runs one qemu-io command line on `node_name` (a device or node name) and returns what
/// qemu-io prints. `Err` only when there is no such node.
pub fn run(layer: &BlockLayer, node_name: &str, cmdline: &str) -> Result<Output, BlockError> {
    let node = layer
        .lookup_bs(Some(node_name), Some(node_name))
        .map_err(|_| BlockError::CannotFind {
            device: String::new(),
            node: node_name.to_string(),
        })?;
    Ok(run_on(&node, cmdline))
}

/// [`run`] on a node already looked up.
pub fn run_on(node: &BlockNode, cmdline: &str) -> Output {
    let argv: Vec<&str> = cmdline.split(' ').filter(|s| !s.is_empty()).collect();
    let Some((&cmd, args)) = argv.split_first() else {
        return Output::default();
    };
    let (name, writes) = match cmd {
        "read" | "r" => ("read", false),
        "write" | "w" => ("write", true),
        "discard" | "d" => ("discard", true),
        _ => {
            return Output {
                stderr: format!("command \"{cmd}\" not found\n"),
                ..Output::default()
            }
        }
    };
    if args.len() < 2 {
        return Output {
            stderr: format!(
                "bad argument count {} to {cmd}, expected at least 2 arguments\n",
                args.len()
            ),
            ..Output::default()
        };
    }
    if writes && !node.writable() {
        return Output {
            monitor: "Block node is read-only\n".to_string(),
            ..Output::default()
        };
    }
    let r = match name {
        "read" => read_cmd(node, cmd, args),
        "write" => write_cmd(node, cmd, args),
        _ => discard_cmd(node, cmd, args),
    };
    let text = r.unwrap_or_else(|text| text);
    // getopt's complaint (glibc prints it on stderr), then qemu-io's usage on stdout.
    let getopt_error = [
        format!("{cmd}: invalid option -- "),
        format!("{cmd}: option requires an argument -- "),
    ]
    .iter()
    .any(|p| text.starts_with(p.as_str()));
    match text.split_once('\n') {
        Some((first, rest)) if getopt_error => Output {
            stderr: format!("{first}\n"),
            stdout: rest.to_string(),
            ..Output::default()
        },
        _ => Output::stdout(text),
    }
}

fn write_cmd(node: &BlockNode, cmd: &str, args: &[&str]) -> Result<String, String> {
    let (mut cflag, mut fua, mut nflag, mut qflag, mut unmap, mut zflag) =
        (false, false, false, false, false, false);
    let mut pattern: Option<u8> = None;
    let mut pos = Vec::new();
    for o in getopt(cmd, args, "bcCfnpP:quzs:", WRITE_USAGE)? {
        match o {
            Opt::Positional(p) => pos.push(p),
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag('f', _) => fua = true,
            Opt::Flag('n', _) => nflag = true,
            Opt::Flag('p', _) => {}
            Opt::Flag('P', a) => pattern = Some(parse_pattern(a.unwrap_or_default())?),
            Opt::Flag('q', _) => qflag = true,
            Opt::Flag('u', _) => unmap = true,
            Opt::Flag('z', _) => zflag = true,
            Opt::Flag(c, _) => {
                return Err(format!(
                    "{cmd}: option -{c} is not supported by this qemu-io\n"
                ))
            }
        }
    }
    let [off_arg, len_arg] = pos[..] else {
        return Err(format!("{WRITE_USAGE}\n"));
    };
    if nflag && !zflag {
        return Err("-n requires -z to be specified\n".into());
    }
    if unmap && !zflag {
        return Err("-u requires -z to be specified\n".into());
    }
    if zflag && pattern.is_some() {
        return Err("Only one of -z, -P, and -s can be specified at the same time\n".into());
    }
    let offset = cvtnum(off_arg).map_err(|e| cvtnum_err(e, off_arg))?;
    let count = cvtnum(len_arg).map_err(|e| cvtnum_err(e, len_arg))?;
    if count > REQUEST_MAX_BYTES && !nflag {
        return Err(format!(
            "length cannot exceed {REQUEST_MAX_BYTES} without -n, given {len_arg}\n"
        ));
    }
    if nflag {
        // BDRV_REQ_NO_FALLBACK: QEMU fails a write-zeroes that the driver cannot do without
        // writing data (a qcow2 request that does not cover whole clusters); the drivers here
        // always fall back, so the flag is refused rather than ignored.
        return Err(format!(
            "{cmd}: option -n is not supported by this qemu-io\n"
        ));
    }
    let pattern = pattern.unwrap_or(0xcd);
    let t0 = Instant::now();
    let r = check_range(node, offset, count).and_then(|()| {
        if zflag {
            node.write_zeroes(offset, count, unmap)
        } else {
            let buf = vec![pattern; count.min(1 << 20) as usize];
            if count == 0 {
                node.write_at(offset, &[])
            } else {
                for_each_piece(offset, count, |o, n| {
                    node.write_at(o, buf.get(..n).unwrap_or_default())
                })
            }
        }
        .and_then(|()| if fua { node.flush() } else { Ok(()) })
    });
    let t = t0.elapsed();
    if let Err(e) = r {
        return Err(format!("write failed: {e}\n"));
    }
    if qflag {
        return Ok(String::new());
    }
    Ok(report("wrote", t, offset, count, count, cflag))
}

fn read_cmd(node: &BlockNode, cmd: &str, args: &[&str]) -> Result<String, String> {
    let (mut cflag, mut qflag, mut vflag) = (false, false, false);
    let mut pattern: Option<u8> = None;
    let mut pattern_offset: Option<u64> = None;
    let mut pattern_count: Option<u64> = None;
    let mut pos = Vec::new();
    for o in getopt(cmd, args, "bCl:pP:qs:v", READ_USAGE)? {
        match o {
            Opt::Positional(p) => pos.push(p),
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag('l', a) => {
                let a = a.unwrap_or_default();
                pattern_count = Some(cvtnum(a).map_err(|e| cvtnum_err(e, a))?);
            }
            Opt::Flag('p', _) => {}
            Opt::Flag('P', a) => pattern = Some(parse_pattern(a.unwrap_or_default())?),
            Opt::Flag('q', _) => qflag = true,
            Opt::Flag('s', a) => {
                let a = a.unwrap_or_default();
                pattern_offset = Some(cvtnum(a).map_err(|e| cvtnum_err(e, a))?);
            }
            Opt::Flag('v', _) => vflag = true,
            Opt::Flag(c, _) => {
                return Err(format!(
                    "{cmd}: option -{c} is not supported by this qemu-io\n"
                ))
            }
        }
    }
    let [off_arg, len_arg] = pos[..] else {
        return Err(format!("{READ_USAGE}\n"));
    };
    let offset = cvtnum(off_arg).map_err(|e| cvtnum_err(e, off_arg))?;
    let count = cvtnum(len_arg).map_err(|e| cvtnum_err(e, len_arg))?;
    if count > REQUEST_MAX_BYTES {
        return Err(format!(
            "length cannot exceed {REQUEST_MAX_BYTES}, given {len_arg}\n"
        ));
    }
    if pattern.is_none() && (pattern_offset.is_some() || pattern_count.is_some()) {
        return Err(format!("{READ_USAGE}\n"));
    }
    let p_off = pattern_offset.unwrap_or(0);
    let p_cnt = match pattern_count {
        Some(c) => Some(c),
        None => count.checked_sub(p_off),
    };
    let p_cnt = match p_cnt {
        Some(c) if c.checked_add(p_off).is_some_and(|end| end <= count) => c,
        _ => return Err("pattern verification range exceeds end of read data\n".into()),
    };
    let mut mismatch = false;
    let mut dump = String::new();
    let t0 = Instant::now();
    let r = check_range(node, offset, count).and_then(|()| {
        let mut buf = vec![0xabu8; count.min(1 << 20) as usize];
        for_each_piece(offset, count, |o, n| {
            let piece = buf.get_mut(..n).unwrap_or_default();
            piece.fill(0xab);
            node.read_at(o, piece)?;
            let rel = o - offset;
            if let Some(p) = pattern {
                let lo = p_off.max(rel);
                let hi = (p_off + p_cnt).min(rel + n as u64);
                if lo < hi {
                    let s = piece
                        .get((lo - rel) as usize..(hi - rel) as usize)
                        .unwrap_or_default();
                    mismatch |= s.iter().any(|&b| b != p);
                }
            }
            if vflag && rel < DUMP_LIMIT {
                let n = piece.len().min((DUMP_LIMIT - rel) as usize);
                dump_buffer(&mut dump, piece.get(..n).unwrap_or_default(), o);
                if rel + n as u64 == DUMP_LIMIT && count > DUMP_LIMIT {
                    let _ = writeln!(dump, "(dump stops after {DUMP_LIMIT} bytes)");
                }
            }
            Ok(())
        })
    });
    let t = t0.elapsed();
    if let Err(e) = r {
        return Err(format!("read failed: {e}\n"));
    }
    let mut out = String::new();
    if mismatch {
        let _ = writeln!(
            out,
            "Pattern verification failed at offset {}, {p_cnt} bytes",
            offset + p_off
        );
    }
    if qflag {
        return Ok(out);
    }
    out.push_str(&dump);
    out.push_str(&report("read", t, offset, count, count, cflag));
    Ok(out)
}

/// qemu-io's `dump_buffer`: 16 bytes a line, hex then the alphanumeric characters.
fn dump_buffer(out: &mut String, buf: &[u8], offset: u64) {
    for (i, line) in buf.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + 16 * i as u64);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
}

fn discard_cmd(node: &BlockNode, cmd: &str, args: &[&str]) -> Result<String, String> {
    let (mut cflag, mut qflag) = (false, false);
    let mut pos = Vec::new();
    for o in getopt(cmd, args, "Cq", DISCARD_USAGE)? {
        match o {
            Opt::Positional(p) => pos.push(p),
            Opt::Flag('C', _) => cflag = true,
            Opt::Flag(_, _) => qflag = true,
        }
    }
    let [off_arg, len_arg] = pos[..] else {
        return Err(format!("{DISCARD_USAGE}\n"));
    };
    let offset = cvtnum(off_arg).map_err(|e| cvtnum_err(e, off_arg))?;
    let count = cvtnum(len_arg).map_err(|e| cvtnum_err(e, len_arg))?;
    if count > REQUEST_MAX_BYTES {
        return Err(format!(
            "length cannot exceed {REQUEST_MAX_BYTES}, given {len_arg}\n"
        ));
    }
    let t0 = Instant::now();
    let r = node.discard(offset, count);
    let t = t0.elapsed();
    if let Err(e) = r {
        return Err(format!("discard failed: {e}\n"));
    }
    if qflag {
        return Ok(String::new());
    }
    Ok(report("discard", t, offset, count, count, cflag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layer() -> BlockLayer {
        let l = BlockLayer::new();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "node0", "size": 1000000, "read-zeroes": true}))
            .unwrap();
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "ro", "size": 4096, "read-only": true}),
        )
        .unwrap();
        l
    }

    fn first_line(s: &str) -> &str {
        s.lines().next().unwrap_or("")
    }

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(strtosz("64k"), Ok(65536));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("1.2345k"), Ok(1264));
        assert_eq!(strtosz("1.0009k"), Ok(1025));
        assert_eq!(strtosz("1.00001k"), Ok(1024));
        assert_eq!(strtosz("0x10"), Ok(16));
        assert_eq!(strtosz("0x2000"), Ok(8192));
        assert_eq!(strtosz("010"), Ok(10));
        assert_eq!(strtosz("+5"), Ok(5));
        assert_eq!(strtosz("1b"), Ok(1));
        assert_eq!(strtosz("1B"), Ok(1));
        assert_eq!(strtosz("1K"), Ok(1024));
        assert_eq!(strtosz("3g"), Ok(3 << 30));
        assert_eq!(strtosz("1E"), Ok(1 << 60));
        assert_eq!(strtosz("1.k"), Ok(1024));
        for bad in [
            "abc", "1.5", "0.5", "1k1", "1e3", "", "-5", "0x", "0x1k", "1.5e3k",
        ] {
            assert_eq!(strtosz(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(strtosz("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(strtosz("16E"), Err(SizeError::Range));
        assert_eq!(cvtnum("8E"), Err(SizeError::Range));
        assert_eq!(cvtnum("7E"), Ok(7 << 60));
    }

    #[test]
    fn unit_strings() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(1000448.0), "977 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(2.5 * 1073741824.0), "2.500 GiB");
        assert_eq!(timestr(Duration::from_micros(1500), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(250), false), "00.25 sec");
        assert_eq!(timestr(Duration::from_millis(61_500), false), "0:01:01.50");
    }

    #[test]
    fn outputs_match_qemu_io() {
        let l = layer();
        let run = |c: &str| run(&l, "node0", c).unwrap().text();
        let out = run("write 0 64k");
        assert_eq!(first_line(&out), "wrote 65536/65536 bytes at offset 0");
        let second = out.lines().nth(1).unwrap();
        assert!(second.starts_with("64 KiB, 1 ops; 00.0"), "{second}");
        assert!(second.ends_with(" ops/sec)"), "{second}");
        assert_eq!(
            first_line(&run("write 1k 1.5k")),
            "wrote 1536/1536 bytes at offset 1024"
        );
        assert_eq!(first_line(&run("w 0x10 1")), "wrote 1/1 bytes at offset 16");
        assert_eq!(first_line(&run("write 0 0")), "wrote 0/0 bytes at offset 0");
        assert_eq!(
            run("write 0 0").lines().nth(1).unwrap().split(';').next(),
            Some("0 bytes, 1 ops")
        );
        assert_eq!(
            first_line(&run("write 999999 449")),
            "wrote 449/449 bytes at offset 999999"
        );
        assert_eq!(run("write 0 1000449"), "write failed: Input/output error\n");
        assert_eq!(run("write 1000448 1"), "write failed: Input/output error\n");
        assert_eq!(run("write -z 0 1M"), "write failed: Input/output error\n");
        assert_eq!(run("read 2000000 0"), "read failed: Input/output error\n");
        assert_eq!(
            first_line(&run("read 1000448 0")),
            "read 0/0 bytes at offset 1000448"
        );
        assert_eq!(run("discard 0 1G"), "discard failed: Input/output error\n");
        assert_eq!(
            first_line(&run("discard 3 5")),
            "discard 5/5 bytes at offset 3"
        );
        assert_eq!(run("write -q 0 1"), "");
        assert_eq!(run("discard -q 0 1"), "");
        assert_eq!(run("write -P 300 0 1"), "300 is not a valid pattern byte\n");
        assert_eq!(run("write -P abc 0 1"), "abc is not a valid pattern byte\n");
        assert_eq!(run("write -P -1 0 1"), "-1 is not a valid pattern byte\n");
        assert_eq!(
            first_line(&run("write -P 0377 0 1")),
            "wrote 1/1 bytes at offset 0"
        );
        assert_eq!(
            run("write abc 1"),
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc\n"
        );
        assert_eq!(
            run("write 99999999999999999999 1"),
            "Parsing error: argument too large -- 99999999999999999999\n"
        );
        assert_eq!(
            run("write 0"),
            "bad argument count 1 to write, expected at least 2 arguments\n"
        );
        assert_eq!(
            run("read -P"),
            "bad argument count 1 to read, expected at least 2 arguments\n"
        );
        assert_eq!(
            run("write -1 5"),
            format!("write: invalid option -- '1'\n{WRITE_USAGE}\n")
        );
        assert_eq!(
            run("write 0 -5"),
            format!("write: invalid option -- '5'\n{WRITE_USAGE}\n")
        );
        assert_eq!(run("write 0 1 2"), format!("{WRITE_USAGE}\n"));
        assert_eq!(run("read 0 1 2"), format!("{READ_USAGE}\n"));
        assert_eq!(run("discard 0 1 2"), format!("{DISCARD_USAGE}\n"));
        assert_eq!(
            run("discard -z 0 1"),
            format!("discard: invalid option -- 'z'\n{DISCARD_USAGE}\n")
        );
        assert_eq!(
            run("write -z -P 1 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            run("write 0 3g"),
            "length cannot exceed 2147483136 without -n, given 3g\n"
        );
        assert_eq!(
            run("write 0 2147483137"),
            "length cannot exceed 2147483136 without -n, given 2147483137\n"
        );
        assert_eq!(run("foo 0 1"), "command \"foo\" not found\n");
        assert_eq!(run(""), "");
        // -n (no fallback) is refused, after qemu-io's own checks of the command line: QEMU
        // fails such a write-zeroes where a driver would have to write data, and ours always
        // would.
        assert_eq!(run("write -n 0 1"), "-n requires -z to be specified\n");
        assert_eq!(
            run("write -z -n 0 1"),
            "write: option -n is not supported by this qemu-io\n"
        );
        assert_eq!(
            run("write -z -n 0 3g"),
            "write: option -n is not supported by this qemu-io\n"
        );
    }

    /// Where QEMU 7.2 prints each kind of output (checked against `human-monitor-command`
    /// on QEMU: the reply, its stdout and its stderr).
    #[test]
    fn output_goes_where_qemu_prints_it() {
        let l = layer();
        let run = |c: &str| run(&l, "node0", c).unwrap();
        let out = run("write -P 1 0 512");
        assert!(out.stdout.starts_with("wrote 512/512 bytes at offset 0\n"));
        assert_eq!((out.stderr.as_str(), out.monitor.as_str()), ("", ""));
        assert_eq!(
            run("write -X 0 512"),
            Output {
                stderr: "write: invalid option -- 'X'\n".into(),
                stdout: format!("{WRITE_USAGE}\n"),
                monitor: String::new(),
            }
        );
        assert_eq!(
            run("write 0"),
            Output {
                stderr: "bad argument count 1 to write, expected at least 2 arguments\n".into(),
                ..Output::default()
            }
        );
        assert_eq!(
            run("bogus"),
            Output {
                stderr: "command \"bogus\" not found\n".into(),
                ..Output::default()
            }
        );
        let out = run("read -P 2 0 512");
        assert!(out
            .stdout
            .starts_with("Pattern verification failed at offset 0, 512 bytes\nread 512/512"));
        assert_eq!(
            run("write 0 1x").stdout,
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x\n"
        );
    }

    #[test]
    fn read_verifies_patterns() {
        let l = layer();
        let run = |c: &str| run(&l, "node0", c).unwrap().text();
        // read-zeroes=on: reads are zeroes whatever was written.
        assert_eq!(
            first_line(&run("read -P 0 0 512")),
            "read 512/512 bytes at offset 0"
        );
        let out = run("read -P 1 5 700");
        assert_eq!(
            first_line(&out),
            "Pattern verification failed at offset 5, 700 bytes"
        );
        assert_eq!(
            out.lines().nth(1).unwrap(),
            "read 700/700 bytes at offset 5"
        );
        assert_eq!(
            first_line(&run("read -P 1 -s 10 -l 4 0 100")),
            "Pattern verification failed at offset 10, 4 bytes"
        );
        assert_eq!(run("read -s 10 0 100"), format!("{READ_USAGE}\n"));
        assert_eq!(
            run("read -P 0 -s 200 0 100"),
            "pattern verification range exceeds end of read data\n"
        );
        let out = run("read -v 0 32");
        assert_eq!(
            out.lines().next().unwrap(),
            "00000000:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................"
        );
        assert_eq!(out.lines().nth(2).unwrap(), "read 32/32 bytes at offset 0");
        assert_eq!(
            run("read -q -P 1 0 1"),
            "Pattern verification failed at offset 0, 1 bytes\n"
        );
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "big", "size": 4 << 20, "read-zeroes": true}),
        )
        .unwrap();
        let big = super::run(&l, "big", "read -v 0 2M").unwrap().text();
        assert_eq!(big.lines().count(), 65536 + 3);
        assert_eq!(
            big.lines().nth(65536).unwrap(),
            "(dump stops after 1048576 bytes)"
        );
        let c = run("read -C 0 512");
        assert!(c.starts_with("512,1,0:00:00.00,"), "{c}");
    }

    #[test]
    fn null_without_read_zeroes_leaves_qemu_io_fill() {
        let l = BlockLayer::new();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 4096}))
            .unwrap();
        let out = run(&l, "n", "read -P 0xab 0 512").unwrap().text();
        assert_eq!(first_line(&out), "read 512/512 bytes at offset 0");
    }

    #[test]
    fn errors_and_read_only() {
        let l = layer();
        assert_eq!(
            run(&l, "zz", "write 0 1").unwrap_err().to_string(),
            "Cannot find device='' nor node-name='zz'"
        );
        assert_eq!(
            run(&l, "ro", "write 0 512").unwrap().text(),
            "Block node is read-only\n"
        );
        assert_eq!(
            run(&l, "ro", "discard 0 512").unwrap().text(),
            "Block node is read-only\n"
        );
        assert_eq!(
            first_line(&run(&l, "ro", "read 0 512").unwrap().text()),
            "read 512/512 bytes at offset 0"
        );
    }
}
