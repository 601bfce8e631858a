#!/usr/bin/env bash
# Every GPU measurement the issues ask for, for a machine whose python3 has torch, triton, torchvision,
# torchaudio, numpy, einops, safetensors and tqdm but not this package (nor hydra, diffusers, av, librosa):
#
#     OUT=gpu_out bash bench/gpu_checks.sh                  # every step (the limits add up to 20 minutes)
#     OUT=gpu_out bash bench/gpu_checks.sh env tests steps   # only the steps named
#
# A session's device time (15 minutes, a command at most 10) holds two calls, in this order of value:
#     env tests steps steps-xxl sample          (issues 3, 5, 6: the step ratios, the XXL step, the headline)
#     kernel kernel-causal sample-compile       (issue 6: the kernel against flash SDPA; torch.compile)
# then, if time is left: profile steps-64 video-attention tune trainers.
#
# The repository is put on PYTHONPATH as its packages (no install); wheels in .whl/ are installed to
# /tmp/site first if present. For xformers on torch 2.11.0+cu130: PyPI's 0.0.35 has no CUDA operator there
# (docs/benchmarks.md 9b); 0.0.35.dev1147 is pure Python over `mslk`, whose mslk-cuda 1.1.0 cp312 wheel
# (44.5 MB, links libcudart.so.13) finds all 118 torch symbols it needs in that torch's libraries (nm,
# 2026-12-07, without a GPU). Carry those two wheels for the first call (carry is 64 MiB a call). Without
# diffusers the `sample` steps time the sampling alone (no decoding rows); `trainers` needs av, soundfile,
# librosa and mlxtend wheels (a call of its own), and its test files skip without them.
# Each step has its own time limit, so one that hangs or fails leaves the others' figures; the script ends
# with the steps that failed and exits non-zero if any did.
#   env    the GPU, torch, triton, xformers and the backends "auto" picks
#   tests  the CUDA tests of the attention dispatcher, the Triton kernel and the graphed JVP (issue 6)
#   steps, profile, steps-64, steps-xxl: sCT / sCD / teacher training steps, bf16, with the eager and the
#          CUDA-graphed JVP side by side: ImageNet-64 S, the video DiT-S preset (17 frames at 256x256 through
#          a 16-channel 4x8x8 latent; xformers forward when it loads); the top operators of one JVP; the video
#          step at batch 64; ImageNet-512 XXL (issues 3, 5, 6)
#   video-attention  the JVP attention at the video presets' sequence lengths (issue 5)
#   sample, sample-compile: 2-step generation per 512x512 sample, ImageNet-512 XXL at batch 1: eager, CUDA
#          graph, compile (issue 6)
#   tune, kernel, kernel-causal: the kernel's block sizes at N = 8192, then output + tangent vs flash SDPA
#          forward at N 1k-32k, D 64 and 128, non-causal and causal (issue 6)
#   trainers  the video autoencoder and vocoder trainers on CUDA against their CPU losses, and the image
#          metrics on CUDA (scm-mm-eval's device) against the CPU's
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/scm_mm_pkgs
for m in image audio video; do ln -sfn "$PWD/modalities/scm_mm_$m" "/tmp/scm_mm_pkgs/scm_mm_$m"; done
ln -sfn "$PWD/configs" /tmp/scm_mm_pkgs/scm_mm_configs
export PYTHONPATH=$PWD:/tmp/scm_mm_pkgs${PYTHONPATH:+:$PYTHONPATH}

STEPS=" env tests steps profile steps-64 steps-xxl video-attention sample sample-compile tune kernel kernel-causal trainers "
for name in "$@"; do
    if [[ "$STEPS" != *" $name "* ]]; then echo "unknown step '$name'; the steps are:$STEPS" >&2; exit 2; fi
done
ONLY=" $* "
FAILED=""
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output and how it ended
    local name=$1 limit=$2
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    echo "=== $name: exit $code after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$code" != 0 ]; then FAILED="$FAILED $name($code)"; fi
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
    python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)";
    python3 -c "import xformers, xformers.ops; print(\"xformers\", xformers.__version__)";
    python3 -c "from scm_mm.nn.attention import auto_backends; print(\"auto backends on cuda:\", auto_backends(\"cuda\"))"'
step tests 120 python3 -m pytest -q -p no:cacheprovider -p no:hydra_pytest -m "gpu or not slow" tests/test_triton_attention.py tests/test_attention.py tests/test_cuda_graph_jvp.py
step steps 150 python3 bench/step_time.py --nets imagenet64-S video-dit-s --precision bf16 --batch 16 --repeats 5 \
    --tangent-method jvp cuda_graph_jvp
step profile 60 python3 bench/step_time.py --nets video-dit-s imagenet64-S --precision bf16 --batch 16 --repeats 2 --profile
step steps-64 60 python3 bench/step_time.py --nets video-dit-s --precision bf16 --batch 64 --repeats 3
step steps-xxl 130 python3 bench/step_time.py --nets imagenet512-XXL --precision bf16 --batch 8 --repeats 3 \
    --tangent-method jvp cuda_graph_jvp
step video-attention 40 python3 bench/video_attention.py --device cuda --batch 4 --heads 12 --dtype bfloat16 --repeats 5
step sample 70 python3 bench/sample_time.py --modes eager graph --repeats 20
step sample-compile 150 python3 bench/sample_time.py --modes compile --repeats 20
step tune 60 python3 bench/attention_triton.py --tune --lengths 8192 --head-dims 64 128 256 --out "$OUT/tune.json"
step kernel 120 python3 bench/attention_triton.py --out "$OUT/kernel.json"
step kernel-causal 45 python3 bench/attention_triton.py --causal --lengths 4096 16384 --methods "flash forward" fused blockwise --out "$OUT/kernel_causal.json"
step trainers 120 python3 -m pytest -q -p no:cacheprovider -p no:hydra_pytest -m gpu tests/test_trainers_cuda.py tests/test_metrics_cuda.py
echo "=== done $(date -u +%H:%M:%S); failed:${FAILED:- none}" | tee -a "$LOG"
[ -z "$FAILED" ]
