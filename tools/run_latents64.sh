#!/bin/bash
# The measured 64-px latent run (docs/RESULTS.md "Latents at 64 px").
set -e
cd "$(dirname "$0")/.."
R=${1:-runs/latents64}; mkdir -p $R
CFG="--config configs/latents.yaml"
DS=$R/encoded/alchemist_dataset/1.0.0
export ALCHEMIST_OFFLINE=1
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s )) s: $*" >> $R/times.txt; }
[ -f $R/vae/train_summary.json ] || t .venv/bin/python tools/train_vae.py --out $R/vae --channels 16,32,32 --steps 300 --batch-size 16 data.shapes.resolution=64 data.shapes.size=1000
t .venv/bin/alchemist-jax encode $CFG --source shapes --splits train,validation,test --out $R/encoded encode.vae_path=$R/vae encode.clip_path=tests/fixtures/clip_tiny
t .venv/bin/alchemist-jax rate $CFG --workdir $R/rate data.source=$DS
t .venv/bin/alchemist-jax score $CFG --rater $R/rate --out $R/ratings.parquet data.source=$DS
t .venv/bin/alchemist-jax select $CFG --ratings $R/ratings.parquet --out $R/selection.parquet data.source=$DS
t .venv/bin/alchemist-jax train $CFG --selection $R/selection.parquet --workdir $R/train data.source=$DS
t .venv/bin/alchemist-jax evaluate $CFG --model $R/train --out $R/eval data.source=$DS evaluate.vae_path=$R/vae evaluate.clip_path=tests/fixtures/clip_tiny
echo DONE >> $R/times.txt
