#!/usr/bin/env bash
# The built-in demo: offline, on CPU, in a few minutes. Tokenise a small corpus (docstrings of the
# installed Python packages), train configs/tiny_cpu.yaml with two data-parallel processes
# (evaluating, sampling and checkpointing on the way), then load the last checkpoint in a fresh
# process with AutoModelForCausalLM + AutoTokenizer and generate.
set -euo pipefail
cd "$(dirname "$0")"

data_dir=demo_data
output_dir=log/tiny_cpu
export OMP_NUM_THREADS=1  # two processes share the cores: one thread each

python prepare_fineweb.py --source python_docs --max_tokens 1000000 --shard_size 250000 --val_tokens 50000 \
    --output_dir "$data_dir"
rm -rf "$output_dir"  # the demo always starts afresh
accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train_accelerate.py \
    --config configs/tiny_cpu.yaml --data_dir "$data_dir" --output_dir "$output_dir"
python sample.py "$(ls -d "$output_dir"/model_* | tail -n 1)"
