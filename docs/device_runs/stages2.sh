#!/bin/bash
# Second device call: the strong recipe's peak learning rate (0.4 diverged at step ~170), each
# run alone so its wall time is clean; then the benchmark with FLOPs counted before XLA's passes.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-300}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(date +%H:%M:%S.%N | cut -c1-12) t=$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "$QUICK" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
PY=${PY:-python3}
D="--config.dataset=cifar10_folder --config.progress_bar=False"
if [ -n "$QUICK" ]; then
  X="--config.model.widths=(8,8,16,16) --config.model.num_heads=2 --config.num_epochs=1 --config.warmup_epochs=0 --config.train_split=test"
  BX="--steps 2 --warmup 1"
else
  X=""; BX="--steps 30 --warmup 5"
fi
$PY .gpu/gpu_run.py decode || exit 1
for lr in 0.2 0.1 0.05; do
  log "fast recipe, bf16, lr $lr: launch"
  timeout 90 $PY .gpu/gpu_run.py launch --config configs/cifar_hybrid_fast.py \
    --workdir /tmp/w/fast_lr$lr --config.learning_rate=$lr --config.model.dtype=bfloat16 $D $X > $OUT/fast_lr$lr.log 2>&1
  log "fast lr $lr rc=$?"; grep -E "kind=epoch" $OUT/fast_lr$lr.log | grep -oE "epoch=[0-9]+ train_loss=[0-9.]+|test_accuracy=[0-9.]+" | paste - -
done
for run in "bfloat16 512 989000 --torch" "float32 512 494000 --torch" "bfloat16 2048 989000"; do
  set -- $run
  [ $(left) -lt 40 ] && break
  log "bench $1 batch $2"
  timeout $(( $(left) - 5 )) $PY .gpu/gpu_run.py bench --config configs/cifar_hybrid_fast.py \
    --config.model.dtype=$1 --config.batch_size=$2 $D $X $BX --pipeline_steps 40 --peak_gflops=$3 $4 2>&1 | grep -vE "^(W|I)[0-9]{4}" >> $OUT/bench2.txt
  tail -9 $OUT/bench2.txt
done
(cd /tmp/w && tar czf $OUT/runs2.tgz */metrics.jsonl */config.json)
log "done"
