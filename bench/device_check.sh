#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on one H200): everything README.md and BENCHMARKS.md need from a
# CUDA machine. From the repository root:   bash bench/device_check.sh
#   1. the suite's GPU-marked tests (pytest -m gpu: shaping and a main.py sweep on CUDA equal the CPU's results);
#   2. bench/throughput.py on CUDA, bf16 autocast, channels_last weights, ResNet-50 at batch 256: the main.py test
#      loop against the plain PyTorch loop (writes the throughput_cuda section of BENCHMARKS.md);
#   3. a sweep on the GPU: main.py test over 2 x 5,120 noise images with ResNet-50 (random weights, bf16-mixed,
#      batch 256), one ASH setting against a 16-setting grid in one run, wall seconds of each whole process
#      (the grid's results go to sweep_cuda_results.json beside the log).
# Needs python3 with torch (CUDA), timm, pytorch-lightning, torchmetrics, jsonargparse[signatures], tensorboard,
# matplotlib, scikit-learn, pyyaml; PYTHON picks another interpreter. Wheels of missing packages placed in .whl/
# (e.g. jsonargparse, docstring-parser, typeshed-client for Python 3.12) are installed into /tmp/site first.
# The log, BENCHMARKS.md and the sweep's results are written to $OUT (the device tool's folder) or a temp folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" - <<'PYTHON'
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| device", torch.cuda.get_device_name(0))
for name in ("timm", "pytorch_lightning", "torchmetrics", "jsonargparse"):
    print(name, importlib.import_module(name).__version__)
PYTHON
}

sweep() {
    "$PY" - "$OUT_DIR" <<'PYTHON'
import subprocess, sys, tempfile, time
from pathlib import Path

import yaml

out, scratch = Path(sys.argv[1]), Path(tempfile.mkdtemp())
grid = [f"{v}@{p}" for v in ("ash_p", "ash_b", "ash_s", "scale") for p in (65, 75, 85, 90)]
images, wall = 5120, {}
for name, shaping in (("one", "ash_s@90"), ("grid", grid)):
    config = {
        "seed_everything": 0,
        "model": {"backbone": "resnet50", "shaping": shaping, "placement": "penultimate", "score": "energy"},
        "data": {"id": {"kind": "gaussian", "size": 224, "num_samples": images, "seed": 0},
                 "ood": {"uniform": {"kind": "uniform", "size": 224, "num_samples": images, "seed": 1}},
                 "batch_size": 256, "num_workers": 8, "pin_memory": True},
        "trainer": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "enable_progress_bar": False,
                    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(scratch), "name": "sweep", "version": name}}}}
    (scratch / f"{name}.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "main.py", "test", "--config", str(scratch / f"{name}.yaml")],
                          capture_output=True, text=True, timeout=55)
    wall[name] = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"sweep run {name!r} failed:\n{proc.stderr[-3000:]}")
print(proc.stdout[-2500:])
(out / "sweep_cuda_results.json").write_text((scratch / "sweep" / "grid" / "ood_results.json").read_text())
print("| what | settings | wall s (whole process: start-up, model, data, metrics, files) |\n|---|---:|---:|")
print(f"| one setting (ash_s@90) | 1 | {wall['one']:.1f} |\n| grid in one run | {len(grid)} | {wall['grid']:.1f} |")
print(f"\ngrid / one setting = {wall['grid'] / wall['one']:.2f}; {2 * images} images per run, timm resnet50 "
      "(random weights), bf16-mixed, batch 256, 8 data workers")
PYTHON
}

main() {
    step "machine"
    machine
    step "1. GPU-marked tests"
    timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ || echo "GPU TESTS FAILED (status $?)"
    step "2. throughput on CUDA: ResNet-50, batch 256, bf16, channels_last, main.py loop vs plain loop"
    timeout 240 "$PY" bench/throughput.py --settings resnet50 --device cuda --bf16 --channels-last --batch-size 256 \
        --interleaved 4 --repeats 2 || echo "THROUGHPUT FAILED (status $?)"
    step "3. sweep on the GPU: one setting vs a 16-setting grid (main.py test, whole process)"
    sweep || echo "SWEEP FAILED (status $?)"
    step "done"
    cp BENCHMARKS.md "$OUT_DIR/BENCHMARKS.md"
}

main 2>&1 | tee "$OUT_DIR/device_check.log"
echo "log, BENCHMARKS.md, sweep_cuda_results.json: $OUT_DIR"
