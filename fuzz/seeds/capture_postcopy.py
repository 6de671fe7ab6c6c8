#!/usr/bin/env python3
"""Records the channels of a real postcopy migration, as seeds for the `postcopy` fuzz target.

    capture_postcopy.py SRC DST OUT [--mode ram|bitmaps] [--bitmaps SPEC] [--preempt] [--pages]
                        [--return-path RP] [--machine none|livemig]

SRC and DST are `qemu` (QEMU 7.2's qemu-system-x86_64) or the path of a `livemig` binary. Both
run `-M none -m 1M` with a null-co node `node0` of 64 MiB (the destination the harness builds).
The destination listens on a unix socket (`-incoming defer`, then `migrate-incoming`); the
source migrates to a recording relay in front of it, which forwards both ways and keeps what
the source sent on each connection: the main channel, and with --preempt the
`postcopy-preempt` channel.

--mode ram turns `postcopy-ram` on at both ends (with `dirty-bitmaps` when SPEC names any
bitmap); --mode bitmaps is bitmap-only postcopy (`dirty-bitmaps` alone). SPEC is a
comma-separated list of NAME:GRANULARITY[:disabled] bitmaps added on the source's node0 (default
`bitmap0:65536`), each with a few writes through qemu-io. --pages (QEMU source only) gives the
source's RAM three non-zero pages (a memory-backend-file, as capture_qemu.py).

The source runs at `max-bandwidth` 1000 B/s and `downtime-limit` 1 ms, so precopy cannot
converge, and `migrate-start-postcopy` switches as soon as the migration is active; after the
switch, postcopy's bandwidth is unlimited. OUT is the main channel's bytes; with --preempt the
file is the main channel, then the preempt channel's bytes, then their length as a
little-endian u32 and `PRMT` (the harness's input format, `fuzz_harness::postcopy`). The
VMs are started and their bitmaps made through `capture.py`.

--return-path RP also keeps what the destination sent back on the main channel (the
`return_path` fuzz target's input). --machine livemig (livemig at both ends) runs `-M livemig`
guests, whose vCPUs fault on pages postcopy has not sent yet: the return path then carries
real page requests.
"""
import argparse, os, struct, tempfile, time

from capture import Relay, dirty_bitmaps, quit_all, start as start_vm, wait_ended

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("out")
ap.add_argument("--mode", choices=["ram", "bitmaps"], default="ram")
ap.add_argument("--bitmaps", default="bitmap0:65536")
ap.add_argument("--preempt", action="store_true")
ap.add_argument("--pages", action="store_true")
ap.add_argument("--return-path")
ap.add_argument("--machine", choices=["none", "livemig"], default="none")
a = ap.parse_args()
out = os.path.abspath(a.out)
d = tempfile.mkdtemp(prefix="capture-pc-")


def start(which, name, extra):
    sock = f"{d}/{name}.qmp"
    if which == "qemu":
        args = ["qemu-system-x86_64", "-M", "none", "-m", "1M", "-nodefaults", "-display",
                "none", "-accel", "tcg"]
        if a.pages and name == "src":
            with open(f"{d}/ramfile", "wb") as f:
                f.truncate(1 << 20)
                for off, val in [(0x3000, b"\x5a" * 4), (0x4000, b"\x01\x02\x03\x04"),
                                 (0xff000, b"\xff" * 4)]:
                    f.seek(off); f.write(val)
            args[2] = "none,memory-backend=ram"
            args += ["-object", f"memory-backend-file,id=ram,size=1M,mem-path={d}/ramfile,share=off"]
    else:
        args = [which, "vm", "-M", a.machine, "-m", "1M", "-name", name]
    args += ["-blockdev", "driver=null-co,node-name=node0,size=67108864",
             "-qmp", f"unix:{sock},server=on,wait=off"] + extra
    return start_vm(args, sock, name)


bitmaps = [s for s in a.bitmaps.split(",") if s]
caps = []
if a.mode == "ram":
    caps.append("postcopy-ram")
if bitmaps or a.mode == "bitmaps":
    caps.append("dirty-bitmaps")
if a.preempt:
    caps.append("postcopy-preempt")
caps = [{"capability": c, "state": True} for c in caps]

dp, dcmd = start(a.dst, "dst", ["-incoming", "defer"])
sp, scmd = start(a.src, "src", [])
dcmd("migrate-set-capabilities", capabilities=caps)
dst_sock = f"{d}/dst.sock"
dcmd("migrate-incoming", uri=f"unix:{dst_sock}")

# The relay: every connection the source opens is forwarded to the destination, in order
# (main first, then preempt), and what the source sends on it is kept.
relay = Relay(f"{d}/relay.sock", dst_sock, 4)

dirty_bitmaps(scmd, a.bitmaps)
scmd("migrate-set-capabilities", capabilities=caps)
scmd("migrate-set-parameters", **{"max-bandwidth": 1000, "downtime-limit": 1})
scmd("migrate", uri=f"unix:{relay.path}")
for _ in range(200):
    if scmd("query-migrate").get("status") == "active":
        break
    time.sleep(0.02)
time.sleep(0.3)
scmd("migrate-start-postcopy")
st, dst = wait_ended(scmd, dcmd)
print(out, "source", st.get("status"), "destination", dst.get("status"), dst.get("error-desc", ""))
main = relay.sent_bytes(0)
data = main
if a.preempt:
    pre = relay.sent_bytes(1)
    data = main + pre + struct.pack("<I", len(pre)) + b"PRMT"
with open(out, "wb") as f:
    f.write(data)
if a.return_path:
    with open(a.return_path, "wb") as f:
        f.write(relay.returned_bytes(0))
quit_all((sp, scmd), (dp, dcmd))
