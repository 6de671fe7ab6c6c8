#!/usr/bin/env python3
"""Writes the qmp target's seed inputs: what a client sends, valid and not, one file each.

    qmp_seeds.py OUTDIR
"""
import os, sys

out = sys.argv[1]
neg = b'{"execute": "qmp_capabilities"}\n'
seeds = {
    "negotiate-then-query": neg + b'{"execute": "query-status", "id": 1}\n{"execute": "query-version", "id": "v"}\n{"execute": "query-commands"}\n',
    "oob": b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n{"exec-oob": "x-fuzz-echo", "id": 7, "arguments": {"value": [1, 2.5, "x"]}}\n',
    "before-negotiation": b'{"execute": "query-status"}\n{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}\n',
    "bitmaps": neg + b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk0", "name": "b1", "granularity": 512, "persistent": false, "disabled": true}}\n'
        b'{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "disk0", "target": "b1", "bitmaps": ["b0", {"node": "disk0", "name": "b0"}]}}\n'
        b'{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "disk0", "name": "b1"}}\n'
        b'{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "b1"}}\n'
        b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}\n{"execute": "query-block"}\n',
    "blockdev": neg + b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1", "size": 1048576, "read-zeroes": true}}\n'
        b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n1", "name": "x", "granularity": 4096}}\n'
        b'{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "n1", "name": "x"}}\n'
        b'{"execute": "block-dirty-bitmap-disable", "arguments": {"node": "n1", "name": "x"}}\n'
        b'{"execute": "block-dirty-bitmap-enable", "arguments": {"node": "n1", "name": "x"}}\n'
        b'{"execute": "blockdev-del", "arguments": {"node-name": "n1"}}\n',
    "migration": neg + b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "dirty-bitmaps", "state": true}, {"capability": "events", "state": true}]}}\n'
        b'{"execute": "query-migrate-capabilities"}\n'
        b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 300, "max-bandwidth": 1000000, "multifd-channels": 2, "tls-creds": "", "block-bitmap-mapping": [{"node-name": "disk0", "alias": "d0", "bitmaps": [{"name": "b0", "alias": "bb", "transform": {"persistent": true}}]}]}}\n'
        b'{"execute": "query-migrate-parameters"}\n',
    "migration-errors": neg + b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "foo", "state": true}]}}\n'
        b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 3000000}}\n'
        b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 0}}\n'
        b'{"execute": "migrate-set-parameters", "arguments": {"block-bitmap-mapping": [{"node-name": "disk0", "alias": "1x", "bitmaps": []}]}}\n',
    "shape-errors": neg + b'{"execute": 1}\n{"arguments": {}}\n{"execute": "query-status", "arguments": []}\n{"execute": "query-status", "control": {}}\n'
        b'{"execute": "x-fuzz-echo", "arguments": {"value": null, "extra": 1}}\n{"execute": "nope"}\n[1, 2]\n"str"\n42\n',
    "json-errors": b"{'execute': 'qmp_capabilities'}\n{\"a\": 1,}\n{\"a\" 1}\n@\n{\"a\": [1, 2}\n{\"k\": \"\\u12\"}\n{\"k\": \"\\ud800\"}\n"
        b"{\"a\": 1, \"a\": 2}\n{\"x\": truth}\n{\"n\": 1e400}\n\x01{\"execute\": \"query-status\"}\n\xff\xfe{\"s\": \"\xc3\x28\"}\n{\"k\": 'it\\'s'}\n",
    "nesting": neg + b'{"execute": "x-fuzz-echo", "arguments": {"value": ' + b"[" * 40 + b"{}" + b"]" * 40 + b"}}\n",
    "numbers": neg + b'{"execute": "x-fuzz-echo", "arguments": {"value": [0, -0, 0.5, -1.5e-7, 9223372036854775807, 9223372036854775808, 18446744073709551616, 1E5, 0e5]}}\n',
    "unicode": neg + b'{"execute": "x-fuzz-echo", "id": {"deep": ["id"]}, "arguments": {"value": "caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \xf0\x9f\x98\x80 \\/ \\b\\f\\n\\r\\t"}}\n',
    "unterminated": neg + b'{"execute": "query-status"',
}
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name + ".json"), "wb") as f:
        f.write(data)
print(len(seeds), "seeds in", out)
