//! Mixed precision: f32 master weights and activations, bf16 matmuls.
//!
//! With [`Compute::Bf16`] every matmul (linear layers, attention scores and values, the tied LM
//! head) casts its operands to bf16 and its result back to f32: that is where tensor cores pay
//! off. The residual stream, norms, soft-caps, softmax and the loss stay f32, as big_vision
//! computes attention logits and softmax in f32. Casts are tracked by autodiff, so gradients
//! reach the f32 parameters as f32 and the optimizer never sees bf16.
//!
//! The patch-embedding convolution stays f32: it is a fraction of a percent of the FLOPs.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The dtype matmuls compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for Compute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Compute::F32),
            "bf16" => Ok(Compute::Bf16),
            _ => Err(format!("unknown dtype `{s}`: expected f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        })
    }
}

impl Compute {
    /// Whether `device` computes in this dtype. wgpu (WGSL) has no bf16 and may give garbage
    /// instead of failing, so check before training.
    pub fn supported<B: Backend>(self, device: &B::Device) -> bool {
        match self {
            Compute::F32 => true,
            Compute::Bf16 => B::supports_dtype(device, DType::BF16),
        }
    }

    fn low<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Compute::F32 => x,
            Compute::Bf16 => x.cast(FloatDType::BF16),
        }
    }

    fn high<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Compute::F32 => x,
            Compute::Bf16 => x.cast(FloatDType::F32),
        }
    }

    /// `l.forward(x)`, with the matmul in this dtype and the bias added in f32.
    ///
    /// The leading dimensions are flattened into one so that forward, input gradient and weight
    /// gradient are each one GEMM. Burn's `linear` on a `[B, T, D]` input runs B matmuls against
    /// the broadcast weight, and its weight gradient B matmuls of depth T plus a sum over B
    /// (burn-backend `linear_weight_backward`), which was the largest cost of a CPU step.
    pub fn linear<B: Backend, const D: usize>(
        self,
        l: &Linear<B>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([rows, d_in]);
        let y = match self {
            Compute::F32 => l.forward(x),
            Compute::Bf16 => {
                let y = self.high(linear(self.low(x), self.low(l.weight.val()), None));
                match &l.bias {
                    Some(b) => y + b.val().unsqueeze(),
                    None => y,
                }
            }
        };
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }

    /// `a.matmul(b)` in this dtype, result in f32.
    pub fn matmul<B: Backend, const D: usize>(
        self,
        a: Tensor<B, D>,
        b: Tensor<B, D>,
    ) -> Tensor<B, D> {
        self.high(self.low(a).matmul(self.low(b)))
    }

    /// Scaled dot-product attention, `mask` true = blocked, with Burn's NaN-safe semantics (a
    /// fully masked row gives zeros).
    ///
    /// Without gradients, in f32, this is Burn's `attention` (a fused kernel where the backend
    /// has one). With gradients, or in bf16, it is [`Compute::attention_in_chunks`]: Burn's
    /// autodiff decomposes its attention into ops that keep three [B, H, Sq, Sk] matrices per
    /// layer for the backward pass, and several more alive while they are computed.
    ///
    /// Grouped-query attention (MQA/GQA) takes `Hkv` key/value heads, a divisor of `H`: kv head
    /// `j` serves query heads `j·rep … (j+1)·rep − 1` (HF `repeat_kv`).
    ///
    /// # Shapes
    /// - q: [B, H, Sq, Dh], k, v: [B, Hkv, Sk, Dh], mask: [B, H, Sq, Sk] → [B, H, Sq, Dh]
    pub fn attention<B: Backend>(
        self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        opts: AttentionModuleOptions,
    ) -> Tensor<B, 4> {
        if self == Compute::F32 && !B::ad_enabled(&q.device()) {
            let h = q.dims()[1];
            return attention(q, repeat_kv(k, h), repeat_kv(v, h), mask, None, opts);
        }
        let [b, h, _, _] = q.dims();
        let row_bytes = b * h * k.dims()[2] * 4;
        let rows = (CHUNK_BYTES / row_bytes).max(16);
        self.attention_in_chunks(q, k, v, mask, opts, rows)
    }

    /// Attention over blocks of `rows` queries, normalised after the value matmul:
    /// `o = (E·V) / rowsum(E)` with `E = exp(s − max s)`, the max shift detached (softmax does
    /// not depend on it), and the row sums taken as `E·1`. The backward pass keeps two matrices
    /// per block: E (for both matmuls) and the input of the exp (Burn's autodiff recomputes exp
    /// from it), where the decomposed softmax kept three; everything else of a block is freed
    /// before the next one starts. The matmuls run in this dtype; scores, soft-cap and
    /// normalisation in f32.
    ///
    /// With grouped heads the `rep` query heads of a kv head are stacked as rows of one matrix,
    /// [B, Hkv, rep·r, Dh], so the keys and values are used as they are: one matmul per kv head
    /// instead of `rep` on copies (and no sum of `rep` copies' gradients).
    ///
    /// # Shapes
    /// - as [`Compute::attention`]
    pub fn attention_in_chunks<B: Backend>(
        self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        opts: AttentionModuleOptions,
        rows: usize,
    ) -> Tensor<B, 4> {
        let [b, h, sq, dh] = q.dims();
        let [_, hkv, sk, _] = k.dims();
        assert!(
            hkv > 0 && h % hkv == 0,
            "{h} query heads do not share {hkv} key/value heads evenly"
        );
        let rep = h / hkv;
        let scale = opts.scale.unwrap_or_else(|| (dh as f64).powf(-0.5));
        let kt = k.swap_dims(2, 3); // [B, H, Dh, Sk]
        let ones = Tensor::<B, 4>::ones([1, 1, sk, 1], &v.device());
        let mut out = Vec::with_capacity(sq.div_ceil(rows));
        for r0 in (0..sq).step_by(rows.max(1)) {
            let r1 = (r0 + rows).min(sq);
            let whole = r0 == 0 && r1 == sq;
            let r = r1 - r0;
            let qc = if whole {
                q.clone()
            } else {
                q.clone().slice([0..b, 0..h, r0..r1, 0..dh])
            };
            let qc = qc.reshape([b, hkv, rep * r, dh]);
            let mut s = self.matmul(qc, kt.clone()).mul_scalar(scale); // [B, Hkv, rep·r, Sk]
            if let Some(cap) = opts.softcap {
                s = s.div_scalar(cap).tanh().mul_scalar(cap);
            }
            if let Some(m) = &mask {
                let m = if whole {
                    m.clone()
                } else {
                    m.clone().slice([0..b, 0..h, r0..r1, 0..sk])
                };
                s = s.mask_fill(m.reshape([b, hkv, rep * r, sk]), f32::NEG_INFINITY);
            }
            let max = s.clone().detach().max_dim(3).clamp_min(f32::MIN);
            let e = (s - max).exp();
            // rowsum(E) as a matmul with a ones column: a fused `sum_dim` over the exp gave
            // wrong sums on wgpu (tested by train::wgpu_training_matches_cpu).
            let sum = e.clone().matmul(ones.clone()).clamp_min(f32::MIN_POSITIVE);
            out.push((self.matmul(e, v.clone()) / sum).reshape([b, h, r, dh]));
        }
        if out.len() == 1 {
            out.pop().expect("one block")
        } else {
            Tensor::cat(out, 2)
        }
    }
}

