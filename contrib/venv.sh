#!/usr/bin/env bash
# The project's virtual environment: `make demo` and `make test` install into it, never
# into the interpreter itself, which a distribution may manage (PEP 668: Debian's and
# Fedora's python3 refuse `pip install` outside a virtual environment).
#
#   PYTHON=/usr/bin/python3 contrib/venv.sh [DIR]     (DIR defaults to .venv)
#
# Creates DIR with $PYTHON (default python3) unless it exists and was made with that same
# interpreter; a DIR made with another one is made anew, so PYTHON=... always means what
# it says. Debian's python3 needs its python3-venv package (tests/install-deps.sh
# installs it; `make demo` says so when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv="${1:-.venv}"
base="$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.made-with" 2>/dev/null)" = "$base" ]; then
    exit 0
fi
rm -rf "$venv"
if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "contrib/venv.sh: $python cannot create a virtual environment; on Debian or" \
         "Ubuntu install python3-venv (apt-get install python3-venv) and try again" >&2
    exit 1
fi
"$venv/bin/python" -m pip install -q --upgrade pip
echo "$base" > "$venv/.made-with"
