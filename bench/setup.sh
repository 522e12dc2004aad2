#!/usr/bin/env bash
# Bench-only tools, best effort: `make bench` runs this before `python -m bench`.
#   - psutil and py-spy into the venv (pip; py-spy is optional: profiles are skipped without it)
#   - wrk (load generator), nginx (reference proxy) and a C compiler (the readiness
#     lag's shim, bench/readylag.c) from
#     Debian when running as root and they are missing; without them the bench falls
#     back to its Python load generator, leaves nginx out and does not measure the
#     readiness lag.  BENCH_NO_APT=1 skips apt-get.
set -uo pipefail
VENV="${VENV:-.venv}"

"$VENV/bin/python" -m pip install -q psutil >&2 || { echo "bench/setup.sh: psutil is required" >&2; exit 1; }
"$VENV/bin/python" -m pip install -q py-spy >&2 || echo "bench/setup.sh: no py-spy; profiles will be skipped" >&2

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v cc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -gt 0 ] && [ "${BENCH_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench/setup.sh: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
        || echo "bench/setup.sh: could not install ${missing[*]}; the bench falls back without them" >&2
fi
exit 0
