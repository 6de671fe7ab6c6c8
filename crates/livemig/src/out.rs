//! Standard output for the tools (`demo`, `bench`, `analyze`, `--help`): a reader that goes
//! away early (`livemig bench --json | head -1`) ends the tool quietly instead of a panic.
//!
//! `print!` panics when stdout is a closed pipe (Rust ignores `SIGPIPE`, so the write fails
//! with `EPIPE`). Here every write returns [`Closed`] instead; a tool passes it up with `?` and
//! returns, so its destructors run (the demo's VM processes are killed on drop) and it exits
//! with status 0, as a filter whose reader stopped reading.

use std::fmt;
use std::io::{ErrorKind, Write};

/// Standard output cannot be written any more: its reader went away (exit status 0), or
/// writing failed otherwise (said on stderr; exit status 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    status: i32,
}

impl Closed {
    /// The exit status the tool ends with.
    pub fn status(self) -> i32 {
        self.status
    }
}

/// Writes `args` to standard output and flushes it (a progress line must show at once).
pub fn write(args: fmt::Arguments<'_>) -> Result<(), Closed> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(Closed { status: 0 }),
        Err(e) => {
            log::error!("cannot write to standard output: {e}");
            Err(Closed { status: 1 })
        }
    }
}

/// `print!` that returns [`Closed`] instead of panicking.
macro_rules! out {
    ($($t:tt)*) => { $crate::out::write(format_args!($($t)*)) };
}

/// `println!` that returns [`Closed`] instead of panicking.
macro_rules! outln {
    () => { $crate::out::write(format_args!("\n")) };
    ($($t:tt)*) => { $crate::out::write(format_args!("{}\n", format_args!($($t)*))) };
}

pub(crate) use {out, outln};
