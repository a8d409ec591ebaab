#!/usr/bin/env bash
# Serve a real Gemma 4 shape with random weights (--load-format dummy) on one GPU and load it with
# bench/serve_bench.py: SGLang's latency run (10 prompts at concurrency 1, about 610 in / 422 out)
# and throughput run (1000 prompts at concurrency 100, about 512 in / 512 out), forced lengths.
#
#   bash bench/serve_random_weights.sh OUT_DIR [MODEL_KEY=gemma-4-E4B-it] [COMMIT]
#
# The checkpoint directory holds the model's config.json and the embedded model's tokenizer,
# widened to the model's vocabulary (prompts are token ids below 1024; outputs are random ids).
# A topology on cuda:0: preprocess and one engine, or with SPLIT=1 a prefill and a decode process
# sharing the GPU (KV pages over CUDA IPC).
# Profiling (both optional): TRACE=1 serves with --trace-dir OUT_DIR/trace (per-stage spans; at the
# end OUT_DIR/trace_breakdown.txt and the step timeline OUT_DIR/steps.json);
# PYSPY_S=N samples every actor process with py-spy for N seconds from 20 s into the throughput run
# (collapsed stacks in OUT_DIR/pyspy-<actor>.txt; needs py-spy on the PATH). RUNS picks among
# "latency", "throughput" (the default: both) and "image" (SGLang's image run at concurrency 1: two
# 720p images and 128 text tokens per request, 1024 out; adds a vision encoder on cuda:0, its tower
# torch.compile'd unless COMPILE_VISION=0). KV_PAGES (16384 x 16 / PAGE_SIZE), PAGE_SIZE (16 tokens a page) and
# KV_DTYPE (auto; fp8_e4m3) size the KV cache,
# e.g. to fit 26B-A4B's bf16 weights on an 80 GB card; PROMPTS (1000) sets the throughput run's prompts;
# PREFETCH_BS=N reads weights into L2 ahead of their products at decode batches of up to N (0: off);
# GPUS=2 uses two GPUs: with SPLIT=1 prefill (and the vision encoder) on cuda:0 and decode on cuda:1,
# else two colocated replicas (an engine and a vision encoder on each GPU). RUNS "goodput" runs the
# mixed workload (chat, 512 in / 256 out, IMAGE_FRACTION (0.5) of the requests with two 720p images)
# under Poisson arrivals at each of GOODPUT_RATES (8 16 32 48 64 96 requests/s: past where one GPU's
# prefill and decode keep up; GOODPUT_PROMPTS each, by default 20 s of arrivals and at least 200)
# with PREPROCESS preprocess replicas (4 on two GPUs); VISION_GPU=1 puts the split topology's vision
# encoder beside decode on cuda:1
# and counts the requests meeting TTFT_MS (1000) and TPOT_MS (30): the targets, stated before the run;
# TANDEM_PDL=0 (inherited by the actors) launches the decode path's Triton kernels independently;
# TANDEM_TMA_STAGES=N sets the decode attention's TMA pages in flight (0: off) and
# TANDEM_DECODE_PROGRAMS_PER_SM=N its split count by batch (0: 16 splits at every batch),
# TANDEM_ATTENTION_EARLY_METADATA=1 its metadata read before its dependent wait;
# TANDEM_SMALL_M=0 (TANDEM_GEMV_TMA=0) takes the decoder's products of up to 16 rows through cuBLAS
# (the small-M kernels without TMA loads), TANDEM_GEMV_PREFETCH_K=N has them ask L2 for N columns
# of their weight rows before they wait and TANDEM_GEMV_EARLY_CHUNKS=N (1) load their first N weight
# chunks there, and up to TANDEM_SPLITS_IN_NORM_ROWS rows (1) the norms after them add their K
# splits in the norms' launches;
# DETAILS=1 keeps each request's timings in the JSONs (serve_bench.py --output-details).
set -euo pipefail
server_command="GPUS=${GPUS:-} PREPROCESS=${PREPROCESS:-} VISION_GPU=${VISION_GPU:-} GOODPUT_RATES='${GOODPUT_RATES:-}' GOODPUT_PROMPTS=${GOODPUT_PROMPTS:-} IMAGE_FRACTION=${IMAGE_FRACTION:-} TTFT_MS=${TTFT_MS:-} TPOT_MS=${TPOT_MS:-} SPLIT=${SPLIT:-} RUNS='${RUNS:-}' TRACE=${TRACE:-} PYSPY_S=${PYSPY_S:-} COMPILE_VISION=${COMPILE_VISION:-}\
 KV_PAGES=${KV_PAGES:-} PAGE_SIZE=${PAGE_SIZE:-} KV_DTYPE=${KV_DTYPE:-} PREFETCH_BS=${PREFETCH_BS:-} TANDEM_PDL=${TANDEM_PDL:-} TANDEM_TMA_STAGES=${TANDEM_TMA_STAGES:-} TANDEM_DECODE_PROGRAMS_PER_SM=${TANDEM_DECODE_PROGRAMS_PER_SM:-} TANDEM_ATTENTION_EARLY_METADATA=${TANDEM_ATTENTION_EARLY_METADATA:-} TANDEM_SMALL_M=${TANDEM_SMALL_M:-} TANDEM_GEMV_TMA=${TANDEM_GEMV_TMA:-} TANDEM_SPLITS_IN_NORM_ROWS=${TANDEM_SPLITS_IN_NORM_ROWS:-} TANDEM_GEMV_PREFETCH_K=${TANDEM_GEMV_PREFETCH_K:-} TANDEM_GEMV_EARLY_CHUNKS=${TANDEM_GEMV_EARLY_CHUNKS:-} PROMPTS=${PROMPTS:-} DETAILS=${DETAILS:-} bash $0 $*"
