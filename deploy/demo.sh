#!/usr/bin/env bash
# End-to-end demo on this machine, no external service: synthetic X-rays -> MXNet training ->
# verified ONNX bundle -> the agent inspecting a replayed stream. Called by `make demo`.
# Expects the export CLI on PATH (.venv) and AGENT_PYTHON pointing at the MXNet-free agent venv.
set -euo pipefail

OUT=${1:-demo-out}
AGENT_PYTHON=${AGENT_PYTHON:-python3}
export PYTHONWARNINGS=ignore
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
step() { printf '\n== [%4ss] %s\n' "$(($(date +%s) - start))" "$*"; }

step "1/5 synthetic radiographs (GDXray layout) -> $OUT/data"
rm -rf "$OUT/data"
lineside-export synth --out "$OUT/data" --images 96 --seed 11 --size 286x384 --defect-contrast 3 > "$OUT/synth.json"
echo "$(grep -c . "$OUT"/data/Castings/*/ground_truth.txt | awk -F: '{s+=$2} END {print s}') defect boxes written"

step "2/5 training the three models in MXNet Gluon (CPU, a few minutes)"
rm -rf "$OUT/runs"
lineside-export train-classifier --data "$OUT/data" --out "$OUT/runs/classifier" --epochs 6 --iters 40 --batch-size 32
lineside-export train-vae --data "$OUT/data" --out "$OUT/runs/vae" --epochs 4 --iters 25 --batch-size 16
lineside-export train-ssd --data "$OUT/data" --out "$OUT/runs/ssd" --epochs 6 --iters 40 --batch-size 16 --lr 2e-3

step "3/5 ONNX export with parity checks, calibration, bundle -> $OUT/bundle"
lineside-export build --classifier "$OUT/runs/classifier" --vae "$OUT/runs/vae" --ssd "$OUT/runs/ssd" \
    --calib "$OUT/data" --out "$OUT/bundle" --force

step "4/5 evaluation on the held-out synthetic series (same ONNX Runtime code as the agent)"
lineside-export evaluate --bundle "$OUT/bundle" --data "$OUT/data" --json "$OUT/evaluation.json"

step "5/5 the agent (no MXNet in its environment) inspecting a replayed stream of the test series"
rm -rf "$OUT/stream" "$OUT/annotated" "$OUT/results.jsonl"
mkdir -p "$OUT/stream"
# The test series of the split the build used: images the models never saw.
"$AGENT_PYTHON" - "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
manifest = json.loads((out / "bundle" / "manifest.json").read_text())
for group in manifest["dataset"]["test_groups"]:
    for png in sorted((out / "data" / "Castings" / group).glob("*.png")):
        shutil.copy2(png, out / "stream" / png.name)
PY
cat > "$OUT/agent.yaml" <<YAML
station: demo
bundle:
  path: $OUT/bundle
inference:
  providers: [cuda, cpu]
source:
  kind: replay
  path: $OUT/stream
  rate_hz: 0
sinks:
  - kind: jsonl
    path: $OUT/results.jsonl
  - kind: annotate
    folder: $OUT/annotated
    only_defective: false
YAML
"$AGENT_PYTHON" -m lineside.agent.cli check-config "$OUT/agent.yaml"
"$AGENT_PYTHON" -m lineside.agent.cli run --config "$OUT/agent.yaml"

"$AGENT_PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
flagged = [r for r in rows if r["is_defective"]]
errors = [r for r in rows if r["error"]]
total = sorted(r["latency_ms"].get("total", 0.0) for r in rows)
print(f"\n{len(rows)} frames inspected, {len(flagged)} flagged defective, {len(errors)} errors")
if total:
    print(f"latency per frame: median {total[len(total) // 2]:.0f} ms, max {total[-1]:.0f} ms")
for r in rows[:5]:
    boxes = ", ".join(f"{b['source']}@({b['x1']:.0f},{b['y1']:.0f})" for b in r["boxes"][:3])
    print(f"  {r['meta'].get('file', r['frame_id'])}: defective={r['is_defective']} score={r['score']:.2f} {boxes}")
PY

step "done in $(($(date +%s) - start)) s. Look at:"
echo "  $OUT/results.jsonl      one JSON result per frame (what MQTT will carry)"
echo "  $OUT/annotated/         each frame with its boxes drawn (ssd and vae colours)"
echo "  $OUT/bundle/            the model bundle: manifest.json, ONNX files, golden images"
echo "  $OUT/evaluation.json    the evaluation report printed above"
