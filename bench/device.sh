#!/usr/bin/env bash
# The GPU check, prepared: on a machine with an NVIDIA GPU, install the cuda extra (unless a JAX
# GPU plugin is already there), then time PES on the standard workload (bench.estimators) at
# 16, 256 and 4096 particles and the default meta-train, and print one JSON summary on stdout
# (progress on stderr). Budget: under 5 minutes; each stage has its own timeout.
#
#   bash bench/device.sh [OUT_DIR]        # OUT_DIR (default: a temporary folder) keeps the files
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! "$PY" -c "import jax_plugins.xla_cuda12" 2>/dev/null; then
  echo "installing the cuda extra" >&2
  timeout 150 "$PY" -m pip install -q -e ".[cuda]" >&2 || echo "pip install failed" >&2
fi
timeout 60 "$PY" -c "import jax; print(jax.devices())" >&2

for PAIRS in 8 128 2048; do  # 2 x pairs particles: 16, 256, 4096
  echo "bench.estimators pes, $((2 * PAIRS)) particles" >&2
  timeout 60 "$PY" -m bench.estimators --estimators pes --pairs "$PAIRS" --devices 1 \
    --outer-steps 5 --repeats 1 --out "$OUT/pes_$((2 * PAIRS)).json" >/dev/null \
    || echo "{\"error\": \"timed out or failed\"}" > "$OUT/pes_$((2 * PAIRS)).json"
done

echo "learned-opt meta-train (default config, at most 90 s)" >&2
rm -rf "$OUT/meta_train"
START=$(date +%s)
timeout 90 "$PY" -m outer_train.cli meta-train --out "$OUT/meta_train" --no-progress \
  > "$OUT/meta_train.log" 2>&1
echo "$? $(( $(date +%s) - START ))" > "$OUT/meta_train.status"

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"estimators_pes": {}}
for n in (16, 256, 4096):
    r = json.loads((out / f"pes_{n}.json").read_text())
    pes = r.get("results", {}).get("pes", r)
    summary["estimators_pes"][n] = {k: pes.get(k) for k in
                                    ("steps_per_s", "inner_steps_per_estimate", "error")}
    summary.setdefault("machine", r.get("machine"))
code, seconds = (out / "meta_train.status").read_text().split()
train = []
metrics = out / "meta_train" / "metrics.jsonl"
if metrics.exists():
    train = [json.loads(x) for x in metrics.read_text().splitlines()]
steps = [r for r in train if r.get("kind") == "train"]
summary["meta_train_default"] = {
    "exit_status": int(code), "wall_seconds": int(seconds), "outer_steps_done": len(steps),
    "inner_steps_per_second_last": steps[-1]["inner_steps_per_second"] if steps else None,
    "startup_seconds": next((r["startup_seconds"] for r in train if r["kind"] == "setup"), None),
}
print(json.dumps(summary, indent=2))
PYEOF
