#!/usr/bin/env python3
"""Writes the tiny HF fixtures (tests/fixtures/tiny-gemma{1,2}) as big_vision PaliGemma `.npz`
checkpoints, in the layout of the released files (`params/img/...`, `params/llm/...`, scanned
layers stacked on a leading axis), for `pali model convert --from FILE.npz`'s tests.

The layout is the inverse of HF transformers' own converters
(src/transformers/models/paligemma/convert_paligemma_weights_to_hf.py and
convert_paligemma2_weights_to_hf.py); `hf_from_npz` below repeats those scripts' forward
expressions and the script checks that they give the fixture back exactly, so the files are
what those converters read.

Outputs, under tests/fixtures/big_vision/:
  tiny-gemma1.npz, tiny-gemma2.npz   f32 arrays (`<f4`)
  tiny-gemma1.b16.npz                every array bf16, stored as 2-byte void `|V2` (as JAX
                                     writes bf16; round to nearest even)

Run: bench/.venv/bin/python scripts/big_vision_reference.py  (numpy + safetensors)
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "big_vision")


def hf_key(d, *names):
    """The fixture's name of a tensor: hub (4.x) or 5.x vision naming."""
    for n in names:
        if n in d:
            return n
    raise KeyError(names[0])


def vis(d, rest):
    return d[hf_key(d, "vision_tower.vision_model." + rest, "vision_tower." + rest)]


def npz_from_hf(d, cfg):
    v, t = cfg["vision_config"], cfg["text_config"]
    W, heads = v["hidden_size"], v["num_attention_heads"]
    dh = W // heads
    Lv = v["num_hidden_layers"]
    D, H, K, Dh = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    L = t["num_hidden_layers"]
    gemma2 = t["model_type"] == "gemma2"
    out = {}
    out["img/embedding/kernel"] = vis(d, "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
    out["img/embedding/bias"] = vis(d, "embeddings.patch_embedding.bias")
    out["img/pos_embedding"] = vis(d, "embeddings.position_embedding.weight")[None]
    blk = "img/Transformer/encoderblock/"
    lay = lambda i, n: vis(d, f"encoder.layers.{i}.{n}")
    stack = lambda f, n: np.stack([f(i) for i in range(n)])
    for ln, hf in [("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")]:
        out[blk + ln + "/scale"] = stack(lambda i: lay(i, hf + ".weight"), Lv)
        out[blk + ln + "/bias"] = stack(lambda i: lay(i, hf + ".bias"), Lv)
    for k, hf in [("Dense_0", "fc1"), ("Dense_1", "fc2")]:
        out[blk + f"MlpBlock_0/{k}/kernel"] = stack(lambda i: lay(i, f"mlp.{hf}.weight").T, Lv)
        out[blk + f"MlpBlock_0/{k}/bias"] = stack(lambda i: lay(i, f"mlp.{hf}.bias"), Lv)
    att = blk + "MultiHeadDotProductAttention_0/"
    for k in ["query", "key", "value"]:
        hf = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}[k]
        out[att + k + "/kernel"] = stack(
            lambda i: lay(i, f"self_attn.{hf}.weight").T.reshape(W, heads, dh), Lv)
        out[att + k + "/bias"] = stack(
            lambda i: lay(i, f"self_attn.{hf}.bias").reshape(heads, dh), Lv)
    out[att + "out/kernel"] = stack(
        lambda i: lay(i, "self_attn.out_proj.weight").T.reshape(heads, dh, W), Lv)
    out[att + "out/bias"] = stack(lambda i: lay(i, "self_attn.out_proj.bias"), Lv)
    out["img/Transformer/encoder_norm/scale"] = vis(d, "post_layernorm.weight")
    out["img/Transformer/encoder_norm/bias"] = vis(d, "post_layernorm.bias")
    out["img/head/kernel"] = d["multi_modal_projector.linear.weight"].T
    out["img/head/bias"] = d["multi_modal_projector.linear.bias"]

    g = lambda i, n: d[f"language_model.model.layers.{i}.{n}"]
    out["llm/embedder/input_embedding"] = d["language_model.model.embed_tokens.weight"]
    out["llm/layers/attn/q_einsum/w"] = stack(
        lambda i: g(i, "self_attn.q_proj.weight").reshape(H, Dh, D).transpose(0, 2, 1), L)
    out["llm/layers/attn/kv_einsum/w"] = stack(
        lambda i: np.stack([
            g(i, f"self_attn.{p}_proj.weight").reshape(K, Dh, D).transpose(0, 2, 1)
            for p in ["k", "v"]
        ]), L)
    out["llm/layers/attn/attn_vec_einsum/w"] = stack(
        lambda i: g(i, "self_attn.o_proj.weight").reshape(D, H, Dh).transpose(1, 2, 0), L)
    out["llm/layers/mlp/gating_einsum"] = stack(
        lambda i: np.stack([g(i, "mlp.gate_proj.weight").T, g(i, "mlp.up_proj.weight").T]), L)
    out["llm/layers/mlp/linear"] = stack(lambda i: g(i, "mlp.down_proj.weight").T, L)
    out["llm/layers/pre_attention_norm/scale"] = stack(lambda i: g(i, "input_layernorm.weight"), L)
    if gemma2:
        out["llm/layers/pre_ffw_norm/scale"] = stack(lambda i: g(i, "pre_feedforward_layernorm.weight"), L)
        out["llm/layers/post_attention_norm/scale"] = stack(lambda i: g(i, "post_attention_layernorm.weight"), L)
        out["llm/layers/post_ffw_norm/scale"] = stack(lambda i: g(i, "post_feedforward_layernorm.weight"), L)
    else:
        # Gemma 1: HF's `post_attention_layernorm` is big_vision's pre-MLP norm.
        out["llm/layers/pre_ffw_norm/scale"] = stack(lambda i: g(i, "post_attention_layernorm.weight"), L)
    out["llm/final_norm/scale"] = d["language_model.model.norm.weight"]
    return {"params/" + k: np.ascontiguousarray(a) for k, a in out.items()}


