#!/bin/bash
# One device call: fast recipe (timed alone), the paper's three ablations (concurrently), then the
# benchmark in bf16 and float32. Every stage is capped so the call ends inside its limit.
# Local dry run: QUICK=1 OUT=/tmp/out bash .gpu/stages.sh
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-560}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(date +%H:%M:%S) t=$(( $(date +%s) - T0 ))s] $*"; }
if [ -d .gpu/whl ] && [ -z "$QUICK" ]; then
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
log "setup"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1
$PY -c "import jax, flax, optax, orbax.checkpoint, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'numpy', numpy.__version__, jax.devices())" || exit 1
$PY .gpu/gpu_run.py decode || exit 1

log "fast recipe, bf16, 12 epochs, alone"
timeout $(( $(left) - 330 )) $PY .gpu/gpu_run.py launch --config configs/cifar_hybrid_fast.py \
  --workdir /tmp/w/fast --config.model.dtype=bfloat16 $D $X > $OUT/fast.log 2>&1
log "fast rc=$?"; grep -E "kind=epoch|First step|parameters" $OUT/fast.log | cut -c1-400

log "ablations, paper setup (float32, batch 128), 12 epochs, three at once"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
T=$(( $(left) - 150 ))
for c in cnn hybrid_noembed hybrid; do
  timeout $T $PY .gpu/gpu_run.py launch --config configs/cifar_$c.py --workdir /tmp/w/$c \
    --config.checkpoint_every_steps=1000 $D $X > $OUT/abl_$c.log 2>&1 &
done
wait
unset XLA_PYTHON_CLIENT_PREALLOCATE
for c in cnn hybrid_noembed hybrid; do
  log "$c"; grep -E "kind=epoch" $OUT/abl_$c.log | grep -oE "epoch=[0-9]+ .*test_accuracy=[0-9.]+" | sed 's/train_loss.*test_loss=[0-9.]*//'
done

for dp in bfloat16:989000 float32:494000; do dt=${dp%:*}
  log "bench $dt"
  timeout $(( $(left) / 2 + 10 )) $PY .gpu/gpu_run.py bench --config configs/cifar_hybrid_fast.py \
    --config.model.dtype=$dt $D $X $BX --pipeline_steps 40 --torch --peak_gflops=${dp#*:} 2>&1 | grep -vE "^(W|I)[0-9]{4}" >> $OUT/bench.txt
  tail -8 $OUT/bench.txt
done
(cd /tmp/w && tar czf $OUT/runs.tgz */metrics.jsonl */config.json)
log "done"
