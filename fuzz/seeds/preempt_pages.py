#!/usr/bin/env python3
"""Gives a recorded postcopy seed a preempt channel that carries pages, as a seed for the
`postcopy` fuzz target.

    preempt_pages.py IN OUT

IN is a capture_postcopy.py --preempt recording of `-M none -m 1M` (its preempt channel is only
the EOS: with no vCPU on the destination nothing faults, so no page is requested). OUT keeps
the main channel and replaces the preempt channel with what a source sends there when pages
are requested (QEMU 7.2's `ram_save_host_page` on the preempt channel, livemig's
`PreemptSender`): a page of data at 0x10000 naming block `ram`, a ZERO record (fill 0) at
0x11000 and a ZERO record with a non-zero fill at 0x12000 continuing it, then EOS. The same
pages come on the main channel too, so either channel may place them first.
"""
import struct, sys

PAGE, ZERO, EOS, CONTINUE = 0x08, 0x02, 0x10, 0x20
src, dst = sys.argv[1], sys.argv[2]
d = open(src, "rb").read()
assert d.endswith(b"PRMT"), "not a recording with a preempt channel"
n = struct.unpack("<I", d[-8:-4])[0]
main = d[:-8 - n]
pre = struct.pack(">Q", 0x10000 | PAGE) + bytes([3]) + b"ram" + bytes(range(256)) * 16
pre += struct.pack(">Q", 0x11000 | ZERO | CONTINUE) + b"\x00"
pre += struct.pack(">Q", 0x12000 | ZERO | CONTINUE) + b"\x5a"
pre += struct.pack(">Q", EOS)
open(dst, "wb").write(main + pre + struct.pack("<I", len(pre)) + b"PRMT")
