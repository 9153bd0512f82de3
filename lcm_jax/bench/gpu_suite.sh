#!/usr/bin/env bash
# GPU benchmark suite (one GPU, under 10 minutes): writes one JSON with
#   * the LCD training step (lcm_jax/bench/lcd_step.py, SD 2.1-base UNet, bf16 compute, bf16
#     teacher) at 512x512 with each attention backend (cudnn, chunked, xla): step seconds,
#     samples/s, XLA's FLOPs per step and the model-FLOPs utilisation against the GPU's bf16
#     peak (lcd_step.PEAK_FLOPS);
#   * 4-step LCM sampling (lcm_jax/bench/sample_speed.py, SD 2.1 architecture, random weights,
#     bf16 on both sides) at 512 and 768: lcm-jax and diffusers images/s.
# Never part of `make test`. Run from the repository root:
#   bash lcm_jax/bench/gpu_suite.sh [--dry-run] [--out gpu_suite.json] [--workdir DIR]
#                                   [--batch_size 8] [--sample_batch 4]
# --dry-run prints the commands (and the JSON assembly) without running them; it works on CPU.
# Each command runs under `timeout`: its own limit (STEP_LIMIT / SAMPLE_LIMIT seconds) and
# never past the suite's deadline (SUITE_LIMIT, 570 s from the start), so the whole suite
# stays under 10 minutes; a command that fails or times out is recorded as an error in the
# JSON. Expected on an H100/H200: ~100 s per LCD step run (compile ~60 s), ~150 s for
# sampling at 512 (saving the random pipeline included), ~90 s at 768. The xla step runs
# last: it is the least informative and the first to lose time.
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT=gpu_suite.json
WORKDIR=${TMPDIR:-/tmp}/lcm_gpu_suite
BATCH=8          # LCD step batch at 512 (per the paper's per-GPU batch on an 80 GB card)
SAMPLE_BATCH=4   # images per sampling call
STEP_LIMIT=${STEP_LIMIT:-130}      # compile (~1 min) + 5 timed steps, per backend
SAMPLE_LIMIT=${SAMPLE_LIMIT:-200}  # load + compile + timed calls, both sides, per resolution
SUITE_LIMIT=${SUITE_LIMIT:-570}
DRY_RUN=0
BACKENDS=(cudnn chunked xla)

while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=$2; shift ;;
    --workdir) WORKDIR=$2; shift ;;
    --batch_size) BATCH=$2; shift ;;
    --sample_batch) SAMPLE_BATCH=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PARTS=$WORKDIR/parts

DEADLINE=$((SECONDS + SUITE_LIMIT))

# run NAME LIMIT CMD...: runs CMD under `timeout` (LIMIT, or less if the suite's deadline is
# nearer), stdout into $PARTS/NAME.out, stderr into $PARTS/NAME.err; prints it instead under
# --dry-run.
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if (( left < limit )); then limit=$left; fi
  echo "+ [$name, ${limit}s] $*"
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  if (( limit < 30 )); then echo "  $name skipped: suite deadline" | tee "$PARTS/$name.err"; return 0; fi
  timeout "$limit" "$@" > "$PARTS/$name.out" 2> "$PARTS/$name.err" || echo "  $name failed (exit $?)"
}

# step BACKEND: the LCD step at 512 with this attention backend. lcd_step.py has no
# --attention flag, so its jax role runs in-process with build_module given the backend
# (it builds every UNet through it).
step() {
  run "step_$1" "$STEP_LIMIT" "$PYTHON" -c "
import functools, sys
import lcm_jax.sd_pipeline as sd_pipeline
from lcm_jax.bench import lcd_step
sd_pipeline.build_module = functools.partial(sd_pipeline.build_module, attention='$1')
sys.argv = ['lcd_step', '--resolution', '512', '--batch_size', '$BATCH', '--steps', '5', '--_role', 'jax']
lcd_step.main()"
}

# sample SIZE: 4-step LCM at SIZE px, lcm-jax ('auto' attention: cudnn in bf16) and diffusers.
sample() {
  run "sample_$1" "$SAMPLE_LIMIT" "$PYTHON" -m lcm_jax.bench.sample_speed --resolution "$1" \
    --batch_size "$SAMPLE_BATCH" --repeats 3 --dtype bf16 --runs LCM --workdir "$WORKDIR/pipeline" \
    --json "$PARTS/sample_$1.json"
}

if [[ $DRY_RUN == 0 ]]; then mkdir -p "$PARTS"; fi

step cudnn
step chunked
sample 512
sample 768
step xla

# One JSON from the parts.
echo "+ assemble $OUT from $PARTS"
if [[ $DRY_RUN == 1 ]]; then exit 0; fi
"$PYTHON" - "$PARTS" "$OUT" "$BATCH" "${BACKENDS[@]}" <<'EOF'
import json, os, sys
from lcm_jax.bench.lcd_step import _peak_flops
parts, out, batch, backends = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
result = {"lcd_step_512": {}, "sampling_lcm_4_steps": {}}
for backend in backends:
  path = os.path.join(parts, f"step_{backend}.out")
  text = open(path).read() if os.path.exists(path) else ""
  if "RESULT " not in text:
    err = open(os.path.join(parts, f"step_{backend}.err")).read()[-2000:]
    result["lcd_step_512"][backend] = {"error": err}
    continue
  r = json.loads(text.split("RESULT ", 1)[1])
  peak = _peak_flops(r["device"])
  r.update(batch_size=batch, samples_per_s=batch / r["step_s"],
           mfu=r["flops"] / r["step_s"] / peak if peak else None, peak_flops=peak)
  result["device"] = r["device"]
  result["lcd_step_512"][backend] = r
for size in (512, 768):
  path = os.path.join(parts, f"sample_{size}.json")
  result["sampling_lcm_4_steps"][str(size)] = (json.load(open(path)) if os.path.exists(path) else
                                               {"error": open(os.path.join(parts, f"sample_{size}.err")).read()[-2000:]})
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result, indent=1))
EOF
