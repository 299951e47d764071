#!/usr/bin/env bash
# Export the official Score SDE PyTorch code (yang-song/score_sde_pytorch) into the git-ignored
# folder bench/official/score_sde_pytorch, for bench/gpu.py's "official_step" section (their
# NCSN++ training step next to ours). Never commit bench/official/ (.gitignore has it).
#
#   bash bench/get_official.sh [SOURCE]
#
# SOURCE: a git directory holding the repository (default: $SCORE_SDE_GIT, else the stored
# mirror /work/.mirror/yang-song+score_sde_pytorch/repo, else a shallow clone from GitHub).
# Only the code is exported (configs/, models/, op/, the top-level *.py, LICENSE): no
# images, no notebook (about 0.3 MB). Their compiled CUDA ops (op/upfirdn2d, op/fused_act)
# are NOT built: bench/gpu.py replaces them at import time by their own pure-PyTorch
# fallback (upfirdn2d_native), without editing their files.
#
# It also saves the ml_collections wheel into bench/official/wheels (the GPU machine's image
# lacks ml_collections; bench/gpu.sh installs it from there), when pip can fetch it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/bench/official/score_sde_pytorch"
WHEELS="$ROOT/bench/official/wheels"
SOURCE="${1:-${SCORE_SDE_GIT:-/work/.mirror/yang-song+score_sde_pytorch/repo}}"
TMP=""
if ! git --git-dir="$SOURCE" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    if [ -d "$SOURCE/.git" ]; then
        SOURCE="$SOURCE/.git"
    else
        TMP="$(mktemp -d)"
        echo "no git directory at $SOURCE; cloning github.com/yang-song/score_sde_pytorch" >&2
        git clone --quiet --depth 1 --bare https://github.com/yang-song/score_sde_pytorch "$TMP/repo"
        SOURCE="$TMP/repo"
    fi
fi
COMMIT="$(git --git-dir="$SOURCE" rev-parse HEAD)"
rm -rf "$DEST"
mkdir -p "$DEST"
PATHS=(configs models op LICENSE)
for f in $(git --git-dir="$SOURCE" ls-tree --name-only HEAD | grep '\.py$'); do PATHS+=("$f"); done
git --git-dir="$SOURCE" archive --format=tar "$COMMIT" -- "${PATHS[@]}" | tar -x -C "$DEST"
echo "$COMMIT" > "$DEST/COMMIT"
[ -n "$TMP" ] && rm -rf "$TMP"
echo "exported score_sde_pytorch $COMMIT to $DEST ($(du -sh "$DEST" | cut -f1))"

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    PY="${PYTHON:-python3}"
    VERSION="$("$PY" -c 'import ml_collections, importlib.metadata as m; print(m.version("ml_collections"))' 2>/dev/null || echo 1.1.0)"
    mkdir -p "$WHEELS"
    if "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "ml_collections==$VERSION" >/dev/null 2>&1; then
        echo "saved $(ls "$WHEELS")  in $WHEELS"
    else
        echo "could not download the ml_collections wheel (no network?); the GPU machine needs it" >&2
    fi
fi
