#!/usr/bin/env python3
"""Return-path inputs a `-M none` capture cannot produce (its destination has no vCPU to fault
on a page, and is never recovered): page requests, a recovery's received maps, and messages a
source must refuse, written as QEMU 7.2's destination writes them (`migrate_send_rp_*`).

    return_path_seeds.py OUTDIR

The block names and sizes are the harness's (`fuzz_harness::return_path::BLOCKS`): `ram` of
256 pages (QEMU's `-M none -m 1M`) and `rom` of 16.
"""
import os, struct, sys

out = sys.argv[1]


def msg(ty, body=b""):
    return struct.pack(">HH", ty, len(body)) + body


def shut(v): return msg(1, struct.pack(">I", v))
def pong(v): return msg(2, struct.pack(">I", v))
def req_id(block, start, n): return msg(3, struct.pack(">QIB", start, n, len(block)) + block)
def req(start, n): return msg(4, struct.pack(">QI", start, n))
def recv_bitmap(block): return msg(5, bytes([len(block)]) + block)
def resume_ack(v): return msg(6, struct.pack(">I", v))


def dump(pages, received):
    """A received map: be64 size, little-endian words (one bit per page), be64 end mark."""
    size = -(-pages // 8)
    size += -size % 8
    bits = bytearray(size)
    for p in received:
        bits[p // 8] |= 1 << (p % 8)
    return struct.pack(">Q", size) + bytes(bits) + struct.pack(">Q", 0x0123456789ABCDEF)


seeds = {
    # What a faulting destination sends in postcopy: the first request names its block, the
    # next ones in the same block do not (QEMU's `migrate_send_rp_req_pages`); one request for
    # a page precopy sent already, one for the other block; then the verdict.
    "postcopy-requests.rp": pong(1) + pong(2) + req_id(b"ram", 0x10000, 0x2000)
    + req(0x20000, 0x1000) + req(0x21000, 0x1000) + req_id(b"rom", 0x3000, 0x1000)
    + req_id(b"ram", 0x0, 0x1000) + req(0xff000, 0x1000) + pong(4) + pong(3) + shut(0),
    # A postcopy recovery (`migrate_send_rp_recv_bitmap`, `migrate_send_rp_resume_ack`): each
    # block's received map, RESUME_ACK, then the faults that waited are asked for again.
    "recovery.rp": recv_bitmap(b"ram") + dump(256, list(range(0, 200)) + [255])
    + recv_bitmap(b"rom") + dump(16, [0, 1, 2]) + resume_ack(1)
    + req_id(b"ram", 0xc8000, 0x1000) + req(0xc9000, 0x4000) + shut(0),
    # A request for a block the source does not have: the source fails the migration.
    "request-unknown-block.rp": pong(1) + req_id(b"pc.ram", 0, 0x1000) + shut(0),
    # A request past the end of the block and a misaligned one.
    "request-overrun.rp": req_id(b"ram", 0xff000, 0x2000) + shut(0),
    "request-misaligned.rp": req_id(b"ram", 0x800, 0x1000) + shut(0),
    # A received map of the wrong size, and one whose end mark is wrong.
    "recovery-bad-size.rp": recv_bitmap(b"ram") + dump(128, [1]) + resume_ack(1),
    "recovery-bad-end.rp": recv_bitmap(b"rom") + dump(16, [1])[:-1] + b"\0" + resume_ack(1),
    # The destination failed to load (SHUT 1), and a destination that speaks TLS (an alert).
    "shut-failed.rp": pong(0x80000000) + shut(1),
    "tls-alert.rp": bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
}
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
