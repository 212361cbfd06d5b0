#!/usr/bin/env bash
# Package a training run as MODEL_STORE/NAME-VERSION.mar with this repository's handler.
#   scripts/archive.sh RUN_DIR NAME VERSION [--force] [--precision fp32|bf16|fp16|auto] [--no-precision-check]
#                      [--pt2 fp32|bf16|int8]
# --pt2 P serves RUN_DIR/model-P.pt2 (an AOTInductor package, `scripts/export.py --pt2 P`) instead
# of model.pt: its record and its passing agreement report (`--check-precision --pt2 P`, on this
# very package) travel in the .mar; without the report it refuses (exit 2) unless --no-precision-check.
# --precision writes handler.precision into the packaged model-config.yaml (default fp32). Any
# other precision needs RUN_DIR/precision-P.json, a passing report of
# `python scripts/export.py --check-precision P` on this model.pt (auto: at least one), unless
# --no-precision-check (models of random weights, as the benchmark's). The reports travel in the .mar.
# MODEL_STORE (environment) picks the store; default: model_store/ in the repository.
# HANDLER_DIR (a copy of handler/, e.g. an older revision to measure against) and MODEL_CONFIG
# (another model-config.yaml) are for the benchmark's variants; defaults: this repository's.
# One file per version, so several versions can stand in the store side by side.
set -euo pipefail

USAGE="usage: scripts/archive.sh RUN_DIR NAME VERSION [--force] [--precision fp32|bf16|fp16|auto] [--no-precision-check] [--pt2 fp32|bf16|int8]"
die() { echo "error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HANDLER_DIR=$(cd "${HANDLER_DIR:-$REPO/handler}" 2>/dev/null && pwd) || die "HANDLER_DIR not found: $HANDLER_DIR"
MODEL_CONFIG=$(realpath -m "${MODEL_CONFIG:-$HANDLER_DIR/model-config.yaml}")
HANDLER_FILES=("$HANDLER_DIR/__init__.py" "$HANDLER_DIR/classifier_handler.py" "$MODEL_CONFIG")
RUN_FILES=(model.pt index_to_name.json preprocess.json)

force=0 precision=fp32 precision_check=1 pt2=""
args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --no-precision-check) precision_check=0 ;;
        --precision) [ "$#" -ge 2 ] || die "--precision needs a value ($USAGE)"; precision=$2; shift ;;
        --precision=*) precision=${1#--precision=} ;;
        --pt2) [ "$#" -ge 2 ] || die "--pt2 needs a value ($USAGE)"; pt2=$2; shift ;;
        --pt2=*) pt2=${1#--pt2=} ;;
        -h|--help) echo "$USAGE"; exit 0 ;;
        -*) die "unknown option $1 ($USAGE)" ;;
        *) args+=("$1") ;;
    esac
    shift
done
case "$precision" in fp32|bf16|fp16|auto) ;; *) die "--precision $precision: expected fp32, bf16, fp16 or auto" ;; esac
case "$pt2" in ''|fp32|bf16|int8) ;; *) die "--pt2 $pt2: expected fp32, bf16 or int8" ;; esac
[ -z "$pt2" ] || precision=auto  # a package serves its own precision
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

# Check the run's contents the way the handler will read them, and the precision's agreement
# reports, before packaging; write the model-config.yaml to package (PyYAML: no hand-made YAML).
work=$(mktemp -d "$store/.archive-$name-XXXXXX")
trap 'rm -rf "$work"' EXIT
classes=$(.venv/bin/python - "$run_dir" "$MODEL_CONFIG" "$precision" "$precision_check" "$work" "$pt2" <<'EOF'
import json
import sys
from pathlib import Path

import torch
import yaml

from handler import aot
from handler.batch_inference import check_model_outputs, load_labels, load_model
from handler.device import DTYPES, REPORT_PATTERN
from handler.preprocessing import PreprocessConfig
from training.agreement import file_sha256

run, config_path, precision, work = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[5])
check = sys.argv[4] == "1"
pt2 = sys.argv[6]
try:
    labels = load_labels(run / "index_to_name.json")
    cfg = PreprocessConfig.load(run / "preprocess.json")
    model = load_model(run / "model.pt", torch.device("cpu"))
    check_model_outputs(model, cfg, len(labels), torch.device("cpu"))
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    config.setdefault("handler", {})["precision"] = precision
except Exception as e:
    sys.exit(f"error: {run}: {e}")

