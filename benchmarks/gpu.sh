#!/usr/bin/env bash
# Issue 23's GPU checks in one go, on a lent GPU machine (the device tool), within 10 minutes: the CUDA tests
# (tests/gpu/, and the CUDA paths' CPU tests) then the benchmark (benchmarks/gpu.py). Logs and results go to $OUT
# (the device tool's folder that comes back) or ./gpu-results.
#
#   here:    bash benchmarks/gpu_wheels.sh        # the packages the GPU machine's image lacks, into .whl/
#   device:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#
# What it measures (acceptance of issue 23): greedy tokens = transformers' on CUDA (fp32, 32 prompts), CUDA graph
# replays = eager steps bit for bit, training losses on CUDA = the CPU's (fp32 1e-4, bf16 2e-2), DDP/FSDP over NCCL
# where there are 2+ GPUs; offline throughput, single-stream decode (share of the bandwidth bound) and LoRA SFT
# tokens/s + MFU on SmolLM2-135M's and Llama-3.2-1B's shapes, lmforge vs transformers (+ PEFT).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LMFORGE_KERNELS=0  # the CPU kernels are not what is measured here
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 280 python3 -m pytest -q -ra -p no:cacheprovider tests/gpu tests/unit/test_cuda_paths.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 280 python3 benchmarks/gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
