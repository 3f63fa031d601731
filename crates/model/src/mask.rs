//! Attention masks as data (big_vision `make_attn_mask`, paligemma.py; HF masking_utils.py).
//!
//! One rule gives every masking variant of the paper: with `cum = cumsum(mask_ar)`,
//! token i may attend token j iff `cum[j] <= cum[i]` and both are real (`input_mask`).
//!
//! ```text
//! mask_ar = [1 1 1 1 1 1]  → fully causal
//! mask_ar = [0 0 0 1 1 1]  → prefix-LM: the first 3 tokens see each other, the rest is causal
//! mask_ar = [1 0 0 1 0 0]  → block-causal: blocks [0,1,2] and [3,4,5]
//! ```
//!
//! Padding carries `mask_ar = 1` in big_vision, so real tokens never attend to it even without
//! `input_mask`. Sliding-window layers (Gemma 2) additionally require `i − j < window` unless the
//! two tokens are in the same bidirectional block, which reproduces HF's rule for prefix-LM.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use crate::gemma::AttentionMasks;

fn pairwise<B: Backend>(t: Tensor<B, 2, Int>) -> (Tensor<B, 3, Int>, Tensor<B, 3, Int>) {
    let [b, s] = t.dims();
    let q = t.clone().reshape([b, s, 1]).expand([b, s, s]); // [B, Sq, Sk] value of the query
    let k = t.reshape([b, 1, s]).expand([b, s, s]); // [B, Sq, Sk] value of the key
    (q, k)
}

fn both<B: Backend>(m: Tensor<B, 2, Bool>) -> Tensor<B, 3, Bool> {
    let [b, s] = m.dims();
    let q = m.clone().reshape([b, s, 1]).expand([b, s, s]);
    let k = m.reshape([b, 1, s]).expand([b, s, s]);
    q.bool_and(k)
}

fn index_grid<B: Backend>(
    b: usize,
    s: usize,
    device: &B::Device,
) -> (Tensor<B, 3, Int>, Tensor<B, 3, Int>) {
    let ar = Tensor::<B, 1, Int>::arange(0..s as i64, device);
    let q = ar.clone().reshape([1, s, 1]).expand([b, s, s]);
    let k = ar.reshape([1, 1, s]).expand([b, s, s]);
    (q, k)
}

/// big_vision's mask: `allowed[b,i,j] = cum[b,j] <= cum[b,i] && input_mask[b,i] && input_mask[b,j]`.
///
/// # Shapes
/// - mask_ar: [B, S] (0/1), input_mask: [B, S] → masks [B, S, S] (true = may attend)
pub fn make_attn_mask<B: Backend>(
    mask_ar: Tensor<B, 2, Int>,
    input_mask: Tensor<B, 2, Bool>,
    sliding_window: Option<usize>,
) -> AttentionMasks<B> {
    let [b, s] = mask_ar.dims();
    let device = mask_ar.device();
    let (cq, ck) = pairwise(mask_ar.cumsum(1));
    let full = ck
        .clone()
        .lower_equal(cq.clone())
        .bool_and(both(input_mask));
    let sliding = sliding_window.map(|w| {
        let (qi, ki) = index_grid::<B>(b, s, &device);
        let near = (qi - ki).lower_elem(w as i64);
        full.clone().bool_and(near.bool_or(ck.equal(cq)))
    });
    AttentionMasks { full, sliding }
}

