#!/usr/bin/env bash
# SimCLR v2's road on the CIFAR-10 benchmark data, on a CPU: for 10% and 1% of the training labels,
# fine-tune a pretrained encoder, train the same architecture from scratch on the same labels, distil the
# fine-tuned model into a narrower small_cnn; then the report, the test-embedding map, the student's ONNX
# export and its speed against PyTorch.
#
# Needs the split of benchmarks/cifar10_cpu.py (45,000 training images, the last 500 of each class held
# out) and a pretraining run on it, for example:
#   contrastive pretrain --config configs/simclr-cifar10.yaml --data .bench/cifar10/split --backbone small_cnn \
#       --epochs 10 --output .bench/cifar10/runs/simclr --device cpu optim.warmup_epochs=1 train.progress=false
# Run: bash benchmarks/cifar10_semi_supervised.sh [SPLIT] [RUNS]   (defaults below)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-.bench/cifar10/split}
R=${2:-.bench/cifar10/runs}
C=".venv/bin/contrastive"
RECIPE=configs/semi-supervised/cifar10.yaml
STUDENT="backbone.widths=[16,32,64,128]"
for pct in 10 1; do
  $C finetune --checkpoint "$R/simclr/checkpoint.pt" --data "$D" --labels "$pct%" --recipe $RECIPE \
      --output "$R/finetune-${pct}pct" --device cpu
  $C finetune --scratch --backbone small_cnn --data "$D" --labels "$R/finetune-${pct}pct/labels.json" \
      --recipe $RECIPE --output "$R/scratch-${pct}pct" --device cpu
  $C distill --teacher "$R/finetune-${pct}pct" --student small_cnn --data "$D" --recipe $RECIPE \
      --output "$R/distill-${pct}pct" --device cpu "$STUDENT"
done
$C report "$R"/scratch-* "$R"/finetune-* "$R"/distill-* "$R/simclr" --output "$R"
$C embed --checkpoint "$R/simclr/encoder.pt" --data "$D" --split test --output "$R/simclr/test-embeddings.npy" \
    --map "$R/simclr/embedding-map.png"
$C export --checkpoint "$R/distill-10pct/classifier.pt" --format onnx --output "$R/distill-10pct/student.onnx"
.venv/bin/python benchmarks/export_speed.py --model "$R/distill-10pct/classifier.pt" --batch-size 256 --threads 2
