//! The human monitor: QEMU 7.2's HMP, reached through QMP's `human-monitor-command` or on
//! stdio (`-monitor stdio`, or `-nographic` without another monitor), with QEMU 7.2's output
//! byte for byte (`info status`, `info name`, `info migrate`, `info migrate_capabilities`,
//! `info migrate_parameters`, `qemu-io`) and its replies to mistakes.
//!
//! `qemu-io [-d] DEVICE "COMMAND"` runs `block::qemu_io` on a drive or node and prints as
//! QEMU's does: qemu-io's output on the process's standard output (the reply is empty),
//! getopt's complaints on standard error, a missing node as `Error: ...` in the reply; with
//! `-d` DEVICE is a guest device's id or QOM path.
//!
//! The commands that change the migration (`migrate_set_capability`, `migrate_set_parameter`,
//! `migrate [-d] [-r] URI`, `migrate_start_postcopy`) build the arguments of the QMP command
//! QEMU's handler calls and dispatch them to the migration's own command set, so they act —
//! and fail — exactly as that command does; a refusal prints as QEMU's `hmp_handle_error`
//! prints it (`Error: ...`). `quit` is QMP's `quit`.
//!
//! On stdio the monitor is QEMU's readline: the banner, the `(qemu) ` prompt, and each typed
//! byte echoed by redrawing the line (`ESC[D` back over what was drawn, the line, `ESC[K`), as
//! QEMU's terminal update draws it, with `\n` written as `\r\n`. Of readline's editing keys
//! only Enter and Backspace are built; the other control bytes (completion, history, cursor
//! movement) change nothing, as QEMU's readline ignores control bytes it has no use for.

use super::App;
use migration::machine::Machine;
use migration::runstate::RunState;
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// The commands of [`HmpCommands`].
pub const COMMANDS: &[&str] = &["human-monitor-command"];

/// The human monitor of one VM.
pub struct HmpCommands {
    app: Arc<App>,
}

impl HmpCommands {
    /// The human monitor of `app`.
    pub fn new(app: Arc<App>) -> HmpCommands {
        HmpCommands { app }
    }
}

impl CommandSet for HmpCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, mut a: Args) -> Result<Reply, QmpError> {
        if name != "human-monitor-command" {
            return Err(QmpError::unknown_command(name));
        }
        let line = a.req_str("command-line")?;
        // QEMU's cpu-index picks the CPU for commands that need one; none here does.
        let _cpu: Option<i64> = a.opt_int("cpu-index")?;
        a.finish()?;
        let out = hmp(&self.app, &line, Terminal::Qmp);
        if out.quit {
            return Ok(super::run::quit_replying(
                &self.app,
                Value::String(out.text),
            ));
        }
        Ok(Reply::new(Value::String(out.text)))
    }
}

/// Where an HMP line came from: QEMU's `migrate` without `-d` waits for the migration only on
/// a monitor that can be suspended (a terminal), not under `human-monitor-command`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Terminal {
    /// `human-monitor-command`.
    Qmp,
    /// `-monitor stdio`.
    Stdio,
}

/// What one HMP line printed, and whether it asked the VM to quit.
struct Output {
    text: String,
    quit: bool,
}

impl From<String> for Output {
    fn from(text: String) -> Output {
        Output { text, quit: false }
    }
}

