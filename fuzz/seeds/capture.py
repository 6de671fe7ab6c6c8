"""What the capture scripts share: start a VM whose monitor listens on a unix socket, talk QMP
to it, add and dirty the bitmaps of a SPEC on node0, migrate to a file, record a migration
through a relay, wait for both ends, and quit.
"""
import json, socket, subprocess, threading, time


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


class Relay:
    """A recording relay on the unix socket `path`: every connection a source opens is
    forwarded to the unix socket `dst_sock`, in order, both ways. `sent[i]` and `returned[i]`
    are the byte chunks of connection i, each way."""

    def __init__(self, path, dst_sock, backlog):
        self.path, self.dst_sock = path, dst_sock
        self.sent, self.returned = [], []
        self.lsn = socket.socket(socket.AF_UNIX)
        self.lsn.bind(path)
        self.lsn.listen(backlog)
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @staticmethod
    def _pump(src, dst, keep):
        while True:
            try:
                b = src.recv(65536)
            except OSError:
                b = b""
            if not b:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            keep.append(b)
            try:
                dst.sendall(b)
            except OSError:
                return

    def _accept_loop(self):
        while True:
            try:
                c, _ = self.lsn.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX)
            for _ in range(100):
                try:
                    u.connect(self.dst_sock); break
                except OSError:
                    time.sleep(0.02)
            keep, back = [], []
            self.sent.append(keep)
            self.returned.append(back)
            threading.Thread(target=self._pump, args=(c, u, keep), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, back), daemon=True).start()

    def sent_bytes(self, i):
        """What the source sent on connection i (empty if it never opened one)."""
        return b"".join(self.sent[i]) if len(self.sent) > i else b""

    def returned_bytes(self, i):
        """What the destination sent back on connection i."""
        return b"".join(self.returned[i]) if len(self.returned) > i else b""


def wait_ended(scmd, dcmd):
    """Waits (30 s at most) for both ends to complete or fail; returns their `query-migrate`
    replies (source, destination)."""
    for _ in range(600):
        st = scmd("query-migrate")
        dst = dcmd("query-migrate")
        if st.get("status") in ("completed", "failed") and dst.get("status") in ("completed", "failed"):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return st, dst


def quit_all(*vms):
    """Quits each (process, cmd) pair and waits for the process."""
    for p, cmd in vms:
        try:
            cmd("quit")
        except (SystemExit, json.JSONDecodeError, ValueError, OSError):
            pass
        p.wait()
