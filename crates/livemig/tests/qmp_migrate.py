#!/usr/bin/env python3
"""Drives one whole migration between two `livemig vm` processes with QEMU's own Python QMP
client (`qemu.qmp` from PyPI), the way management scripts drive QEMU.

Usage: qmp_migrate.py SRC_QMP_SOCKET DST_QMP_SOCKET URI

Connects to both monitors, turns on the capabilities `events`, `dirty-bitmaps` and
`return-path` on both ends, runs `migrate`, waits for the source's `MIGRATION` event with
status `completed` (failing on `failed` or `cancelled`), and checks `query-migrate` on both
ends. Prints one line per step, ending with `OK`; exits non-zero on any failure.
Run by crates/livemig/tests/tools.rs.
"""

import asyncio
import sys

from qemu.qmp import EventListener, QMPClient

CAPS = ["events", "dirty-bitmaps", "return-path"]
TIMEOUT = 30


async def connect(name: str, path: str) -> QMPClient:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    return client


async def main(src_path: str, dst_path: str, uri: str) -> int:
    src = await connect("src", src_path)
    dst = await connect("dst", dst_path)
    try:
        for client in (src, dst):
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": True} for c in CAPS]},
            )
            caps = await client.execute("query-migrate-capabilities")
            on = sorted(c["capability"] for c in caps if c["state"])
            print(f"{client.name} capabilities: {' '.join(on)}")
            if on != sorted(CAPS):
                print(f"{client.name}: unexpected capabilities {on}")
                return 1

        statuses = []
        listener = EventListener("MIGRATION")
        with src.listen(listener):
            await src.execute("migrate", {"uri": uri})
            while True:
                event = await asyncio.wait_for(listener.get(), TIMEOUT)
                status = event["data"]["status"]
                statuses.append(status)
                if status in ("completed", "failed", "cancelled"):
                    break
        print(f"source events: {' '.join(statuses)}")
        if statuses[-1] != "completed":
            print(f"migration ended {statuses[-1]}: {await src.execute('query-migrate')}")
            return 1

        info = await src.execute("query-migrate")
        ram = info.get("ram", {})
        print(
            f"source query-migrate: status {info['status']}, "
            f"transferred {ram.get('transferred', 0)}, normal {ram.get('normal', 0)}, "
            f"downtime {info.get('downtime', -1)}"
        )
        if info["status"] != "completed" or ram.get("transferred", 0) <= 0:
            return 1

        # The destination's side may finish a moment later without a return path.
        for _ in range(TIMEOUT * 100):
            dinfo = await dst.execute("query-migrate")
            if dinfo.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(0.01)
        print(f"destination query-migrate: status {dinfo.get('status')}")
        if dinfo.get("status") != "completed":
            return 1
        print("OK")
        return 0
    finally:
        await src.disconnect()
        await dst.disconnect()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3])))
