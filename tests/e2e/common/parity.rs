//! Parity checks against the HF fixtures, generic over the backend (used by parity.rs on the CPU
//! backend and by parity_wgpu.rs on wgpu).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pali_model::loss::hf_causal_lm_loss;
use pali_model::mask::hf_attention_masks;
use pali_model::paligemma::bool_values;
use pali_model::{LayerType, ModelInput, Trace};

use super::*;

pub fn full_forward_parity<B: Backend>(variant: &str, dev: &B::Device) {
    let dir = fixture(variant);
    let (config, model) = pali_model::load_hf::<B>(&dir, dev).unwrap_or_else(|e| panic!("{e}"));
    let inp = open(&dir.join("inputs.safetensors"));
    let out = open(&dir.join("outputs.safetensors"));

    let (px, ps) = f32s(&inp, "pixel_values");
    let pixel_values =
        Tensor::<B, 5>::from_data(TensorData::new(px, [ps[0], 1, ps[1], ps[2], ps[3]]), dev);
    let ids = int2::<B>(&inp, "input_ids", dev);
    let [b, t] = ids.dims();
    let tt = int2::<B>(&inp, "token_type_ids", dev);
    let am = int2::<B>(&inp, "attention_mask", dev);
    let masks = hf_attention_masks(tt, am, config.text.sliding_window);

    // Positions: HF counts from 1.
    let (want_pos, _) = i64s(&out, "position_ids");
    assert_eq!(want_pos, (1..=t as i64).collect::<Vec<_>>());
    let positions = Tensor::<B, 1, Int>::arange(1..t as i64 + 1, dev)
        .reshape([1, t])
        .expand([b, t]);

    // Per-layer attention masks, exact.
    let (allowed, ashape) = i64s(&out, "lm_attention_allowed");
    assert_eq!(ashape, vec![config.text.num_layers, b, t, t]);
    let full: Vec<bool> = bool_values(masks.full.clone());
    let sliding: Option<Vec<bool>> = masks.sliding.clone().map(bool_values);
    for layer in 0..config.text.num_layers {
        let ours = match (config.text.layer_type(layer), &sliding) {
            (LayerType::SlidingAttention, Some(s)) => s,
            _ => &full,
        };
        let theirs = &allowed[layer * b * t * t..(layer + 1) * b * t * t];
        for (i, (o, w)) in ours.iter().zip(theirs).enumerate() {
            assert_eq!(
                *o,
                *w == 1,
                "{variant}: layer {layer} mask differs at flat index {i}"
            );
        }
    }

    let mut trace = Trace::default();
    let input = ModelInput {
        pixel_values,
        input_ids: ids,
        positions,
        masks,
    };
    let o = model
        .forward(input, 0, true, Some(&mut trace))
        .unwrap_or_else(|e| panic!("{e}"));

    let cmp = |what: &str, got: Tensor<B, 3>, atol: f32, rtol: f32| {
        let (g, gs) = to_vec(got);
        let (w, ws) = f32s(&out, what);
        compare(&format!("{variant} {what}"), &g, &gs, &w, &ws, atol, rtol)
    };
    for (i, h) in trace.vision_hidden.iter().enumerate() {
        cmp(&format!("vision_hidden_states.{i}"), h.clone(), 3e-5, 1e-5);
    }
    cmp(
        "vision_last_hidden_state",
        trace.vision_last_hidden.clone().unwrap(),
        3e-5,
        1e-5,
    );
    let d_img = cmp("image_features", o.image_features.clone(), 3e-5, 1e-5);
    let n = trace.lm_hidden.len();
    assert_eq!(n, config.text.num_layers + 1);
    for (i, h) in trace.lm_hidden.iter().enumerate().take(n - 1) {
        cmp(&format!("lm_hidden_states.{i}"), h.clone(), 1e-4, 1e-4);
    }
    cmp(
        "lm_last_layer_output_prenorm",
        trace.lm_hidden[n - 1].clone(),
        1e-4,
        1e-4,
    );
    cmp(
        &format!("lm_hidden_states.{}", n - 1),
        trace.lm_last_hidden.clone().unwrap(),
        1e-4,
        1e-4,
    );
    let d_logits = cmp("logits", o.logits.clone(), 1e-4, 1e-4);

    let labels = int2::<B>(&inp, "labels", dev);
    let loss = hf_causal_lm_loss(o.logits, labels)
        .into_data()
        .to_vec::<f32>()
        .unwrap()[0];
    let (want_loss, _) = f32s(&out, "loss");
    assert!(
        (loss - want_loss[0]).abs() <= 1e-5,
        "{variant} loss {loss} vs HF {}",
        want_loss[0]
    );
    eprintln!(
        "{variant}: max |Δ| image_features {d_img:.2e}, logits {d_logits:.2e}, loss {:.2e}",
        (loss - want_loss[0]).abs()
    );
}

