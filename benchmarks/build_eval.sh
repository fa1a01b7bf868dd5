#!/usr/bin/env bash
# build_eval.sh RUN OUT [DATA]: an SSD-only bundle from RUN (an SSD run folder, or a snapshot from
# snapshot_epochs.sh), calibrated on DATA's validation series and evaluated on its test series; prints one
# summary line per figure group. DATA defaults to ../shared/data/gdxray. Run from the repository root, in the
# export environment (.venv). This is how every SSD row of docs/evaluation.md's per-lever table was made.
set -euo pipefail
run=${1:?usage: build_eval.sh RUN OUT [DATA]}
out=${2:?usage: build_eval.sh RUN OUT [DATA]}
data=${3:-../shared/data/gdxray}
mkdir -p "$out"
.venv/bin/lineside-export build --ssd "$run" --calib "$data" --out "$out/bundle" --force > "$out/build.log" 2>&1
.venv/bin/lineside-export evaluate --bundle "$out/bundle" --data "$data" --json "$out/eval.json" > "$out/eval.txt" 2>&1
.venv/bin/python - "$out/eval.json" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
c, m, p = r["methods"]["combined"], r["methods"]["ssd"], r["operating_point"]
i = c["image"]
print(
    f"{sys.argv[1]}: avg F1 {c['study']['avg_f1']:.3f} avg IoU {c['study']['avg_iou']:.3f} AP50 {c['ap50']:.3f} "
    f"box R@0.25 {p['box_recall_iou25']:.3f} false boxes/normal {p['false_boxes_per_normal_image']:.2f} | image "
    f"P {i['precision']:.3f} R {i['recall']:.3f} F1 {i['f1']:.3f} AUROC {r['auroc']['decision_score']:.3f}"
)
print(f"  ssd method: avg F1 {m['study']['avg_f1']:.3f} avg IoU {m['study']['avg_iou']:.3f} AP50 {m['ap50']:.3f}")
print("  per series avg F1:", {g: None if v["avg_f1"] is None else round(v["avg_f1"], 3) for g, v in r["per_group"].items()})
box = r["thresholds"]["ssd"]
print(f"  box threshold {box['box']:.3f}, box scale {box.get('box_scale', 1.0):g}; latency {r['latency_ms']}")
PY
