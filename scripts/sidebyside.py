#!/usr/bin/env python3
"""Side-by-side: the same migration with QEMU 7.2 and with livemig, across shaped links.

For each link (see scripts/netbed.sh: two network namespaces joined by a veth pair, shaped
with tc tbf or htb), the script measures what one TCP stream carries across it, then runs,
interleaved (QEMU first on odd runs, livemig first on even ones), the same migration with
each: a guest whose RAM is filled with non-zero data and idle, source in one namespace,
destination in the other, over TCP, `max-bandwidth` lifted so the link is the limit, default
`downtime-limit` (300 ms). It prints, per link and implementation, the medians of total time,
downtime and throughput (bytes transferred / total time), the throughput as a share of the
link's measured TCP capacity, and livemig/QEMU ratios.

QEMU's guest is `-M none` with its RAM loaded by `-device loader` from a file of non-zero
bytes; livemig's is the reference machine whose one vCPU fills its RAM and then idles. Both
send every page as a normal page.

With --variants, each link gets one row per variant, both implementations configured alike:
`plain` (one stream), `multifd:N` (capability multifd, N channels), `tls` (x509 credentials
made for the run with openssl, tls-creds on both ends; `tls+multifd:N` with channels), `psk`
(tls-creds-psk with a random key made for the run; `psk+multifd:N` with channels),
`zstd:N` (multifd with N channels and multifd-compression zstd). Both guests hold
incompressible data (QEMU's loader file is random bytes, livemig's fill pages are
pseudo-random), so zstd rows show what compression costs where it cannot help.

With --compressible, both guests hold compressible RAM instead (every page the same 4 KiB
pattern): QEMU's from its loader, and livemig's by migrating it in from such a QEMU first
(over a unix socket inside the source's namespace, not timed), into `-M none` machines on
both livemig ends. Throughput is then guest RAM / total time (what compression buys), not
bytes on the wire; livemig's destinations are not verified page by page (foreign data).

With --hot, it adds livemig-only rows: a guest rewriting a hot set faster than the link
carries it, with and without auto-converge (QEMU 7.2 `-M none` has no vCPU to dirty memory).

Needs root (ip netns, tc). Not part of `cargo test`. Example:

    cargo build --release -p livemig
    sudo scripts/sidebyside.py --ram 512M --runs 3 --links none,10gbit,1gbit,1gbit:htb --hot
    sudo scripts/sidebyside.py --ram 256M --runs 3 --links none,1gbit \
        --variants plain,multifd:2,multifd:4,tls,tls+multifd:2,psk,psk+multifd:2,zstd:2
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NETBED = os.path.join(HERE, "netbed.sh")
PREFIX = os.environ.get("NETBED_PREFIX", "lmbench")
NS_SRC, NS_DST = PREFIX + "-src", PREFIX + "-dst"
ADDR_DST = "10.231.0.2"


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper()
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)


class Qmp:
    """A minimal QMP client over a unix socket: commands, events skipped."""

    def __init__(self, path, timeout=30.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RuntimeError(f"no QMP socket at {path}")
                time.sleep(0.05)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{name} {args}: {r['error'].get('desc')}")
            return r.get("return")

    def close(self):
        self.sock.close()


class Proc:
    """A VM process inside one end of the bed, with its QMP client."""

    def __init__(self, workdir, name, ns, argv):
        self.qmp_path = os.path.join(workdir, name + ".qmp")
        self.log_path = os.path.join(workdir, name + ".log")
        full = ["ip", "netns", "exec", ns] + argv + [
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.log = open(self.log_path, "w")
        self.p = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            self.qmp = Qmp(self.qmp_path)
        except Exception:
            self.kill()
            raise RuntimeError(f"{name} did not start: {open(self.log_path).read()}")

    def kill(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()
        self.log.close()


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def bed_up(rate, qdisc):
    env = dict(os.environ, NETBED_PREFIX=PREFIX)
    subprocess.run([NETBED, "up", rate, qdisc], check=True, env=env, stdout=subprocess.DEVNULL)


def bed_down():
    env = dict(os.environ, NETBED_PREFIX=PREFIX)
    subprocess.run([NETBED, "down"], check=True, env=env)


RECEIVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""


def tcp_capacity(nbytes, port=5599):
    """Bytes per second one TCP stream carries from the source end to the destination end."""
    rx = subprocess.Popen(["ip", "netns", "exec", NS_DST, sys.executable, "-c", RECEIVER,
                           ADDR_DST, str(port)], stdout=subprocess.PIPE, text=True)
    rx.stdout.readline()
    sender = f"""
