#!/usr/bin/env bash
# Wheels of the runtime requirements a GPU image lacks, for a GPU box without network (hospital
# clusters are often air-gapped). The box is assumed to have its own CUDA torch, transformers,
# accelerate and peft; everything else in requirements.txt is fetched here, on a machine with
# network, then copied over and installed by `bash scripts/gpu_check.sh --wheels DIR`.
#
#   bash scripts/bench/gpu_wheels.sh DIR                        # for this python's version, manylinux x86_64
#   bash scripts/bench/gpu_wheels.sh DIR --python-version 3.10  # the GPU box's python
#   bash scripts/bench/gpu_wheels.sh DIR --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
#   bash scripts/bench/gpu_wheels.sh --list                     # the requirements it would fetch; downloads nothing
#
# Binary wheels only (--only-binary=:all:): the box may have no compiler. Dependencies come
# along, except for a requirement whose dependencies reach torch or the other three: that one is
# fetched again with --no-deps, because a second torch in DIR would replace the box's CUDA build.
# DeepSpeed is not fetched: PyPI has no wheel of it (it compiles against the installed torch).
set -euo pipefail
cd "$(dirname "$0")/../.."

PROVIDED="torch transformers accelerate peft"  # what the GPU image brings itself
PY="${PYTHON:-python3}"
DEST="" LIST=0 PYVER="" PLATFORMS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --list) LIST=1; shift ;;
        --python-version) PYVER="$2"; shift 2 ;;
        --platform) PLATFORMS+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) DEST="$1"; shift ;;
    esac
done

# requirements.txt minus the provided four: each requirement as written, comments dropped.
requirements() {
    local line name
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"
        line="$(echo "$line" | xargs)"
        [ -n "$line" ] || continue
        name="$(echo "$line" | sed -E 's/^([A-Za-z0-9._-]+).*/\1/' | tr 'A-Z_.' 'a-z--')"
        [[ " $PROVIDED " == *" $name "* ]] && continue
        echo "$line"
    done < requirements.txt
}

if [ "$LIST" = 1 ]; then
    requirements
    exit 0
fi
[ -n "$DEST" ] || { echo "usage: bash scripts/bench/gpu_wheels.sh DIR [--python-version X.Y] [--platform TAG]... | --list" >&2; exit 2; }
HERE="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PYVER="${PYVER:-$HERE}"
if [ "$PYVER" != "$HERE" ]; then
    # pip picks wheels for --python-version but evaluates dependency markers (`tomli; python_version
    # < "3.11"`) against the interpreter it runs in, so a conditional dependency can be missed.
    echo "gpu_wheels.sh: note: $PY is python $HERE; for python $PYVER, PYTHON=python$PYVER bash scripts/bench/gpu_wheels.sh" \
         "also gets the dependencies only that version needs" >&2
fi
# manylinux2014 (glibc 2.17) is the broadest tag; newer releases of some packages ship only
# manylinux_2_28 wheels, which every CUDA 12 image's glibc runs.
[ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux2014_x86_64 manylinux_2_28_x86_64)
PLATFORM_FLAGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_FLAGS+=(--platform "$p"); done
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

fetch() {  # fetch REQUIREMENT [--no-deps]: into a fresh folder, so each one's wheels can be inspected
    rm -rf "$TMP/one" && mkdir -p "$TMP/one"
    "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --python-version "$PYVER" \
        "${PLATFORM_FLAGS[@]}" --dest "$TMP/one" "$@"
}

echo "wheels for python $PYVER, ${PLATFORMS[*]} -> $DEST" >&2
while IFS= read -r req; do
    fetch "$req"
    pulled="$(cd "$TMP/one" && ls | grep -iE '^(torch|transformers|accelerate|peft|triton|nvidia_)[-_]' || true)"
    if [ -n "$pulled" ]; then
        echo "  $req: its dependencies pull $(echo $pulled | tr ' ' ','); fetched with --no-deps" >&2
        fetch --no-deps "$req"
    fi
    cp -n "$TMP/one"/* "$DEST"/ 2>/dev/null || true
    echo "  $req" >&2
done < <(requirements)
echo "$(ls "$DEST" | wc -l) files in $DEST; on the GPU box: bash scripts/gpu_check.sh --wheels $DEST" >&2
