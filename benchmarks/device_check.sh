#!/usr/bin/env bash
# The GPU check, prepared to run in one call on a borrowed machine (the `device` tool lends 15 minutes
# a session, the machine's start included: there is no time for a second try).
#
#   bash benchmarks/device_check.sh --prepare
#       Here, once: .device/ (git-ignored) gets the wheels of transformers and peft at the versions
#       installed here (the machine has other versions and no package index) and the tiny test models
#       with their tokenizers (the machine has no embedded models to take them from).
#   device run: carry [".device"], timeout_s 570, command "bash benchmarks/device_check.sh"
#       There: records the machine, runs the device tests (tests/test_devices.py, which compare CUDA
#       with the CPU, and tests/test_precision.py) and the benchmarks on CUDA (bf16; SmolLM2 built
#       from its config with random weights, since 500 MB of weights cannot travel and timing needs
#       only the architecture; the end-to-end run needs the real weights and is left out). Each stage
#       has its own time limit; everything lands in $OUT: env.txt, tests.log, bench/*.log,
#       bench/results.jsonl, bench/results.md.
#
# Dry run of the mechanics on this CPU machine:
#   PYTHON=.venv/bin/python CHECK_DEVICE=cpu BENCH_ARGS=--quick OUT=/tmp/device-check bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    py=.venv/bin/python
    version() { "$py" -c "import $1; print($1.__version__)"; }
    rm -rf .device && mkdir -p .device/whl
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .device/whl \
        "transformers==$(version transformers)" "peft==$(version peft)" || exit 1
    HF_HUB_OFFLINE=1 "$py" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from tiny_assets import build_assets
build_assets(Path('.device/tiny_assets').resolve())" || exit 1
    git rev-parse HEAD > .device/prepared_at_commit 2>/dev/null
    du -sh .device
    exit 0
fi

PYTHON=${PYTHON:-python3}
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
OUT=${OUT:-device-check-out}
mkdir -p "$OUT/bench"
[[ -d .device/whl ]] || { echo "no .device/: run 'bash benchmarks/device_check.sh --prepare' here and carry .device"; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/device-check-site .device/whl/*.whl || exit 1
export PYTHONPATH="/tmp/device-check-site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 DELTATUNE_BENCH_RANDOM_WEIGHTS=1 \
    DELTATUNE_TEST_ASSETS="$PWD/.device/tiny_assets"
[[ "$CHECK_DEVICE" == cpu ]] && export DELTATUNE_TEST_DEVICE=cpu

{
    date -u
    cat .device/prepared_at_commit 2>/dev/null
    nvidia-smi 2>&1 | head -15
    "$PYTHON" -c "
import torch, transformers, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'
print('torch', torch.__version__, 'cuda', torch.version.cuda, gpu)
print('transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== device tests"
timeout 170 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/test_devices.py tests/test_precision.py \
    > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
tail -n 25 "$OUT/tests.log"

echo "== benchmarks"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout 330 "$PYTHON" benchmarks/run_all.py --device "$CHECK_DEVICE" ${BENCH_ARGS:-} --timeout 120 \
    --only lora_layer,mixed_batch,train_step,inference,prompt_prefix --output "$OUT/bench" \
    > "$OUT/bench/run_all.log" 2>&1
echo "exit $?" >> "$OUT/bench/run_all.log"
tail -n 15 "$OUT/bench/run_all.log"
cat "$OUT/bench/results.md" 2>/dev/null
