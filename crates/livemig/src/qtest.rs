//! QEMU's qtest protocol (`-qtest CHARDEV`), as far as livemig speaks it: the connection is
//! made (test harnesses wait for it), each command line gets its reply line, and a command
//! livemig does not implement is answered as QEMU answers one it does not know
//! (`FAIL Unknown command 'NAME'`). livemig implements none of qtest's commands yet — clock
//! stepping, port and memory I/O, IRQ interception — so a test that relies on one sees it
//! fail rather than a fake success. QEMU's migration iotests only need the connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

/// The reply to one command line, without its newline; `None` for a blank line (QEMU
/// answers nothing to a line without words).
pub fn reply(line: &str) -> Option<String> {
    let word = line.split_whitespace().next()?;
    Some(format!("FAIL Unknown command '{word}'"))
}

/// Serves the qtest protocol on `stream` in a thread of its own until the peer closes it.
pub fn serve(stream: UnixStream) -> Result<(), String> {
    let mut out = stream
        .try_clone()
        .map_err(|e| format!("-qtest: cannot use the socket: {e}"))?;
    std::thread::Builder::new()
        .name("qtest".into())
        .spawn(move || {
            let reader = BufReader::new(stream);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(r) = reply(&line) {
                    if out.write_all(format!("{r}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the qtest thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_commands_fail_as_in_qemu() {
        assert_eq!(
            reply("clock_step 100").as_deref(),
            Some("FAIL Unknown command 'clock_step'")
        );
        assert_eq!(reply("   "), None);
    }
}
