#!/usr/bin/env python3
"""Edge coverage per source file of the project's crates, from libFuzzer's -print_coverage=1.

    coverage.py TARGET [FILTER...]

Runs fuzz/corpus/TARGET and fuzz/seeds/TARGET once through the AddressSanitizer build of TARGET
(libFuzzer needs the sanitizer runtime's symbolizer to print coverage; build it with
`RUSTC_BOOTSTRAP=1 cargo fuzz build -s address --target-dir ../target-fuzz-asan`), and prints
covered/instrumented edges for each file under crates/ whose path contains one of FILTER
(default: every file).
"""
import collections, os, re, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
target = sys.argv[1]
filters = sys.argv[2:]
binary = os.environ.get("FUZZ_ASAN_BIN") or os.path.join(
    here, "..", "target-fuzz-asan", "x86_64-unknown-linux-gnu", "release", target)
out = subprocess.run(
    [binary, "-runs=0", "-print_coverage=1", "-close_fd_mask=2",
     os.path.join(here, "corpus", target), os.path.join(here, "seeds", target)],
    capture_output=True, text=True, errors="replace").stderr
line_re = re.compile(r"^(?:UN)?COVERED_FUNC: hits: \d+ edges: (\d+)/(\d+) .* (\S+):\d+$")
files = collections.OrderedDict()
for line in out.splitlines():
    m = line_re.match(line)
    if not m:
        continue
    path = m.group(3)
    i = path.find("/crates/")
    if i < 0:
        continue
    path = path[i + 1:]
    if filters and not any(f in path for f in filters):
        continue
    got, total = files.get(path, (0, 0))
    files[path] = (got + int(m.group(1)), total + int(m.group(2)))
tg = tt = 0
for path in sorted(files):
    g, t = files[path]
    tg += g; tt += t
    print(f"{path:50} {g:6}/{t:<6} {100 * g / t if t else 0:5.1f}%")
print(f"{'total':50} {tg:6}/{tt:<6} {100 * tg / tt if tt else 0:5.1f}%")