pub fn greedy_parity<B: Backend>(variant: &str, dev: &B::Device) {
    let dir = fixture(variant);
    let (config, model) = pali_model::load_hf::<B>(&dir, dev).unwrap_or_else(|e| panic!("{e}"));
    let inp = open(&dir.join("inputs.safetensors"));
    let out = open(&dir.join("outputs.safetensors"));
    let (px, ps) = f32s(&inp, "pixel_values");
    let per = ps[1] * ps[2] * ps[3];
    let pixel_values = Tensor::<B, 5>::from_data(
        TensorData::new(px[..per].to_vec(), [1, 1, ps[1], ps[2], ps[3]]),
        dev,
    );
    let ids = int2::<B>(&inp, "gen.input_ids", dev);
    let t0 = ids.dims()[1];
    let tt = int2::<B>(&inp, "gen.token_type_ids", dev);
    let am = int2::<B>(&inp, "gen.attention_mask", dev);
    let input_mask = am.clone().equal_elem(1);
    let masks = hf_attention_masks(tt, am, config.text.sliding_window);
    let positions = Tensor::<B, 1, Int>::arange(1..t0 as i64 + 1, dev).reshape([1, t0]);
    // The eval crate's decoder (0-indexed positions, host-side sampling) on the same prompt;
    // RoPE only sees position differences, so the tokens must agree with HF's too.
    let valid: Vec<i64> = {
        let (ids, _) = i64s(&inp, "gen.input_ids");
        let (am, _) = i64s(&inp, "gen.attention_mask");
        ids.iter()
            .zip(&am)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect()
    };
    let eval_tokens = |sampler: pali_eval::Sampler| {
        let prompts = pali_eval::Prompts {
            pixel_values: pixel_values.clone(),
            mask_ar: vec![vec![0; valid.len()]],
            ids: vec![valid.clone()],
        };
        let mut o = pali_eval::DecodeOptions::greedy(8, u32::MAX);
        o.sampler = sampler;
        let d = pali_eval::decode(&model, prompts, config.text.sliding_window, &o).unwrap();
        d[0].tokens.iter().map(|t| *t as i64).collect::<Vec<_>>()
    };
    let eval_greedy = eval_tokens(pali_eval::Sampler::Greedy);
    let eval_beam1 = eval_tokens(pali_eval::Sampler::Beam(1));
    let prompt = ModelInput {
        pixel_values,
        input_ids: ids,
        positions,
        masks,
    };
    let (tokens, logits) = pali_model::generate::greedy(
        &model,
        prompt,
        input_mask,
        config.text.sliding_window,
        8,
        None,
    )
    .unwrap();
    let (want, _) = i64s(&out, "gen.new_tokens");
    assert_eq!(tokens[0], want, "{variant}: greedy tokens");
    assert_eq!(eval_greedy, want, "{variant}: pali_eval greedy tokens");
    assert_eq!(eval_beam1, want, "{variant}: pali_eval beam:1 tokens");
    let (want_logits, ws) = f32s(&out, "gen.step_logits");
    let got: Vec<f32> = logits.into_iter().flat_map(|l| to_vec(l).0).collect();
    let d = compare(
        &format!("{variant} gen.step_logits"),
        &got,
        &ws,
        &want_logits,
        &ws,
        1e-4,
        1e-4,
    );
    eprintln!("{variant}: 8 greedy tokens exact, step logits max |Δ| {d:.2e}");
}
