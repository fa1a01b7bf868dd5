#!/usr/bin/env bash
# snapshot_epochs.sh RUN: while a training run goes on, copy its model.params + train.json after every epoch
# into RUN.snap/epochN, for a learning curve (build and evaluate each with build_eval.sh). Stop it with Ctrl-C
# or kill when the run has ended. The run folder is rewritten after every epoch, so without this only the
# last epoch is kept.
set -euo pipefail
run=${1:?usage: snapshot_epochs.sh RUN}
last=""
while sleep 30; do
  [ -f "$run/train.json" ] || continue
  stamp=$(stat -c %Y "$run/train.json")
  if [ "$stamp" != "$last" ]; then
    sleep 5  # model.params is written before train.json; let trainer.states follow
    epoch=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['training']['epochs'])" "$run/train.json")
    mkdir -p "$run.snap/epoch$epoch"
    cp "$run/model.params" "$run/train.json" "$run.snap/epoch$epoch/"
    last=$stamp
  fi
done
