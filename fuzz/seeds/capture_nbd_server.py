#!/usr/bin/env python3
"""Records what real NBD clients (QEMU 7.2's qemu-nbd, qemu-io, qemu-img and a drive-mirror of
qemu-system-x86_64) send to livemig's NBD server, as seeds for the `nbd_server` fuzz target.

    capture_nbd_server.py LIVEMIG OUTDIR

`LIVEMIG vm -M none` exports what the harness (`fuzz_harness::nbd_server`) exports: `node0`,
a writable 1 MiB raw file with the description "fuzzed disk" and the enabled bitmap `b0`
(64 KiB granules, written at 0, 320k and 768k first), and `ro`, a read-only 1 MiB raw file with
the disabled bitmap `b1` (4 KiB granules). Every client connects through a recording relay
(capture.Relay) in front of the server's unix socket; what a client sent on one connection is
one seed, `OUTDIR/<name>.nbd`, exactly the harness's input.
"""
import argparse, json, os, subprocess, tempfile, time

import capture

ap = argparse.ArgumentParser()
ap.add_argument("livemig")
ap.add_argument("outdir")
a = ap.parse_args()
out = os.path.abspath(a.outdir)
os.makedirs(out, exist_ok=True)
d = tempfile.mkdtemp(prefix="capture-nbd-server-")
for name, fill in [("node0", 0x11), ("ro", 0x22)]:
    with open(f"{d}/{name}.raw", "wb") as f:
        f.write(bytes([fill]) * (1 << 20))
# The source of the convert and the mirror: sparse, 16 KiB of data at 0 and at 600k, so that
# the clients send write-zeroes for the rest (and the seeds stay small).
with open(f"{d}/src.raw", "wb") as f:
    f.truncate(1 << 20)
    for at in (0, 600 << 10):
        f.seek(at)
        f.write(bytes([0x44]) * (16 << 10))
sock = f"{d}/q.sock"
nbd = f"{d}/nbd.sock"
relay_sock = f"{d}/relay.sock"
p, cmd = capture.start(
    [a.livemig, "vm", "-M", "none", "-m", "1M", "-name", "nbd",
     "-blockdev", f"driver=raw,node-name=node0,file.driver=file,file.filename={d}/node0.raw",
     "-blockdev", f"driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename={d}/ro.raw",
     "-qmp", f"unix:{sock},server=on,wait=off"],
    sock, "livemig")
# b1's granules (1, 2, 100, 255 of 4 KiB) are written on node0 while a bitmap `tmp` records,
# before b0 exists; b1, on the read-only node, gets them by a merge.
qemu_io = lambda w: cmd("human-monitor-command", **{"command-line": f'qemu-io node0 "{w}"'})
cmd("block-dirty-bitmap-add", node="node0", name="tmp", granularity=4096)
for w in ["write 4k 8k", "write 400k 4k", "write 1020k 4k"]:
    qemu_io(w)
cmd("block-dirty-bitmap-add", node="node0", name="b0", granularity=65536)
cmd("block-dirty-bitmap-disable", node="node0", name="tmp")
for w in ["write 0 4k", "write 320k 4k", "write 768k 4k"]:
    qemu_io(w)
cmd("block-dirty-bitmap-add", node="ro", name="b1", granularity=4096, disabled=True)
cmd("block-dirty-bitmap-merge", node="ro", target="b1", bitmaps=[{"node": "node0", "name": "tmp"}])
cmd("block-dirty-bitmap-remove", node="node0", name="tmp")
cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
cmd("block-export-add", type="nbd", id="node0", **{"node-name": "node0"}, writable=True,
    description="fuzzed disk", bitmaps=["b0"])
cmd("block-export-add", type="nbd", id="ro", **{"node-name": "ro"}, bitmaps=["b1"])
relay = capture.Relay(relay_sock, nbd, 8)
vms = [(p, cmd)]


def uri(export):
    return f"nbd+unix:///{export}?socket={relay_sock}"


def opts(export, bitmap=None):
    o = f"driver=nbd,server.type=unix,server.path={relay_sock},export={export}"
    return o + (f",x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}" if bitmap else "")


def run(name, args):
    """Runs one client; its connection's bytes become OUTDIR/name.nbd."""
    n = len(relay.sent)
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, timeout=60)
    time.sleep(0.2)
    save(name, n)


def save(name, n):
    with open(f"{out}/{name}.nbd", "wb") as f:
        f.write(relay.sent_bytes(n))
    print(f"{name}.nbd", len(relay.sent_bytes(n)), "bytes,", len(relay.returned_bytes(n)), "back")


def captures():
    """Every client's session, one after the other."""
    run("qemu-nbd-list", ["qemu-nbd", "--list", "-k", relay_sock])
    run("qemu-io-rw", ["qemu-io", "-f", "raw", uri("node0"),
                       "-c", "read -P 0x11 128k 64k", "-c", "write -P 0x33 64k 4k",
                       "-c", "write -z 128k 64k", "-c", "write -z -u 192k 64k",
                       "-c", "discard 256k 64k", "-c", "flush", "-c", "write -f 512k 512",
                       "-c", "aio_read 0 4k 8k 12k", "-c", "read -P 0x33 64k 4k",
                       "-c", "readv 1000 100 200"])
    run("qemu-io-ro", ["qemu-io", "-r", "-f", "raw", uri("ro"), "-c", "read -P 0x22 0 1M",
                       "-c", "read 1048064 512"])
    run("qemu-img-map", ["qemu-img", "map", "--output=json", "-f", "raw", uri("node0")])
    run("qemu-img-map-dirty-bitmap-b0", ["qemu-img", "map", "--output=json", "--image-opts",
                                         opts("node0", "b0")])
    run("qemu-img-map-dirty-bitmap-b1", ["qemu-img", "map", "--output=json", "--image-opts",
                                         opts("ro", "b1")])
    run("qemu-img-info", ["qemu-img", "info", "--image-opts", opts("ro")])
    run("qemu-img-convert-to", ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                f"{d}/src.raw", uri("node0")])
    run("qemu-img-compare", ["qemu-img", "compare", "-f", "raw", "-F", "raw", f"{d}/src.raw",
                             uri("node0")])

    # drive-mirror of a QEMU 7.2 guest's 1 MiB disk to the export, as a storage migration does.
    qsock = f"{d}/qemu.sock"
    q, qcmd = capture.start(
        ["qemu-system-x86_64", "-M", "none", "-m", "1M", "-nodefaults", "-display", "none",
         "-accel", "tcg", "-qmp", f"unix:{qsock},server=on,wait=off",
         "-blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={d}/src.raw"],
        qsock, "QEMU")
    vms.insert(0, (q, qcmd))
    n = len(relay.sent)
    qcmd("drive-mirror", device="disk", **{"job-id": "mirror"}, target=uri("node0"), format="raw",
         sync="full", mode="existing", granularity=4096)
    for _ in range(200):
        jobs = qcmd("query-block-jobs")
        if jobs and jobs[0].get("ready"):
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"the mirror did not get ready: {jobs}")
    # Writes while the mirror is ready go to both sides.
    qcmd("human-monitor-command", **{"command-line": 'qemu-io disk "write -P 0x55 4k 8k"'})
    qcmd("block-job-cancel", device="mirror")
    for _ in range(200):
        if not qcmd("query-block-jobs"):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    save("qemu-drive-mirror", n)


try:
    captures()
finally:
    capture.quit_all(*vms)
