#!/usr/bin/env bash
# What a new user gets: a fresh clone of this checkout's HEAD, a brand-new virtual environment, the README's set-up
# command 2 verbatim (install what the tests need), then the tests. Run it before you stop: a package you installed
# by hand in your working environment cannot make it pass.
#
#   scripts/fresh_check.sh            # a fast subset: packaging, the README examples table, extras (~1 min of tests)
#   scripts/fresh_check.sh --full     # the whole suite, as CI runs it (~15 min on 2 cores)
#   scripts/fresh_check.sh -- tests/train -x    # any pytest arguments after --
#
# Uncommitted changes are not in the clone: commit first. Caches kept: pip's downloads and $ESR_CACHE (files only).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
fast=(tests/test_readme.py tests/test_packaging.py tests/test_readme_examples.py::test_every_readme_command_is_covered
      tests/test_readme_examples.py::test_readme_library_example tests/train/test_metrics_log.py
      tests/data/test_data_sources.py tests/serve/test_server.py tests/test_config.py)
case "${1:-}" in
    --full) pytest_args=() ;;
    --) shift; pytest_args=("$@") ;;
    "") pytest_args=("${fast[@]}") ;;
    *) echo "usage: $0 [--full | -- PYTEST_ARGS...]" >&2; exit 2 ;;
esac

work="$(mktemp -d "${TMPDIR:-/tmp}/esr-fresh.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/esr"
# CI lays shared/ (the data files some tests read) beside the clone; so does this script, when the checkout has one.
[ ! -d "$repo/../shared" ] || ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
cd "$work/esr"
echo "== fresh clone of $(git rev-parse --short HEAD) in $work/esr"
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] || echo "   (uncommitted changes in $repo are not checked)"

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
# README command 2, verbatim up to its test run; the pytest arguments are this script's.
command2="$(grep -m1 '^pip install torch==.*\.\[test,vllm\]' README.md)"
install="${command2% && python -m pytest -q}"
[ "$install" != "$command2" ] || { echo "README command 2 no longer ends in 'python -m pytest -q'" >&2; exit 1; }
start=$SECONDS
eval "$install"
echo "== installed in $((SECONDS - start)) s; pytest ${pytest_args[*]:-(whole suite)}"
start=$SECONDS
python -m pytest -q "${pytest_args[@]}"
echo "== tests took $((SECONDS - start)) s"
