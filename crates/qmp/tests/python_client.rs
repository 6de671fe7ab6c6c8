//! The real `qemu.qmp` Python client against our server: connect (with its own greeting
//! parsing and capability negotiation), run a command, get a typed error, receive an event.

mod support;

use qmp::{Args, CommandTable, QmpError, Server};
use serde_json::{json, Value};
use std::sync::Arc;

const SCRIPT: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path):
    qmp = QMPClient('livemig-test')
    await qmp.connect(path)
    out = {'greeting': qmp.greeting._raw}
    out['version'] = await qmp.execute('query-version')
    out['sum'] = await qmp.execute('add', {'a': 40, 'b': 2})
    try:
        await qmp.execute('add', {'a': 'forty', 'b': 2})
    except ExecuteError as e:
        out['error'] = [e.error_class, e.error.error.desc]
    with qmp.listener('MIGRATION') as listener:
        await qmp.execute('fire', {'name': 'MIGRATION', 'data': {'status': 'completed'}})
        ev = await asyncio.wait_for(listener.get(), 10)
        out['event'] = dict(ev)
    await qmp.disconnect()
    print(json.dumps(out, default=dict))

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn python_qemu_qmp_client() {
    if !testkit::require("python_qemu_qmp_client", testkit::python_qmp()) {
        return;
    }
    let mut table = CommandTable::new();
    table.register("add", |mut a: Args| {
        let x: i64 = a.req_int("a")?;
        let y: i64 = a.req_int("b")?;
        a.finish()?;
        Ok::<_, QmpError>(json!(x + y))
    });
    let events = support::register_fire(&mut table);
    let server = Server::new(Arc::new(table));
    let _ = events.set(server.events());
    let dir = testkit::tempdir();
    let path = dir.path().join("py.qmp");
    server.listen_unix(&path).unwrap();

    let script = dir.path().join("client.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["greeting"]["QMP"]["capabilities"], json!(["oob"]));
    assert_eq!(
        v["version"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    assert_eq!(v["sum"], 42);
    assert_eq!(
        v["error"],
        json!([
            "GenericError",
            "Invalid parameter type for 'a', expected: integer"
        ])
    );
    assert_eq!(v["event"]["event"], "MIGRATION");
    assert_eq!(v["event"]["data"], json!({"status": "completed"}));
    assert!(v["event"]["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    server.close(std::time::Duration::from_secs(5));
    assert!(!path.exists());
}
