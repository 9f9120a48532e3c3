#!/usr/bin/env bash
# The perplexity table of docs/compression.md: every pruning configuration of the bundled model,
# evaluated in fp32 on held-out text (the last 8% of the built-in corpus, which calibration never
# reads: its windows come from the first 90% of the tokens).
#   PYTHON=.venv/bin/python scripts/prune_table.sh [WORKDIR] > table.md 2> log
# (about 45 minutes on a busy 2-core machine; the prune lines and progress go to stderr)
set -euo pipefail
WORK=${1:-/tmp/prune_table}
PY=${PYTHON:-python}
mkdir -p "$WORK"
$PY -c "from turbollm.corpus import builtin_corpus_text as t; s = t(); \
open('$WORK/heldout.txt', 'w').write(s[int(len(s) * 0.92):])"
EVAL="eval --text $WORK/heldout.txt --max-tokens 4096 --max-length 512 --dtype float32 --no-progress"
row() {  # name, then the prune arguments (none: the dense model)
  local name=$1; shift
  local model=smollm2-135m extra="--quantization none" secs=""
  if [ $# -gt 0 ]; then
    local t0=$(date +%s)
    $PY -m turbollm.cli --log-level WARNING prune smollm2-135m "$@" --out "$WORK/m" >&2
    secs=$(( $(date +%s) - t0 ))
    model=$WORK/m extra=""
  fi
  local ppl=$($PY -m turbollm.cli --log-level WARNING $EVAL --model "$model" $extra 2>/dev/null \
              | sed -n 's/^perplexity \([0-9.]*\).*/\1/p')
  printf '| %s | %s | %s |\n' "$name" "$ppl" "$secs"
  rm -rf "$WORK/m"
}
echo "| configuration | perplexity | prune seconds |"
echo "|---|---|---|"
row "dense (fp32)"
row "magnitude 50%" --method magnitude --sparsity 0.5
row "wanda 50%" --method wanda --sparsity 0.5
row "sparsegpt 50%" --method sparsegpt --sparsity 0.5
row "magnitude 2:4" --method magnitude --pattern 2:4
row "wanda 2:4" --method wanda --pattern 2:4
row "sparsegpt 2:4" --method sparsegpt --pattern 2:4
row "wanda 4:8" --method wanda --pattern 4:8
row "width 25% (2/3 KV groups, 1152/1536 MLP)" --structured width=0.25
row "depth 4 (26 of 30 layers)" --structured depth=4
