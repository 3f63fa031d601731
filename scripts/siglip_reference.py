#!/usr/bin/env python3
"""Reference for pali's stage-0 SigLIP two-tower model: HF transformers' `SiglipModel`.

    bench/.venv/bin/python scripts/siglip_reference.py            # writes tests/fixtures/siglip
    bench/.venv/bin/python scripts/siglip_reference.py --check DIR  # loads a pali checkpoint

(`scripts/bench_vs_torch.sh` creates bench/.venv with torch 2.15.0 + transformers 5.24.0.)

Writes a tiny randomly initialised `SiglipModel` (both towers, the attention-pooling head,
`logit_scale`, `logit_bias`) with `save_pretrained`, and what HF computes from it on a fixed
batch: image and text embeddings, `logits_per_image` and the sigmoid loss (`return_loss`).
Every parameter is redrawn from a seeded generator so that none keeps an init constant (the
LayerNorms and the head's probe included); `logit_scale` is log 10 and `logit_bias` −2, so the
loss is not saturated.

`--check DIR` is the other direction: `SiglipModel.from_pretrained(DIR)` on a checkpoint pali
wrote (`pali train` stage 0 output), then the same batch through it; prints the loss, so a user
can compare it with pali's, and fails if HF reports missing or unexpected weights.
"""
import argparse
import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/siglip"


def config():
    return SiglipConfig(
        text_config=dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, projection_size=40,
                         pad_token_id=0, bos_token_id=2, eos_token_id=1,
                         layer_norm_eps=1e-6),
        vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8,
                           layer_norm_eps=1e-6),
    )


def batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(0, 97, (5, 12), generator=g)
    return pixels, ids


def randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.302585092994046)
            elif name == "logit_bias":
                p.fill_(-2.0)
            elif "layer_norm" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)


def run(model, pixels, ids):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels, input_ids=ids, return_loss=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", type=pathlib.Path)
    args = ap.parse_args()
    pixels, ids = batch()
    if args.check:
        model, info = SiglipModel.from_pretrained(args.check, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k != "mismatched_keys" or
               (k == "mismatched_keys" and v)}
        if bad:
            raise SystemExit(f"{args.check}: {bad}")
        cfg = model.config
        g = torch.Generator().manual_seed(1)
        r = cfg.vision_config.image_size
        pixels = torch.rand(2, 3, r, r, generator=g) * 2 - 1
        ids = torch.randint(0, cfg.text_config.vocab_size,
                            (2, cfg.text_config.max_position_embeddings), generator=g)
        out = run(model, pixels, ids)
        print(json.dumps({"loaded": str(args.check), "loss": out.loss.item(),
                          "logits_per_image": out.logits_per_image.tolist()}))
        return
    torch.manual_seed(0)
    model = SiglipModel(config()).float()
    randomize(model)
    out = run(model, pixels, ids)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT / "model", safe_serialization=True)
    save_file({
        "pixel_values": pixels.contiguous(),
        "input_ids": ids.contiguous(),
        "image_embeds": out.image_embeds.contiguous(),
        "text_embeds": out.text_embeds.contiguous(),
        "logits_per_image": out.logits_per_image.contiguous(),
        "loss": out.loss.reshape(1).contiguous(),
        # The vision tower's pooled output before normalisation: checks the head alone.
        "pooler_output": out.vision_model_output.pooler_output.contiguous(),
    }, OUT / "reference.safetensors")
    (OUT / "meta.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "loss": out.loss.item(),
    }, indent=1) + "\n")
    print("wrote", OUT, "loss", out.loss.item())


if __name__ == "__main__":
    main()
