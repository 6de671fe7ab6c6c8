import socket, json, time, subprocess, sys, os
out = sys.argv[1]
pages = sys.argv[2] == "pages"
d = "/tmp/cap"
for f in ("q.sock", "qt.sock"):
    try: os.unlink(f"{d}/{f}")
    except FileNotFoundError: pass
args = ["qemu-system-x86_64", "-M", "none", "-m", "4M", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-blockdev", "driver=null-co,node-name=node0,size=67108864",
        "-qmp", f"unix:{d}/q.sock,server=on,wait=off"]
if pages:
    args[2] = "none,memory-backend=ram"
    args += ["-object", f"memory-backend-file,id=ram,size=4M,mem-path={d}/ramfile,share=off"]
p = subprocess.Popen(args)
def conn(path):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); return s
        except OSError: time.sleep(0.05)
    raise SystemExit("no socket")
s = conn(f"{d}/q.sock"); f = s.makefile("rw")
def rd():
    while True:
        m = json.loads(f.readline())
        if "event" in m: continue
        return m
f.readline()
def cmd(c, **a):
    f.write(json.dumps({"execute": c, "arguments": a}) + "\n"); f.flush()
    r = rd()
    if "error" in r: raise SystemExit(f"{c}: {r}")
    return r["return"]
cmd("qmp_capabilities")
cmd("block-dirty-bitmap-add", node="node0", name="bitmap0", granularity=65536)
for w in ["write 0 64k", "write 320k 4k", "write 1M 64k"]:
    print(cmd("human-monitor-command", **{"command-line": f'qemu-io node0 "{w}"'}))
if False:
    q = conn(f"{d}/qt.sock"); qf = q.makefile("rw")
    for addr, val in [(0x3000, "0x5a5a5a5a"), (0x4000, "0x01020304"), (0x3ff000, "0xffffffff")]:
        qf.write(f"writel {addr:#x} {val}\n"); qf.flush(); print(qf.readline().strip())
cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-bitmaps", "state": True}])
cmd("migrate-set-parameters", **{"max-bandwidth": 100000})
cmd("migrate", uri=f"exec:cat > {out}")
for _ in range(400):
    st = cmd("query-migrate")
    if st.get("status") in ("completed", "failed"): break
    time.sleep(0.05)
print(st.get("status"))
cmd("quit"); p.wait()