def hf_from_npz(npz, cfg):
    """HF's conversion (convert_paligemma2_weights_to_hf.py `slice_state_dict`, general in K;
    Gemma 1 norms as in convert_paligemma_weights_to_hf.py), in its own expressions."""
    s = {k.removeprefix("params/"): v for k, v in npz.items()}
    v, t = cfg["vision_config"], cfg["text_config"]
    W = v["hidden_size"]
    gemma2 = t["model_type"] == "gemma2"
    o = {}
    o["vision.embeddings.patch_embedding.weight"] = s.pop("img/embedding/kernel").transpose(3, 2, 0, 1)
    o["vision.embeddings.patch_embedding.bias"] = s.pop("img/embedding/bias")
    o["vision.embeddings.position_embedding.weight"] = s.pop("img/pos_embedding").reshape(-1, W)
    blk = "img/Transformer/encoderblock/"
    att = blk + "MultiHeadDotProductAttention_0/"
    e = {k: s.pop(k) for k in [k for k in s if k.startswith(blk)]}
    for i in range(v["num_hidden_layers"]):
        p = f"vision.encoder.layers.{i}."
        o[p + "layer_norm1.weight"] = e[blk + "LayerNorm_0/scale"][i].transpose()
        o[p + "layer_norm1.bias"] = e[blk + "LayerNorm_0/bias"][i]
        o[p + "layer_norm2.weight"] = e[blk + "LayerNorm_1/scale"][i].transpose()
        o[p + "layer_norm2.bias"] = e[blk + "LayerNorm_1/bias"][i]
        o[p + "mlp.fc1.weight"] = e[blk + "MlpBlock_0/Dense_0/kernel"][i].transpose()
        o[p + "mlp.fc1.bias"] = e[blk + "MlpBlock_0/Dense_0/bias"][i]
        o[p + "mlp.fc2.weight"] = e[blk + "MlpBlock_0/Dense_1/kernel"][i].transpose()
        o[p + "mlp.fc2.bias"] = e[blk + "MlpBlock_0/Dense_1/bias"][i]
        for k, hf in [("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")]:
            # The converters write `.reshape(-1, W).transpose()`, equal to this only when
            # heads · dh = W (true for every SigLIP).
            o[p + f"self_attn.{hf}.weight"] = e[att + k + "/kernel"][i].reshape(W, -1).transpose()
            o[p + f"self_attn.{hf}.bias"] = e[att + k + "/bias"][i].reshape(-1, W).reshape(-1)
        o[p + "self_attn.out_proj.weight"] = e[att + "out/kernel"][i].reshape(-1, W).transpose()
        o[p + "self_attn.out_proj.bias"] = e[att + "out/bias"][i]
    o["vision.post_layernorm.weight"] = s.pop("img/Transformer/encoder_norm/scale").transpose()
    o["vision.post_layernorm.bias"] = s.pop("img/Transformer/encoder_norm/bias")
    o["multi_modal_projector.linear.weight"] = s.pop("img/head/kernel").transpose()
    o["multi_modal_projector.linear.bias"] = s.pop("img/head/bias")
    o["language_model.model.embed_tokens.weight"] = s.pop("llm/embedder/input_embedding")
    q = s.pop("llm/layers/attn/q_einsum/w")
    kv = s.pop("llm/layers/attn/kv_einsum/w")
    av = s.pop("llm/layers/attn/attn_vec_einsum/w")
    ge = s.pop("llm/layers/mlp/gating_einsum")
    lin = s.pop("llm/layers/mlp/linear")
    pre_att = s.pop("llm/layers/pre_attention_norm/scale")
    pre_ffw = s.pop("llm/layers/pre_ffw_norm/scale")
    if gemma2:
        post_att = s.pop("llm/layers/post_attention_norm/scale")
        post_ffw = s.pop("llm/layers/post_ffw_norm/scale")
    H, K, Dh, D = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"], t["hidden_size"]
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        o[p + "self_attn.q_proj.weight"] = q[i].transpose(0, 2, 1).reshape(H * Dh, D)
        o[p + "self_attn.k_proj.weight"] = kv[i, 0].transpose(0, 2, 1).reshape(K * Dh, D)
        o[p + "self_attn.v_proj.weight"] = kv[i, 1].transpose(0, 2, 1).reshape(K * Dh, D)
        o[p + "self_attn.o_proj.weight"] = av[i].transpose(2, 0, 1).reshape(D, H * Dh)
        o[p + "mlp.gate_proj.weight"] = ge[i, 0].transpose()
        o[p + "mlp.up_proj.weight"] = ge[i, 1].transpose()
        o[p + "mlp.down_proj.weight"] = lin[i].transpose()
        o[p + "input_layernorm.weight"] = pre_att[i]
        if gemma2:
            o[p + "pre_feedforward_layernorm.weight"] = pre_ffw[i]
            o[p + "post_attention_layernorm.weight"] = post_att[i]
            o[p + "post_feedforward_layernorm.weight"] = post_ffw[i]
        else:
            o[p + "post_attention_layernorm.weight"] = pre_ffw[i]
    o["language_model.model.norm.weight"] = s.pop("llm/final_norm/scale")
    assert not s, f"unused arrays: {sorted(s)}"
    return o


