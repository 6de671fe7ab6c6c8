//! Migration over descriptors passed to the monitor, as libvirt migrates through a tunnel or
//! saves a VM to a pipe: `getfd` (the descriptor beside the command, `SCM_RIGHTS`), `closefd`,
//! `migrate fd:NAME`, `migrate-incoming fd:NAME`. Replies side by side with QEMU 7.2, and
//! QEMU 7.2 → livemig → QEMU 7.2 over socketpairs, RAM compared with `pmemsave`.

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use testkit::QmpClient;

/// The part of a reply that must match: the return value, or the error's class and text.
fn outcome(r: Value) -> Value {
    match r.get("error") {
        Some(e) => json!({"error": e["desc"], "class": e["class"]}),
        None => json!({"return": r["return"]}),
    }
}

/// Sends `cmd` to both monitors (with a fresh descriptor each when `with_fd`) and asserts the
/// replies match.
fn both(q: &mut QmpClient, l: &mut QmpClient, cmd: &str, args: Value, with_fd: bool) -> Value {
    let run = |c: &mut QmpClient| {
        let r = if with_fd {
            let (x, _y) = UnixStream::pair().unwrap();
            c.execute_with_fd(cmd, args.clone(), x.as_fd()).unwrap()
        } else {
            c.execute(cmd, args.clone()).unwrap()
        };
        outcome(r)
    };
    let a = run(q);
    let b = run(l);
    assert_eq!(b, a, "{cmd} {args}: livemig differs from QEMU");
    a
}

/// A socketpair whose first end cannot take another byte until the second is read: a
/// migration sent into it stays active.
fn full_pair() -> (UnixStream, UnixStream) {
    let (x, y) = UnixStream::pair().unwrap();
    x.set_nonblocking(true).unwrap();
    let chunk = [0u8; 65536];
    loop {
        match (&x).write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling a socketpair: {e}"),
        }
    }
    x.set_nonblocking(false).unwrap();
    (x, y)
}

/// Passes one end of a new socketpair to `src` and the other to `dst`, both named `name`.
fn pair_to(src: &mut QmpClient, dst: &mut QmpClient, name: &str) {
    let (a, b) = UnixStream::pair().unwrap();
    for (c, end) in [(src, &a), (dst, &b)] {
        let r = c
            .execute_with_fd("getfd", json!({"fdname": name}), end.as_fd())
            .unwrap();
        assert_eq!(r["return"], json!({}), "getfd: {r}");
    }
}

#[test]
fn getfd_closefd_and_fd_uris_answer_as_qemu() {
    let Some(tmp) = setup("getfd_closefd_and_fd_uris_answer_as_qemu") else {
        return;
    };
    let dir = tmp.path();
    let qp = qemu(dir, "qemu", &[]);
    let mut q = qp.qmp();
    let lp = livemig(dir, "lm", &[]);
    let mut l = lp.qmp();
    for (cmd, args, with_fd) in [
        ("getfd", json!({"fdname": "a"}), false),
        ("getfd", json!({"fdname": "1a"}), true),
        ("getfd", json!({}), true),
        ("closefd", json!({"fdname": "a"}), false),
        ("getfd", json!({"fdname": "a"}), true),
        // A name given again replaces the descriptor.
        ("getfd", json!({"fdname": "a"}), true),
        ("closefd", json!({"fdname": "a"}), false),
        ("closefd", json!({"fdname": "a"}), false),
        ("migrate", json!({"uri": "fd:nope"}), false),
    ] {
        both(&mut q, &mut l, cmd, args, with_fd);
    }
    // The missing descriptor failed the migration, too.
    let (a, b) = (wait(&mut q, &["failed"]), wait(&mut l, &["failed"]));
    assert_eq!(b["status"], a["status"]);
    // A descriptor is taken by the migration that names it: a second one finds none. Each
    // migration writes into a socket whose buffer is already full, so it is still running when
    // it is cancelled (the 32 MiB of zero pages fit in an empty one before the cancel comes).
    for c in [&mut q, &mut l] {
        let (x, _y) = full_pair();
        c.execute_with_fd("getfd", json!({"fdname": "m"}), x.as_fd())
            .unwrap();
        c.ok("migrate", json!({"uri": "fd:m"}));
        c.ok("migrate_cancel", json!({}));
        wait(c, &["cancelled", "failed"]);
    }
    both(&mut q, &mut l, "migrate", json!({"uri": "fd:m"}), false);
}