/// The human monitor: the commands tests and people use.
fn hmp(app: &App, line: &str, term: Terminal) -> Output {
    let trimmed = line.trim_start();
    let (cmd, rest) = trimmed
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((trimmed, ""));
    let parsed = match cmd {
        "migrate_set_capability" => parse_args(cmd, rest, &[Arg::Str, Arg::OnOff]),
        "migrate_set_parameter" => parse_args(cmd, rest, &[Arg::Str, Arg::Str]),
        "migrate" => parse_migrate(rest),
        "migrate_start_postcopy" | "quit" | "q" => parse_args(cmd, rest, &[]),
        _ => return hmp_info(app, line).into(),
    };
    let args = match parsed {
        Ok(a) => a,
        Err(e) => return format!("{e}Try \"help {cmd}\" for more information\r\n").into(),
    };
    let mig = || migration::qmp::MigrationCommands::new(app.mig.clone());
    let result = match (cmd, args.as_slice()) {
        ("migrate_set_capability", [Parsed::Str(cap), Parsed::Bool(state)]) => {
            let known = migration::caps::Capability::ALL
                .iter()
                .any(|c| c.as_str() == cap);
            enum_value(cap, known).and_then(|cap| {
                qmp_call(
                    &mig(),
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": cap, "state": state}]}),
                )
            })
        }
        ("migrate_set_parameter", [Parsed::Str(p), Parsed::Str(v)]) => parameter_value(p, v)
            .and_then(|(p, v)| {
                let mut m = Map::new();
                m.insert(p, v);
                qmp_call(&mig(), "migrate-set-parameters", Value::Object(m))
            }),
        ("migrate", [Parsed::Flags(flags), Parsed::Str(uri)]) => {
            let has = |f: char| flags.contains(f);
            let mut m = Map::new();
            m.insert("uri".into(), json!(uri));
            for (f, key) in [('b', "blk"), ('i', "inc"), ('r', "resume")] {
                if has(f) {
                    m.insert(key.into(), json!(true));
                }
            }
            match qmp_call(&mig(), "migrate", Value::Object(m)) {
                Ok(()) if has('d') => Ok(()),
                Ok(()) if term == Terminal::Qmp => {
                    return "terminal does not allow synchronous migration, continuing detached\r\n"
                        .to_string()
                        .into()
                }
                Ok(()) => {
                    wait_for_migration(app);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        ("migrate_start_postcopy", []) => qmp_call(&mig(), "migrate-start-postcopy", json!({})),
        ("quit" | "q", []) => {
            return Output {
                text: String::new(),
                quit: true,
            }
        }
        _ => return format!("unknown command: '{cmd}'\r\n").into(),
    };
    match result {
        Ok(()) => String::new().into(),
        Err(e) => format!("Error: {}\r\n", e.replace('\n', "\r\n")).into(),
    }
}

/// QEMU's readline command buffer holds this many bytes; more typed are dropped.
const LINE_MAX: usize = 4095;

/// Serves the human monitor on stdin and stdout (`-monitor stdio`) on a thread of its own:
/// QEMU's banner, then a `(qemu) ` prompt per line read. The end of stdin ends the monitor,
/// not the VM, as in QEMU.
pub fn serve_stdio(app: Arc<App>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("hmp-stdio".into())
        .spawn(move || {
            let mut out = std::io::stdout();
            let mut input = std::io::stdin();
            // A reader that went away ends the monitor quietly, as QEMU's ignores it.
            let _ = stdio_session(&app, &mut input, &mut out);
        })
        .map(|_| ())
}

/// One human-monitor session over `input` and `out`.
fn stdio_session(app: &App, input: &mut impl Read, out: &mut impl Write) -> std::io::Result<()> {
    let v = qmp::VersionInfo::default();
    write!(
        out,
        "QEMU {}.{}.{} monitor - type 'help' for more information\r\n(qemu) ",
        v.major, v.minor, v.micro
    )?;
    out.flush()?;
    let mut line = Readline::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            let Some(cmd) = line.byte(b, out)? else {
                continue;
            };
            let result = hmp(app, &cmd, Terminal::Stdio);
            out.write_all(result.text.as_bytes())?;
            out.flush()?;
            if result.quit {
                let (_, hook) =
                    super::run::quit_replying(app, Value::String(String::new())).into_parts();
                if let Some(hook) = hook {
                    hook();
                }
            }
            out.write_all(b"(qemu) ")?;
            out.flush()?;
        }
    }
}

/// The line being typed, and what of it the terminal shows (QEMU's readline state).
#[derive(Default)]
struct Readline {
    buf: Vec<u8>,
    shown: Vec<u8>,
}

impl Readline {
    /// Takes one typed byte; returns the line when it was Enter.
    fn byte(&mut self, b: u8, out: &mut impl Write) -> std::io::Result<Option<String>> {
        match b {
            b'\r' | b'\n' => {
                out.write_all(b"\r\n")?;
                self.shown.clear();
                let line = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            8 | 127 => {
                self.buf.pop();
            }
            b if b >= 32 && self.buf.len() < LINE_MAX => self.buf.push(b),
            _ => {}
        }
        if self.buf != self.shown {
            // Back to where the line starts, the line, then clear to the end of the row.
            for _ in 0..self.shown.len() {
                out.write_all(b"\x1b[D")?;
            }
            out.write_all(&self.buf)?;
            out.write_all(b"\x1b[K")?;
            self.shown.clone_from(&self.buf);
        }
        out.flush()?;
        Ok(None)
    }
}

/// QEMU's `hmp_migrate_status_cb`: the monitor stays suspended while the migration is in
/// `setup` or `active`, looking once a second; then its error, if any, is reported (on stderr,
/// as QEMU's timer callback reports it outside any monitor).
fn wait_for_migration(app: &App) {
    loop {
        let q = app.mig.query();
        match q.get("status").and_then(Value::as_str) {
            None | Some("setup" | "active") => std::thread::sleep(Duration::from_secs(1)),
            Some(_) => {
                if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
                    log::error!("{e}");
                }
                return;
            }
        }
    }
}

/// Runs a QMP command of `set` as the QMP monitor would, keeping its error's text.
fn qmp_call(set: &dyn CommandSet, name: &str, args: Value) -> Result<(), String> {
    let Value::Object(m) = args else {
        return Err(format!("{name}: arguments are not an object"));
    };
    set.dispatch(name, Args::new(m))
        .map(|_| ())
        .map_err(|e| e.desc)
}

/// QEMU's `qapi_enum_parse` for an HMP argument.
fn enum_value(v: &str, known: bool) -> Result<String, String> {
    if known {
        Ok(v.to_string())
    } else {
        Err(format!("invalid parameter value: {v}"))
    }
}

/// An HMP argument type (QEMU's `args_type` letters this monitor uses).
#[derive(Clone, Copy)]
enum Arg {
    /// `s`: a word, or a string in double quotes.
    Str,
    /// `b`: `on` or `off`.
    OnOff,
}

/// A parsed HMP argument.
#[derive(Debug, PartialEq)]
enum Parsed {
    Str(String),
    Bool(bool),
    /// The `-x` flags given, for `migrate`.
    Flags(String),
}

/// QEMU's `get_str`: a word up to white space, or a double-quoted string with `\\`, `\"`,
/// `\n`, `\r` and `\'` escapes. `None` when there is nothing, or the quote is not closed.
fn get_str(p: &mut &str) -> Option<String> {
    *p = p.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if p.is_empty() {
        return None;
    }
    let mut out = String::new();
    if let Some(body) = p.strip_prefix('"') {
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    *p = &body[i + 1..];
                    return Some(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, e @ ('\\' | '\'' | '"'))) => out.push(e),
                    _ => return None,
                },
                c => out.push(c),
            }
        }
        None
    } else {
        let end = p.find(|c: char| c.is_ascii_whitespace()).unwrap_or(p.len());
        out.push_str(&p[..end]);
        *p = &p[end..];
        Some(out)
    }
}