# Reports on this very model.pt that passed: only those travel in the .mar.
model_sha = file_sha256(run / "model.pt")
found, passing = [], []
for p in DTYPES:
    path = run / REPORT_PATTERN.format(p)
    if not path.is_file():
        continue
    found.append(path.name)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        continue
    if report.get("passed") is True and report.get("model_sha256") == model_sha:
        passing.append(p)
        (work / "reports").mkdir(exist_ok=True)
        (work / "reports" / path.name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
wanted = [p for p in DTYPES if p != "fp32"] if precision == "auto" else [precision]
if check and not pt2 and precision != "fp32" and not set(wanted) & set(passing):
    found_text = f"{', '.join(found)} found but not passed for this model.pt" if found else "none found"
    sys.exit(f"error: {run}: --precision {precision} needs a passing agreement report "
             f"({' or '.join(REPORT_PATTERN.format(p) for p in wanted)}; {found_text}); run "
             f"python scripts/export.py --checkpoint {run}/checkpoint.pth --check-precision "
             f"{wanted[0]}, or pass --no-precision-check")
if pt2:
    package = run / f"model-{pt2}.pt2"
    try:
        meta = aot.check_package(package, torch.device("cpu"))
        compiled, _ = aot.load_package(package, torch.device("cpu"))
        check_model_outputs(compiled, cfg, len(labels), torch.device("cpu"))
    except (aot.PackageRefused, OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {run}: --pt2 {pt2}: {e}")
    if meta.get("model_sha256") != model_sha:
        sys.exit(f"error: {package}: compiled from another model.pt than the run's; compile it again")
    largest = int(config.get("batchSize") or 1)
    if largest > meta["batch_sizes"][-1]:
        sys.exit(f"error: {package}: takes batches up to {meta['batch_sizes'][-1]}, the archive's batchSize is "
                 f"{largest}; compile it with --batch-size {largest}")
    name = REPORT_PATTERN.format(f"pt2-{pt2}")
    try:
        report = json.loads((run / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    good = isinstance(report, dict) and report.get("passed") is True and \
        report.get("package_sha256") == meta["package_sha256"]
    if good:
        (work / "reports").mkdir(exist_ok=True)
        (work / "reports" / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    elif check:
        sys.exit(f"error: {run}: --pt2 {pt2} needs a passing agreement report on this package ({name}: "
                 f"{'none found' if report is None else 'not passed or about another package'}); run "
                 f"python scripts/export.py --checkpoint {run}/checkpoint.pth --pt2 {pt2} --check-precision, "
                 f"or pass --no-precision-check")
(work / "model-config.yaml").write_text(
    f"# Written by scripts/archive.sh from {config_path.name}, handler.precision set to {precision}.\n"
    + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
print(len(labels))
EOF
) || exit 2

# torch-model-archiver writes NAME.mar: build it beside the target, then rename,
# so the file appears whole and never under a name a server could pick up half-written.
# The handler ships as the `handler` package, imported inside the .mar exactly as in the
# repository; the archiver copies a folder's contents, so it gets a folder holding the package.
mkdir -p "$work/package/handler"
cp "$HANDLER_DIR"/*.py "$work/package/handler/"
extra="$work/package,$run_dir/index_to_name.json,$run_dir/preprocess.json"
if [ -d "$work/reports" ]; then
    for report in "$work"/reports/*.json; do extra="$extra,$report"; done
fi
serialized="$run_dir/model.pt"
if [ -n "$pt2" ]; then
    serialized="$run_dir/model-$pt2.pt2"
    extra="$extra,$run_dir/model-$pt2.pt2.json"
fi
"$archiver" --model-name "$name" --version "$version" \
    --serialized-file "$serialized" \
    --handler "$HANDLER_DIR/classifier_handler.py" \
    --extra-files "$extra" \
    --config-file "$work/model-config.yaml" \
    --export-path "$work"
mv -f "$work/$name.mar" "$target"
size=$(du -h "$target" | cut -f1)
echo "archive: $target ($size, $classes classes, handler classifier_handler, ${pt2:+package model-$pt2.pt2, }precision $precision)"
