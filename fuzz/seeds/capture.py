"""What capture_qemu.py and capture_livemig.py share: start a VM whose monitor listens on a
unix socket, talk QMP to it, add and dirty the bitmaps of a SPEC on node0, and migrate to a
file.
"""
import json, socket, subprocess, time


def start(args, sock, who):
    """Starts `args` (its monitor on `sock`) and negotiates; returns the process and `cmd`,
    which runs one command (skipping events) and returns its reply, or exits on an error."""
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(sock); break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit(f"{who}'s monitor did not come up")
    f = s.makefile("rw")
    f.readline()

    def cmd(c, **kw):
        f.write(json.dumps({"execute": c, "arguments": kw}) + "\n"); f.flush()
        while True:
            m = json.loads(f.readline())
            if "event" not in m:
                break
        if "error" in m:
            raise SystemExit(f"{c}: {m}")
        return m["return"]

    cmd("qmp_capabilities")
    return p, cmd


def dirty_bitmaps(cmd, spec):
    """Adds SPEC's NAME:GRANULARITY[:disabled] bitmaps on node0, then writes to it with
    qemu-io (the enabled bitmaps record the writes)."""
    for b in filter(None, spec.split(",")):
        name, gran, *rest = b.split(":")
        cmd("block-dirty-bitmap-add", node="node0", name=name, granularity=int(gran),
            disabled="disabled" in rest)
    for w in ["write 0 64k", "write 320k 4k", "write 1M 64k", "write 63M 4k"]:
        cmd("human-monitor-command", **{"command-line": f'qemu-io node0 "{w}"'})


def migrate_to(cmd, out):
    """Migrates to `exec:cat > out` and waits (20 s at most) for the end; prints and returns
    the last `query-migrate` reply's status."""
    cmd("migrate", uri=f"exec:cat > {out}")
    for _ in range(400):
        st = cmd("query-migrate")
        if st.get("status") in ("completed", "failed"):
            break
        time.sleep(0.05)
    print(out, st.get("status"))
    return st.get("status")
