#!/usr/bin/env python3
"""A tiny VQ-VAE in big_vision's `vae-oid.npz` layout, and what it computes, for pali's tests.

    python3 scripts/vqvae_reference.py tests/fixtures/vqvae

Writes `tiny.npz` (np.savez: PyTorch-style keys `encoder.{0,2,4,6}`, `encoder.{8,9}.net.{0,2,4}`,
`encoder.10`, `_vq_vae._embedding`, `decoder.0`, `decoder.{2,3}.net.{0,2,4}`,
`decoder.{4,6,8,10}`, `decoder.12`; conv weights OIHW, transposed-conv weights
(in, out, kh, kw), float32) with small random widths, and `reference.json`: a 64×64 mask crop,
its 16 codes and the decoder's 64×64 output for them.

The computation is written out in plain numpy from the definitions big_vision uses:
TF `conv2d(padding='SAME')` for the encoder (pad total max(k − s, 0), the smaller half first),
nearest codebook row per cell in row-major order, and for the decoder Flax
`ConvTranspose(kernel 4, stride 2, padding 2, transpose_kernel=True)` on PyTorch weights, which
is PyTorch's `conv_transpose2d(stride 2, padding 1)`: out[o, s·i − p + k] += x[c, i] · w[c, o, k].
"""
import json
import os
import sys

import numpy as np

rng = np.random.default_rng(20261127)
ENC = [4, 8, 8, 8]  # stride-2 conv widths
K_ENC = 4
ENC_RES = 4
D = 8  # codebook width
K = 16  # codebook size
DEC = 16  # decoder width: transposed convs output 16, 8, 4, 2
DEC_RES = 16


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


ckpt = {}
ins = [1] + ENC[:3]
for i in range(4):
    ckpt[f"encoder.{2*i}.weight"] = w(ENC[i], ins[i], K_ENC, K_ENC)
    ckpt[f"encoder.{2*i}.bias"] = w(ENC[i], scale=0.1)
for b in (8, 9):
    ckpt[f"encoder.{b}.net.0.weight"] = w(ENC_RES, ENC[3], 3, 3)
    ckpt[f"encoder.{b}.net.0.bias"] = w(ENC_RES, scale=0.1)
    ckpt[f"encoder.{b}.net.2.weight"] = w(ENC_RES, ENC_RES, 3, 3)
    ckpt[f"encoder.{b}.net.2.bias"] = w(ENC_RES, scale=0.1)
    ckpt[f"encoder.{b}.net.4.weight"] = w(ENC[3], ENC_RES, 1, 1)
    ckpt[f"encoder.{b}.net.4.bias"] = w(ENC[3], scale=0.1)
ckpt["encoder.10.weight"] = w(D, ENC[3], 1, 1)
ckpt["encoder.10.bias"] = w(D, scale=0.1)
ckpt["_vq_vae._embedding"] = w(K, D, scale=1.0)
ckpt["decoder.0.weight"] = w(DEC, D, 1, 1)
ckpt["decoder.0.bias"] = w(DEC, scale=0.1)
for b in (2, 3):
    ckpt[f"decoder.{b}.net.0.weight"] = w(DEC_RES, DEC, 3, 3)
    ckpt[f"decoder.{b}.net.0.bias"] = w(DEC_RES, scale=0.1)
    ckpt[f"decoder.{b}.net.2.weight"] = w(DEC_RES, DEC_RES, 3, 3)
    ckpt[f"decoder.{b}.net.2.bias"] = w(DEC_RES, scale=0.1)
    ckpt[f"decoder.{b}.net.4.weight"] = w(DEC, DEC_RES, 1, 1)
    ckpt[f"decoder.{b}.net.4.bias"] = w(DEC, scale=0.1)
