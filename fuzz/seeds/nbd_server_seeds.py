#!/usr/bin/env python3
"""Writes client sessions for the `nbd_server` fuzz target that no recorded client produces:
option paths QEMU's tools never take, and requests they never send.

    nbd_server_seeds.py OUTDIR

Each file is what a client sends to the harness's servers (`fuzz_harness::nbd_server`: exports
`node0`, writable, bitmap `b0`, and `ro`, read-only, bitmap `b1`, both 1 MiB; and a server with
TLS configured, which refuses everything before STARTTLS).
"""
import os, struct, sys

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED, LIST_META, SET_META = 1, 2, 3, 5, 6, 7, 8, 9, 10
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f=3):
    return struct.pack(">I", f)


def option(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def string(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(s)) + s


def info(name, *reqs):
    return string(name) + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(name, *queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


handle = [0]


def req(kind, off=0, ln=0, cflags=0, payload=b""):
    handle[0] += 1
    return struct.pack(">IHHQQI", REQ, cflags, kind, handle[0], off, ln) + payload


def go(name="node0"):
    return option(GO, info(name, 3))


seeds = {
    # Old-style EXPORT_NAME, with and without the 124 zero bytes, simple replies.
    "export-name-zeroes": flags(1) + option(EXPORT_NAME, b"node0") + req(READ, 0, 512)
    + req(WRITE, 4096, 8, payload=b"ABCDEFGH") + req(READ, 4090, 20) + req(DISC),
    "export-name-no-fixed-newstyle": flags(0) + option(EXPORT_NAME, b"ro") + req(READ, 1 << 19, 4096)
    + req(WRITE, 0, 4, payload=b"nope") + req(DISC),
    "export-name-unknown": flags(3) + option(EXPORT_NAME, b"nothing"),
    "no-fixed-newstyle-go": flags(0) + go(),
    "bad-client-flags": flags(0x80000003),
    # Options in every form, then ABORT.
    "options-then-abort": flags(3) + option(LIST) + option(LIST, b"x") + option(STARTTLS)
    + option(STARTTLS, b"x") + option(99, b"what") + option(4)
    + option(INFO, info("node0", 0, 1, 2, 3)) + option(INFO, info("ro", 2))
    + option(INFO, info("nothing")) + option(INFO, b"\0\0\0\x05node0\0\x01\0")
    + option(INFO, b"\0\0\xff\xffnode0") + option(LIST_META, meta("node0", "base:"))
    + option(STRUCTURED) + option(STRUCTURED) + option(STRUCTURED, b"x")
    + option(LIST_META, meta("node0")) + option(LIST_META, meta("ro", "qemu:", "base:allocation"))
    + option(LIST_META, meta("node0", "qemu:dirty-bitmap:")) + option(LIST_META, meta("nothing"))
    + option(SET_META, meta("node0", "qemu:dirty-bitmap:nope")) + option(SET_META, b"\0\0")
    + option(ABORT),
    "option-too-long": flags(3) + struct.pack(">QII", IHAVEOPT, LIST, 0x10001),
    "option-bad-magic": flags(3) + option(STRUCTURED) + struct.pack(">QII", 0x1234, LIST, 0),
    # Both contexts on node0, every command, bad flags, out of bounds, an unknown type.
    "structured-both-contexts": flags(3) + option(STRUCTURED)
    + option(SET_META, meta("node0", "base:allocation", "qemu:dirty-bitmap:b0")) + go()
    + req(STATUS, 0, 1 << 20) + req(STATUS, 300 << 10, 100 << 10, REQ_ONE)
    + req(WRITE, 200 << 10, 16, FUA, b"x" * 16) + req(STATUS, 0, 1 << 20)
    + req(READ, 0, 8192, DF) + req(READ, 8192, 0) + req(ZEROES, 64 << 10, 4096, NO_HOLE)
    + req(ZEROES, 0, 512, FAST_ZERO) + req(TRIM, 900 << 10, 64 << 10) + req(STATUS, 0, 1 << 20)
    + req(CACHE, 0, 1 << 20) + req(FLUSH) + req(READ, (1 << 20) - 1, 2) + req(WRITE, 1 << 20, 1, 0, b"z")
    + req(READ, 0, 16, 0x100) + req(42, 0, 0) + req(STATUS, 0, 0) + req(READ, 2**64 - 512, 1024)
    + req(WRITE, 0, (32 << 20) + 1) ,
    "bitmap-on-ro": flags(3) + option(STRUCTURED)
    + option(SET_META, meta("ro", "qemu:dirty-bitmap:b1")) + go("ro")
    + req(STATUS, 0, 1 << 20) + req(STATUS, 4096, 4096, REQ_ONE) + req(TRIM, 0, 4096)
    + req(ZEROES, 0, 4096) + req(WRITE, 0, 2, 0, b"no") + req(DISC),
    "contexts-of-another-export": flags(3) + option(STRUCTURED)
    + option(SET_META, meta("ro", "base:allocation")) + go("node0") + req(STATUS, 0, 4096) + req(DISC),
    "simple-status": flags(3) + option(SET_META, meta("node0", "base:allocation")) + go()
    + req(STATUS, 0, 4096) + req(READ, 0, 16, DF) + req(DISC),
    "write-payload-cut": flags(3) + go() + req(WRITE, 0, 4096, 0, b"short"),
    "request-bad-magic": flags(3) + go() + req(FLUSH) + b"\0" * 28,
    # What the harness's server with TLS configured refuses before STARTTLS, then ABORT.
    "before-tls-abort": flags(3) + go() + option(STRUCTURED) + option(LIST) + option(ABORT),
}

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(f"{out}/{name}.nbd", "wb") as f:
        f.write(data)
    print(f"{name}.nbd", len(data))
