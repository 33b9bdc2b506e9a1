#!/usr/bin/env bash
# Every GPU check and benchmark in one call, as the device lease wants (results under $OUT):
#   OUT=gpu_out bash tools/gpu_checks.sh
# 1) GPU tests, 2) inference timings alone on the GPU, 3) the quality benchmarks in parallel.
# Wheels the GPU machine lacks go in .whl/ beforehand (git-ignored), e.g. for its Python 3.12:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 matplotlib tqdm
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/r"; R="$OUT/r"
export PYTHONPATH=$PWD MPLBACKEND=Agg OMP_NUM_THREADS=1
[ -d .whl ] && pip install -q --no-index --no-deps .whl/*.whl >"$R/pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$R/gpu.txt"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >>"$R/gpu.txt"
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/test_engines.py >"$R/pytest_gpu.log" 2>&1
timeout 150 python tools/probe_torch_gpu.py --out "$R/probe.json" >"$R/probe.md" 2>&1
timeout 150 python tools/bench_inference.py --preset edge --device cuda --engines torch,torch-fp16,torch-cudagraph \
  --no-parity --out "$R/bench_inference.json" >"$R/bench_inference.md" 2>&1
T=${QUALITY_SECONDS:-300}
timeout $T python tools/bench_quality.py --preset small --device cuda --targets synthetic \
  --out "$R/quality.json" --plot-dir "$R" >"$R/quality.md" 2>&1 &
timeout $T python tools/ablations.py --preset small --device cuda --out "$R/ablations.json" --plot-dir "$R" \
  >"$R/ablations.md" 2>&1 &
for m in "mas3" "mas3 (reset every round)" "bn" "tent" "pseudo" "mas3-paper"; do
  f=$(echo "$m" | tr -cd 'a-z0-9')
  timeout $T python tools/bench_continual.py --preset small --device cuda --methods "$m" \
    --out "$R/continual_$f.json" --plot "$R/continual_$f.png" >"$R/continual_$f.md" 2>&1 &
done
wait
tar czf "$OUT/results.tar.gz" -C "$OUT" r && cat "$R"/gpu.txt "$R"/probe.md "$R"/bench_inference.md | tail -80
