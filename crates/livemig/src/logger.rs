//! Where the library crates' `log` records go: standard error, worded as QEMU's own messages
//! (`error_report`, `warn_report`, `error_printf`), so an operator — or QEMU's iotests, which
//! compare stderr — reads livemig's messages as QEMU's.
//!
//! | level | printed as |
//! |---|---|
//! | error | `PROG: message` |
//! | warn | `PROG: warning: message` |
//! | info | `message` (QEMU's continuation lines) |
//! | debug, trace | only when `LIVEMIG_LOG=debug` (or `trace`), as `PROG: debug: message` |

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct StderrLogger {
    prog: String,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match record.level() {
            Level::Error => format!("{}: {}\n", self.prog, record.args()),
            Level::Warn => format!("{}: warning: {}\n", self.prog, record.args()),
            Level::Info => format!("{}\n", record.args()),
            Level::Debug | Level::Trace => format!(
                "{}: {}: {}: {}\n",
                self.prog,
                record.level().as_str().to_ascii_lowercase(),
                record.target(),
                record.args()
            ),
        };
        // One write per record, so lines from several threads do not interleave; a closed
        // stderr is not worth dying for.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger once, at start-up. `LIVEMIG_LOG` (`error`, `warn`, `info`, `debug`,
/// `trace`, `off`) sets the level; the default is `info`.
pub fn init() {
    let level = std::env::var("LIVEMIG_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    let logger = StderrLogger {
        prog: "livemig".to_string(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
