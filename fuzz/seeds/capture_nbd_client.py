#!/usr/bin/env python3
"""Records what a real NBD server (QEMU 7.2's qemu-nbd) sends to a client that asks what
livemig's client asks, as seeds for the `nbd_client` fuzz target.

    capture_nbd_client.py OUT [--meta base:allocation|qemu:dirty-bitmap:b0] [--read-only]

qemu-nbd exports a 1 MiB qcow2 image (a few clusters written, a bitmap `b0` that recorded one
of the writes) as `node0` on a unix socket. The script speaks as `nbd::NbdClient` does, byte for
byte (`fuzz_harness::nbd_client` drives it against the recording): client flags,
STRUCTURED_REPLY, SET_META_CONTEXT with --meta, GO with a BLOCK_SIZE info request; then the
harness's requests in its order and with its handles from 1 — read 4 KiB at 0, read 12 KiB at
4 KiB, block status over the first MiB (with --meta), write 512 bytes at 0, write-zeroes and
trim of 8 KiB (when the export has them), flush (when it has it), DISC — skipping the writes
on a read-only export as the client does. OUT is the option byte of the harness's input and
everything the server sent.
"""
import argparse, os, socket, struct, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--meta")
ap.add_argument("--read-only", action="store_true")
a = ap.parse_args()
d = tempfile.mkdtemp(prefix="capture-nbd-")
img = f"{d}/img.qcow2"
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", img], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["qemu-img", "bitmap", "--add", img, "b0"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 4k", img], check=True, stdout=subprocess.DEVNULL)
sock = f"{d}/nbd.sock"
args = ["qemu-nbd", "-f", "qcow2", "-x", "node0", "-k", sock, "-B", "b0"]
if a.read_only:
    args.append("-r")
srv = subprocess.Popen(args + [img])
for _ in range(100):
    if os.path.exists(sock):
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
got = bytearray()


def recv_exact(n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed")
        b += c
    got.extend(b)
    return bytes(b)


def option(o, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)


def option_replies(o):
    """Reads replies to option o until a final one; returns [(type, data)]."""
    out = []
    while True:
        magic, opt_, kind, ln = struct.unpack(">QIII", recv_exact(20))
        data = recv_exact(ln)
        out.append((kind, data))
        if kind == 1 or kind & 0x80000000:
            return out


recv_exact(18)  # NBDMAGIC, IHAVEOPT, flags
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
option(8)
option_replies(8)
name = b"node0"
if a.meta:
    m = a.meta.encode()
    option(10, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(m)) + m)
    option_replies(10)
option(7, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
size = flags = 0
for kind, data in option_replies(7):
    if kind == 3 and struct.unpack(">H", data[:2])[0] == 0:
        size, flags = struct.unpack(">QH", data[2:12])
handle = 1


def request(kind, off, ln, payload=b"", cflags=0):
    global handle
    s.sendall(struct.pack(">IHHQQI", 0x25609513, cflags, kind, handle, off, ln) + payload)
    handle += 1


def reply(read_len=0):
    magic = struct.unpack(">I", recv_exact(4))[0]
    if magic == 0x67446698:
        err = struct.unpack(">IQ", recv_exact(12))[0]
        if not err and read_len:
            recv_exact(read_len)
        return
    while True:
        fl, kind, h, ln = struct.unpack(">HHQI", recv_exact(16))
        recv_exact(ln)
        if fl & 1:
            return
        recv_exact(4)  # the next chunk's magic


request(0, 0, 4096); reply(4096)
request(0, 4096, 12288); reply(12288)
if a.meta:
    request(7, 0, min(size, 1 << 20)); reply()
if not flags & 2:
    request(1, 0, 512, b"\x5a" * 512); reply()
    if flags & (1 << 6):
        request(6, 0, 8192); reply()
    if flags & (1 << 5):
        request(4, 0, 8192); reply()
if flags & (1 << 2):
    request(3, 0, 0); reply()
request(2, 0, 0)
s.close()
srv.wait(timeout=10)
cfg = (1 if a.meta else 0) | (2 if a.meta and a.meta.startswith("qemu:dirty-bitmap") else 0)
with open(a.out, "wb") as f:
    f.write(bytes([cfg]) + bytes(got))
print(a.out, len(got), "bytes from the server, export size", size, "flags", hex(flags))