import socket, sys, time
c = socket.create_connection(("{ADDR_DST}", {port}))
buf = memoryview(bytes(range(256)) * 4096); left = {nbytes}; t = time.time()
while left > 0:
    left -= c.send(buf[:min(left, len(buf))])
c.shutdown(socket.SHUT_WR); n = int(c.recv(64)); print(n / (time.time() - t))
"""
    out = subprocess.run(["ip", "netns", "exec", NS_SRC, sys.executable, "-c", sender],
                         check=True, capture_output=True, text=True).stdout
    rx.wait()
    return float(out.strip())


def wait_status(q, statuses, timeout):
    deadline = time.time() + timeout
    while True:
        r = q.cmd("query-migrate")
        if r.get("status") in statuses:
            return r
        if time.time() > deadline:
            return r
        time.sleep(0.02)


def migrate(src, dst, uri, timeout, poll=None):
    """Runs one migration; returns the source's final query-migrate (or its last, on timeout,
    after cancelling)."""
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.time() + timeout
    while True:
        r = src.qmp.cmd("query-migrate")
        if poll:
            poll(r)
        if r.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.time() > deadline:
            src.qmp.cmd("migrate_cancel")
            r = dict(r, status="timeout")
            break
        time.sleep(0.02)
    if r["status"] == "completed":
        d = wait_status(dst.qmp, ("completed", "failed"), 60)
        if d.get("status") != "completed":
            r = dict(r, status="destination " + str(d.get("status")))
    return r


COMMON_PARAMS = {"max-bandwidth": 100 << 30}


def make_pki(work):
    """A CA, a server certificate for the destination's address and a client certificate,
    all in one directory with QEMU's file names (both ends read the files they need)."""
    d = os.path.join(work, "pki")
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, cwd=d, capture_output=True)

    ossl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
         "-subj", "/O=livemig bench/CN=bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, san, eku in (("server", f"subjectAltName=IP:{ADDR_DST}\n", "serverAuth"),
                          ("client", "", "clientAuth")):
        ossl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
             "-subj", f"/O=livemig bench/CN={who}")
        ext = os.path.join(d, f"{who}.ext")
        with open(ext, "w") as f:
            f.write(san + "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "30", "-extfile", ext)
    # The pre-shared key of the `psk` variants (QEMU's format; `qemu` is the default user).
    with open(os.path.join(d, "keys.psk"), "w") as f:
        f.write(f"qemu:{os.urandom(32).hex()}\n")
    return d


class Variant:
    """How both implementations migrate in a row: multifd channels, compression, TLS."""

    def __init__(self, spec, pki):
        self.name = spec
        self.kind = next((k for k in ("tls", "psk") if spec.startswith(k)), None)
        self.tls = self.kind is not None
        rest = spec[len(self.kind):].lstrip("+") if self.tls else spec
        self.channels, self.compression = 0, "none"
        if rest.startswith("multifd:"):
            self.channels = int(rest.split(":")[1])
        elif rest.startswith("zstd:"):
            self.channels, self.compression = int(rest.split(":")[1]), "zstd"
        elif rest not in ("", "plain"):
            raise SystemExit(f"sidebyside: unknown variant {spec}")
        self.pki = pki

    def argv(self, endpoint):
        if not self.tls:
            return []
        creds = "tls-creds-x509" if self.kind == "tls" else "tls-creds-psk"
        return ["-object", f"{creds},id=tls0,dir={self.pki},endpoint={endpoint}"]

    def setup(self, q):
        """Capabilities and parameters on one end (before the migration connects)."""
        if self.channels:
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "multifd", "state": True}])
            q.cmd("migrate-set-parameters", **{"multifd-channels": self.channels,
                                                "multifd-compression": self.compression})
        if self.tls:
            q.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})


