#!/usr/bin/env bash
# Builds the cargo-fuzz targets, runs each for a while (one at a time), then minimizes its
# corpus into fuzz/corpus/<target> (the corpus the replay test in crates/fuzz-harness runs).
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; TARGET defaults to every target. Environment:
#   FUZZ_TARGET_DIR  cargo target directory (default: target-fuzz at the workspace root)
#   FUZZ_SANITIZER   none (default: the code under test forbids unsafe outside guest memory,
#                    and ASan costs 2-3x), or address
#   FUZZ_ARGS        extra libFuzzer arguments
#
# cargo-fuzz needs nightly-only rustc flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them (there is no other toolchain to fetch here). cargo-fuzz itself comes from crates.io.
# New inputs go to fuzz/corpus-work/<target> (not in git); fuzz/corpus/<target> and the named
# seeds in fuzz/seeds/<target> are read too. At the end the new inputs and fuzz/corpus are
# merged and minimized (`cargo fuzz cmin`) back into fuzz/corpus; the seeds stay as they are.
# Crashes land in fuzz/artifacts/<target>: once fixed, keep the input in fuzz/seeds/<target>
# (which is never minimized away) so the replay test runs it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(stream_loader bitmap_section qmp postcopy return_path multifd nbd_client nbd_server)
fi
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$root/target-fuzz}
export RUSTC_BOOTSTRAP=1
san=${FUZZ_SANITIZER:-none}

max_len() {
    case "$1" in
        stream_loader | postcopy | multifd | nbd_server) echo 65536 ;;
        bitmap_section | nbd_client) echo 32768 ;;
        return_path) echo 4096 ;;
        *) echo 8192 ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$here"
cargo fuzz build -s "$san"

for t in "${targets[@]}"; do
    mkdir -p "corpus-work/$t" "corpus/$t"
    echo "== $t: fuzzing for ${secs}s"
    # shellcheck disable=SC2086
    # -close_fd_mask=2: the loaders report dropped bitmaps on stderr, once per input;
    # libFuzzer keeps its own copy of stderr for its reports.
    cargo fuzz run -s "$san" "$t" "corpus-work/$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=4096 \
        -close_fd_mask=2 -print_final_stats=1 ${FUZZ_ARGS:-}
    echo "== $t: minimizing"
    cp -n "corpus-work/$t"/* "corpus/$t"/ 2>/dev/null || true
    cargo fuzz cmin -s "$san" "$t" "corpus/$t" -- -max_len="$(max_len "$t")" -timeout=10
    echo "== $t: $(find "corpus/$t" -type f | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
done
