//! Resampling the ViT position-embedding grid for a resolution change (big_vision
//! `vit.resample_posemb`): `scipy.ndimage.zoom(grid, (g_new/g_old, g_new/g_old, 1), order=1)`,
//! i.e. bilinear interpolation on a corner-aligned grid: output index i samples input
//! coordinate `i·(g_old − 1)/(g_new − 1)`.

/// `emb` is `[g_old², D]` row-major; returns `[g_new², D]`.
pub fn resample(emb: &[f32], g_old: usize, g_new: usize, d: usize) -> Vec<f32> {
    assert_eq!(
        emb.len(),
        g_old * g_old * d,
        "posemb has {} values, expected {g_old}²·{d}",
        emb.len()
    );
    if g_old == g_new {
        return emb.to_vec();
    }
    let coord = |i: usize| -> (usize, usize, f32) {
        if g_new == 1 || g_old == 1 {
            return (0, 0, 0.0);
        }
        let x = i as f64 * (g_old - 1) as f64 / (g_new - 1) as f64;
        let lo = (x.floor() as usize).min(g_old - 1);
        let hi = (lo + 1).min(g_old - 1);
        (lo, hi, (x - lo as f64) as f32)
    };
    let mut out = vec![0f32; g_new * g_new * d];
    for y in 0..g_new {
        let (y0, y1, fy) = coord(y);
        for x in 0..g_new {
            let (x0, x1, fx) = coord(x);
            let o = (y * g_new + x) * d;
            for c in 0..d {
                let v = |yy: usize, xx: usize| emb[(yy * g_old + xx) * d + c];
                let top = v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx;
                let bot = v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx;
                out[o + c] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    out
}

/// `model` with its position embedding resampled from resolution `from` to `to`.
pub fn set_resolution<B: burn::tensor::backend::Backend>(
    mut model: pali_model::PaliGemma<B>,
    from: usize,
    to: usize,
) -> pali_model::PaliGemma<B> {
    use burn::module::Param;
    use burn::tensor::{Tensor, TensorData};
    if from == to {
        return model;
    }
    let p = model.patch_size;
    if let Some(v) = model.vision_tower.as_mut() {
        let w = v.embeddings.position_embedding.weight.val();
        let [n, d] = w.dims();
        let device = w.device();
        let vals: Vec<f32> = w.into_data().convert::<f32>().to_vec().expect("f32");
        let (g_old, g_new) = (from / p, to / p);
        assert_eq!(
            n,
            g_old * g_old,
            "position embedding rows {n} vs grid {g_old}²"
        );
        let out = resample(&vals, g_old, g_new, d);
        let t = Tensor::<B, 2>::from_data(TensorData::new(out, [g_new * g_new, d]), &device);
        v.embeddings.position_embedding.weight = Param::from_tensor(t);
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corners_are_kept_and_linear_ramps_stay_linear() {
        // A linear ramp in x and y is reproduced exactly by bilinear interpolation.
        let g = 4;
        let emb: Vec<f32> = (0..g * g)
            .map(|i| (i % g) as f32 + 10.0 * (i / g) as f32)
            .collect();
        let out = resample(&emb, g, 7, 1);
        for y in 0..7 {
            for x in 0..7 {
                let want = x as f32 * 3.0 / 6.0 + 10.0 * y as f32 * 3.0 / 6.0;
                assert!((out[y * 7 + x] - want).abs() < 1e-5);
            }
        }
        assert_eq!(resample(&emb, g, g, 1), emb);
    }

    /// Numbers computed by scipy (scripts/posemb_reference.py → tests/fixtures/posemb_zoom.json).
    #[test]
    fn matches_scipy_zoom_order_1() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/posemb_zoom.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in v["cases"].as_array().unwrap() {
            let (go, gn, d) = (
                case["g_old"].as_u64().unwrap() as usize,
                case["g_new"].as_u64().unwrap() as usize,
                case["d"].as_u64().unwrap() as usize,
            );
            let inp: Vec<f32> = case["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let want: Vec<f32> = case["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let got = resample(&inp, go, gn, d);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{go}->{gn}: max diff {worst}");
        }
    }
}