PLAIN = Variant("plain", None)


def qemu_run(args, work, port, fill_file, variant=PLAIN):
    base = [args.qemu, "-M", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-m", str(args.ram >> 20)]
    dst = Proc(work, "qemu-dst", NS_DST, base + variant.argv("server") + [
        "-incoming", f"tcp:{ADDR_DST}:{port}"])
    try:
        variant.setup(dst.qmp)
        src = Proc(work, "qemu-src", NS_SRC, base + variant.argv("client") + [
            "-device", f"loader,file={fill_file},addr=0,force-raw=on"])
        try:
            variant.setup(src.qmp)
            src.qmp.cmd("migrate-set-parameters", **COMMON_PARAMS)
            return migrate(src, dst, f"tcp:{ADDR_DST}:{port}", args.timeout)
        finally:
            src.kill()
    finally:
        dst.kill()


def livemig_vm(args, work, name, ns, workload, extra=()):
    argv = [args.livemig, "vm", "-name", name, "-M", "livemig", "-smp", "1",
            "-m", f"{args.ram >> 20}M"] + (["-workload", workload] if workload else [])
    argv += list(extra)
    return Proc(work, name, ns, argv)


def wait_filled(p, pages, timeout=120):
    deadline = time.time() + timeout
    while p.qmp.cmd("x-livemig-query-vm")["pages-written"] < pages:
        if time.time() > deadline:
            raise RuntimeError("the livemig guest did not fill its RAM")
        time.sleep(0.05)


def livemig_run(args, work, port, workload=None, caps=(), params=None, poll=None,
                timeout=None, variant=PLAIN):
    workload = workload or f"fill={args.ram >> 20}M,hot=0"
    dst = livemig_vm(args, work, "lm-dst", NS_DST, None, variant.argv("server") +
                     ["-incoming", f"tcp:{ADDR_DST}:{port}", "-S"] + prealloc(args))
    try:
        variant.setup(dst.qmp)
        src = livemig_vm(args, work, "lm-src", NS_SRC, workload, variant.argv("client"))
        try:
            variant.setup(src.qmp)
            fill = size(dict(kv.split("=") for kv in workload.split(","))["fill"])
            wait_filled(src, fill // 4096)
            if caps:
                src.qmp.cmd("migrate-set-capabilities",
                            capabilities=[{"capability": c, "state": True} for c in caps])
            src.qmp.cmd("migrate-set-parameters", **dict(COMMON_PARAMS, **(params or {})))
            r = migrate(src, dst, f"tcp:{ADDR_DST}:{port}", timeout or args.timeout, poll)
            if r["status"] == "completed" and args.verify:
                v = dst.qmp.cmd("x-livemig-verify-ram")
                if v.get("corrupt"):
                    r = dict(r, status=f"corrupt destination RAM: {v}")
            return r
        finally:
            src.kill()
    finally:
        dst.kill()


def prealloc(args):
    """`-mem-prealloc` for livemig's destinations, when asked."""
    return ["-mem-prealloc"] if args.mem_prealloc else []


def livemig_seeded_run(args, work, port, fill_file, variant=PLAIN):
    """livemig -> livemig (`-M none`) of RAM a QEMU loaded from `fill_file` and migrated into
    the livemig source first."""
    base = [args.livemig, "vm", "-M", "none", "-m", f"{args.ram >> 20}M"]
    seed_sock = os.path.join(work, f"seed{port}.sock")
    dst = Proc(work, "lm-dst", NS_DST, base + variant.argv("server") + [
        "-incoming", f"tcp:{ADDR_DST}:{port}", "-S"] + prealloc(args))
    try:
        variant.setup(dst.qmp)
        src = Proc(work, "lm-src", NS_SRC, base + variant.argv("client") + [
            "-incoming", f"unix:{seed_sock}"])
        try:
            seed = Proc(work, "qemu-seed", NS_SRC, [
                args.qemu, "-M", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
                "-m", str(args.ram >> 20),
                "-device", f"loader,file={fill_file},addr=0,force-raw=on"])
            try:
                seed.qmp.cmd("migrate-set-parameters", **COMMON_PARAMS)
                r = migrate(seed, src, f"unix:{seed_sock}", args.timeout)
                if r.get("status") != "completed":
                    return dict(r, status=f"seed {r.get('status')}")
            finally:
                seed.kill()
            variant.setup(src.qmp)
            src.qmp.cmd("migrate-set-parameters", **COMMON_PARAMS)
            return migrate(src, dst, f"tcp:{ADDR_DST}:{port}", args.timeout)
        finally:
            src.kill()
    finally:
        dst.kill()


def figures(r):
    total = r.get("total-time", 0)
    xfer = r.get("ram", {}).get("transferred", 0)
    return {
        "status": r.get("status"),
        "total_ms": total,
        "downtime_ms": r.get("downtime"),
        "transferred": xfer,
        "bytes_per_s": xfer / (total / 1000) if total else 0,
        "passes": r.get("ram", {}).get("dirty-sync-count"),
        "error": r.get("error-desc"),
    }


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--livemig", default=os.path.join(HERE, "..", "target", "release", "livemig"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--ram", type=size, default=size("512M"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--links", default="none,10gbit,1gbit,1gbit:htb",
                    help="comma-separated RATE[:tbf|htb]; none = unshaped veth")
    ap.add_argument("--hot", action="store_true",
                    help="add livemig rows: a hot guest over 1gbit with/without auto-converge")
    ap.add_argument("--hot-set", type=size, default=size("256M"))
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--hot-timeout", type=float, default=60.0,
                    help="how long a hot-guest migration may run before it is cancelled")
    ap.add_argument("--verify", action="store_true",
                    help="check the livemig destination's RAM page by page")
    ap.add_argument("--variants", default="plain",
                    help="comma-separated: plain, multifd:N, tls, tls+multifd:N, psk, "
                         "psk+multifd:N, zstd:N")
    ap.add_argument("--compressible", action="store_true",
                    help="compressible guest RAM on both (livemig's migrated in from QEMU)")
    ap.add_argument("--mem-prealloc", action="store_true",
                    help="start livemig's destinations with -mem-prealloc")
    ap.add_argument("--json", help="also write every run here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("sidebyside: needs root (ip netns, tc)")
    for tool in (args.livemig, args.qemu):
        if not shutil.which(tool):
            sys.exit(f"sidebyside: {tool} not found (cargo build --release -p livemig?)")
    args.livemig = os.path.abspath(shutil.which(args.livemig))

    work = tempfile.mkdtemp(prefix="sidebyside-", dir="/dev/shm")
    fill_file = os.path.join(work, "fill.bin")
    with open(fill_file, "wb") as f:
        if args.compressible:
            page = bytes((i * 7 + 1) % 255 + 1 for i in range(4096))
            for _ in range(args.ram >> 20):
                f.write(page * 256)
        else:
            # Random bytes, as livemig's fill pages are pseudo-random: the same
            # (incompressible) work for both, and no page is zero.
            for _ in range(args.ram >> 20):
                f.write(os.urandom(1 << 20))
    pki = make_pki(work) if "tls" in args.variants or "psk" in args.variants else None
    variants = [Variant(v, pki) for v in args.variants.split(",")]
    rows, every = [], []
    port = 4700
    try:
        for link in args.links.split(","):
            rate, _, qdisc = link.partition(":")
            qdisc = qdisc or "tbf"
            bed_up(rate, qdisc)
            # A few seconds' worth at the slowest rate, so the ramp-up weighs little.
            cap = tcp_capacity(max(args.ram, 512 << 20) if rate != "none" else 2 << 30)
            label = "unshaped veth" if rate == "none" else f"{rate} {qdisc}"
            print(f"== {label}: one TCP stream carries {cap / 1e6:.0f} MB/s", flush=True)
            res = {(v.name, impl): [] for v in variants for impl in ("qemu", "livemig")}
            # Round by round, every variant of both implementations, so all rows of a link
            # see the same load.
            for i in range(args.runs):
                for v in variants:
                    order = ["qemu", "livemig"] if i % 2 == 0 else ["livemig", "qemu"]
                    for impl in order:
                        port += 1
                        if impl == "qemu":
                            r = qemu_run(args, work, port, fill_file, v)
                        elif args.compressible:
                            r = livemig_seeded_run(args, work, port, fill_file, v)
                        else:
                            r = livemig_run(args, work, port, variant=v)
                        fg = figures(r)
                        if args.compressible and fg["total_ms"]:
                            fg["bytes_per_s"] = args.ram / (fg["total_ms"] / 1000)
                        res[(v.name, impl)].append(fg)
                        every.append(dict(fg, link=label, variant=v.name, impl=impl, run=i + 1))
                        print(f"  run {i + 1} {v.name:14} {impl:8} {fg['status']:10} total"
                              f" {fg['total_ms']:6} ms  downtime {fg['downtime_ms']} ms"
                              f"  {fg['bytes_per_s'] / 1e6:7.0f} MB/s  passes {fg['passes']}"
                              + (f"  error: {fg['error']}" if fg["error"] else ""),
                              flush=True)
            for v in variants:
                row = {"link": label, "variant": v.name, "tcp": cap}
                for impl in ("qemu", "livemig"):
                    runs = res[(v.name, impl)]
                    ok = [f for f in runs if f["status"] == "completed"]
                    row[impl] = {
                        "ok": len(ok), "runs": len(runs),
                        "total_ms": med([f["total_ms"] for f in ok]),
                        "downtime_ms": med([f["downtime_ms"] for f in ok]),
                        "bytes_per_s": med([f["bytes_per_s"] for f in ok]),
                    }
                rows.append(row)
        if args.hot:
            bed_up("1gbit", "tbf")
            label = "1gbit tbf"
            hot = args.hot_set >> 20
            workload = f"fill={hot}M,hot={hot}M"
            for caps in ((), ("auto-converge",)):
                port += 1
                seen = []

                def poll(r):
                    t = r.get("cpu-throttle-percentage")
                    if t and (not seen or seen[-1] != t):
                        seen.append(t)
                r = livemig_run(args, work, port, workload=workload, caps=caps, poll=poll,
                                timeout=args.hot_timeout)
                fg = figures(r)
                name = "livemig hot " + ("auto-converge" if caps else "plain")
                every.append(dict(fg, link=label, impl=name, throttle=seen))
                print(f"== {label}, {hot} MiB hot set, {name}: {fg['status']}, total"
                      f" {fg['total_ms']} ms, downtime {fg['downtime_ms']} ms, passes"
                      f" {fg['passes']}, throttle {seen}", flush=True)
    finally:
        bed_down()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"idle guest, {args.ram >> 20} MiB of data, medians of {args.runs} runs" +
          (", compressible RAM, MB/s = RAM / total time" if args.compressible else ""))
    print("| link | variant | TCP stream | QEMU total | QEMU downtime | QEMU MB/s |"
          " livemig total | livemig downtime | livemig MB/s | livemig/QEMU throughput |"
          " livemig % of TCP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        q, lm = row["qemu"], row["livemig"]
        ratio = lm["bytes_per_s"] / q["bytes_per_s"] if q["bytes_per_s"] else float("nan")
        print(f"| {row['link']} | {row['variant']} | {row['tcp'] / 1e6:.0f} MB/s |"
              f" {q['total_ms']:.0f} ms |"
              f" {q['downtime_ms']:.0f} ms | {q['bytes_per_s'] / 1e6:.0f} |"
              f" {lm['total_ms']:.0f} ms | {lm['downtime_ms']:.0f} ms |"
              f" {lm['bytes_per_s'] / 1e6:.0f} | {ratio:.2f} |"
              f" {100 * lm['bytes_per_s'] / row['tcp']:.0f} % |"
              + ("" if q["ok"] == q["runs"] and lm["ok"] == lm["runs"] else
                 f" (completed: QEMU {q['ok']}/{q['runs']}, livemig {lm['ok']}/{lm['runs']})"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "runs": every}, f, indent=1)


if __name__ == "__main__":
    main()
