#!/usr/bin/env bash
# The benchmark suite on a lent GPU machine, in one call of the device tool (its
# command is limited to 10 minutes; the wheels come from scripts/gpu_wheels.sh):
#
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#     run(command="bash benchmarks/gpu.sh clipping", ...)     # one part only
#
# Parts, in this order by default, each under its own time limit so that one that
# overruns leaves the others' results: probe (where a small model's fixed cost per
# step goes: fit against the jitted step alone, and per-step device-to-host transfers;
# 60 s), run (keras_dp vs plain Keras vs jax-privacy:
# MLP, Gemma3 LoRA and full; 280 s), clipping (per_example/ghost/auto vs plain: MLP, CNN,
# text classifier, Gemma3 LoRA; 220 s), host (host work per update, also with the
# progress bar: eight kinds of fit; 120 s); on request
# only, tied (a tied embedding's ghost norm against its per-example gradients, 240 s:
# `bash benchmarks/gpu.sh tied`), probe-lm (the probe on Gemma3 LoRA: is its DP
# step or the host's work around it the gap; 150 s: `bash benchmarks/gpu.sh probe-lm`)
# and parts (a DP step split into clipping, padding rows and noise: MLP and text
# classifier; 120 s: `bash benchmarks/gpu.sh parts`).
# Results land
# in $OUT (the device tool brings them back; at most 8 files): <part>-*.md, <part>-*.json
# and gpu.log (the card, versions and every part's output). PROBE_S, RUN_S, CLIPPING_S,
# HOST_S, TIED_S, PROBE_LM_S and PARTS_S override the limits (run, clipping and host together took 430 s on
# 2026-12-04, the probe 40 s alone). Checked here in a venv holding only the image's
# packages (no TensorFlow) with the same wheels for Python 3.11: every part starts and
# writes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/keras_dp_gpu}"
mkdir -p "$out"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(probe run clipping host)
log="$out/gpu.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" >>"$log"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import jax, keras, keras_hub, dp_accounting, jax_privacy, keras_dp; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'keras_hub', keras_hub.__version__, 'jax_privacy', jax_privacy.__version__)"
} >>"$log" 2>&1
for part in "${parts[@]}"; do
  dir="$out/tmp_$part"
  echo "== $part $(date -u +%T)" >>"$log"
  case "$part" in
    probe) timeout "${PROBE_S:-75}" python3 benchmarks/gpu_probe.py --out "$dir" >>"$log" 2>&1 ;;
    probe-lm) timeout "${PROBE_LM_S:-150}" python3 benchmarks/gpu_probe.py --models gemma-lora \
           --out "$dir" >>"$log" 2>&1 ;;
    run) timeout "${RUN_S:-280}" python3 benchmarks/run.py --repeats 2 --sweep --sections overhead memory \
           --memory-models mlp gemma-lora --out "$dir" >>"$log" 2>&1 ;;
    clipping) timeout "${CLIPPING_S:-220}" python3 benchmarks/clipping.py \
           --models mlp cnn text gemma-lora --repeats 2 --memory-models mlp cnn text \
           --out "$dir" >>"$log" 2>&1 ;;
    host) timeout "${HOST_S:-120}" python3 benchmarks/host.py --repeats 3 --out "$dir" >>"$log" 2>&1 ;;
    tied) mkdir -p "$dir" && timeout "${TIED_S:-240}" python3 benchmarks/tied_embedding.py \
           --repeats 5 >"$dir/tied_embedding.md" 2>>"$log" ;;
    parts) timeout "${PARTS_S:-120}" python3 benchmarks/step_parts.py --models mlp text \
           --repeats 31 --calls 30 --out "$dir" >>"$log" 2>&1 ;;
    *) echo "unknown part $part (probe, run, clipping, host, tied, probe-lm, parts)" >>"$log"; continue ;;
  esac
  echo "== $part exited $? $(date -u +%T)" >>"$log"
  for f in "$dir"/*.md "$dir"/*.json; do
    [ -e "$f" ] && mv "$f" "$out/${part}-$(basename "$f")"
  done
  rm -rf "$dir"
done
