#!/usr/bin/env bash
# The accelerator half of the kernel work, as one run on a lent GPU/TPU machine (the device tool):
#   1. the kernel tests with the kernels compiled for the device (tests/test_kernels_native.py)
#      and the interpreted/lowering kernel tests;
#   2. the kernel benchmark: ms per call, achieved K/V bandwidth vs the measured copy bandwidth,
#      speed-up over XLA's jnp twin (table on stdout, JSON beside it).
# Needs only jax (with the accelerator), numpy, pytest, torch + transformers (for the random model).
#   bash scripts/device_check.sh            # writes into $OUT (the device tool's) or runs/device
set -uo pipefail
out=${OUT:-runs/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
status=0
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
python -m pytest -q -p no:cacheprovider -rs tests/test_kernels_native.py tests/test_kernels_slot_attention.py \
    tests/test_kernels_prefill_attention.py tests/test_kernels_topk.py 2>&1 | tee "$out/kernel_tests.txt" || status=1
python eval/bench_kernels.py --out "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.txt" || status=1
exit $status
