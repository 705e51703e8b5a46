#!/usr/bin/env bash
# The GPU measurements of issue 7 (speed) in one call of a lent GPU machine:
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu PY=python bash benchmarks/device_check.sh   # a dry run of the same steps on a CPU
#
# That machine has torch, Lightning and torchmetrics but no network: hydra-core, omegaconf,
# wandb and pythae (and what they need that it lacks) travel as wheels in .whl/, the data as
# .benchdata/{MNIST/raw,BinarizedMNIST} (copies of ../shared/data; both folders git-ignored).
# Every train.py or benchmark process costs ~20-40 s of start-up there (imports, CUDA context,
# W&B), far more than an epoch: on 2026-11-27 one round of four contenders took ~100 s per
# model. Each finished run prints its figures at once, so a call cut short keeps them.
# Prepare both here, where pip reaches the registry:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl -r benchmarks/device_wheels.txt
#   python -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl     # (no wheel on PyPI)
#   mkdir -p .benchdata/MNIST/raw .benchdata/BinarizedMNIST
#   cp ../shared/data/MNIST/raw/*.gz .benchdata/MNIST/raw/
#   cp ../shared/data/BinarizedMNIST/binarized_mnist.npz .benchdata/BinarizedMNIST/
# (~40 MB together) and carry .whl and .benchdata with the call.
# PHASES picks the steps: tests (tests/test_graphs.py, whose GPU tests record real CUDA graphs, and
# the test of evaluation.pass_size=auto against CUDA's own out-of-memory error),
# smoke (the default run in bf16-mixed on the GPU, model.cuda_graph=auto), table (the issue's
# table, both models), variants (model.compile=true, its reduce-overhead mode, data.on_device=false, one sync a step), profile (cProfile
# of a short MLP run, to $OUT/vaelab-mlp.prof); not by default: evaluation (importance-sampled
# log p(x) by evaluation.pass_size on the GPU, benchmarks/evaluation.py: whether auto should bound
# passes there too; ~6 processes, EVAL_MODELS=mlp for fewer).
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; EPOCHS=${EPOCHS:-2}; REPEATS=${REPEATS:-1}; PHASES=${PHASES:-"tests smoke table variants profile"}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PY:-python3}
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  # a clean folder: a package left from an earlier install there can shadow the standard library
  rm -rf /tmp/site; $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
fi
SITE=${PYTHAE_DIR:-/tmp/site}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY -c "import torch, lightning, hydra, wandb, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'wandb', wandb.__version__, 'cuda', torch.cuda.is_available())"
ACCEL=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
GRAPH=$([ "$DEVICE" = cuda ] && echo ",plain-graph" || echo "")
bench() { $PY benchmarks/throughput.py --device "$DEVICE" --epochs "$EPOCHS" --shared .benchdata --pythae-dir "$SITE" "$@"; }

for PHASE in $PHASES; do case $PHASE in
tests)
  # the tests that need a GPU (CUDA graphs recorded for real), with the rest of their file
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_graphs.py \
    tests/test_reliability.py::test_a_real_cuda_out_of_memory_halves_auto_passes_and_frees_the_failed_pass \
    2>&1 | tee "$OUT/tests-graphs.txt" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "TESTS FAILED"; exit 1; } ;;
smoke)
  # the default run in bf16-mixed with the step as CUDA graphs (auto: eager on a CPU dry run)
  rm -rf /tmp/smoke  # train.py refuses a new run into an earlier run's folder (a second call on a warm machine)
  timeout 150 $PY train.py trainer.max_epochs=3 trainer.precision=bf16-mixed trainer.accelerator=$ACCEL \
    model.cuda_graph=auto hydra.run.dir=/tmp/smoke > "$OUT/smoke.log" 2>&1 && grep -E "cuda_graph|elbo|nll" "$OUT/smoke.log" | tail -14 \
    || { echo "SMOKE FAILED"; tail -30 "$OUT/smoke.log"; exit 1; } ;;
table)
  for MODEL in mlp conv; do
    bench --model $MODEL --repeats "$REPEATS" --contenders "vaelab,vaelab-eager,plain,pythae$GRAPH" 2>&1 | tee "$OUT/throughput-$MODEL.txt"
  done ;;
variants)
  bench --model mlp --repeats 1 --contenders "vaelab-hostdata,vaelab-compile,vaelab-compile-graphs,plain-sync" 2>&1 | tee "$OUT/throughput-variants.txt" ;;
evaluation)
  $PY benchmarks/evaluation.py --device "$DEVICE" --model "${EVAL_MODELS:-mlp,conv}" --samples 100 --repeats 2 \
    --pass-sizes none,1024,16384 2>&1 | tee "$OUT/evaluation.txt" | tail -12 ;;
profile)
  ROOT=/tmp/profroot; mkdir -p $ROOT; cp -r .benchdata/BinarizedMNIST $ROOT/; rm -rf /tmp/prof
  timeout 150 $PY -m cProfile -o "$OUT/vaelab-mlp.prof" train.py data=binarized_mnist data.root=$ROOT \
    encoder=mlp decoder=mlp "encoder.hidden=[512,512]" "decoder.hidden=[512,512]" likelihood=bernoulli \
    latent_dim=32 data.batch_size=128 trainer.accelerator=$ACCEL trainer.max_epochs=2 test=false hydra.run.dir=/tmp/prof \
    > "$OUT/profile-run.log" 2>&1; echo "profile run rc=$?" ;;
esac; done
