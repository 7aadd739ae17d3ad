#!/usr/bin/env bash
# GPU checks in one command, for a CUDA machine whose `python3` has torch (and this package's other
# needs; Ray and MLflow are not used):
#   bash bench/gpu.sh [OUTDIR]      (default OUTDIR: runs/gpu; STEPS="pipeline speed" picks steps)
# 1. the digits pipeline end to end on the GPU (every stage, device=cuda), summary written to OUTDIR, then
#    again with the student in fp16 mixed precision (the first five stages must be skipped);
# 2. bench.synthesis --sd-size: latent-only vs decode on a Stable-Diffusion-v1-sized model, fp16 512x512;
# 3. bench.overhead on the GPU: the Accelerate loop against a plain PyTorch loop;
# 4. recipe: the cifar100_32 and cifar100_oal presets end to end on CUDA, on the scale rehearsal's generated data
#    (tests/realdata.py: an OpenOOD tree, a Stable-Diffusion-layout folder; sizes and epochs shrunk);
# 5. hours: bench.paper_hours, GPU throughput of each stage of the paper's CIFAR-100 recipe and its GPU-hours;
# 6. speed: bench.gpu_speed, before and after: the OAL training step (fp32, bf16 autocast, bf16 teacher copy,
#    channels-last) and UNet sampling (classic attention, SDPA, torch.compile), ratios in one run.
# Each step has its own time limit so that one slow step does not take the others' results with it.
set -uo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
py=${PYTHON:-python3}
nvidia-smi -L
$py - <<'EOF'
import torch, diffusers, transformers, accelerate, timm
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "timm", timm.__version__)
EOF

status=0
step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, its output into OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 40 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}

steps=" ${STEPS:-pipeline synthesis overhead recipe hours speed} "
runs=$(mktemp -d)
if [[ $steps == *" pipeline "* ]]; then
  step pipeline 200 $py -m oal.cli pipeline --config digits --no-progress device=cuda "output_dir=$runs"
  cp "$runs/digits/eval/results.md" "$out/pipeline_results.md"
  step pipeline_fp16 120 $py -m oal.cli pipeline --config digits --no-progress device=cuda "output_dir=$runs" \
    student.mixed_precision=fp16
  echo "stages skipped in the fp16 rerun: $(grep -c 'skipped (up to date)' "$out/pipeline_fp16.log") (expected 7)"
fi
if [[ $steps == *" synthesis "* ]]; then
  step synthesis_sd 200 $py -m bench.synthesis --sd-size --steps 20 --batch 8 --reps 3
fi
if [[ $steps == *" overhead "* ]]; then
  step overhead 120 $py -m bench.overhead --device cuda --reps 3 --epochs 3
fi
if [[ $steps == *" recipe "* ]]; then
  for preset in cifar100_32 cifar100_oal; do
    overrides=$($py -m tests.realdata "$runs/data-$preset" "$preset" 2>/dev/null)
    step "recipe_$preset" 150 $py -m oal.cli pipeline --config "$preset" --no-progress $overrides device=cuda \
      "output_dir=$runs"
    cp "$runs/$preset/results.md" "$out/recipe_${preset}_results.md"
  done
fi
if [[ $steps == *" hours "* ]]; then
  step hours 330 $py -m bench.paper_hours --out "$out/paper_hours.md"
fi
if [[ $steps == *" speed "* ]]; then
  step speed 420 $py -m bench.gpu_speed --out "$out/gpu_speed.md"
fi
exit $status
