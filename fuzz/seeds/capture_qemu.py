#!/usr/bin/env python3
"""Writes a QEMU 7.2 migration stream to a file, as a seed for the fuzz corpora.

    capture_qemu.py OUT [--pages] [--bitmaps SPEC]

QEMU runs `-M none -m 1M -accel tcg` with a null-co node `node0` of 64 MiB (the destination
the stream_loader harness builds), capability `dirty-bitmaps`, and migrates to
`exec:cat > OUT` at max-bandwidth 100000. SPEC is a comma-separated list of NAME:GRANULARITY[:disabled] bitmaps to
add on node0 (default `bitmap0:65536`); each gets a few writes through qemu-io first. With
--pages, RAM is a memory-backend-file with three non-zero pages.
"""
import argparse, os, tempfile

import capture

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--pages", action="store_true")
ap.add_argument("--bitmaps", default="bitmap0:65536")
a = ap.parse_args()
out = os.path.abspath(a.out)
d = tempfile.mkdtemp(prefix="capture-")
sock = f"{d}/q.sock"
args = ["qemu-system-x86_64", "-M", "none", "-m", "1M", "-nodefaults", "-display", "none",
        "-accel", "tcg", "-blockdev", "driver=null-co,node-name=node0,size=67108864",
        "-qmp", f"unix:{sock},server=on,wait=off"]
if a.pages:
    with open(f"{d}/ramfile", "wb") as f:
        f.truncate(1 << 20)
        for off, val in [(0x3000, b"\x5a" * 4), (0x4000, b"\x01\x02\x03\x04"), (0xff000, b"\xff" * 4)]:
            f.seek(off); f.write(val)
    args[2] = "none,memory-backend=ram"
    args += ["-object", f"memory-backend-file,id=ram,size=1M,mem-path={d}/ramfile,share=off"]
p, cmd = capture.start(args, sock, "QEMU")
capture.dirty_bitmaps(cmd, a.bitmaps)
caps = [{"capability": "dirty-bitmaps", "state": True}]
cmd("migrate-set-capabilities", capabilities=caps)
# With dirty bitmaps QEMU sends empty PART sections until it decides to switch over; a low
# bandwidth keeps them to a few hundred (unlimited, or a long downtime limit, gives 20000).
cmd("migrate-set-parameters", **{"max-bandwidth": 100000})
capture.migrate_to(cmd, out)
cmd("quit"); p.wait()