/// QEMU's `monitor_parse_arguments` for `types`, with its messages (each ending the line).
fn parse_args(cmd: &str, rest: &str, types: &[Arg]) -> Result<Vec<Parsed>, String> {
    let mut p = rest;
    let mut out = Vec::new();
    for t in types {
        match t {
            Arg::Str => match get_str(&mut p) {
                Some(s) => out.push(Parsed::Str(s)),
                None => return Err(format!("{cmd}: string expected\r\n")),
            },
            Arg::OnOff => {
                p = p.trim_start_matches(|c: char| c.is_ascii_whitespace());
                let end = p.find(|c: char| !c.is_ascii_graphic()).unwrap_or(p.len());
                let v = match &p[..end] {
                    "on" => true,
                    "off" => false,
                    _ => return Err("Expected 'on' or 'off'\r\n".into()),
                };
                p = &p[end..];
                out.push(Parsed::Bool(v));
            }
        }
    }
    if !p
        .trim_start_matches(|c: char| c.is_ascii_whitespace())
        .is_empty()
    {
        return Err(format!(
            "{cmd}: extraneous characters at the end of line\r\n"
        ));
    }
    Ok(out)
}

/// `migrate [-d] [-b] [-i] [-r] uri` (QEMU's `detach:-d,blk:-b,inc:-i,resume:-r,uri:s`):
/// flags as `-d`, `-db`, ... before the URI.
fn parse_migrate(rest: &str) -> Result<Vec<Parsed>, String> {
    let mut p = rest;
    let mut flags = String::new();
    loop {
        p = p.trim_start_matches(|c: char| c.is_ascii_whitespace());
        let Some(f) = p.strip_prefix('-') else { break };
        let end = f.find(|c: char| c.is_ascii_whitespace()).unwrap_or(f.len());
        for c in f[..end].chars() {
            if !"dbir".contains(c) {
                return Err(format!("migrate: unsupported option -{c}\r\n"));
            }
            flags.push(c);
        }
        p = &f[end..];
    }
    let mut args = parse_args("migrate", p, &[Arg::Str])?;
    args.insert(0, Parsed::Flags(flags));
    Ok(args)
}

