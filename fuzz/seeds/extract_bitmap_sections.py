#!/usr/bin/env python3
"""Cuts the bodies of a migration stream's `dirty-bitmap` sections out, back to back, as a seed
for the bitmap_section target (which reads section bodies without headers or footers).

    extract_bitmap_sections.py LIVEMIG STREAM OUT

Uses `livemig analyze --json` for the sections' offsets and sizes.
"""
import json, subprocess, sys

livemig, stream, out = sys.argv[1:4]
data = open(stream, "rb").read()
items = json.loads(subprocess.check_output([livemig, "analyze", stream, "--json"]))["items"]
body = b""
for it in items:
    if it.get("name") != "dirty-bitmap" or it.get("count", 1) != 1:
        continue
    if it["kind"] in ("START", "FULL"):
        # type, section id, idstr (length byte + text), instance id, version id
        header = 1 + 4 + 1 + len(it["name"]) + 4 + 4
    else:
        header = 1 + 4
    footer = 1 + 4
    start = it["offset"] + header
    body += data[start:it["offset"] + it["bytes"] - footer]
open(out, "wb").write(body)
print(out, len(body), "bytes")
