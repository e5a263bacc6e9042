#!/usr/bin/env bash
# Smoke-tests keras_dp against the oldest and the newest tested Keras and JAX, each in a
# fresh virtual environment (keras-hub left out, jax-privacy in for BandMF: the smoke subset is the
# DP step, its reference tests, the privacy fixes and the noise; TensorFlow is in, as keras-hub
# brings it, and keras 3.12.0 imports it through optree).
#
#   scripts/version_range.sh oldest|newest     (about 4-8 min each on 2 cores)
#
# oldest: keras 3.12.0 (3.10.0 fails in the ledger's saving, 3.8.0 does not import without
#         TensorFlow) and jax 0.8.0 (jax-privacy 2.0, which DPConfig(noise="bandmf")
#         needs, calls jax.enable_x64: not in jax 0.7.x); newest: what pip serves.
set -euo pipefail
which=${1:?usage: scripts/version_range.sh oldest|newest}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$which" in
  oldest) pins=("keras==3.12.0" "jax==0.8.0" "jaxlib==0.8.0" "dp-accounting==0.6.0" "tensorflow"
          "jax-privacy==2.0.0") ;;
  newest) pins=("keras" "jax" "jaxlib" "dp-accounting" "tensorflow" "jax-privacy") ;;
  *) echo "usage: $0 oldest|newest" >&2; exit 2 ;;
esac
venv=$(mktemp -d -t keras-dp-range.XXXXXX)
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" scipy numpy \
  pytest pytest-xdist hypothesis scikit-learn
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$root"
"$venv/bin/python" -c "import keras, jax, dp_accounting, importlib.metadata as m; \
print('keras', keras.__version__, '| jax', jax.__version__, '| dp-accounting', m.version('dp-accounting'))"
cd "$root"
start=$SECONDS
KERAS_BACKEND=jax "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_training.py tests/test_clipping.py tests/test_reference_step.py \
  tests/test_privacy_fixes.py tests/test_config.py tests/test_noise.py \
  tests/test_calibration_overlap.py -k "not audit"
echo "version_range $which: tests took $((SECONDS - start)) s"
rm -rf "$venv"
