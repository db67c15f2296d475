#!/usr/bin/env bash
# Build build/org.surfaces.bot-v<version>.mbp from this checkout and print its path.
# Needs only python3 (no zip, no venv); an old build of the same version is replaced.
set -euo pipefail
cd "$(dirname "$0")"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" -m devtools.build "$@"
