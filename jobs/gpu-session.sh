#!/usr/bin/env bash
# One session on a lent GPU machine, in one prepared script: the GPU tests, the gpu-smoke sweep
# (one trainer, then two sharing the GPU) measured against `bench train` at the same shapes, and
# `bench train` once from the command line. Every log, JSON and figure goes to $OUT.
#
# Here, once (needs the package registry; writes .gpu/, which git ignores):
#   bash jobs/gpu-session.sh --pack
# There, from the repository root, in one run that carries .gpu:
#   bash jobs/gpu-session.sh                                   # about 8 minutes
# Proving the plumbing on a CPU (tiny shapes, device cpu, this machine's Python):
#   DICTSWEEP_GPU_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/gpu-out bash jobs/gpu-session.sh
#
# The lent machine has Python 3.12, torch + CUDA, numpy, pyarrow, transformers; no Ray, MLflow,
# pydantic (../shared/gpu/bundle.sh packs them: .gpu/site.tar.xz) and maybe no pytest: --pack also
# packs pytest, pytest-xdist and nvidia-ml-py (torch.cuda.utilization reads NVML through it) into
# .gpu/extra.tar.xz, unpacked beside the bundle when the machine lacks them.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [ "${1:-}" = "--pack" ]; then
  set -e
  cd "$root"
  extra=$(mktemp -d) scratch=$(mktemp -d); trap 'rm -rf "$extra" "$scratch"' EXIT
  # bundle.sh notes .gpu/ in .git/info/exclude, which a git worktree (.git is a file there) lacks:
  # it runs from a scratch folder and writes here
  [ -f .gpu/site.tar.xz ] || (mkdir -p "$scratch/.git/info" && cd "$scratch" && bash "$root/../shared/gpu/bundle.sh" "$root/.gpu")
  python3 -m pip install -q --target "$extra" --python-version 3.12 --implementation cp --only-binary=:all: \
    pytest pytest-xdist nvidia-ml-py 2>&1 | grep -v '^WARNING' || true
  find "$extra" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$extra"/bin
  tar -C "$extra" -cf - . | xz -6 -T0 > .gpu/extra.tar.xz
  du -h .gpu/*.tar.xz
  exit 0
fi

OUT=${OUT:?set OUT to the folder that keeps the logs}
mkdir -p "$OUT"
dry=${DICTSWEEP_GPU_DRY:-}
PY=${PYTHON:-python3}
scale=$([ -n "$dry" ] && echo 4 || echo 1)  # a small shared CPU is slower than the GPU machine at anything
work=${WORK:-/tmp/gpu-session}
rm -rf "$work" && mkdir -p "$work"
started=$(date +%s)
note() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/session.txt"; }
# a step: its name, its time limit (seconds), the command; output in $OUT/<name>.log, status noted
step() {
  local name=$1 limit=$(( $2 * scale )); shift 2
  note "$name: $*"
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  note "$name: exit $code$([ $code = 124 ] && echo " (ran past ${limit} s)")"
  return $code
}

if [ -z "$dry" ]; then
  site=/tmp/site
  mkdir -p "$site" && tar -xJf "$root/.gpu/site.tar.xz" -C "$site"
  if ! "$PY" -c "import pytest, xdist, pynvml" 2>/dev/null && [ -f "$root/.gpu/extra.tar.xz" ]; then
    mkdir -p /tmp/extra && tar -xJf "$root/.gpu/extra.tar.xz" -C /tmp/extra
    # PYTHONPATH comes before the machine's own packages: keep only what the machine lacks
    for module in pytest:_pytest:py xdist execnet pluggy iniconfig packaging pygments pynvml; do
      "$PY" -c "import ${module%%:*}" 2>/dev/null || continue
      for name in ${module//:/ }; do rm -rf /tmp/extra/"$name" /tmp/extra/"$name".py /tmp/extra/"$name"-*.dist-info; done
    done
    site=$site:/tmp/extra
  fi
  export PYTHONPATH=$site:$root/service:$root
else
  export PYTHONPATH=$root/service:$root
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
cd "$work"

{
  date -u; nproc; free -g | head -2; df -h /dev/shm "$work" | tail -2
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
  "$PY" -c "import ray, mlflow, pydantic; print('ray', ray.__version__, 'mlflow', mlflow.__version__)" 2>&1
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
  "$PY" -c "import pynvml; print('nvidia-ml-py there')" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
command -v nvidia-smi > /dev/null && {
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/nvidia-smi.csv" 2>&1 &
  smi=$!
}

spec=$root/jobs/gpu-smoke.yaml
sets=()
if [ -n "$dry" ]; then  # the same file at tiny shapes on the CPU
  sets=(--set resources.device=cpu --set data.synth.d_model=64 --set data.synth.n_features=256
    --set data.synth.active=4 --set data.synth.rows=32768 --set data.synth.eval_rows=4096
    --set data.synth.shard_rows=4096 --set "grid.n_latents=[128,256]" --set "grid.k=[8]"
    --set "grid.target_l0=[8]" --set "grid.seed=[0,1]" --set train.tokens=32768 --set train.batch_rows=512
    --set train.step_rows=512 --set train.log_every_tokens=4096 --set train.eval_tokens=4096
    --set evaluation.inspect_tokens=8192 --set evaluation.baseline_rows=8192 --set evaluation.ica_rows=2048
    --set stream.readers_per_node=2)
fi

# the dataset, written on the CPU while the GPU tests run (the sweep would write it on first use)
"$PY" - "$spec" "${sets[@]}" > "$OUT/synth.log" 2>&1 <<'EOF' &
import sys
from dictsweep.spec_file import load_spec
from dictsweep.store.synth import synth_dataset
spec = load_spec(sys.argv[1], [arg for arg in sys.argv[2:] if arg != "--set"])
manifest = synth_dataset(spec.data.uri, spec.data.synth)
print(f"{manifest.n_rows} rows, d_model {manifest.d_model}, {manifest.dtype}, at {spec.data.uri}")
EOF
synth=$!

workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
step gpu-tests 150 "$PY" -m pytest -m cuda "$root/tests/gpu" -q -rs $workers -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"
note "gpu-tests: $(tail -1 "$OUT/gpu-tests.log")"
wait $synth; note "synth: exit $? ($(tail -1 "$OUT/synth.log"))"

# what a finished sweep must have left: every export loads, every MLflow run FINISHED with its
# curves, an inspect browser per selected dictionary
check() {
  "$PY" - "$1" > "$OUT/check-$1.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from mlflow import MlflowClient
from dictsweep import load_dictionary
export = Path("dictionaries/gpu-smoke")
index = json.loads((export / "index.json").read_text())
for entry in index:
    sae = load_dictionary(str(export / entry["path"]))
    browser = export / "inspect" / entry["path"] / "index.html"
    print(f"{entry['path']}: loads, W_dec {tuple(sae.W_dec.shape)}, fvu {entry['metrics']['fvu']:.3f}, browser {browser.exists()}")
client = MlflowClient("sqlite:///mlflow.db")
experiment = client.get_experiment_by_name("gpu-smoke")
runs = client.search_runs([experiment.experiment_id])
statuses = {}
for run in runs:
    statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
print("runs by status:", statuses)
saes = [run for run in runs if run.data.tags.get("dictsweep.role") == "sae"]
points = {len(client.get_metric_history(run.info.run_id, "fvu")) for run in saes}
print(f"{len(saes)} SAE runs, fvu curve points per run: {sorted(points)}")
EOF
  note "check-$1: exit $? ($(tail -2 "$OUT/check-$1.log" | tr '\n' ' '))"
}

step sweep-1trainer 180 "$PY" -m dictsweep.cli bench sweep "$spec" "${sets[@]}" --compare --json
tail -1 "$OUT/sweep-1trainer.log" > "$OUT/sweep-1trainer.json"
check 1trainer
cp dictionaries/gpu-smoke/index.json "$OUT/index-1trainer.json" 2>/dev/null
cp dictionaries/gpu-smoke/pareto.png "$OUT/pareto-1trainer.png" 2>/dev/null
rm -rf sweeps dictionaries  # the disk: checkpoints and dictionaries of 32 SAEs

# two trainers sharing the GPU (on a CPU: two trainers), half the tokens, no baselines or inspect (the
# first run had them)
step sweep-2trainers 120 "$PY" -m dictsweep.cli bench sweep "$spec" "${sets[@]}" \
  --set resources.gpus_per_trainer=0.5 --set train.tokens=$([ -n "$dry" ] && echo 16384 || echo 1048576) \
  $([ -n "$dry" ] && echo --set resources.trainers=2) \
  --set "baselines=[]" --set evaluation.inspect=false --compare --json
tail -1 "$OUT/sweep-2trainers.log" > "$OUT/sweep-2trainers.json"

# bench train from the command line at the sweep's largest topk shape (4 SAEs, as its ensembles)
if [ -n "$dry" ]; then shape=(--d-model 64 --n-latents 256 --batch-rows 512 --device cpu); else
  shape=(--d-model 768 --n-latents 24576 --batch-rows 4096 --device cuda); fi
step bench-train 40 "$PY" -m dictsweep.cli bench train "${shape[@]}" --members 4 --k $([ -n "$dry" ] && echo 8 || echo 32) \
  --architecture topk --steps 10 --rounds 3 --no-reference --json
tail -1 "$OUT/bench-train.log" > "$OUT/bench-train.json"

[ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
"$PY" - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("sweep-1trainer", "sweep-2trainers"):
    try:
        r = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as error:
        print(f"{name}: no result ({error})")
        continue
    print(f"{name}: {r['saes']} SAEs on {r['device']}; {r['sae_samples_per_s']:,.0f} SAE-samples/s over "
          f"{r['train_seconds']:.1f} s ({r['checkpoint_seconds']:.1f} s writing checkpoints); bench train at the same "
          f"shapes {r['bench_train_sae_samples_per_s']:,.0f} -> {r['fraction_of_bench_train']:.0%}; data wait "
          f"{r['data_wait_fraction']:.1%}; GPU busy {r['gpu_busy_fraction']}; utilisation {r['gpu_utilization']}; {r['gpu_note']}")
    for b in r["bench_train"]:
        print(f"  bench train {b['architecture']} {b['d_model']}x{b['n_latents']} x{b['members']} k{b['k']} "
              f"{b['kernel']}/{b['decode']}: {b['sae_samples_per_s']:,.0f}")
EOF
cat "$OUT/summary.txt" | tee -a "$OUT/session.txt"
note "done"
