//! The monitor serves at most `-x-livemig-monitor-clients` clients at once (issue 14): one
//! more is told why in a QMP error line and closed, instead of costing two threads and three
//! descriptors — or, at the descriptor limit, getting no greeting at all.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[test]
fn clients_beyond_the_cap_are_refused_with_a_message() {
    let dir = tempdir();
    let mut vm = Lm::start(
        dir.path(),
        "vm",
        &["-M", "none", "-m", "16M", "-x-livemig-monitor-clients", "2"],
    );
    let mut second = testkit::QmpClient::connect(&vm.proc.qmp_path, TIMEOUT).expect("second");
    let s = UnixStream::connect(&vm.proc.qmp_path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(
        v,
        json!({"error": {"class": "GenericError",
            "desc": "Too many monitor clients: at most 2 are served at once"}})
    );
    line.clear();
    assert_eq!(r.read_line(&mut line).unwrap(), 0, "not closed: {line}");
    // The two served clients carry on.
    assert_eq!(vm.status(), "running");
    assert!(second.execute("query-status", json!({})).unwrap()["return"].is_object());
}
