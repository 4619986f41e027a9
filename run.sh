#!/usr/bin/env bash
# Quick start: `./run.sh demo` or `./run.sh test`. Both prepare the machine
# first (scripts/setup.sh, safe to repeat).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    echo "usage: ./run.sh demo|test [extra arguments]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
what=$1
shift
case "$what" in
    demo)
        bash "$top/scripts/setup.sh"
        exec "$top/.venv/bin/firmware-sim" demo "$@"
        ;;
    test)
        bash "$top/scripts/setup.sh"
        cd "$top"
        .venv/bin/ruff format --check --quiet .
        .venv/bin/ruff check --quiet .
        .venv/bin/mypy
        exec .venv/bin/pytest -n 2 --dist loadgroup "$@"
        ;;
    *)
        usage
        ;;
esac