out=${1:?output directory}
key=${2:-gemma-4-E4B-it}
commit=${3:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$out"
ckpt=$(mktemp -d)
cp "tests/fixtures/hf_configs/$key.json" "$ckpt/config.json"
cp default_model/checkpoint/generation_config.json "$ckpt/"
cp default_model/checkpoint/chat_template.jinja "$ckpt/"
# the embedded tokenizer plus one added token per id it lacks, up to the model's vocabulary: every
# random output id then has text, so the stream carries a chunk per token. The config's media token
# ids become the embedded tokenizer's, and its processor gives the model's soft tokens per image.
python3 - "$ckpt" <<'PY'
import json, sys
from transformers import AutoTokenizer
ckpt, embedded = sys.argv[1], "default_model/checkpoint"
config = json.load(open(f"{ckpt}/config.json"))
ids = json.load(open(f"{embedded}/config.json"))
ids["eoa_token_id"] = ids["eoa_token_index"]
for key in ("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id", "eoa_token_id",
            "eoa_token_index", "video_token_id"):
    if key in config:
        config[key] = ids[key]
json.dump(config, open(f"{ckpt}/config.json", "w"), indent=1)
processor = json.load(open(f"{embedded}/processor_config.json"))
soft = config.get("vision_soft_tokens_per_image")
if soft:
    processor["image_seq_length"] = processor["image_processor"]["image_seq_length"] = soft
    processor["image_processor"]["max_soft_tokens"] = soft
json.dump(processor, open(f"{ckpt}/processor_config.json", "w"), indent=1)
vocab = config.get("text_config", config)["vocab_size"]
tokenizer = AutoTokenizer.from_pretrained(embedded)
tokenizer.add_tokens([f"<r{i}>" for i in range(len(tokenizer), vocab)])
tokenizer.save_pretrained(ckpt)
PY
topology="$ckpt/topology.toml"
runs=" ${RUNS:-latency throughput} "
python3 bench/random_weights_topology.py "$topology" "$ckpt" --gpus "${GPUS:-1}" $([ "${SPLIT:-}" = 1 ] && echo --split) \
  $([[ $runs == *" image "* || $runs == *" goodput "* ]] && echo --vision) \
  --kv-pages "${KV_PAGES:-$(( 262144 / ${PAGE_SIZE:-16} ))}" --page-size "${PAGE_SIZE:-16}" --kv-dtype "${KV_DTYPE:-auto}" \
  --prefetch-bs "${PREFETCH_BS:-0}" --compile-vision "${COMPILE_VISION:-1}" \
  --preprocess "${PREPROCESS:-$([ "${GPUS:-1}" = 2 ] && echo 4 || echo 1)}" --vision-gpu "${VISION_GPU:-0}"
port=8123
trace=()
[ -n "${TRACE:-}" ] && trace=(--trace-dir "$out/trace")
python3 -m actors.cli serve --topology "$topology" --port "$port" "${trace[@]}" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" \
    2> /dev/null && break
  kill -0 $server 2>/dev/null || { tail -40 "$out/server.log"; exit 1; }
  sleep 0.5
done
# Each chunk carries its token ids (return_token_ids): a random model's greedy output can dwell on a
# special token, whose text is skipped, so a text-only client would time the first token late.
bench() {
  python3 bench/serve_bench.py --base-url "http://127.0.0.1:$port" --disable-tqdm --meta "model_shape=$key" \
    --extra-request-body '{"return_token_ids": true}' \
    --meta "weights=random (--load-format dummy)" --meta "commit=$commit" \
    --meta "topology=$([ "${SPLIT:-}" = 1 ] && echo split || echo colocated)$([ "${GPUS:-1}" = 2 ] && echo ' on two GPUs')" \
    --meta "traces=$([ -n "${TRACE:-}" ] && echo on || echo off)" \
    --meta "device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)" \
    --meta "server_command=${server_command}" $([ "${DETAILS:-}" = 1 ] && echo --output-details) "$@"
}
if [[ $runs == *" latency "* ]]; then
  bench --label latency --num-prompts 10 --max-concurrency 1 --random-input-len 1220 --random-output-len 844 \
    --output-file "$out/latency.json"
fi
if [[ $runs == *" throughput "* ]]; then
  if [ -n "${PYSPY_S:-}" ]; then
    ( sleep 20
      for actor in api preprocess engine prefill decode; do
        pid=$(pgrep -f -- "actors.main .*--actor $actor " | head -1) || continue
        py-spy record --format raw --rate 250 --duration "$PYSPY_S" --pid "$pid" --output "$out/pyspy-$actor.txt" \
          > /dev/null 2>&1 &
      done
      wait ) &
  fi
  bench --label throughput --num-prompts "${PROMPTS:-1000}" --max-concurrency 100 --random-input-len 1024 --random-output-len 1024 \
    --output-file "$out/throughput.json"
fi
if [[ $runs == *" image "* ]]; then  # SGLang's image run at concurrency 1: two 720p images, 128 text tokens
  bench --label image --dataset-name image --num-prompts 10 --max-concurrency 1 --image-count 2 \
    --image-resolution 720p --random-input-len 128 --random-output-len 1024 --output-file "$out/image.json"
fi
if [[ $runs == *" goodput "* ]]; then  # the mixed workload under Poisson arrivals, goodput under targets set here
  for rate in ${GOODPUT_RATES:-8 16 32 48 64 96}; do
    bench --label "goodput-$rate" --dataset-name mixed --image-fraction "${IMAGE_FRACTION:-0.5}" \
      --num-prompts "${GOODPUT_PROMPTS:-$(( rate * 20 > 200 ? rate * 20 : 200 ))}" --request-rate "$rate" --random-input-len 512 --random-output-len 256 \
      --goodput ttft:"${TTFT_MS:-1000}" tpot:"${TPOT_MS:-30}" --output-file "$out/goodput_$rate.json"
  done
fi
python3 bench/anchors.py $(ls "$out"/{latency,throughput,image}.json 2> /dev/null)  # SGLang's figures beside ours
if [ -n "${TRACE:-}" ]; then  # the server's spans flushed at its exit: per-request stages and the step timeline
  kill $server 2>/dev/null || true; wait $server 2>/dev/null || true
  python3 -m actors.cli trace "$out/trace" --steps "$out/steps.json" > "$out/trace_breakdown.txt" || true
fi
