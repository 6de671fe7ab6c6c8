//! The secured migrations between QEMU 7.2 and livemig (`qemu_tls`: x509, `qemu_psk`:
//! pre-shared keys): the credentials objects, the QMP steps both ends take, and the
//! QEMU → livemig → QEMU chain both files run with their own credentials, authz and messages.

use super::*;

/// Multifd channels on every end of a multifd chain.
pub const CHANNELS: u64 = 2;

/// A process and its QMP client.
pub struct VmProcessQ {
    /// The process.
    pub p: VmProcess,
    /// Its monitor.
    pub q: QmpClient,
}

/// `-object KIND,id=ID,dir=DIR/SUB,endpoint=ENDPOINT`: credentials of `kind`
/// (`tls-creds-x509` or `tls-creds-psk`) from a directory in QEMU's layout.
pub fn creds_arg(kind: &str, dir: &Path, id: &str, sub: &str, endpoint: &str) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "{kind},id={id},dir={},endpoint={endpoint}",
            dir.join(sub).display()
        ),
    ]
}

/// Capability `return-path`.
pub fn return_path(q: &mut QmpClient) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": true}]}),
    );
}

/// Capability `multifd` with [`CHANNELS`] channels, when `on`.
pub fn multifd(q: &mut QmpClient, on: bool) {
    if on {
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        q.ok(
            "migrate-set-parameters",
            json!({ "multifd-channels": CHANNELS }),
        );
    }
}

/// A QEMU destination with `-incoming defer` and `extra` arguments (credentials, authz),
/// `params` set, listening on TCP port 0; returns it and the URI to migrate to.
pub fn qemu_destination(
    dir: &Path,
    name: &str,
    extra: &[String],
    params: Value,
    with_multifd: bool,
) -> (VmProcessQ, String) {
    let mut args = strings(&["-incoming", "defer"]);
    args.extend_from_slice(extra);
    let p = qemu(dir, name, &args);
    let mut q = p.qmp();
    return_path(&mut q);
    multifd(&mut q, with_multifd);
    q.ok("migrate-set-parameters", params);
    q.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let uri = connect_uri(&mut q, "tcp:127.0.0.1:0");
    (VmProcessQ { p, q }, uri)
}

/// Waits until the process's log holds `what` (QEMU reports incoming TLS failures there).
pub fn wait_log(p: &VmProcess, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = p.log();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < deadline, "no '{what}' in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With multifd, the pages went over the (encrypted) channels.
pub fn check_channels(s: &Value, on: bool, what: &str) {
    let bytes = s["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    if on {
        assert!(bytes >= 2 << 20, "{what}: pages over the channels: {s}");
    }
}

/// What the x509 and the PSK chains do differently.
pub struct Chain<'a> {
    /// The test's name (for `setup`).
    pub test: &'a str,
    /// Multifd on every end.
    pub multifd: bool,
    /// The credentials' QOM type.
    pub kind: &'a str,
    /// Writes `cli/` (the sources' credentials) and `srv/` (the destinations') under the
    /// directory it is given.
    pub credentials: &'a dyn Fn(&Path),
    /// Appended to QEMU's credentials objects (e.g. `,priority=...`).
    pub qemu_props: &'a str,
    /// Environment for livemig (`LIVEMIG_LOG=debug` to read its sessions back).
    pub livemig_env: &'a [&'a str],
    /// livemig's `-object` checking QEMU A's identity, with id `auth0`.
    pub livemig_authz: &'a str,
    /// QEMU B's `-object` checking livemig's identity, with id `auth0`, if any.
    pub qemu_authz: Option<&'a str>,
    /// Seed of the pattern QEMU A's RAM starts with.
    pub seed: u8,
    /// How the hops are secured, for messages ("TLS", "TLS-PSK").
    pub over: &'a str,
}

/// The end of a [`chain`]: livemig (source of the second hop) and its directory.
pub struct ChainEnd {
    /// The test's directory (the credentials are under it).
    pub tmp: tempfile::TempDir,
    /// livemig L.
    pub l: VmProcess,
    /// Its monitor.
    pub l_q: QmpClient,
}