#[test]
fn qemu_to_livemig_to_qemu_over_passed_sockets() {
    let Some(tmp) = setup("qemu_to_livemig_to_qemu_over_passed_sockets") else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 2 << 20, 11);
    let mut a_args = loader(&pat, 0);
    a_args.extend(strings(&["-S"]));
    let ap = qemu(dir, "qa", &a_args);
    let mut a = ap.qmp();
    let lp = livemig(dir, "l1", &strings(&["-incoming", "defer"]));
    let mut l = lp.qmp();

    // QEMU → livemig: the destination takes its end by name too.
    pair_to(&mut a, &mut l, "mig");
    l.ok("migrate-incoming", json!({"uri": "fd:mig"}));
    a.ok("migrate", json!({"uri": "fd:mig"}));
    let (s, d) = (
        wait(&mut a, &["completed", "failed"]),
        wait(&mut l, &["completed", "failed"]),
    );
    assert_completed("QEMU -> livemig", &s, &ap, &d, &lp);
    let ram_a = ram(&mut a, dir, "qa");
    assert!(
        ram_a[..4096].iter().any(|&x| x != 0),
        "the loader put nothing in QEMU's RAM"
    );
    assert_same_ram(&ram_a, &ram(&mut l, dir, "l1"), "QEMU -> livemig");

    // livemig → QEMU, with the return path the socket carries.
    let bp = qemu(dir, "qb", &strings(&["-incoming", "defer"]));
    let mut b = bp.qmp();
    l.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": true}]}),
    );
    b.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": true}]}),
    );
    pair_to(&mut l, &mut b, "back");
    b.ok("migrate-incoming", json!({"uri": "fd:back"}));
    l.ok("migrate", json!({"uri": "fd:back"}));
    let (s, d) = (
        wait(&mut l, &["completed", "failed"]),
        wait(&mut b, &["completed", "failed"]),
    );
    assert_completed("livemig -> QEMU", &s, &lp, &d, &bp);
    assert_same_ram(&ram_a, &ram(&mut b, dir, "qb"), "livemig -> QEMU");
}

#[test]
fn livemig_saves_to_a_passed_pipe_and_restores_from_an_inherited_one() {
    let Some(tmp) = setup("livemig_saves_to_a_passed_pipe_and_restores_from_an_inherited_one")
    else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 1 << 20, 5);
    let ap = qemu(dir, "qa", &{
        let mut v = loader(&pat, 4 << 20);
        v.extend(strings(&["-S"]));
        v
    });
    let mut a = ap.qmp();
    let lp = livemig(dir, "l1", &strings(&["-incoming", "defer"]));
    let mut l = lp.qmp();
    pair_to(&mut a, &mut l, "in");
    l.ok("migrate-incoming", json!({"uri": "fd:in"}));
    a.ok("migrate", json!({"uri": "fd:in"}));
    wait(&mut l, &["completed"]);
    let want = ram(&mut l, dir, "l1");
    assert!(
        want[4 << 20..(4 << 20) + 4096].iter().any(|&x| x != 0),
        "the pattern did not arrive"
    );

    // Save: the stream goes into a file passed as a descriptor (no return path).
    let saved = dir.join("saved.mig");
    let f = std::fs::File::create(&saved).unwrap();
    let r = l
        .execute_with_fd("getfd", json!({"fdname": "save"}), f.as_fd())
        .unwrap();
    assert_eq!(r["return"], json!({}), "{r}");
    drop(f);
    l.ok("migrate", json!({"uri": "fd:save"}));
    let s = wait(&mut l, &["completed", "failed"]);
    assert_eq!(s["status"], "completed", "{s}\n{}", lp.log());

    // Restore into QEMU from the file, passed by name.
    let bp = qemu(dir, "qb", &strings(&["-incoming", "defer"]));
    let mut b = bp.qmp();
    let f = std::fs::File::open(&saved).unwrap();
    let r = b
        .execute_with_fd("getfd", json!({"fdname": "restore"}), f.as_fd())
        .unwrap();
    assert_eq!(r["return"], json!({}), "{r}");
    b.ok("migrate-incoming", json!({"uri": "fd:restore"}));
    let d = wait(&mut b, &["completed", "failed"]);
    assert_eq!(d["status"], "completed", "{d}\n{}", bp.log());
    assert_same_ram(&want, &ram(&mut b, dir, "qb"), "restored in QEMU");

    // And into livemig, from `-incoming fd:N`: a descriptor it inherits.
    let f = std::fs::File::open(&saved).unwrap();
    // Inherited across exec: without close-on-exec.
    nix::fcntl::fcntl(
        &f,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let n = std::os::fd::AsRawFd::as_raw_fd(&f);
    let cp = livemig(dir, "l2", &strings(&["-incoming", &format!("fd:{n}")]));
    drop(f);
    let mut c = cp.qmp();
    let d = wait(&mut c, &["completed", "failed"]);
    assert_eq!(d["status"], "completed", "{d}\n{}", cp.log());
    assert_same_ram(&want, &ram(&mut c, dir, "l2"), "restored in livemig");
}