def bf16_void(a):
    """f32 → bf16 (round to nearest even) as numpy's 2-byte void, the way JAX arrays are saved."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.view("V2")


def main():
    os.makedirs(OUT, exist_ok=True)
    for variant in ["tiny-gemma1", "tiny-gemma2"]:
        d = load_file(os.path.join(FIX, variant, "model.safetensors"))
        cfg = json.load(open(os.path.join(FIX, variant, "config.json")))
        npz = npz_from_hf(d, cfg)
        back = hf_from_npz(npz, cfg)
        for k, a in back.items():
            name = k.replace("vision.", "vision_tower.", 1) if k.startswith("vision.") else k
            ref = vis(d, name[len("vision_tower."):]) if name.startswith("vision_tower.") else d[name]
            assert ref.shape == a.shape and np.array_equal(ref, a), k
        assert len(back) == len(d), (len(back), len(d))
        np.savez(os.path.join(OUT, f"{variant}.npz"), **npz)
        print(f"{variant}.npz: {len(npz)} arrays, HF's conversion gives the fixture back exactly")
        if variant == "tiny-gemma1":
            np.savez(os.path.join(OUT, f"{variant}.b16.npz"), **{k: bf16_void(a) for k, a in npz.items()})
            print(f"{variant}.b16.npz: every array bf16 as |V2")


if __name__ == "__main__":
    sys.exit(main())
