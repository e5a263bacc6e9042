#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks, for benchmarks/gpu.sh, into .whl/
# (ignored: it travels with `carry: [".whl"]`). The image has Python 3.12, jax, numpy,
# scipy, optax, chex, scikit-learn, sentencepiece, tokenizers, h5py, rich, regex, attrs,
# mpmath (see the device tool's KINDS.md); nothing can be fetched there.
#
#     bash scripts/gpu_wheels.sh        # here, with the network; then benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions tested here (pip list of the dev environment); compiled ones for cp312.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  keras==3.15.1 keras-hub==0.32.0 dp-accounting==0.6.0 jax-privacy==2.0.0 \
  namex==0.1.0 optree==0.20.0 dm-tree==0.1.10 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 \
  kagglehub==1.0.2 kagglesdk==0.1.28
ls .whl
du -sh .whl
