//! Postcopy set-ups shared by the postcopy tests: a source whose precopy is slowed down so
//! that most of RAM is still to send at the switch, the wait for `postcopy-paused`, and a
//! recovery (`migrate-recover` on the destination, `migrate ... resume=true` on the source).

use super::*;

/// Capabilities every postcopy test turns on, on both ends.
pub const CAPS: &[&str] = &["events", "postcopy-ram"];

/// A busy source started with `extra` arguments (credentials, say), [`CAPS`] set, filled,
/// and its precopy held to 4 MiB/s.
pub fn slow_source_with(dir: &Path, extra: &[String]) -> Lm {
    let mut a: Vec<&str> = GUEST.to_vec();
    a.extend(["-workload", BUSY]);
    a.extend(extra.iter().map(String::as_str));
    let mut src = Lm::start(dir, "src", &a);
    src.caps_on(CAPS);
    src.wait_filled();
    src.set_params(json!({"max-bandwidth": 4 << 20}));
    src
}

/// [`slow_source_with`] no extra arguments.
pub fn slow_source(dir: &Path) -> Lm {
    slow_source_with(dir, &[])
}

/// Waits until `lm`'s migration is `postcopy-paused` and returns its `query-migrate`.
pub fn paused(lm: &mut Lm) -> Value {
    let q = lm.wait_migration(&["postcopy-paused", "failed", "completed"]);
    assert_eq!(q["status"], "postcopy-paused", "{}: {q}", lm.name);
    q
}

/// `migrate-recover` on the destination, `migrate ... resume=true` on the source, and both
/// back to `postcopy-active`.
pub fn recover(src: &mut Lm, dst: &mut Lm, uri: &str) {
    dst.ok("migrate-recover", json!({ "uri": uri }));
    resume(src, dst, uri);
}

/// The second half of [`recover`], once the destination listens: `migrate URI resume=true`
/// on the source (`uri` may lead to the destination's listener through a relay), and both
/// back to `postcopy-active`.
pub fn resume(src: &mut Lm, dst: &mut Lm, uri: &str) {
    src.ok("migrate", json!({ "uri": uri, "resume": true }));
    src.wait_migration(&["postcopy-active", "completed"]);
    dst.wait_migration(&["postcopy-active", "completed"]);
}

/// `x-livemig-postcopy`'s `preempt-pages` in `lm`'s `query-migrate`: the pages that went
/// (source) or came (destination) on the preempt channel.
pub fn preempt_pages(lm: &mut Lm) -> u64 {
    lm.ok("query-migrate", json!({}))["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0)
}