widths = [DEC, DEC, DEC // 2, DEC // 4, DEC // 8]
for i in range(4):
    ckpt[f"decoder.{4+2*i}.weight"] = w(widths[i], widths[i + 1], 4, 4)
    ckpt[f"decoder.{4+2*i}.bias"] = w(widths[i + 1], scale=0.1)
ckpt["decoder.12.weight"] = w(1, DEC // 8, 1, 1)
ckpt["decoder.12.bias"] = w(1, scale=0.1)


def conv_same(x, weight, bias, stride):
    """TF conv2d, padding SAME. x: [C, H, W]; weight OIHW."""
    o, c, kh, kw = weight.shape
    _, h, wd = x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - wd, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((o, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride]  # [C, oh, ow]
            out += np.einsum("oc,chw->ohw", weight[:, :, i, j], patch)
    return out + bias[:, None, None]


def conv_transpose(x, weight, bias, stride=2, pad=1):
    """PyTorch conv_transpose2d. x: [C, H, W]; weight [C, O, kh, kw]."""
    c, h, wd = x.shape
    _, o, kh, kw = weight.shape
    full = np.zeros((o, (h - 1) * stride + kh, (wd - 1) * stride + kw), np.float64)
    for i in range(h):
        for j in range(wd):
            full[:, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "c,cokl->okl", x[:, i, j], weight)
    oh, ow = (h - 1) * stride - 2 * pad + kh, (wd - 1) * stride - 2 * pad + kw
    return full[:, pad:pad + oh, pad:pad + ow] + bias[:, None, None]


relu = lambda a: np.maximum(a, 0)


def resblock(x, name):
    h = relu(conv_same(x, ckpt[name + ".0.weight"], ckpt[name + ".0.bias"], 1))
    h = relu(conv_same(h, ckpt[name + ".2.weight"], ckpt[name + ".2.bias"], 1))
    return x + conv_same(h, ckpt[name + ".4.weight"], ckpt[name + ".4.bias"], 1)


def encode(mask):
    x = (2.0 * (mask - 0.5))[None]
    for i in range(4):
        x = relu(conv_same(x, ckpt[f"encoder.{2*i}.weight"], ckpt[f"encoder.{2*i}.bias"], 2))
    for b in (8, 9):
        x = resblock(x, f"encoder.{b}.net")
    x = conv_same(x, ckpt["encoder.10.weight"], ckpt["encoder.10.bias"], 1)  # [D, 4, 4]
    flat = x.transpose(1, 2, 0).reshape(-1, D)  # row-major cells
    e = ckpt["_vq_vae._embedding"].astype(np.float64)
    dist = (flat ** 2).sum(1, keepdims=True) + (e ** 2).sum(1) - 2 * flat @ e.T
    return dist.argmin(1), np.sort(dist, 1)[:, 1] - np.sort(dist, 1)[:, 0]


def decode(codes):
    x = ckpt["_vq_vae._embedding"][codes].reshape(4, 4, D).transpose(2, 0, 1).astype(np.float64)
    x = relu(conv_same(x, ckpt["decoder.0.weight"], ckpt["decoder.0.bias"], 1))
    for b in (2, 3):
        x = resblock(x, f"decoder.{b}.net")
    for i in range(4):
        x = relu(conv_transpose(x, ckpt[f"decoder.{4+2*i}.weight"], ckpt[f"decoder.{4+2*i}.bias"]))
    return conv_same(x, ckpt["decoder.12.weight"], ckpt["decoder.12.bias"], 1)[0]


yy, xx = np.mgrid[:64, :64]
mask = (((yy - 30) / 22.0) ** 2 + ((xx - 36) / 14.0) ** 2 < 1).astype(np.float64)
mask[40:, :20] = 0.5  # a soft edge, as after an antialiased resize
codes, margin = encode(mask)
dec_codes = rng.integers(0, K, 16)
out = decode(dec_codes)

d = sys.argv[1]
os.makedirs(d, exist_ok=True)
np.savez(os.path.join(d, "tiny.npz"), **ckpt)
json.dump({
    "mask": mask.ravel().tolist(),
    "codes": codes.tolist(),
    "min_code_margin": float(margin.min()),
    "decode_codes": dec_codes.tolist(),
    "decoded": out.ravel().tolist(),
}, open(os.path.join(d, "reference.json"), "w"))
print("codes", codes.tolist(), "min margin", margin.min())
