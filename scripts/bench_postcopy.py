#!/usr/bin/env python3
"""Postcopy side by side: `livemig bench --postcopy` and a QEMU 7.2 -> QEMU 7.2 postcopy of the
same size, in one batch, interleaved (the machine is shared: each round runs both).

Each round runs:
  - `livemig bench --postcopy --ram SIZE --hot HOT --vcpus 1 --runs 1 --json --accel ACCEL`:
    the guest fills its RAM, keeps rewriting its hot set, the migration switches to postcopy
    at once and the destination's vCPU pulls the pages it touches;
  - QEMU 7.2 `-M pc -accel ACCEL -m SIZE -kernel postcopy_hot_guest.elf` (one vCPU, built
    here from scripts/postcopy_hot_guest.S): the same fill, then the same 64 MiB hot set;
    once filled it migrates to a QEMU 7.2 destination with `postcopy-ram` (and
    `postcopy-blocktime` there), `migrate-start-postcopy` right after `migrate`.
QEMU's default max-bandwidth (128 MiB/s) is lifted, as livemig bench sets no cap.
Reported: total time (the source's `total-time`), downtime, postcopy requests, blocktime
(the destination's `postcopy-blocktime`; with one vCPU it is that vCPU's time waiting for
pages) and blocktime per request; for livemig also its fault -> placement latency (median,
p99), which QEMU does not report. Medians over the rounds.

usage: scripts/bench_postcopy.py [--ram 1G] [--hot 64M] [--rounds 3] [--transport tcp|unix]
                                 [--preempt] [--livemig target/release/livemig] [--accel kvm|tcg]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_multifd import Qmp, size  # noqa: E402


def build_guest(tmp):
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "postcopy_hot_guest.S")
    obj, elf = os.path.join(tmp, "g.o"), os.path.join(tmp, "g.elf")
    subprocess.run(["gcc", "-m32", "-c", src, "-o", obj], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", obj, "-o", elf],
                   check=True)
    return elf


def qemu(tmp, name, ram, accel, elf, extra):
    qmp = os.path.join(tmp, name + ".qmp")
    p = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "pc", "-accel", accel, "-m", str(ram // (1 << 20)) + "M",
         "-smp", "1", "-kernel", elf, "-display", "none", "-nodefaults",
         "-qmp", f"unix:{qmp},server=on,wait=off"] + extra,
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, name + ".log"), "w"))
    return p, Qmp(qmp)


def hmp(q, line):
    return q.cmd("human-monitor-command", **{"command-line": line})


def qemu_run(tmp, ram, accel, elf, transport, preempt):
    incoming = ("tcp:127.0.0.1:0" if transport == "tcp"
                else "unix:" + os.path.join(tmp, "q.sock"))
    src, sq = qemu(tmp, "qsrc", ram, accel, elf, [])
    dst, dq = qemu(tmp, "qdst", ram, accel, elf, ["-incoming", incoming])
    try:
        deadline = time.time() + 300
        while "0x00000001" not in hmp(sq, "xp /1wx 0x500").split(":")[-1]:
            if time.time() > deadline:
                raise RuntimeError("the QEMU guest did not finish its fill")
            time.sleep(0.2)
        extra = ["postcopy-preempt"] if preempt else []
        for q, caps in ((sq, ["postcopy-ram"] + extra),
                        (dq, ["postcopy-ram", "postcopy-blocktime"] + extra)):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": c, "state": True} for c in caps])
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        uri = incoming
        if transport == "tcp":
            port = dq.cmd("query-migrate")["socket-address"][0]["port"]
            uri = f"tcp:127.0.0.1:{port}"
        sq.cmd("migrate", uri=uri)
        sq.cmd("migrate-start-postcopy")
        while True:
            st = sq.cmd("query-migrate")
            if st["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if st["status"] != "completed":
            raise RuntimeError(f"QEMU migration {st['status']}: {st}")
        while True:
            d = dq.cmd("query-migrate")
            if d.get("status") in ("completed", "failed"):
                break
            time.sleep(0.01)
        reqs = st["ram"].get("postcopy-requests", 0)
        bt = d.get("postcopy-blocktime", 0)
        return {"total-ms": st["total-time"], "downtime-ms": st.get("downtime", 0),
                "requests": reqs, "blocktime-ms": bt,
                "blocktime-per-request-us": bt * 1000 / reqs if reqs else 0}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def livemig_run(binary, ram, hot, transport, preempt, accel):
    cmd = [binary, "bench", "--postcopy", "--ram", str(ram // (1 << 20)) + "M",
           "--hot", str(hot // (1 << 20)) + "M", "--vcpus", "1", "--runs", "1", "--json",
           "--transport", transport, "--accel", accel] + (["--preempt"] if preempt else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    run = json.loads(out.splitlines()[0])
    p = run["postcopy"]
    reqs = p["requests"]
    bt = p["blocktime-ns"] / 1e6
    return {"total-ms": run["total-ms"], "downtime-ms": run["downtime-ms"],
            "requests": reqs, "blocktime-ms": bt,
            "blocktime-per-request-us": bt * 1000 / reqs if reqs else 0,
            "latency-median-us": p["latency-median-us"], "latency-p99-us": p["latency-p99-us"],
            "asking-median-us": p["latency-asking-median-us"],
            "answer-median-us": p["latency-answer-median-us"],
            "placing-median-us": p["latency-placing-median-us"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--hot", default="64M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "unix"])
    ap.add_argument("--accel", default="kvm", choices=["kvm", "tcg"],
                    help="both ends' vCPUs: KVM (like for like) or software")
    ap.add_argument("--preempt", action="store_true", help="postcopy-preempt on both")
    ap.add_argument("--livemig", default="target/release/livemig")
    a = ap.parse_args()
    ram, hot = size(a.ram), size(a.hot)
    if hot != 64 << 20:
        sys.exit("the QEMU guest's hot set is 64 MiB (scripts/postcopy_hot_guest.S)")
    res = {"livemig": [], "qemu": []}
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_guest(tmp)
        for r in range(a.rounds):
            # Alternate who goes first, so neither always meets the same load.
            order = ["livemig", "qemu"] if r % 2 == 0 else ["qemu", "livemig"]
            for who in order:
                if who == "livemig":
                    x = livemig_run(a.livemig, ram, hot, a.transport, a.preempt, a.accel)
                else:
                    x = qemu_run(tmp, ram, a.accel, elf, a.transport, a.preempt)
                res[who].append(x)
                print(f"round {r + 1} {who}: {json.dumps(x)}", file=sys.stderr)
    med = lambda who, k: statistics.median(x[k] for x in res[who])
    print(f"{a.ram} guest, {a.hot} hot set, 1 vCPU, {a.transport}, postcopy at once"
          f"{' with postcopy-preempt' if a.preempt else ''}, "
          f"medians of {a.rounds} interleaved rounds")
    print("| | total | downtime | requests | blocktime | blocktime / request "
          "| latency p50 / p99 | p50 asking / answer / placing |")
    print("|---|---|---|---|---|---|---|---|")
    for who, name in (("livemig", f"livemig bench --postcopy --accel {a.accel}"),
                      ("qemu", f"QEMU 7.2 -> QEMU 7.2 (-accel {a.accel})")):
        lat = (f"{med(who, 'latency-median-us'):.0f} µs / {med(who, 'latency-p99-us'):.0f} µs "
               f"| {med(who, 'asking-median-us'):.0f} / {med(who, 'answer-median-us'):.0f} / "
               f"{med(who, 'placing-median-us'):.0f} µs"
               if who == "livemig" else "not reported | not reported")
        print(f"| {name} | {med(who, 'total-ms'):.0f} ms | {med(who, 'downtime-ms'):.0f} ms "
              f"| {med(who, 'requests'):.0f} | {med(who, 'blocktime-ms'):.1f} ms "
              f"| {med(who, 'blocktime-per-request-us'):.0f} µs | {lat} |")


if __name__ == "__main__":
    main()
