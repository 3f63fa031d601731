#!/usr/bin/env python3
"""Opens a pali checkpoint directory the way an HF user would (AutoProcessor +
PaliGemmaForConditionalGeneration.from_pretrained), decodes greedily, and compares the tokens
with `pali generate` on the same inputs.

  bench/.venv/bin/python scripts/hf_roundtrip.py CKPT_DIR [--prompt "answer en what color is the circle?"]
      [--image IMG.png] [--tokens 8] [--pali target/release/pali]

CKPT_DIR: `OUT/checkpoints/step-…` of `pali train` (or `pali model convert --tokenizer` /
`pali model init` output with a tokenizer). Without --image a fixed random image is used.
Exit status 0 when every token matches. Needs torch, transformers, safetensors, numpy, pillow.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--image")
    ap.add_argument("--tokens", type=int, default=8)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--pali", default=os.path.join(root, "target", "release", "pali"))
    a = ap.parse_args()

    processor = AutoProcessor.from_pretrained(a.ckpt)
    model = PaliGemmaForConditionalGeneration.from_pretrained(a.ckpt, torch_dtype=torch.float32)
    model.eval()
    if a.image:
        image = Image.open(a.image).convert("RGB")
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    inputs = processor(text=a.prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=a.tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    hf_tokens = out[0, n:].tolist()

    with tempfile.TemporaryDirectory() as d:
        inp = os.path.join(d, "inputs.safetensors")
        save_file(
            {
                "pixel_values": inputs["pixel_values"].numpy().astype(np.float32),
                "input_ids": inputs["input_ids"].numpy().astype(np.int64),
                "attention_mask": inputs["attention_mask"].numpy().astype(np.int64),
                "token_type_ids": inputs["token_type_ids"].numpy().astype(np.int64),
            },
            inp,
        )
        res = os.path.join(d, "out.safetensors")
        subprocess.run(
            [a.pali, "generate", "--checkpoint", a.ckpt, "--inputs", inp,
             "--max-new-tokens", str(len(hf_tokens)), "--out", res],
            check=True,
        )
        pali_tokens = load_file(res)["new_tokens"][0].tolist()

    print(f"prompt {a.prompt!r}, {n} input tokens")
    print(f"HF   {hf_tokens}  {processor.decode(hf_tokens)!r}")
    print(f"pali {pali_tokens}  {processor.decode(pali_tokens)!r}")
    same = hf_tokens == pali_tokens[: len(hf_tokens)]
    print("match" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
