#!/usr/bin/env bash
# The test suite on a GPU machine file by file, each under its own time limit, one log per file
# and one summary line each, so that a run cut short by the device's per-command limit still
# says what passed (on CUDA every test runs on the GPU, the `gpu`-marked ones included).
#   bash benchmarks/gpu_tests.sh OUT_DIR [SECONDS_PER_FILE] [test files...]
# Default: every tests/test_*.py, 240 s each. MARK="gpu" (a pytest -m expression) narrows it.
# SUMMARY_LOG=FILE also appends each file's summary line and failure report to FILE as it goes
# (one file to bring back from a machine that returns few files).
set -u
out=${1:?usage: gpu_tests.sh OUT_DIR [SECONDS_PER_FILE] [files...]}
limit=${2:-240}
shift $(( $# >= 2 ? 2 : $# ))
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(tests/test_*.py)
fi
mkdir -p "$out"
status=0
for f in "${files[@]}"; do
  name=$(basename "$f" .py)
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider ${MARK:+-m "$MARK"} "$f" \
    > "$out/$name.log" 2>&1
  rc=$?
  last=$(grep -E "passed|failed|skipped|deselected|error|no tests ran" "$out/$name.log" | tail -1)
  [ $rc -eq 124 ] && last="TIMED OUT after ${limit}s: $(grep -c '' "$out/$name.log") lines; $(tr -cd '.F' < "$out/$name.log" | wc -c) results so far"
  echo "$name: ${last:-rc $rc}"
  if [ -n "${SUMMARY_LOG:-}" ]; then
    { echo "=== $name: ${last:-rc $rc}"
      sed -n '/= FAILURES =/,/short test summary/p' "$out/$name.log" | head -300
      grep -E "^(FAILED|ERROR) " "$out/$name.log"; } >> "$SUMMARY_LOG"
  fi
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
done
exit $status
