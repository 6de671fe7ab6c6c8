//! The human monitor (`human-monitor-command`): the HMP commands tests and people use, with
//! QEMU 7.2's output byte for byte (`info status`, `info name`, `info migrate`,
//! `info migrate_capabilities`, `info migrate_parameters`, `qemu-io`) and its replies to
//! mistakes.

use super::App;
use migration::machine::Machine;
use migration::runstate::RunState;
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::Value;
use std::sync::Arc;

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
        Ok(Reply::new(Value::String(hmp(&self.app, &line))))
    }
}

/// The human monitor: the commands tests and people use.
fn hmp(app: &App, line: &str) -> String {
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
            let mut rest: Vec<&str> = rest.to_vec();
            while rest.first().is_some_and(|a| *a == "-d" || *a == "-q") {
                rest.remove(0);
            }
            match rest.as_slice() {
                [node, cmd] => match block::qemu_io::run(&app.block, node, cmd) {
                    Ok(out) => out.replace('\n', "\r\n"),
                    Err(e) => format!("{e}\r\n"),
                },
                _ => "qemu-io: usage: qemu-io [-d] [-q] device \"command\"\r\n".into(),
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
