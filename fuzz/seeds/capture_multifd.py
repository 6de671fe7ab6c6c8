#!/usr/bin/env python3
"""Records the multifd channels of a real precopy migration, as seeds for the `multifd` fuzz
target.

    capture_multifd.py SRC DST OUT [--channels N] [--compression none|zlib|zstd] [--step STEP]

SRC and DST are `qemu` (QEMU 7.2's qemu-system-x86_64) or the path of a `livemig` binary. Both
run `-M none -m 1M`. A QEMU source's RAM is a memory-backend-file with a non-zero page every
STEP bytes (`--step`, default 0x5000): multifd carries only those, zero pages stay on the main
stream. A livemig source's `-M none` RAM is all zero: its channels carry the handshake and the
sync packets. The destination listens on a unix socket; the
source migrates with capability `multifd`, `multifd-channels` N and `multifd-compression` to
a recording relay in front of it, which forwards both ways and keeps what the source sent on
each connection. OUT is the harness's input (`fuzz_harness::multifd`): the configuration byte,
then the bytes of every connection but the first (the main channel), separated by `MFDC`.
"""
import argparse, os, tempfile

from capture import Relay, quit_all, start as start_vm, wait_ended

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("out")
ap.add_argument("--channels", type=int, default=2)
ap.add_argument("--compression", choices=["none", "zlib", "zstd"], default="none")
ap.add_argument("--step", type=lambda v: int(v, 0), default=0x5000)
a = ap.parse_args()
out = os.path.abspath(a.out)
d = tempfile.mkdtemp(prefix="capture-mfd-")


def start(which, name, extra):
    sock = f"{d}/{name}.qmp"
    if which == "qemu":
        args = ["qemu-system-x86_64", "-M", "none", "-m", "1M", "-nodefaults", "-display",
                "none", "-accel", "tcg"]
        if name == "src":
            with open(f"{d}/ramfile", "wb") as f:
                f.truncate(1 << 20)
                for off in range(0, 1 << 20, a.step):
                    f.seek(off); f.write(bytes([0x5a, off >> 12 & 0xff, 3, 4]) * 16)
            args[2] = "none,memory-backend=ram"
            args += ["-object", f"memory-backend-file,id=ram,size=1M,mem-path={d}/ramfile,share=off"]
    else:
        args = [which, "vm", "-M", "none", "-m", "1M", "-name", name]
    args += ["-qmp", f"unix:{sock},server=on,wait=off"] + extra
    return start_vm(args, sock, name)


caps = [{"capability": "multifd", "state": True}]
params = {"multifd-channels": a.channels, "multifd-compression": a.compression}
dp, dcmd = start(a.dst, "dst", ["-incoming", "defer"])
sp, scmd = start(a.src, "src", [])
for cmd in (dcmd, scmd):
    cmd("migrate-set-capabilities", capabilities=caps)
    cmd("migrate-set-parameters", **params)
dst_sock = f"{d}/dst.sock"
dcmd("migrate-incoming", uri=f"unix:{dst_sock}")

relay = Relay(f"{d}/relay.sock", dst_sock, 16)
scmd("migrate", uri=f"unix:{relay.path}")
st, dst = wait_ended(scmd, dcmd)
print(out, "source", st.get("status"), "destination", dst.get("status"), dst.get("error-desc", ""))
channels = [b"".join(k) for k in relay.sent[1:]]
cfg = {"none": 0, "zlib": 1, "zstd": 2}[a.compression] | (max(1, min(len(channels), 4)) - 1) << 2
data = bytes([cfg]) + b"MFDC".join(channels)
for i, c in enumerate(channels):
    if b"MFDC" in c:
        raise SystemExit(f"channel {i} contains the separator: pick other pages")
with open(out, "wb") as f:
    f.write(data)
quit_all((sp, scmd), (dp, dcmd))
