#!/usr/bin/env bash
# Time the first build of the C++ CPU extension (salunet/nn/csrc), this tree against an older revision, interleaved
# (old, new, old, new, ...) into fresh TORCH_EXTENSIONS_DIRs so that both meet the same machine load. Each time is the
# wall time of a fresh process that imports salunet and builds (the import is ~2 s of it).
#   bash scripts/build_time.sh OLD_REV [REPEATS]      e.g. bash scripts/build_time.sh 8a9a3b6 3
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_REV=${1:?usage: bash scripts/build_time.sh OLD_REV [REPEATS]}
REPEATS=${2:-3}
TMP=$(mktemp -d)
trap 'git worktree remove --force "$TMP/old" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git worktree add -q --detach "$TMP/old" "$OLD_REV"
build() {  # $1: the src folder to import salunet from; prints the seconds
  local ext=$TMP/ext.$RANDOM start
  start=$(date +%s.%N)
  if ! (cd "$TMP" && TORCH_EXTENSIONS_DIR=$ext PYTHONPATH=$1 python -c \
      "from salunet.nn import cpu_ext; assert cpu_ext.load() is not None, cpu_ext.load_error()" 2>"$TMP/err"); then
    echo "the build from $1 failed:" >&2; tail -5 "$TMP/err" >&2; return 1
  fi
  python -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start"
  rm -rf "$ext"
}
old=() new=()
for i in $(seq "$REPEATS"); do
  t_old=$(build "$TMP/old/src") && t_new=$(build "$PWD/src") || exit 1  # a failed build is no time
  old+=("$t_old"); new+=("$t_new")
  echo "repeat $i: $OLD_REV ${old[-1]} s, this tree ${new[-1]} s"
done
python - "${#old[@]}" "${old[@]}" "${new[@]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); old, new = map(float, sys.argv[2:2 + n]), map(float, sys.argv[2 + n:])
o, m = statistics.median(old), statistics.median(new)
print(f"median: old {o:.1f} s, this tree {m:.1f} s, ratio {m / o:.2f}x")
PY
