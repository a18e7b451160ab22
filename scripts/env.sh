# Sourced by scripts/quickstart.sh and scripts/test.sh: create or reuse .venv at the repo
# root and install only what is missing.
#   ensure_venv          runtime requirements
#   ensure_venv dev      plus test requirements
# TORCH_SPEC (default torch==2.13.0) is installed only when no torch is importable; a GPU
# server whose python already has a CUDA torch gets a venv that sees it
# (--system-site-packages) instead of a second multi-GB copy.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"

_pip() {
    # pip's notes about missing local mirrors are noise here; real errors still show.
    "$PY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

ensure_venv() {
    local want="requirements.txt"
    [ "${1:-}" = "dev" ] && want="requirements.txt requirements-dev.txt"
    local base_python="${PYTHON:-python3}"
    if [ ! -x "$PY" ]; then
        if "$base_python" -c "import torch" 2>/dev/null; then
            echo "[env] creating .venv on top of $("$base_python" -c 'import torch; print("torch", torch.__version__)') from $base_python" >&2
            "$base_python" -m venv --system-site-packages "$VENV"
        else
            echo "[env] creating .venv" >&2
            "$base_python" -m venv "$VENV"
        fi
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[env] installing ${TORCH_SPEC:-torch==2.13.0}" >&2
        _pip "${TORCH_SPEC:-torch==2.13.0}"
    fi
    # A stamp of the requirement files: unchanged requirements cost no pip call at all.
    local stamp="$VENV/.installed-$(echo "$want" | tr ' ' '+')"
    local digest
    digest="$(cd "$REPO_ROOT" && cat $want | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "[env] installing $want" >&2
        local args=()
        for f in $want; do args+=(-r "$REPO_ROOT/$f"); done
        _pip "${args[@]}"
        echo "$digest" > "$stamp"
    fi
    export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
}
