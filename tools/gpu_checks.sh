#!/usr/bin/env bash
# Every GPU check and benchmark in one call, as the device lease wants (results under $OUT):
#   OUT=gpu_out bash tools/gpu_checks.sh                      # ~7 min at most (the timeouts below)
#   OUT=gpu_out STEPS="sets" bash tools/gpu_checks.sh         # a rerun of one step
#   OUT=gpu_out QUALITY_SECONDS=300 bash tools/gpu_checks.sh  # also the quality benchmarks (5 more minutes)
# Steps, in this order, each alone on the GPU (timings must not share it):
#   tests      the GPU tests (CUDA engines, per-set folding, torch-compile)           <= 90 s
#   probe      tools/probe_torch_gpu.py: the torch engine's knobs, adapted rows       <= 80 s
#   inference  tools/bench_inference.py: one-set edge model, FLOPs and % of peak      <= 70 s
#   sets       tools/bench_sets.py: 1 vs 2 normalisation sets at 512x1024 on
#              torch-cudagraph, torch-compile (Inductor; compiles here) and tensorrt  <= 170 s
# Wheels the GPU machine lacks go in .whl/ beforehand (git-ignored), e.g. for its Python 3.12:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 matplotlib tqdm
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/r"; R="$OUT/r"
STEPS=${STEPS:-"tests probe inference sets"}
export PYTHONPATH=$PWD MPLBACKEND=Agg OMP_NUM_THREADS=1
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
[ -d .whl ] && pip install -q --no-index --no-deps .whl/*.whl >"$R/pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$R/gpu.txt"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >>"$R/gpu.txt"
has tests && timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/test_engines.py tests/test_compiled.py \
  >"$R/pytest_gpu.log" 2>&1
has probe && timeout 80 python tools/probe_torch_gpu.py --rounds 2 --seconds 0.5 --out "$R/probe.json" >"$R/probe.md" 2>&1
has inference && timeout 70 python tools/bench_inference.py --preset edge --device cuda --sizes 512x1024 \
  --engines torch,torch-cudagraph --rounds 2 --seconds 0.5 --no-parity --out "$R/bench_inference.json" \
  >"$R/bench_inference.md" 2>&1
has sets && timeout 170 python tools/bench_sets.py --device cuda --sizes 512x1024 --sets 1,2 --per-set-graphs 2 \
  --engines torch-cudagraph,torch-compile,tensorrt --seconds 8 --out "$R/bench_sets.json" >"$R/bench_sets.md" 2>&1
T=${QUALITY_SECONDS:-0}
if [ "$T" -gt 0 ]; then
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
fi
tar czf "$OUT/results.tar.gz" -C "$OUT" r
cat "$R"/gpu.txt; tail -5 "$R/pytest_gpu.log" 2>/dev/null
for f in probe bench_inference bench_sets; do [ -f "$R/$f.md" ] && grep -E '^\||^[A-Z]' "$R/$f.md" | tail -20; done
