#!/usr/bin/env bash
# Locate (or build once, then cache) a CPU-only llama.cpp `llama-server` binary.
#
# Usage:  scripts/llama-server.sh            # prints the binary's absolute path
#         BIN=$(scripts/llama-server.sh | tail -n1)
#
# Progress goes to stderr; the LAST line on stdout is the absolute path of a
# working llama-server. Resolution order:
#   1. $LLAMA_SERVER, if set and executable
#   2. `llama-server` on $PATH
#   3. cached build: ${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap/llama-server-<ver>/llama-server
#   4. build it from the llama.cpp vendored in the llama-cpp-python sdist (PyPI),
#      then cache it (step 3) for next time.
#
# Environment knobs:
#   PYTHON                  python used for `-m pip` (default: python3)
#   LLAMA_CPP_PYTHON_SDIST  path to an already downloaded
#                           llama_cpp_python-<ver>.tar.gz (skips pip download;
#                           for fully offline machines)
#   JOBS                    parallel build jobs (default: nproc)
#   LLAMASWAP_KEEP_BUILD=1  keep the temporary build directory (debugging)
#
# Nothing is downloaded at configure/build time: the prebuilt web UI download
# (LLAMA_USE_PREBUILT_UI) and the npm UI build (LLAMA_BUILD_UI) are disabled,
# so the binary has no embedded web UI (the HTTP API is unaffected).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36

PY="${PYTHON:-python3}"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap"
DEST_DIR="$CACHE_ROOT/llama-server-$LLAMA_CPP_PYTHON_VERSION"
DEST_BIN="$DEST_DIR/llama-server"

log() { printf '[llama-server.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

abspath() {
    # absolute path without resolving symlinks (coreutils realpath -s, else python)
    realpath -s -- "$1" 2>/dev/null || "$PY" -c 'import os,sys;print(os.path.abspath(sys.argv[1]))' "$1"
}

# works BIN: true when BIN runs and answers --version.
works() {
    local out
    out=$("$1" --version 2>&1) || return 1
    printf '%s\n' "$out" | grep -q 'version' || return 1
    log "$(printf '%s\n' "$out" | grep -m1 'version')"
}

found() {
    local p
    p=$(abspath "$1")
    log "using $p"
    printf '%s\n' "$p"
    exit 0
}

# 1. explicit override
if [ -n "${LLAMA_SERVER:-}" ]; then
    if [ -x "$LLAMA_SERVER" ] && [ ! -d "$LLAMA_SERVER" ]; then
        log "LLAMA_SERVER=$LLAMA_SERVER"
        works "$LLAMA_SERVER" || die "\$LLAMA_SERVER ($LLAMA_SERVER) does not run (--version failed)"
        found "$LLAMA_SERVER"
    fi
    log "warning: LLAMA_SERVER=$LLAMA_SERVER is not an executable file; ignoring it"
fi

# 2. on PATH
if p=$(command -v llama-server 2>/dev/null) && [ -n "$p" ]; then
    if works "$p"; then
        found "$p"
    fi
    log "warning: $p on PATH does not run; ignoring it"
fi

# 3. cache (checked again under the lock below)
if [ -x "$DEST_BIN" ] && works "$DEST_BIN"; then
    found "$DEST_BIN"
fi

# 4. build, serialised by a lock in the cache dir
command -v flock >/dev/null || die "flock (util-linux) is required"
command -v cmake >/dev/null || die "cmake is required to build llama-server"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "a C++ compiler is required"

mkdir -p "$CACHE_ROOT"
LOCK_FILE="$CACHE_ROOT/llama-server-$LLAMA_CPP_PYTHON_VERSION.lock"
exec 9>"$LOCK_FILE"
if ! flock -n 9; then
    log "another build holds $LOCK_FILE; waiting for it..."
    flock 9
fi

if [ -x "$DEST_BIN" ] && works "$DEST_BIN"; then
    log "built concurrently by another process"
    found "$DEST_BIN"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llamaswap-build.XXXXXX")
cleanup() {
    if [ "${LLAMASWAP_KEEP_BUILD:-0}" = 1 ]; then
        log "keeping build dir $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

START=$(date +%s)

# 4a. source: the llama-cpp-python sdist vendors a full llama.cpp checkout
if [ -n "${LLAMA_CPP_PYTHON_SDIST:-}" ]; then
    [ -f "$LLAMA_CPP_PYTHON_SDIST" ] || die "LLAMA_CPP_PYTHON_SDIST=$LLAMA_CPP_PYTHON_SDIST not found"
    SDIST="$LLAMA_CPP_PYTHON_SDIST"
    log "using sdist $SDIST"
else
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI (~75 MB)..."
    "$PY" -m pip download --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$WORK/dl" >&2 \
        || die "pip download failed"
    SDIST=$(ls "$WORK"/dl/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null | head -n1)
    [ -n "$SDIST" ] || die "sdist not found in $WORK/dl"
fi

log "extracting $(basename "$SDIST")..."
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
SRC=$(ls -d "$WORK"/src/*/vendor/llama.cpp 2>/dev/null | head -n1)
[ -n "$SRC" ] && [ -f "$SRC/CMakeLists.txt" ] || die "vendor/llama.cpp not found in the sdist"
log "llama.cpp source: $SRC"

# 4b. configure
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
BUILD="$WORK/build"

CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=OFF
    -DGGML_AVX=ON
    -DGGML_AVX2=ON
    -DGGML_FMA=ON
    -DGGML_F16C=ON
    -DLLAMA_USE_PREBUILT_UI=OFF   # would download the web UI from a HF bucket
    -DLLAMA_BUILD_UI=OFF          # would run npm
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DBUILD_SHARED_LIBS=OFF
)
log "configuring (cmake ${GEN[*]} ${CMAKE_FLAGS[*]})..."
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >&2 || die "cmake configure failed"

# 4c. build only the server
log "building llama-server with $JOBS jobs (several minutes on 2 cores)..."
cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2 || die "build failed"

BUILT="$BUILD/bin/llama-server"
[ -x "$BUILT" ] || die "build finished but $BUILT is missing"

# 4d. must not depend on anything inside the (temporary) build tree
if command -v ldd >/dev/null; then
    LDD=$(ldd "$BUILT" 2>&1 || true)
    printf '%s\n' "$LDD" | sed 's/^/[llama-server.sh]   ldd: /' >&2
    if printf '%s\n' "$LDD" | grep -qF "$WORK"; then
        die "binary links to libraries inside the build tree"
    fi
    if printf '%s\n' "$LDD" | grep -q 'not found'; then
        die "binary has unresolved shared libraries"
    fi
fi
works "$BUILT" || die "freshly built binary does not run"

# 4e. install atomically into the cache
mkdir -p "$DEST_DIR"
TMP_BIN="$DEST_DIR/.llama-server.tmp.$$"
cp "$BUILT" "$TMP_BIN"
chmod 755 "$TMP_BIN"
mv -f "$TMP_BIN" "$DEST_BIN"
works "$DEST_BIN" || die "cached binary $DEST_BIN does not run"

log "built and cached in $(( $(date +%s) - START ))s"
found "$DEST_BIN"
