#!/usr/bin/env bash
# Submit a cap-dist recipe to a Ray cluster: `ray job submit` with this repository as the working directory and
# cluster/runtime_env.yaml as the runtime environment (what it ships and which variables it sets).
#
#   jobs/submit.sh [options] RECIPE [prune|run] [key=value ...]
#
#   jobs/submit.sh jobs/dinov2_vitg14_oneshot50.yaml
#   jobs/submit.sh jobs/deit_small_gradual90.yaml run finetune.epochs=2
#   jobs/submit.sh --no-wait jobs/convnext_base_oneshot50.yaml prune prune.sparsity=0.6 output=s3://b/runs/cnx-60
#   DRY_RUN=1 jobs/submit.sh jobs/vit4mnist.yaml          # print the command, run nothing
#
# The command defaults to `run` (gradual prune + finetune) for a recipe with a top-level `finetune:` section and to
# `prune` otherwise. The cluster address comes from RAY_ADDRESS (default http://127.0.0.1:8265: `ray dashboard
# cluster/aws.yaml` or `kubectl port-forward svc/cap-dist-head-svc 8265:8265` forward it there).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: jobs/submit.sh [--dry-run] [--no-wait] [--address URL] [--submission-id ID] RECIPE [prune|run] [key=value ...]

  RECIPE             a recipe inside this repository (e.g. jobs/dinov2_vitg14_oneshot50.yaml) or a URI (s3://...)
  prune|run          cap-dist command (default: run if the recipe has a finetune: section, else prune)
  key=value          recipe overrides passed to cap-dist (e.g. prune.sparsity=0.75 output=s3://bucket/runs/x)

  --dry-run          print the `ray job submit` command instead of running it (same as DRY_RUN=1)
  --no-wait          return after submitting; follow with `ray job logs -f ID`
  --address URL      Ray dashboard / job API address (default: $RAY_ADDRESS or http://127.0.0.1:8265)
  --submission-id ID job id to use (default: Ray picks one)
EOF
}

die() {
    echo "jobs/submit.sh: error: $*" >&2
    exit 2
}

dry_run="${DRY_RUN:-0}"
no_wait=0
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
submission_id=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) dry_run=1; shift ;;
        --no-wait) no_wait=1; shift ;;
        --address) [[ $# -ge 2 && -n "$2" ]] || die "--address needs a URL"; address="$2"; shift 2 ;;
        --address=*) address="${1#*=}"; shift ;;
        --submission-id) [[ $# -ge 2 && -n "$2" ]] || die "--submission-id needs a value"; submission_id="$2"; shift 2 ;;
        --submission-id=*) submission_id="${1#*=}"; shift ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) break ;;
    esac
done

if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
recipe="$1"
shift

# The working directory shipped to the cluster is the repository, so a local recipe must lie inside it; the
# job then reads it by its path relative to the repository root.
if [[ "$recipe" == *://* ]]; then
    config="$recipe"
    finetune_section=0
else
    [[ -f "$recipe" ]] || die "recipe $recipe does not exist (give a path such as jobs/dinov2_vitg14_oneshot50.yaml)"
    recipe_abs="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"
    case "$recipe_abs" in
        "$root"/*) config="${recipe_abs#"$root"/}" ;;
        *) die "recipe $recipe lies outside the repository $root, which is what the job ships; copy it into jobs/" ;;
    esac
    if grep -qE '^finetune:' "$recipe_abs"; then finetune_section=1; else finetune_section=0; fi
fi

command=""
if [[ $# -gt 0 && ( "$1" == "prune" || "$1" == "run" ) ]]; then
    command="$1"
    shift
elif [[ $# -gt 0 && "$1" != *=* ]]; then
    die "unknown command '$1': use prune or run (or key=value overrides)"
fi
if [[ -z "$command" ]]; then
    if [[ "$finetune_section" == 1 ]]; then command=run; else command=prune; fi
fi

for override in "$@"; do
    [[ "$override" == *=* && "${override%%=*}" != "" ]] || die "override '$override' is not key=value (e.g. prune.sparsity=0.75)"
done

runtime_env="cluster/runtime_env.yaml"
[[ -f "$root/$runtime_env" ]] || die "$root/$runtime_env is missing"

cmd=(ray job submit --address "$address" --working-dir . --runtime-env "$runtime_env")
[[ "$no_wait" == 1 ]] && cmd+=(--no-wait)
[[ -n "$submission_id" ]] && cmd+=(--submission-id "$submission_id")
cmd+=(-- cap-dist "$command" --config "$config" "$@")

if [[ "$dry_run" == 1 ]]; then
    echo "# would run in $root:" >&2
    line="$(printf '%q ' "${cmd[@]}")"
    echo "${line% }"
    exit 0
fi

command -v ray >/dev/null 2>&1 || die "the ray CLI is not on PATH (pip install 'ray[default]==2.60.0', or activate .venv)"
cd "$root"
exec "${cmd[@]}"