/// How `migrate_set_parameter` reads a parameter's value (QEMU 7.2's
/// `hmp_migrate_set_parameter`, through the string input visitor).
#[derive(Clone, Copy)]
enum ParamType {
    U8,
    U32,
    Bool,
    Str,
    /// A size, bytes by default.
    Size,
    /// A size, MiB by default (`max-bandwidth`).
    SizeMiB,
    /// A size that must fit an `int64` (`xbzrle-cache-size`).
    SizeI64,
    /// `multifd-compression`.
    Compression,
    /// `block-bitmap-mapping`: QMP only.
    QmpOnly,
}

/// Every migration parameter with the way HMP reads it.
const PARAMETER_TYPES: &[(&str, ParamType)] = &[
    ("announce-initial", ParamType::Size),
    ("announce-max", ParamType::Size),
    ("announce-rounds", ParamType::Size),
    ("announce-step", ParamType::Size),
    ("compress-level", ParamType::U8),
    ("compress-threads", ParamType::U8),
    ("compress-wait-thread", ParamType::Bool),
    ("decompress-threads", ParamType::U8),
    ("throttle-trigger-threshold", ParamType::U8),
    ("cpu-throttle-initial", ParamType::U8),
    ("cpu-throttle-increment", ParamType::U8),
    ("cpu-throttle-tailslow", ParamType::Bool),
    ("max-cpu-throttle", ParamType::U8),
    ("tls-creds", ParamType::Str),
    ("tls-hostname", ParamType::Str),
    ("tls-authz", ParamType::Str),
    ("max-bandwidth", ParamType::SizeMiB),
    ("downtime-limit", ParamType::Size),
    ("x-checkpoint-delay", ParamType::U32),
    ("block-incremental", ParamType::Bool),
    ("multifd-channels", ParamType::U8),
    ("multifd-compression", ParamType::Compression),
    ("multifd-zlib-level", ParamType::U8),
    ("multifd-zstd-level", ParamType::U8),
    ("xbzrle-cache-size", ParamType::SizeI64),
    ("max-postcopy-bandwidth", ParamType::Size),
    ("block-bitmap-mapping", ParamType::QmpOnly),
];