/// `t` with each of its heads repeated for the query heads it serves (HF `repeat_kv`).
///
/// # Shapes
/// - t: [B, Hkv, S, Dh] → [B, heads, S, Dh]
pub fn repeat_kv<B: Backend>(t: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, hkv, s, dh] = t.dims();
    if hkv == heads {
        return t;
    }
    t.unsqueeze_dim::<5>(2)
        .expand([b, hkv, heads / hkv, s, dh])
        .reshape([b, heads, s, dh])
}

/// Bytes of one block's score matrix in [`Compute::attention`] (f32, all batch rows and
/// heads): a block's temporaries stay far below the matrices the backward pass keeps, and the
/// CPU benchmarks' sequences (up to 112 tokens) take one block. On a 1-layer model with 4096
/// image tokens (bench/long), 16 MiB blocks were faster than 64 MiB ones and than one block
/// (which also peaked 1 GB higher).
const CHUNK_BYTES: usize = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as B;
    use burn::backend::Autodiff;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    fn close(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// A [2, h, q, k] mask: key `ki` blocked for query `qi` of head `hi` when
    /// `ki > qi + ahead + hi` (so heads differ), and every key blocked for query `dead` of
    /// batch 1 (a fully masked row).
    fn mask<X: Backend>(
        h: usize,
        q: usize,
        k: usize,
        ahead: usize,
        dead: usize,
    ) -> Tensor<X, 4, Bool> {
        let blocked: Vec<bool> = (0..2 * h * q * k)
            .map(|i| {
                let (b, hi, qi, ki) = (i / (h * q * k), (i / (q * k)) % h, (i / k) % q, i % k);
                let ahead = ahead + hi;
                ki > qi + ahead || (b == 1 && qi == dead)
            })
            .collect();
        let data = burn::tensor::TensorData::new(blocked, [2, h, q, k]);
        Tensor::from_data(data, &Default::default())
    }

    /// Scale 0.3 and a soft-cap of 5, so both paths of the scores are exercised.
    const OPTS: AttentionModuleOptions = AttentionModuleOptions {
        scale: Some(0.3),
        softcap: Some(5.0),
        is_causal: false,
    };

    #[test]
    fn bf16_attention_matches_f32_and_zeroes_fully_masked_rows() {
        let dev = Default::default();
        let rand = || Tensor::<B, 4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &dev);
        let (q, k, v) = (rand(), rand(), rand());
        // Row 4 of batch 1 sees nothing; everything else sees a causal prefix.
        let mask = mask::<B>(3, 5, 5, 0, 4);
        let f = Compute::F32.attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), OPTS);
        let h = Compute::Bf16.attention(q, k, v, Some(mask), OPTS);
        assert_eq!(h.dtype(), DType::F32);
        let d = close(f.clone(), h.clone());
        assert!(d > 0.0 && d < 0.05, "bf16 vs f32 attention differ by {d}");
        let dead = h.slice([1..2, 0..3, 4..5, 0..8]);
        assert_eq!(dead.abs().max().into_scalar(), 0.0);
    }

    #[test]
    fn bf16_linear_keeps_f32_weights_and_gives_f32_gradients() {
        type A = Autodiff<B>;
        let dev = Default::default();
        let l = LinearConfig::new(16, 8).init::<A>(&dev);
        let x = Tensor::<A, 3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &dev);
        let grad = |c: Compute| {
            let y = c.linear(&l, x.clone());
            assert_eq!(y.dtype(), DType::F32);
            let g = y.powi_scalar(2).sum().backward();
            l.weight.grad(&g).unwrap()
        };
        let (g32, g16) = (grad(Compute::F32), grad(Compute::Bf16));
        assert_eq!(g16.dtype(), DType::F32);
        assert_eq!(l.weight.val().dtype(), DType::F32);
        let rel =
            (g32.clone() - g16.clone()).abs().max().into_scalar() / g32.abs().max().into_scalar();
        assert!(rel > 0.0 && rel < 0.02, "relative gradient error {rel}");
    }

    /// Attention in blocks of 2 queries, normalised after the value matmul, gives Burn's
    /// attention and its gradients (soft-cap, a mask with a fully masked row) to float rounding.
    #[test]
    fn attention_in_chunks_matches_burn_with_gradients() {
        chunked_matches_burn(3, 3);
    }

    /// Grouped heads (4 query heads on 2 and on 1 kv heads): Burn's attention on repeated keys
    /// and values, and its gradients (summed over the repeats), to float rounding.
    #[test]
    fn grouped_attention_matches_burn_on_repeated_kv() {
        for hkv in [2, 1] {
            chunked_matches_burn(4, hkv);
        }
    }

    /// [`Compute::attention_in_chunks`] in blocks of 2 of 5 queries, `h` query heads on `hkv`
    /// kv heads, against Burn's `attention` on [`repeat_kv`]'d keys and values: output, dq, dk
    /// and dv within 1e-5 of the largest value.
    fn chunked_matches_burn(h: usize, hkv: usize) {
        type A = Autodiff<B>;
        let dev = Default::default();
        let rand = |s: [usize; 4]| {
            Tensor::<A, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev).require_grad()
        };
        let (q, k, v) = (
            rand([2, h, 5, 8]),
            rand([2, hkv, 6, 8]),
            rand([2, hkv, 6, 8]),
        );
        let mask = mask::<A>(h, 5, 6, 1, 3);
        let w = Tensor::<A, 4>::random([2, h, 5, 8], Distribution::Normal(0.0, 1.0), &dev);
        let run = |chunked: bool| {
            let (q, k, v) = (q.clone(), k.clone(), v.clone());
            let o = if chunked {
                Compute::F32.attention_in_chunks(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(mask.clone()),
                    OPTS,
                    2,
                )
            } else {
                let (kr, vr) = (repeat_kv(k.clone(), h), repeat_kv(v.clone(), h));
                attention(q.clone(), kr, vr, Some(mask.clone()), None, OPTS)
            };
            let g = (o.clone() * w.clone()).sum().backward();
            let grad = |t: &Tensor<A, 4>| t.grad(&g).unwrap();
            [o.inner(), grad(&q), grad(&k), grad(&v)]
        };
        let (ours, burn) = (run(true), run(false));
        for (name, (a, b)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(ours.into_iter().zip(burn))
        {
            assert_eq!(a.dims(), b.dims(), "{name}");
            let d = (a.clone() - b.clone()).abs().max().into_scalar();
            let m = b.abs().max().into_scalar();
            assert!(
                d <= 1e-5 * m.max(1.0),
                "{h} heads on {hkv}, {name}: differs by {d} (max {m})"
            );
        }
    }
}
