#!/usr/bin/env bash
# The GPU path in one run on a CUDA machine (under 8 minutes on one H100): the CUDA-marked tests,
# one epoch of GPT-2 124M and 355M (random init, the book's data, the CLI's defaults), and
# generation against transformers. Prints one JSON line last.
#
#   bash bench/gpu_check.sh                          # the book's data from the app's cache (downloaded once)
#   DATA=path/to/instruction-data.json bash bench/gpu_check.sh   # seed the cache from a local copy (offline)
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
export GPT2_INSTRUCT_RUNS="$work/runs"
data=${DATA:-../shared/data/instruction-data.json}
if [ -f "$data" ]; then
  python -c "import sys; from data import cache; cache.is_cached() or cache.store_canonical(open(sys.argv[1], 'rb').read())" "$data"
fi

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1

start=$(date +%s)
timeout 240 python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py > "$work/tests.log" 2>&1
tests_rc=$?
tail -5 "$work/tests.log"

for model in gpt2 gpt2-medium; do
  timeout 180 python -m training --model "$model" --random-init --data canonical --epochs 1 --out "$work/$model" \
    > "$work/$model.log" 2>&1 || tail -20 "$work/$model.log"
done

timeout 120 python -m bench.generate --skip-nocache > "$work/generate.log" 2>&1 || tail -20 "$work/generate.log"

python - "$work" "$tests_rc" "$start" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

work, tests_rc, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = (work / "tests.log").read_text().strip().splitlines()
figures = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "torch": torch.__version__,
           "cuda_tests": log[-1] if log else "no output", "cuda_tests_ok": tests_rc == 0}
for model in ("gpt2", "gpt2-medium"):
    manifest = work / model / "manifest.json"
    m = json.loads(manifest.read_text()) if manifest.exists() else {}
    figures[model] = {k: m.get(k) for k in ("status", "device", "steps", "wall_time_s", "train_time_s", "eval_time_s",
                                            "final_val_loss", "peak_rss_mb")}
try:
    gen = json.loads((work / "generate.log").read_text().strip().splitlines()[-1])
    gen.pop("nocache_tokens_per_s", None)
    gen["ours_vs_transformers"] = round(gen["ours_tokens_per_s"] / gen["transformers_tokens_per_s"], 2)
except (ValueError, KeyError, IndexError):
    gen = {"error": "bench.generate printed no figures"}
figures["generate"] = gen
figures["total_s"] = round(time.time() - start)
print(json.dumps(figures))
EOF
