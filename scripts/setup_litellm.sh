#!/usr/bin/env bash
# Create (once) a separate virtual environment holding the LiteLLM proxy, for the
# gateway-overhead benchmark (loadtests/bench_overhead.py), which runs it beside
# nomoat against the same fake upstream. It lives in the cache, never in the repo,
# and is never importable from the gateway's environment.
#
# Version: 1.108.7, the one issue 3 measured (what `pip install 'litellm[proxy]'`
# installed on these machines). If that exact pin cannot be installed, the script
# falls back to whatever `pip install 'litellm[proxy]'` installs and records the
# version it got (LITELLM_VERSION=... picks another pin).
#
# Idempotent, keyed by version: a complete install leaves a marker and a re-run is
# instant; a venv without the marker (an interrupted install) is removed and redone.
# Concurrent runs are serialised with flock.
#
# Usage: scripts/setup_litellm.sh    last line of stdout: the venv's `litellm` command
#        (the installed version is in "$venv/.nomoat-version")
set -euo pipefail

litellm_version=${LITELLM_VERSION:-1.108.7}
cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
python=${PYTHON:-python3}
venv="$cache/litellm-$litellm_version"
marker="$venv/.nomoat-complete"
# What the marker promises; a change here invalidates the old install.
state="litellm[proxy]==$litellm_version (or unpinned fallback)"

mkdir -p "$cache"
exec 9>"$cache/.litellm-$litellm_version.lock"
flock 9

if [ "$(cat "$marker" 2>/dev/null)" != "$state" ]; then
  if [ -e "$venv" ]; then
    echo "setup_litellm: removing incomplete $venv" >&2
    rm -rf "$venv"
  fi
  echo "setup_litellm: installing litellm[proxy] $litellm_version into $venv (once)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  if ! "$venv/bin/python" -m pip install --quiet "litellm[proxy]==$litellm_version"; then
    echo "setup_litellm: litellm[proxy]==$litellm_version failed; installing the latest" >&2
    "$venv/bin/python" -m pip install --quiet "litellm[proxy]"
  fi
  # The proxy imports its server stack lazily: check the pieces it starts with
  # (with the bundled price table: importing litellm fetches one from the network).
  LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False \
    "$venv/bin/python" -c "import litellm, litellm.proxy.proxy_server, uvicorn" >&2
  "$venv/bin/python" -c \
    "import importlib.metadata as m; print(m.version('litellm'))" >"$venv/.nomoat-version"
  echo "$state" >"$marker"
fi

echo "setup_litellm: litellm $(cat "$venv/.nomoat-version") in $venv" >&2
echo "$venv/bin/litellm"
