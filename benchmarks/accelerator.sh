#!/usr/bin/env bash
# The accelerator benchmark set, as recorded in benchmarks/RESULTS.md.
#
#   benchmarks/accelerator.sh OUT_DIR [SET]
#
# SET is `all` (default), `mtag`, `d2v` or `extra`. Every case appends its
# JSON lines to OUT_DIR/results.jsonl and its stderr, under a header, to
# OUT_DIR/stderr.log, and is cut off after CASE_TIMEOUT seconds (default
# 240) so that one slow case cannot eat the rest. JAX must see the accelerator (jax with CUDA);
# the HuggingFace baseline needs torch with CUDA and transformers 4.x.
set -u
out=${1:?usage: benchmarks/accelerator.sh OUT_DIR [all|mtag|d2v|extra]}
set_name=${2:-all}
py=${PYTHON:-python3}
mkdir -p "$out"
# Leave room for the torch baseline in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

case_run() {
  local name=$1
  shift
  local start=$SECONDS
  echo "=== $name: $*" >>"$out/stderr.log"
  timeout "${CASE_TIMEOUT:-240}" "$py" -m "$@" \
    >>"$out/results.jsonl" 2>>"$out/stderr.log"
  echo "$name: rc=$? $((SECONDS - start)) s"
}

if [[ $set_name == all || $set_name == mtag ]]; then
  case_run mtag_dense benchmarks.mtag_step --backends=dense --steps=10 \
    --epoch_batches=0
fi
if [[ $set_name == all || $set_name == d2v ]]; then
  # The host allocator hardly matters next to a GPU; the recorded runs
  # used glibc's defaults.
  d2v=(benchmarks.d2v_step --sizes=base --dtypes=bfloat16 --steps=10
    --baseline --no_malloc_tuning)
  case_run d2v_vision "${d2v[@]}" --modalities=vision --batch=64
  case_run d2v_audio "${d2v[@]}" --modalities=audio --batch=4
  case_run d2v_text "${d2v[@]}" --modalities=text --batch=32
fi
if [[ $set_name == all || $set_name == extra ]]; then
  case_run d2v_vision_f32 benchmarks.d2v_step --sizes=base --dtypes=float32 \
    --steps=10 --baseline --no_malloc_tuning --modalities=vision --batch=64
  case_run mtag_segment benchmarks.mtag_step --backends=segment --steps=5 \
    --epoch_batches=0
fi
