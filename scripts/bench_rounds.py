#!/usr/bin/env python3
"""Interleaved `livemig bench` rounds: several builds or option sets on the same work, one run
of each per round, so that every line of a round sees the same load.

Each variant is LABEL=BINARY[,EXTRA,ARGS]; every run is
`BINARY bench --ram SIZE --runs 1 --mem-prealloc --json EXTRA ARGS`. Per variant it prints the
throughput of each round and their median, and the CPU time per byte: user + system time of
the bench and its VM processes (getrusage of the children) over the bytes transferred. That
one barely moves with the machine's load, where throughput on a shared machine swings 2x; it
includes filling and preallocating the guests (~1 ns/B of a plaintext run on a 2-core EPYC).

    scripts/bench_rounds.py --rounds 7 plain=target/release/livemig \\
        tls=target/release/livemig,--tls-creds,PKI old-tls=/tmp/livemig-old,--tls-creds,PKI
"""

import argparse
import json
import os
import resource
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ram", default="512M")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("variants", nargs="+", help="LABEL=BINARY[,EXTRA,ARGS]")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    rate = {label: [] for label, _ in variants}
    cpu = {label: [] for label, _ in variants}
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        for label, spec in variants:
            binary, *extra = spec.split(",")
            cmd = [binary, "bench", "--ram", args.ram, "--runs", "1", "--mem-prealloc",
                   "--json", *extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 timeout=args.timeout).stdout
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
            runs = [l for l in lines if "run" in l]
            if not runs:
                raise SystemExit(f"{label}: no result from {' '.join(cmd)}")
            rate[label].append(runs[0]["throughput-bytes-per-s"] / 1e6)
            secs = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            cpu[label].append(secs * 1e9 / runs[0]["transferred"])
        print(f"round {r + 1} load {load:.1f}: "
              + ", ".join(f"{l} {rate[l][-1]:.0f}" for l, _ in variants), flush=True)
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    for label, _ in variants:
        print(f"{label:24} median {statistics.median(rate[label]):6.0f} MB/s "
              f"(runs {', '.join(f'{x:.0f}' for x in rate[label])}); "
              f"CPU {statistics.median(cpu[label]):.2f} ns/B "
              f"(runs {', '.join(f'{x:.2f}' for x in cpu[label])})")


if __name__ == "__main__":
    main()
