#!/usr/bin/env bash
# The embedded tiny default, end to end on CPU: set up the environment, build the tiny models,
# cache the text embeddings, train with 2 processes (FSDP2 + gloo), export, and sample one image
# with the stock FluxPipeline from the exported state dict. Outputs go to results/tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
bash scripts/setup.sh
srpo=.venv/bin/srpo
out=results/tiny
[ -f "$out/models/manifest.json" ] || "$srpo" make-tiny "$out/models"
[ -f "$out/embeddings/index.json" ] || "$srpo" encode --base-model "$out/models/flux" \
  --prompts config/prompts-tiny.txt --out-dir "$out/embeddings" --max-sequence-length 32
.venv/bin/torchrun --nproc-per-node 2 --standalone -m srpo train --config config/train-tiny.yaml
.venv/bin/python - <<'PY'
import safetensors.torch
from diffusers import FluxPipeline

BASE, CKPT = "results/tiny/models/flux", "results/tiny/train/model/diffusion_pytorch_model.safetensors"
pipe = FluxPipeline.from_pretrained(BASE)
pipe.transformer.load_state_dict(safetensors.torch.load_file(CKPT))
image = pipe("a lighthouse on a cliff at sunset", height=64, width=64, num_inference_steps=50,
             guidance_scale=3.5, max_sequence_length=32).images[0]
image.save("results/tiny/sample.png")
print("wrote results/tiny/sample.png")
PY
