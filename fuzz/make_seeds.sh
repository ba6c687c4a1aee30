#!/usr/bin/env bash
# Fills fuzz/corpus/<target>/ with a few small valid inputs made from the repository's test
# fixtures, so each fuzzer starts from files that parse and mutates them. Run from anywhere;
# the corpus is not committed (fuzz/.gitignore).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
c="$root/fuzz/corpus"
mkdir -p "$c"/{safetensors,gguf,config_json,tokenizer_json,adapter,toml_config,reward_data,arrow,texts,jsonl_report}

cp "$root/lora/tests/fixtures/llama/adapter/adapter_model.safetensors" "$c/safetensors/adapter"
cp "$root/lora/tests/fixtures/neox/adapter/adapter_model.safetensors" "$c/safetensors/adapter_neox"
cp "$root/models/tests/fixtures/gguf_model_tied.gguf" "$c/gguf/tied"
for d in llama_gqa_tied neox_bnb8 neox_parallel_half_v5; do
  cp "$root/models/tests/fixtures/models/$d/config.json" "$c/config_json/$d"
done
cp "$root/reward/tests/fixtures/tiny_bert/config.json" "$c/config_json/tiny_bert"
cp "$root/reward/tests/fixtures/tiny_bert/tokenizer.json" "$c/tokenizer_json/tiny_bert"

# adapter: a little-endian u16 length of adapter_config.json, the config, the weights.
adapter() {
  local dir="$1" out="$2" n
  n=$(stat -c %s "$dir/adapter_config.json")
  { printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8)))"
    cat "$dir/adapter_config.json" "$dir/adapter_model.safetensors"; } > "$out"
}
adapter "$root/lora/tests/fixtures/llama/adapter" "$c/adapter/llama"
adapter "$root/lora/tests/fixtures/neox/adapter" "$c/adapter/neox"

cat > "$c/toml_config/ppo" <<'TOML'
[ppo]
learning_rate = 5e-4
batch_size = 16
mini_batch_size = 4
ppo_epochs = 4
init_kl_coef = 0.2
adap_kl_ctrl = true

[run]
steps = 100
query_length = { min = 2, max = 7 }
response_length = { min = 4, max = 15 }
lora_r = 16
TOML
printf 'block_size = 64\nmax_steps = 10\nlearning_rate = 1e-4\nlora_r = 8\n' > "$c/toml_config/sft"
printf 'epochs = 2\nbatch_size = 8\nlr = 1e-3\n' > "$c/toml_config/reward"

# reward_data: the first byte picks .json (even) or .jsonl (odd).
printf '\x00[{"text": "good film", "label": 1}, {"text": "bad", "label": "neg"}, {"text": "", "label": null}]' > "$c/reward_data/json"
printf '\x01{"text": "good film", "label": 1}\n{"text": "bad", "class": false}\n' > "$c/reward_data/jsonl"
# arrow: the first byte picks .arrow (0), .feather (1) or .parquet (2); pyarrow and HF
# datasets wrote these (scripts/make_data_fixtures.py).
{ printf '\x00'; cat "$root/reward/tests/fixtures/tiny.arrow"; } > "$c/arrow/tiny"
for f in "$root"/data/tests/fixtures/*.arrow "$root"/data/tests/fixtures/*.parquet; do
  case "$f" in
    *.file.arrow) pick='\x01' ;;
    *.parquet) pick='\x02' ;;
    *) pick='\x00' ;;
  esac
  { printf "$pick"; cat "$f"; } > "$c/arrow/$(basename "$f")"
done

# texts: the first byte picks .txt (0), .json (1) or .jsonl (2).
printf '\x00one text\n\nanother text\n' > "$c/texts/txt"
printf '\x01["a", {"text": "b"}]' > "$c/texts/json"
printf '\x02{"text": "a"}\n"b"\n' > "$c/texts/jsonl"

# jsonl_report: a u16 length of metrics.jsonl, metrics.jsonl, samples.jsonl.
metrics='{"step": 1, "env/reward_mean": 0.1, "objective/kl": 0.0, "objective/entropy": 2.0, "ppo/loss/total": 0.5, "ppo/loss/policy": 0.1, "ppo/loss/value": 0.4}
{"step": 2, "env/reward_mean": 0.3, "objective/kl": 0.01, "objective/entropy": 1.9, "ppo/loss/total": 0.4, "ppo/loss/policy": 0.1, "ppo/loss/value": 0.3}
'
samples='{"step": 1, "query": "a <b>", "response": "c", "reward": 0.5}
'
n=${#metrics}
{ printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8)))"; printf '%s' "$metrics" "$samples"; } > "$c/jsonl_report/run"
echo "seeds in $c"