/// HF PaliGemma's mask from `token_type_ids` (0 = image+prefix, also padding; 1 = suffix) and
/// `attention_mask` (transformers 5.24 masking_utils.py; fixtures README):
///
/// `allowed[b,q,k] = am[b,k] && ((k <= q [&& k > q − window]) || (tt[b,q] == 0 && tt[b,k] == 0))`
///
/// Padding queries differ from big_vision's rule (they attend); only their own outputs change.
pub fn hf_attention_masks<B: Backend>(
    token_type_ids: Tensor<B, 2, Int>,
    attention_mask: Tensor<B, 2, Int>,
    sliding_window: Option<usize>,
) -> AttentionMasks<B> {
    let [b, s] = token_type_ids.dims();
    let device = token_type_ids.device();
    let (qi, ki) = index_grid::<B>(b, s, &device);
    let causal = ki.clone().lower_equal(qi.clone());
    let prefix_block = both(token_type_ids.equal_elem(0));
    let key_real = attention_mask
        .equal_elem(1)
        .reshape([b, 1, s])
        .expand([b, s, s]);
    let full = causal
        .clone()
        .bool_or(prefix_block.clone())
        .bool_and(key_real.clone());
    let sliding = sliding_window.map(|w| {
        let near = (qi - ki).lower_elem(w as i64);
        causal
            .bool_and(near)
            .bool_or(prefix_block)
            .bool_and(key_real)
    });
    AttentionMasks { full, sliding }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paligemma::{bool_tensor, bool_values};
    use crate::TestBackend as TB;
    use burn::tensor::TensorData;

    fn mask_of(
        mask_ar: &[i64],
        input: &[bool],
        w: Option<usize>,
    ) -> (Vec<bool>, Option<Vec<bool>>) {
        let dev = Default::default();
        let s = mask_ar.len();
        let ar = Tensor::<TB, 2, Int>::from_data(TensorData::new(mask_ar.to_vec(), [1, s]), &dev);
        let im = bool_tensor::<TB, 2>(input.to_vec(), [1, s], &dev);
        let m = make_attn_mask(ar, im, w);
        let v = |t: Tensor<TB, 3, Bool>| bool_values(t);
        (v(m.full), m.sliding.map(v))
    }

    #[test]
    fn prefix_lm_pattern() {
        // image, image, bos, prefix, sep | suffix, suffix, eos | pad pad
        let ar = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
        let im = [true, true, true, true, true, true, true, true, false, false];
        let (m, _) = mask_of(&ar, &im, None);
        let s = ar.len();
        let at = |i: usize, j: usize| m[i * s + j];
        for i in 0..s {
            for j in 0..s {
                let (pi, pj) = (i < 5, j < 5);
                let real = im[i] && im[j];
                if pi && pj {
                    assert!(at(i, j), "prefix tokens see each other ({i},{j})");
                }
                if !pi && j > i {
                    assert!(!at(i, j), "suffix token {i} must not see later token {j}");
                }
                if im[i] && !im[j] {
                    assert!(!at(i, j), "real token {i} must not attend padding {j}");
                }
                if pi && !pj {
                    assert!(!at(i, j), "prefix token {i} must not see suffix token {j}");
                }
                if !pi && j <= i && real {
                    assert!(at(i, j), "suffix token {i} sees earlier token {j}");
                }
            }
        }
    }

    #[test]
    fn causal_and_block_causal() {
        let (m, _) = mask_of(&[1, 1, 1], &[true; 3], None);
        assert_eq!(
            m,
            vec![true, false, false, true, true, false, true, true, true]
        );
        let (m, _) = mask_of(&[1, 0, 1, 0], &[true; 4], None);
        #[rustfmt::skip]
        let want = vec![
            true, true, false, false,
            true, true, false, false,
            true, true, true, true,
            true, true, true, true,
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn padding_is_never_attended_even_without_input_mask() {
        // big_vision trains with input_mask all true; padding's mask_ar = 1 keeps it out.
        let (m, _) = mask_of(&[0, 0, 1, 1, 1], &[true; 5], None);
        // row 2 (the only suffix token) must not see 3, 4 (padding).
        assert!(!m[2 * 5 + 3] && !m[2 * 5 + 4]);
    }

    #[test]
    fn sliding_window_keeps_prefix_block_bidirectional() {
        let ar = [0, 0, 0, 0, 1, 1, 1, 1];
        let (full, sliding) = mask_of(&ar, &[true; 8], Some(2));
        let sl = sliding.unwrap();
        let s = 8;
        // prefix block: all pairs allowed, regardless of distance
        assert!(sl[3 * s] && sl[3]);
        // suffix token 7 sees 6, 7 but not 5 or the prefix
        assert!(sl[7 * s + 7] && sl[7 * s + 6] && !sl[7 * s + 5] && !sl[7 * s]);
        assert!(full[7 * s]);
    }

    #[test]
    fn hf_form_matches_big_vision_on_real_tokens() {
        let dev = Default::default();
        let tt = Tensor::<TB, 2, Int>::from_data(
            TensorData::new(vec![0i64, 0, 0, 1, 1, 0, 0], [1, 7]),
            &dev,
        );
        let am = Tensor::<TB, 2, Int>::from_data(
            TensorData::new(vec![1i64, 1, 1, 1, 1, 0, 0], [1, 7]),
            &dev,
        );
        let hf = hf_attention_masks(tt, am, Some(2));
        let (bv, bvs) = mask_of(
            &[0, 0, 0, 1, 1, 1, 1],
            &[true, true, true, true, true, false, false],
            Some(2),
        );
        let hf_full = bool_values(hf.full);
        let hf_sl = bool_values(hf.sliding.unwrap());
        let bvs = bvs.unwrap();
        for q in 0..5 {
            for k in 0..7 {
                assert_eq!(hf_full[q * 7 + k], bv[q * 7 + k], "full ({q},{k})");
                assert_eq!(hf_sl[q * 7 + k], bvs[q * 7 + k], "sliding ({q},{k})");
            }
        }
        // HF padding queries see the prefix block (unlike big_vision's all-false rows).
        assert!(hf_full[5 * 7] && !bv[5 * 7]);
    }
}