/// QEMU A → livemig L → QEMU B, every hop secured as `c` says, L's destination checking A's
/// identity with `tls-authz`: both migrations complete (with multifd, the pages go over the
/// channels) and RAM is identical at every step. livemig's server credentials come by
/// `-object`, its client credentials by `object-add`. `None` when the test is skipped.
pub fn chain(c: &Chain) -> Option<ChainEnd> {
    let tmp = setup(c.test)?;
    let dir = tmp.path();
    (c.credentials)(dir);
    let qemu_creds = |sub: &str, endpoint: &str| {
        let mut a = creds_arg(c.kind, dir, "tls0", sub, endpoint);
        a[1].push_str(c.qemu_props);
        a
    };
    let a_file = dir.join("a.bin");
    let pat = pattern_file(&a_file, 2 << 20, c.seed);

    // 1. QEMU A (client credentials) -> livemig L (server credentials, authz).
    let mut args = qemu_creds("cli", "client");
    args.extend(loader(&a_file, 0));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    return_path(&mut qa_q);
    multifd(&mut qa_q, c.multifd);
    qa_q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));

    let mut args = strings(c.livemig_env);
    args.push(env!("CARGO_BIN_EXE_livemig").to_string());
    args.extend(strings(&["vm", "-M", "none", "-m", RAM_ARG]));
    args.extend(creds_arg(c.kind, dir, "tls0", "srv", "server"));
    args.extend(strings(&[
        "-object",
        c.livemig_authz,
        "-incoming",
        "tcp:127.0.0.1:0",
    ]));
    let l = VmProcess::spawn("env", &args, dir, "l")
        .unwrap_or_else(|e| panic!("cannot start livemig: {e}"));
    let mut l_q = l.qmp();
    return_path(&mut l_q);
    multifd(&mut l_q, c.multifd);
    l_q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
    );
    let (s, d) = migrate(&mut qa_q, &mut l_q, "tcp:127.0.0.1:0");
    check_channels(&s, c.multifd, "QEMU -> livemig");
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l);
    let ram_a = ram(&mut qa_q, dir, "qa");
    assert_eq!(&ram_a[..pat.len()], &pat[..]);
    let ram_l = ram(&mut l_q, dir, "l");
    assert_same_ram(&ram_a, &ram_l, &format!("QEMU -> livemig over {}", c.over));
    drop(qa);

    // 2. livemig L (client credentials by object-add) -> QEMU B (server credentials, authz if
    // any).
    l_q.ok(
        "object-add",
        json!({"qom-type": c.kind, "id": "tls1", "endpoint": "client",
               "dir": dir.join("cli").display().to_string()}),
    );
    l_q.ok("migrate-set-parameters", json!({"tls-creds": "tls1"}));
    let mut extra = qemu_creds("srv", "server");
    let mut params = json!({"tls-creds": "tls0"});
    if let Some(authz) = c.qemu_authz {
        extra.extend(strings(&["-object", authz]));
        params["tls-authz"] = json!("auth0");
    }
    let (mut b, uri) = qemu_destination(dir, "qb", &extra, params, c.multifd);
    let (s, d) = migrate(&mut l_q, &mut b.q, &uri);
    check_channels(&s, c.multifd, "livemig -> QEMU");
    assert_completed("livemig -> QEMU", &s, &l, &d, &b.p);
    let ram_b = ram(&mut b.q, dir, "qb");
    assert_same_ram(&ram_l, &ram_b, &format!("livemig -> QEMU over {}", c.over));
    Some(ChainEnd { tmp, l, l_q })
}

/// A livemig source (`-M none`, no workload) with `creds` (its `-object` arguments), a
/// return path and `params`.
pub fn livemig_source(dir: &Path, name: &str, creds: &[String], params: Value) -> VmProcessQ {
    let p = livemig(dir, name, creds);
    let mut q = p.qmp();
    return_path(&mut q);
    q.ok("migrate-set-parameters", params);
    VmProcessQ { p, q }
}

/// A QEMU source with `creds` (its `-object` arguments, id `tls0`) and a return path.
/// Without one, a QEMU source whose small stream fits in the socket buffers reports
/// `completed` before it could learn that the destination refused it.
pub fn qemu_source(dir: &Path, name: &str, creds: &[String]) -> VmProcessQ {
    let p = qemu(dir, name, creds);
    let mut q = p.qmp();
    return_path(&mut q);
    q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    VmProcessQ { p, q }
}

/// A livemig destination with `extra` arguments (credentials, authz) and `params`, listening
/// on TCP port 0; returns it and the URI to migrate to.
pub fn livemig_destination(
    dir: &Path,
    name: &str,
    extra: &[String],
    params: Value,
) -> (VmProcessQ, String) {
    let mut args = extra.to_vec();
    args.extend(strings(&["-incoming", "tcp:127.0.0.1:0"]));
    let p = livemig(dir, name, &args);
    let mut q = p.qmp();
    q.ok("migrate-set-parameters", params);
    let uri = connect_uri(&mut q, "tcp:127.0.0.1:0");
    (VmProcessQ { p, q }, uri)
}

/// Asserts the source failed and runs on; returns its `error-desc`.
pub fn source_failed_and_runs(src: &mut QmpClient, what: &str) -> String {
    let s = wait(src, &["completed", "failed", "cancelled"]);
    assert_eq!(s["status"], "failed", "{what}: {s}");
    assert_eq!(
        src.ok("query-status", json!({}))["status"],
        "running",
        "{what}: the source runs on"
    );
    s["error-desc"].as_str().unwrap_or_default().to_string()
}

/// Waits for the destination to fail; returns its `error-desc`.
pub fn destination_failed(dst: &mut QmpClient) -> String {
    let d = wait(dst, &["failed", "completed"]);
    assert_eq!(d["status"], "failed", "{d}");
    d["error-desc"].as_str().unwrap_or_default().to_string()
}
