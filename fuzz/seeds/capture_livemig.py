#!/usr/bin/env python3
"""Writes a livemig migration stream to a file, as a seed for the fuzz corpora.

    capture_livemig.py LIVEMIG OUT [--machine none|livemig] [--bitmaps SPEC] [--workload W]

Runs `LIVEMIG vm -M MACHINE -m 1M` with a null-co node `node0` of 64 MiB (the destination the
stream_loader harness builds), capability `dirty-bitmaps`, and migrates to `exec:cat > OUT`.
SPEC is a comma-separated list of NAME:GRANULARITY[:disabled] bitmaps to add on node0
(default `bitmap0:65536`); each gets a few writes through qemu-io first. With -M livemig the
workload (default `fill=8192,hot=4096,dirty-rate=200,disk=node0,disk-every=4,seed=7`) runs
for half a second before the migration.
"""
import argparse, json, os, tempfile, time

import capture

ap = argparse.ArgumentParser()
ap.add_argument("livemig")
ap.add_argument("out")
ap.add_argument("--machine", default="none")
ap.add_argument("--bitmaps", default="bitmap0:65536")
ap.add_argument("--workload", default="fill=8192,hot=4096,dirty-rate=200,disk=node0,disk-every=4,seed=7")
a = ap.parse_args()
out = os.path.abspath(a.out)
d = tempfile.mkdtemp(prefix="capture-")
sock = f"{d}/q.sock"
args = [a.livemig, "vm", "-M", a.machine, "-m", "1M", "-name", "seed",
        "-blockdev", "driver=null-co,node-name=node0,size=67108864",
        "-qmp", f"unix:{sock},server=on,wait=off"]
if a.machine == "livemig":
    args += ["-smp", "1", "-workload", a.workload]
p, cmd = capture.start(args, sock, "livemig")
capture.dirty_bitmaps(cmd, a.bitmaps)
cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-bitmaps", "state": True}])
if a.machine == "livemig":
    time.sleep(0.5)
capture.migrate_to(cmd, out)
try:
    cmd("quit")
except (SystemExit, json.JSONDecodeError, OSError):
    pass
p.wait()
