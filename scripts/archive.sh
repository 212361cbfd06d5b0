#!/usr/bin/env bash
# Package a training run as MODEL_STORE/NAME-VERSION.mar with this repository's handler.
#   scripts/archive.sh RUN_DIR NAME VERSION [--force]
# MODEL_STORE (environment) picks the store; default: model_store/ in the repository.
# HANDLER_DIR (a copy of handler/, e.g. an older revision to measure against) and MODEL_CONFIG
# (another model-config.yaml) are for the benchmark's variants; defaults: this repository's.
# One file per version, so several versions can stand in the store side by side.
set -euo pipefail

USAGE="usage: scripts/archive.sh RUN_DIR NAME VERSION [--force]"
die() { echo "error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HANDLER_DIR=$(cd "${HANDLER_DIR:-$REPO/handler}" 2>/dev/null && pwd) || die "HANDLER_DIR not found: $HANDLER_DIR"
MODEL_CONFIG=$(realpath -m "${MODEL_CONFIG:-$HANDLER_DIR/model-config.yaml}")
HANDLER_FILES=("$HANDLER_DIR/__init__.py" "$HANDLER_DIR/classifier_handler.py" "$MODEL_CONFIG")
RUN_FILES=(model.pt index_to_name.json preprocess.json)

force=0
args=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) echo "$USAGE"; exit 0 ;;
        -*) die "unknown option $arg ($USAGE)" ;;
        *) args+=("$arg") ;;
    esac
done
[ "${#args[@]}" -eq 3 ] || die "expected RUN_DIR NAME VERSION, got ${#args[@]} argument(s) ($USAGE)"
run_arg=${args[0]} name=${args[1]} version=${args[2]}

# Names end up in URLs (/predictions/NAME/VERSION) and file names: keep them plain.
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || die "NAME '$name' must be letters, digits, '_' or '-'"
[[ "$version" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "VERSION '$version' must be letters, digits, '.', '_' or '-'"

# Relative paths are the caller's, resolved before moving to the repository root.
[ -d "$run_arg" ] || die "run folder not found: $run_arg"
run_dir=$(cd "$run_arg" && pwd)
[[ "$run_dir" != *,* ]] || die "run folder path must not contain ',' (torch-model-archiver splits on it): $run_dir"
missing=()
for f in "${RUN_FILES[@]}"; do [ -f "$run_dir/$f" ] || missing+=("$run_arg/$f"); done
for f in "${HANDLER_FILES[@]}"; do [ -f "$f" ] || missing+=("$f"); done
[ "${#missing[@]}" -eq 0 ] || die "missing: ${missing[*]}"

store=${MODEL_STORE:-$REPO/model_store}
mkdir -p "$store" || die "cannot create model store $store"
store=$(cd "$store" && pwd)
target="$store/$name-$version.mar"
if [ -e "$target" ] && [ "$force" -eq 0 ]; then
    die "$target exists; pass --force to overwrite it"
fi

cd "$REPO"
archiver=.venv/bin/torch-model-archiver
[ -x "$archiver" ] || die "$REPO/$archiver not found; run 'make install' first"

# Check the run's contents the way the handler will read them, before packaging.
classes=$(.venv/bin/python - "$run_dir" <<'EOF'
import sys
from pathlib import Path

from handler.batch_inference import check_model_outputs, load_labels, load_model
from handler.preprocessing import PreprocessConfig

import torch

run = Path(sys.argv[1])
try:
    labels = load_labels(run / "index_to_name.json")
    cfg = PreprocessConfig.load(run / "preprocess.json")
    model = load_model(run / "model.pt", torch.device("cpu"))
    check_model_outputs(model, cfg, len(labels), torch.device("cpu"))
except Exception as e:
    sys.exit(f"error: {run}: {e}")
print(len(labels))
EOF
) || exit 2

# torch-model-archiver writes NAME.mar: build it beside the target, then rename,
# so the file appears whole and never under a name a server could pick up half-written.
work=$(mktemp -d "$store/.archive-$name-XXXXXX")
trap 'rm -rf "$work"' EXIT
# The handler ships as the `handler` package, imported inside the .mar exactly as in the
# repository; the archiver copies a folder's contents, so it gets a folder holding the package.
mkdir -p "$work/package/handler"
cp "$HANDLER_DIR"/*.py "$work/package/handler/"
extra="$work/package,$run_dir/index_to_name.json,$run_dir/preprocess.json"
"$archiver" --model-name "$name" --version "$version" \
    --serialized-file "$run_dir/model.pt" \
    --handler "$HANDLER_DIR/classifier_handler.py" \
    --extra-files "$extra" \
    --config-file "$MODEL_CONFIG" \
    --export-path "$work"
mv -f "$work/$name.mar" "$target"
size=$(du -h "$target" | cut -f1)
echo "archive: $target ($size, $classes classes, handler classifier_handler)"
