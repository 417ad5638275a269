#!/bin/bash
# Third device call: the benchmark with FLOPs counted on the CPU-lowered step (the GPU's lowered
# programs have no cost analysis), then two weight-decay variants of the strong recipe at lr 0.05.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-260}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(date +%H:%M:%S.%N | cut -c1-12) t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
D="--config.dataset=cifar10_folder --config.progress_bar=False"
python3 .gpu/gpu_run.py decode || exit 1
for run in "bfloat16 512 989000 --torch" "float32 512 494000 --torch" "bfloat16 2048 989000"; do
  set -- $run
  log "bench $1 batch $2"
  timeout 60 python3 .gpu/gpu_run.py bench --config configs/cifar_hybrid_fast.py \
    --config.model.dtype=$1 --config.batch_size=$2 $D --steps 30 --warmup 5 --pipeline_steps 40 --peak_gflops=$3 $4 2>&1 | grep -vE "^(W|I)[0-9]{4}" >> $OUT/bench3.txt
  tail -9 $OUT/bench3.txt
done
for wd in 0.002 0.005; do
  [ $(left) -lt 58 ] && break
  log "fast recipe, bf16, lr 0.05, weight decay $wd: launch"
  timeout $(( $(left) - 3 )) python3 .gpu/gpu_run.py launch --config configs/cifar_hybrid_fast.py \
    --workdir /tmp/w/fast_lr0.05_wd$wd --config.learning_rate=0.05 --config.weight_decay=$wd \
    --config.model.dtype=bfloat16 $D > $OUT/fast_wd$wd.log 2>&1
  log "rc=$?"; grep -E "kind=epoch" $OUT/fast_wd$wd.log | grep -oE "epoch=[0-9]+ train_loss=[0-9.]+|test_accuracy=[0-9.]+" | paste - -
done
(cd /tmp/w && tar czf $OUT/runs3.tgz */metrics.jsonl */config.json)
log "done"
