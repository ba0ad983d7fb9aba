#!/usr/bin/env bash
# Fuzz the sans-I/O SMTP server with atheris for a bounded time; exit non-zero on a crash.
#
#   fuzz/run.sh                          # 60 seconds
#   FUZZ_TIME=600 fuzz/run.sh            # longer
#   fuzz/run.sh -max_total_time=600 -jobs=2 -workers=2   # extra libFuzzer flags (last wins)
#
# Environment: FUZZ_TIME (seconds, default 60), FUZZ_WORKDIR (corpus, dictionary and crash
# artifacts; default a new temporary directory, kept when something was found), PYTHON.
# Exit status: 0 when the time ran out without a finding, non-zero (libFuzzer's) otherwise;
# the crashing input is then in $FUZZ_WORKDIR/artifacts/ and replays with
#   python fuzz/fuzz_server.py <file>
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
PYTHON=${PYTHON:-python3}
time=${FUZZ_TIME:-60}
work=${FUZZ_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/postier-fuzz.XXXXXX")}
mkdir -p "$work/artifacts"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c 'import atheris' 2>/dev/null || {
    echo "fuzz/run.sh: atheris is not installed (pip install atheris)" >&2
    exit 2
}
"$PYTHON" "$here/fuzz_server.py" --prepare "$work" 2>/dev/null

echo "fuzz/run.sh: fuzzing for ${time}s; corpus and artifacts in $work" >&2
status=0
"$PYTHON" "$here/fuzz_server.py" \
    -max_total_time="$time" \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -max_len=8192 \
    -print_final_stats=1 \
    -dict="$work/smtp.dict" \
    -artifact_prefix="$work/artifacts/" \
    "$@" \
    "$work/corpus" >"$work/fuzz.log" 2>&1 || status=$?

grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' \
    "$work/fuzz.log" >&2 || true
if [ "$status" -ne 0 ] || [ -n "$(ls -A "$work/artifacts")" ]; then
    echo "fuzz/run.sh: FAILED (status $status); last lines of $work/fuzz.log:" >&2
    tail -n 60 "$work/fuzz.log" >&2
    ls -l "$work/artifacts" >&2
    exit "$((status == 0 ? 1 : status))"
fi
echo "fuzz/run.sh: no crash in ${time}s" >&2
if [ -z "${FUZZ_WORKDIR:-}" ]; then
    rm -rf "$work"
fi