/// The `migrate-set-parameters` member for `migrate_set_parameter NAME VALUE`, or QEMU's
/// message for a value its visitor refuses.
fn parameter_value(name: &str, v: &str) -> Result<(String, Value), String> {
    let Some((_, ty)) = PARAMETER_TYPES.iter().find(|(n, _)| *n == name) else {
        return Err(format!("invalid parameter value: {name}"));
    };
    let expects = |what: &str| format!("Parameter '{name}' expects {what}");
    let uint = |max: u64, ty: &str| -> Result<Value, String> {
        let n = parse_u64(v).ok_or_else(|| expects("uint64"))?;
        if n > max {
            return Err(expects(ty));
        }
        Ok(json!(n))
    };
    let value = match ty {
        ParamType::U8 => uint(u8::MAX.into(), "uint8_t")?,
        ParamType::U32 => uint(u32::MAX.into(), "uint32_t")?,
        ParamType::Bool => match v {
            "on" | "yes" | "true" | "y" => json!(true),
            "off" | "no" | "false" | "n" => json!(false),
            _ => return Err(expects("'on' or 'off'")),
        },
        ParamType::Str => json!(v),
        ParamType::Size => json!(parse_size(v, 1).map_err(|range| size_error(name, v, range))?),
        ParamType::SizeI64 => {
            let n = parse_size(v, 1).map_err(|range| size_error(name, v, range))?;
            if n > i64::MAX as u64 {
                return Err(format!("Invalid size {v}"));
            }
            json!(n)
        }
        ParamType::SizeMiB => match parse_size(v, 1 << 20) {
            Ok(n) if n <= i64::MAX as u64 => json!(n),
            _ => return Err(format!("Invalid size {v}")),
        },
        ParamType::Compression => {
            if !["none", "zlib", "zstd"].contains(&v) {
                return Err(format!("Parameter '{name}' does not accept value '{v}'"));
            }
            json!(v)
        }
        ParamType::QmpOnly => {
            return Err("The block-bitmap-mapping parameter can only be set through QMP".into())
        }
    };
    Ok((name.to_string(), value))
}

/// QEMU's `parse_option_size` messages: out of range, or not a size (with its hint).
fn size_error(name: &str, value: &str, out_of_range: bool) -> String {
    if out_of_range {
        format!("Value '{value}' is out of range for parameter '{name}'")
    } else {
        format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    }
}

