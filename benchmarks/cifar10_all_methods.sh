#!/usr/bin/env bash
# The CIFAR-10 CPU benchmark's row for every method (benchmarks/cifar10_cpu.py), 5 epochs each, one after the
# other on an otherwise idle machine; SimCLR, MoCo v2 and BYOL side by side with lightly 1.6's parts; CMC and
# CPC beside their own encoder at its initial random weights under the same probes (--mode random).
# A recipe that warms up (10 of its epochs) warms up for 0.5 of the 5 (10% of the run, as SimCLR's 10 of 100).
# Run from the repository root: bash benchmarks/cifar10_all_methods.sh [METHOD...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv-bench/bin/python
EPOCHS=${EPOCHS:-5}
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(simclr moco-v1 moco-v2 moco-v3 instdisc invaspread byol simsiam swav dino cmc cpc)
for m in "${methods[@]}"; do
  mode=ours
  case $m in simclr|moco-v2|byol) mode=both ;; esac
  set_warmup=()
  warmup=$($PY -c "import yaml; print(yaml.safe_load(open('configs/$m-cifar10.yaml'))['optim'].get('warmup_epochs', 10))")
  if [ "$warmup" != "0" ]; then set_warmup=(--set optim.warmup_epochs=0.5); fi
  echo "== $m ($mode, $EPOCHS epochs ${set_warmup[*]})"
  $PY benchmarks/cifar10_cpu.py --method "$m" --mode $mode --epochs "$EPOCHS" "${set_warmup[@]}"
  case $m in cmc|cpc) $PY benchmarks/cifar10_cpu.py --method "$m" --mode random --epochs "$EPOCHS" "${set_warmup[@]}" ;; esac
done
