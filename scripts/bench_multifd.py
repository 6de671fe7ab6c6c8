#!/usr/bin/env python3
"""Multifd side by side: livemig and QEMU 7.2 on the same work, in one batch, interleaved.

Each round runs, for every channel count asked for (0 = one stream, no multifd):
  - `livemig bench --ram SIZE --runs 1 --json [--multifd N]`: a livemig source whose guest
    filled all its RAM with (incompressible) pages and idles, migrated into a livemig
    destination over loopback;
  - QEMU 7.2 `-M none -m SIZE`, its RAM filled with random bytes by `-device loader`,
    migrated into a QEMU 7.2 destination the same way (capability `multifd` and
    `multifd-channels` on both ends when N > 0).
QEMU's max-bandwidth (128 MiB/s by default) is lifted, as livemig bench sets no cap.
Throughput is QEMU's definition on both: `ram.transferred` / `total-time` from the source's
`query-migrate`. Medians over the rounds; the last column is livemig / QEMU.

usage: scripts/bench_multifd.py [--ram 1G] [--rounds 3] [--channels 0,2,4]
                                [--transport tcp|unix] [--compression none|zlib|zstd]
                                [--livemig target/release/livemig]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


class Qmp:
    """A minimal QMP client over a unix socket (no events kept)."""

    def __init__(self, path):
        deadline = time.time() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']['desc']}")


def qemu(tmp, name, ram, extra):
    qmp = os.path.join(tmp, name + ".qmp")
    p = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-m", str(ram // (1 << 20)) + "M",
         "-nographic", "-display", "none", "-nodefaults",
         "-qmp", f"unix:{qmp},server=on,wait=off"] + extra,
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, name + ".log"), "w"))
    return p, Qmp(qmp)


def qemu_run(tmp, fill, ram, channels, transport, compression):
    caps = [{"capability": "multifd", "state": channels > 0}]
    params = {"multifd-channels": max(channels, 1), "multifd-compression": compression}
    incoming = ("tcp:127.0.0.1:0" if transport == "tcp"
                else "unix:" + os.path.join(tmp, "q.sock"))
    dst, dq = qemu(tmp, "qdst", ram, ["-incoming", incoming])
    src, sq = qemu(tmp, "qsrc", ram,
                   ["-device", f"loader,file={fill},addr=0,force-raw=on"])
    try:
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **params)
        # QEMU's default max-bandwidth is 128 MiB/s; livemig bench sets no cap. Lift it.
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        uri = incoming
        if transport == "tcp":
            port = dq.cmd("query-migrate")["socket-address"][0]["port"]
            uri = f"tcp:127.0.0.1:{port}"
        sq.cmd("migrate", uri=uri)
        while True:
            st = sq.cmd("query-migrate")
            if st["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if st["status"] != "completed":
            raise RuntimeError(f"QEMU migration {st['status']}: {st}")
        total = st["total-time"]
        return {"total-ms": total, "downtime-ms": st.get("downtime", 0),
                "throughput": st["ram"]["transferred"] / (total / 1000)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def livemig_run(binary, ram, channels, transport, compression):
    cmd = [binary, "bench", "--ram", str(ram // (1 << 20)) + "M", "--runs", "1", "--json",
           "--transport", transport]
    if channels > 0:
        cmd += ["--multifd", str(channels), "--multifd-compression", compression]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    run = json.loads(out.splitlines()[0])
    return {"total-ms": run["total-ms"], "downtime-ms": run["downtime-ms"],
            "throughput": run["throughput-bytes-per-s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", default="0,2,4")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "unix"])
    ap.add_argument("--compression", default="none", choices=["none", "zlib", "zstd"])
    ap.add_argument("--livemig", default="target/release/livemig")
    a = ap.parse_args()
    ram = size(a.ram)
    counts = [int(c) for c in a.channels.split(",")]
    results = {(who, n): [] for who in ("livemig", "qemu") for n in counts}
    # The fill lives in /dev/shm when there is one: RAM, not the (tight) disk.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        fill = os.path.join(tmp, "fill.bin")
        with open(fill, "wb") as f:
            for _ in range(ram // (1 << 20)):
                f.write(os.urandom(1 << 20))
        for r in range(a.rounds):
            for n in counts:
                lm = livemig_run(a.livemig, ram, n, a.transport, a.compression)
                q = qemu_run(tmp, fill, ram, n, a.transport, a.compression)
                results[("livemig", n)].append(lm)
                results[("qemu", n)].append(q)
                print(f"round {r + 1} channels {n}: livemig {lm['throughput'] / 1e9:.2f} GB/s "
                      f"({lm['total-ms']} ms), QEMU {q['throughput'] / 1e9:.2f} GB/s "
                      f"({q['total-ms']} ms)", file=sys.stderr)
    med = lambda who, n, k: statistics.median(x[k] for x in results[(who, n)])
    print(f"{a.ram} idle guest, {a.transport}, compression {a.compression}, "
          f"medians of {a.rounds}")
    print("| channels | livemig total ms | livemig GB/s | QEMU 7.2 total ms | QEMU 7.2 GB/s "
          "| livemig / QEMU |")
    print("|---|---|---|---|---|---|")
    for n in counts:
        lt, qt = med("livemig", n, "throughput"), med("qemu", n, "throughput")
        print(f"| {n or '1 stream'} | {med('livemig', n, 'total-ms'):.0f} | {lt / 1e9:.2f} "
              f"| {med('qemu', n, 'total-ms'):.0f} | {qt / 1e9:.2f} | {lt / qt:.2f} |")


if __name__ == "__main__":
    main()
