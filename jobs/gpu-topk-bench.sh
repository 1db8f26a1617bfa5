#!/usr/bin/env bash
# The top-k encoder's GPU figures (docs/gpu.md, "Top-k encoder backward"): its GPU tests, then
# `bench train --device cuda` at the shapes below, bf16 autocast, batch 4096, k 32, each run timing
# the fused encoder (sparse, sparse-chunked, sparse-csr) beside the dense encoder and, at 768 x 24576,
# the per-SAE loop. About 4 minutes on one H100 or H200.
#
# From the repository root on the GPU machine, with pydantic importable (the machine lacks it: carry
# .gpu/site.tar.xz from shared/gpu/bundle.sh, or pydantic's wheels in .whl/; this script unpacks
# either into /tmp/site):
#   OUT=/some/folder bash jobs/gpu-topk-bench.sh
# Writes $OUT/<name>.json (one bench result each), $OUT/tests.log and $OUT/bench.log.
# SMOKE=1 runs the same commands on the CPU at tiny shapes (a check of the script, not a figure).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the JSON results}
mkdir -p "$OUT" /tmp/site
if [ -f .gpu/site.tar.xz ]; then tar -xJf .gpu/site.tar.xz -C /tmp/site; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/service${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import pydantic, typer" 2>/dev/null; then
  echo "pydantic and typer must be importable (see the comment at the top of $0)" >&2
  exit 2
fi

if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu; big=(--d-model 32 --n-latents 2048); huge=(--d-model 32 --n-latents 4096); rows=256; steps=2; rounds=2
  limit=600
else
  device=cuda; big=(--d-model 768 --n-latents 24576); huge=(--d-model 2048 --n-latents 65536); rows=4096; steps=10
  rounds=3; limit=120
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/bench.log"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/bench.log"
  # correctness first: the encoder's GPU tests, auto's choice of it, steps without host syncs (1-2 minutes)
  timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests/gpu/test_sparse_encode_gpu.py \
    "tests/gpu/test_device_gpu.py::test_auto_measures_kernel_decoder_and_encoder_and_drops_what_fails" \
    tests/gpu/test_gpu.py -k "encode or never_wait" >"$OUT/tests.log" 2>&1
  echo "gpu tests: exit $? (tests.log)" | tee -a "$OUT/bench.log"
fi
common=(--device "$device" --batch-rows "$rows" --k 32 --steps "$steps" --rounds "$rounds" --kernel bmm --json)

bench() {  # NAME ARGS...: one bench train run under a time limit, its JSON to $OUT/NAME.json
  local name=$1; shift
  timeout "$limit" python3 -m dictsweep.cli bench train "${common[@]}" "$@" >"$OUT/$name.json" 2>>"$OUT/bench.log"
  echo "$name: exit $? $(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r['kernel'], r['decode'], r['encode'], round(r['sae_samples_per_s']), r['candidates'], 'per-SAE', round(r.get('reference_sae_samples_per_s', 0)))" "$OUT/$name.json" 2>/dev/null)" | tee -a "$OUT/bench.log"
}

# 768 x 24576, 8 SAEs: every decoder x encoder, and the per-SAE loop (its first decoder and encoder: the sparse ones)
bench topk-768x24576x8 "${big[@]}" --members 8 --architecture topk \
  --decode sparse --decode dense --encode sparse --encode dense --encode sparse-chunked --encode sparse-csr
bench batchtopk-768x24576x8 "${big[@]}" --members 8 --architecture batchtopk \
  --decode sparse --decode dense --encode sparse --encode dense --encode sparse-chunked --encode sparse-csr
# 2048 x 65536, 4 SAEs: the sparse decoder (today's best) with each encoder, three trainers a run (17 GB
# of weights, gradients and Adam moments each: an H100 holds three); no per-SAE loop
bench topk-2048x65536x4 "${huge[@]}" --members 4 --architecture topk --no-reference \
  --decode sparse --encode sparse --encode dense --encode sparse-chunked
bench topk-2048x65536x4-csr "${huge[@]}" --members 4 --architecture topk --no-reference \
  --decode sparse --encode sparse --encode sparse-csr
bench batchtopk-2048x65536x4 "${huge[@]}" --members 4 --architecture batchtopk --no-reference \
  --decode sparse --encode sparse --encode dense
# relu at the same shape (no top-k encoder: the yardstick of the matmul rate)
bench relu-2048x65536x4 "${huge[@]}" --members 4 --architecture relu --no-reference --kernel compile