/// QEMU's `qemu_strtou64` with base 0: decimal, `0x` hexadecimal or `0` octal, all of it.
fn parse_u64(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

/// QEMU's `qemu_strtosz` with `unit` for a bare number: a decimal number (with an optional
/// fraction) or a `0x` integer, then an optional suffix `B`, `K`, `M`, `G`, `T`, `P`, `E`
/// (powers of 1024, either case). `Err(true)` when it does not fit 64 bits, `Err(false)`
/// when it is not a size.
fn parse_size(v: &str, unit: u64) -> Result<u64, bool> {
    let hex = v.starts_with("0x") || v.starts_with("0X");
    let (num, suffix) = match v.chars().last() {
        Some(c) if "bBkKmMgGtTpPeE".contains(c) && !(hex && c.is_ascii_hexdigit()) => {
            (&v[..v.len() - 1], Some(c.to_ascii_uppercase()))
        }
        _ => (v, None),
    };
    let mul: u64 = match suffix {
        None => unit,
        Some('B') => 1,
        Some('K') => 1 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        Some('P') => 1 << 50,
        _ => 1 << 60,
    };
    if hex {
        let n = u64::from_str_radix(&num[2..], 16).map_err(|_| false)?;
        return n.checked_mul(mul).ok_or(true);
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) {
        return Err(false);
    }
    let whole = int
        .parse::<u64>()
        .map_err(|_| true)?
        .checked_mul(mul)
        .ok_or(true)?;
    let f: f64 = format!("0.{frac}0").parse().map_err(|_| false)?;
    // A fraction of a byte is no size.
    if mul == 1 && f != 0.0 {
        return Err(false);
    }
    whole.checked_add((f * mul as f64) as u64).ok_or(true)
}

/// The `info` commands and `qemu-io`.
fn hmp_info(app: &App, line: &str) -> String {
    let words = split_hmp(line);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["info", "status"] => {
            let st = app.vm.runstate();
            match st {
                RunState::Running => "VM status: running\r\n".into(),
                RunState::Paused => "VM status: paused\r\n".into(),
                other => format!("VM status: paused ({other})\r\n"),
            }
        }
        ["info", "migrate"] => info_migrate(&app.mig.query()),
        ["info", "migrate_capabilities"] => app
            .mig
            .capabilities()
            .into_iter()
            .map(|(c, s)| format!("{c}: {}\r\n", on_off(s)))
            .collect(),
        ["info", "migrate_parameters"] => info_migrate_parameters(&app.mig.parameters()),
        // QEMU prints nothing for a VM without a name.
        ["info", "name"] => app
            .name
            .as_ref()
            .map(|n| format!("{n}\r\n"))
            .unwrap_or_default(),
        ["qemu-io", rest @ ..] => {
            // QEMU's argument types for it: `qdev:-d,device:B,command:s`.
            let usage = |why: &str| {
                format!("qemu-io: {why}\r\nTry \"help qemu-io\" for more information\r\n")
            };
            let (qdev, rest) = match rest {
                ["-d", rest @ ..] => (true, rest),
                [flag, ..] if flag.starts_with('-') && flag.len() > 1 => {
                    return usage(&format!("unsupported option {flag}"))
                }
                _ => (false, rest),
            };
            match rest {
                [] => usage("block device name expected"),
                [_] => usage("string expected"),
                [_, _, _, ..] => usage("extraneous characters at the end of line"),
                // A guest device's id or QOM path names its BlockBackend (QEMU's
                // `blk_by_qdev_id`: an id is resolved under /machine/peripheral). A device
                // with an id is attached under that id (its `qdev`), one without under its
                // path.
                [dev, cmd] if qdev => {
                    let id = match dev.strip_prefix("/machine/peripheral/") {
                        Some(id) if !id.contains('/') => Some(id),
                        Some(_) => None,
                        None if dev.starts_with('/') => None,
                        None => Some(*dev),
                    };
                    let node = match id {
                        Some(id) => app.block.device_node(id),
                        None => app.block.device_node(dev),
                    };
                    match node {
                        Some(node) => print_qemu_io(block::qemu_io::run_on(&node, cmd)),
                        None => format!("Error: Device '{dev}' not found\r\n"),
                    }
                }
                [node, cmd] => match block::qemu_io::run(&app.block, node, cmd) {
                    Ok(out) => print_qemu_io(out),
                    Err(e) => format!("Error: {e}\r\n"),
                },
            }
        }
        ["info"] => INFO_HELP
            .iter()
            .map(|(sub, help)| format!("info {sub}  -- {help}\r\n"))
            .collect(),
        ["info", sub, _, ..] if INFO_HELP.iter().any(|(s, _)| s == sub) => format!(
            "{sub}: extraneous characters at the end of line\r\n\
             Try \"help info {sub}\" for more information\r\n"
        ),
        ["info", sub, ..] => format!("unknown command: 'info {sub}'\r\n"),
        [] => String::new(),
        [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
    }
}

/// Prints what a `qemu-io` command printed where QEMU 7.2 prints it — qemu-io's own output on
/// the process's standard output, getopt's complaints on standard error, flushed before the
/// command's reply is written (so a `-qmp stdio` reader sees them first, as from QEMU) — and
/// returns what goes to the monitor.
fn print_qemu_io(out: block::qemu_io::Output) -> String {
    // A closed stdout or stderr is not worth failing the command for (QEMU's printf ignores
    // it too).
    if !out.stderr.is_empty() {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(out.stderr.as_bytes());
        let _ = e.flush();
    }
    if !out.stdout.is_empty() {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(out.stdout.as_bytes());
        let _ = o.flush();
    }
    out.monitor.replace('\n', "\r\n")
}

/// The `info` subcommands this monitor has, with QEMU 7.2's help lines.
const INFO_HELP: &[(&str, &str)] = &[
    ("migrate", "show migration status"),
    (
        "migrate_capabilities",
        "show current migration capabilities",
    ),
    ("migrate_parameters", "show current migration parameters"),
    ("name", "show the current VM name"),
    ("status", "show the current VM status (running|paused)"),
];

/// Splits an HMP line into words, honouring double quotes (as `qemu-io dev "write 0 4k"`).
fn split_hmp(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// How `info migrate_parameters` prints one parameter (QEMU 7.2's
/// `hmp_info_migrate_parameters`).
#[derive(Clone, Copy)]
enum Shown {
    /// A number, then a unit if any.
    Num(&'static str),
    /// `on` / `off`.
    OnOff,
    /// A string in single quotes.
    Quoted,
    /// A string as it is.
    Plain,
}

/// The parameters `info migrate_parameters` lists, in QEMU 7.2's order (not the order of
/// `query-migrate-parameters`); the multifd compression levels are not shown, as in QEMU.
const PARAMETER_LINES: &[(&str, Shown)] = &[
    ("announce-initial", Shown::Num(" ms")),
    ("announce-max", Shown::Num(" ms")),
    ("announce-rounds", Shown::Num("")),
    ("announce-step", Shown::Num(" ms")),
    ("compress-level", Shown::Num("")),
    ("compress-threads", Shown::Num("")),
    ("compress-wait-thread", Shown::OnOff),
    ("decompress-threads", Shown::Num("")),
    ("throttle-trigger-threshold", Shown::Num("")),
    ("cpu-throttle-initial", Shown::Num("")),
    ("cpu-throttle-increment", Shown::Num("")),
    ("cpu-throttle-tailslow", Shown::OnOff),
    ("max-cpu-throttle", Shown::Num("")),
    ("tls-creds", Shown::Quoted),
    ("tls-hostname", Shown::Quoted),
    ("max-bandwidth", Shown::Num(" bytes/second")),
    ("downtime-limit", Shown::Num(" ms")),
    ("x-checkpoint-delay", Shown::Num(" ms")),
    ("block-incremental", Shown::OnOff),
    ("multifd-channels", Shown::Num("")),
    ("multifd-compression", Shown::Plain),
    ("xbzrle-cache-size", Shown::Num(" bytes")),
    ("max-postcopy-bandwidth", Shown::Num("")),
    ("tls-authz", Shown::Quoted),
];

/// `info migrate_parameters`, from `query-migrate-parameters`' value.
fn info_migrate_parameters(p: &Value) -> String {
    let mut s = String::new();
    for (name, shown) in PARAMETER_LINES {
        let v = p.get(*name);
        let text = match shown {
            Shown::Num(unit) => format!("{}{unit}", v.and_then(Value::as_u64).unwrap_or(0)),
            Shown::OnOff => on_off(v.and_then(Value::as_bool).unwrap_or(false)).to_string(),
            Shown::Quoted => format!("'{}'", v.and_then(Value::as_str).unwrap_or("")),
            Shown::Plain => v.and_then(Value::as_str).unwrap_or("").to_string(),
        };
        s.push_str(&format!("{name}: {text}\r\n"));
    }
    if let Some(nodes) = p.get("block-bitmap-mapping").and_then(Value::as_array) {
        s.push_str("block-bitmap-mapping:\r\n");
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        for n in nodes {
            s.push_str(&format!(
                "  '{}' -> '{}'\r\n",
                text(n, "node-name"),
                text(n, "alias")
            ));
            for b in n
                .get("bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                s.push_str(&format!(
                    "    '{}' -> '{}'\r\n",
                    text(b, "name"),
                    text(b, "alias")
                ));
            }
        }
    }
    s
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn info_migrate(q: &Value) -> String {
    let mut s = String::from(
        "globals:\r\nstore-global-state: on\r\nonly-migratable: off\r\nsend-configuration: on\r\nsend-section-footer: on\r\ndecompress-error-check: on\r\nclear-bitmap-shift: 18\r\n",
    );
    let Some(st) = q.get("status").and_then(Value::as_str) else {
        return s;
    };
    s.push_str(&format!("Migration status: {st}"));
    if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
        s.push_str(&format!(" ({e})"));
    }
    s.push_str("\r\n");
    let num = |k: &str| q.get(k).and_then(Value::as_u64);
    if let Some(t) = num("total-time") {
        s.push_str(&format!("total time: {t} ms\r\n"));
    }
    if let Some(t) = num("expected-downtime") {
        s.push_str(&format!("expected downtime: {t} ms\r\n"));
    }
    if let Some(t) = num("downtime") {
        s.push_str(&format!("downtime: {t} ms\r\n"));
    }
    if let Some(t) = num("setup-time") {
        s.push_str(&format!("setup: {t} ms\r\n"));
    }
    if let Some(r) = q.get("ram") {
        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        s.push_str(&format!(
            "transferred ram: {} kbytes\r\n",
            n("transferred") >> 10
        ));
        s.push_str(&format!(
            "throughput: {:.2} mbps\r\n",
            r.get("mbps").and_then(Value::as_f64).unwrap_or(0.0)
        ));
        s.push_str(&format!(
            "remaining ram: {} kbytes\r\n",
            n("remaining") >> 10
        ));
        s.push_str(&format!("total ram: {} kbytes\r\n", n("total") >> 10));
        s.push_str(&format!("duplicate: {} pages\r\n", n("duplicate")));
        s.push_str(&format!("skipped: {} pages\r\n", n("skipped")));
        s.push_str(&format!("normal: {} pages\r\n", n("normal")));
        s.push_str(&format!(
            "normal bytes: {} kbytes\r\n",
            n("normal-bytes") >> 10
        ));
        s.push_str(&format!("dirty sync count: {}\r\n", n("dirty-sync-count")));
        s.push_str(&format!("page size: {} kbytes\r\n", n("page-size") >> 10));
        s.push_str(&format!(
            "multifd bytes: {} kbytes\r\n",
            n("multifd-bytes") >> 10
        ));
        s.push_str(&format!("pages-per-second: {}\r\n", n("pages-per-second")));
        // As QEMU 7.2: the rate only while active, the byte splits only when non-zero.
        if st == "active" && n("dirty-pages-rate") > 0 {
            s.push_str(&format!(
                "dirty pages rate: {} pages\r\n",
                n("dirty-pages-rate")
            ));
        }
        for (key, label) in [
            ("precopy-bytes", "precopy ram"),
            ("downtime-bytes", "downtime ram"),
            ("postcopy-bytes", "postcopy ram"),
        ] {
            if n(key) > 0 {
                s.push_str(&format!("{label}: {} kbytes\r\n", n(key) >> 10));
            }
        }
    }
    if let Some(t) = num("cpu-throttle-percentage") {
        s.push_str(&format!("cpu throttle percentage: {t}\r\n"));
    }
    // livemig's own: what the destination dropped or doubted (a dropped dirty bitmap above
    // all), one line each, so that it is not missed by someone reading this page.
    if let Some(ws) = q.get("x-livemig-warnings").and_then(Value::as_array) {
        for w in ws.iter().filter_map(Value::as_str) {
            s.push_str(&format!("warning: {w}\r\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hmp_words_honour_quotes() {
        assert_eq!(
            split_hmp(r#"qemu-io node0 "write -P 0x5a 0 64k""#),
            vec!["qemu-io", "node0", "write -P 0x5a 0 64k"]
        );
        assert_eq!(split_hmp("  info   status "), vec!["info", "status"]);
        assert_eq!(split_hmp(r#"x """#), vec!["x", ""]);
    }

    #[test]
    fn info_migrate_shows_dropped_bitmaps() {
        let q = json!({"status": "completed", "total-time": 5,
            "x-livemig-warnings": ["Bitmap 'b0' on node 'd0' dropped: the nodes differ in size"]});
        assert!(info_migrate(&q).ends_with(
            "total time: 5 ms\r\nwarning: Bitmap 'b0' on node 'd0' dropped: the nodes differ in size\r\n"
        ));
    }

    #[test]
    fn info_migrate_shows_status_and_error() {
        let s = info_migrate(&json!({"status": "failed", "error-desc": "boom", "total-time": 0}));
        assert!(s.contains("Migration status: failed (boom)\r\n"), "{s}");
        assert!(s.contains("total time: 0 ms"), "{s}");
        assert!(info_migrate(&json!({})).starts_with("globals:"));
        let s = info_migrate(&json!({"status": "active", "cpu-throttle-percentage": 30}));
        assert!(s.ends_with("cpu throttle percentage: 30\r\n"), "{s}");
    }
}
