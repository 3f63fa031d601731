//! Checkpoint IO: HF round trip, shards and both naming generations, unimodal tower loading,
//! configs the fixtures never covered, and the one-line errors for bad files.

use crate::common::*;
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use pali_model::checkpoint::{load_into, parameter_shapes, TensorFile, Tower};
use pali_model::mask::make_attn_mask;
use pali_model::presets::count_params;
use pali_model::{ForwardOptions, ImageEncoder, ModelInput, PaliGemma, PaliGemmaConfig};

type B = burn::backend::Flex;

/// Logits of a deterministic prefix-LM batch (2 rows, 1 image each).
fn probe_logits(model: &PaliGemma<B>, config: &PaliGemmaConfig) -> Vec<f32> {
    let dev = Default::default();
    let res = config.vision.image_size();
    let n = config.num_image_tokens();
    let t = n + 6;
    let px: Vec<f32> = (0..2 * 3 * res * res)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let pixel_values = Tensor::<B, 5>::from_data(TensorData::new(px, [2, 1, 3, res, res]), &dev);
    let vocab = config.predictable_vocab() as i64;
    let mut ids = Vec::new();
    let mut ar = Vec::new();
    for r in 0..2i64 {
        for i in 0..t as i64 {
            ids.push(if (i as usize) < n {
                config.image_token_id as i64
            } else {
                (i * 7 + r * 3) % vocab
            });
            ar.push(if (i as usize) < n + 3 { 0 } else { 1 });
        }
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, t]), &dev);
    let ar = Tensor::<B, 2, Int>::from_data(TensorData::new(ar, [2, t]), &dev);
    let masks = make_attn_mask(
        ar,
        Tensor::<B, 2, Int>::ones([2, t], &dev).equal_elem(1),
        config.text.sliding_window,
    );
    let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &dev)
        .reshape([1, t])
        .expand([2, t]);
    let input = ModelInput {
        pixel_values,
        input_ids: ids,
        positions,
        masks,
    };
    let out = model.forward(input, ForwardOptions::default()).unwrap();
    to_vec(out.logits).0
}

/// Streamed saving in shards (HF's `model-0000i-of-0000n.safetensors` + index) reads back
/// bit-exactly; bf16 saving stores every weight's bf16 rounding in half the bytes.
#[test]
fn sharded_and_bf16_saves_read_back() {
    use pali_model::checkpoint::{save_sharded, SaveDtype};
    let dev = Default::default();
    let dir = fixture("tiny-gemma2");
    let (_, model) = pali_model::load_hf::<B>(&dir, &dev).unwrap();
    let want = all_f32(&TensorFile::open(&dir).unwrap());
    let sorted = |mut v: Vec<(String, Vec<usize>, Vec<f32>)>| {
        for t in &mut v {
            t.0 = t.0.replace("vision_tower.vision_model.", "vision_tower.");
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let want = sorted(want);
    let out = tempfile::tempdir().unwrap();
    let files = save_sharded(&model, out.path(), "model", 200_000, SaveDtype::F32).unwrap();
    assert!(files.len() > 3, "{files:?}");
    assert!(out.path().join("model.safetensors.index.json").is_file());
    assert!(!out.path().join("model.safetensors").exists());
    // At most 200 kB of data per shard, or one tensor (the 400 kB embedding) alone.
    for f in &files[..files.len() - 1] {
        let st = TensorFile::open(f).unwrap();
        let bytes: usize = st
            .names()
            .map(|n| 4 * st.shape(n).unwrap().iter().product::<usize>())
            .sum();
        assert!(
            bytes <= 200_000 || st.names().count() == 1,
            "{f:?}: {bytes}"
        );
    }
    let got = sorted(all_f32(&TensorFile::open(out.path()).unwrap()));
    assert!(got == want, "sharded save differs");

    let b16 = tempfile::tempdir().unwrap();
    let files = save_sharded(&model, b16.path(), "model", u64::MAX, SaveDtype::Bf16).unwrap();
    assert_eq!(files.len(), 1);
    let f32_size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(std::fs::metadata(&files[0]).unwrap().len() * 10 < f32_size * 6);
    let got = sorted(all_f32(&TensorFile::open(b16.path()).unwrap()));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
        assert!(g.2 == bf16_rounded(&w.2), "{}", g.0);
    }
}

#[test]
fn save_then_load_is_bit_exact() {
    let dev = Default::default();
    let (config, model) = pali_model::load_hf::<B>(&fixture("tiny-gemma2"), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pali_model::save_hf(&model, &config, dir.path()).unwrap();
    // The saved file uses the hub layout HF transformers 4.x and 5.x both load.
    let f = TensorFile::open(dir.path()).unwrap();
    assert!(f
        .names()
        .any(|n| n == "vision_tower.vision_model.post_layernorm.weight"));
    assert!(f.names().any(|n| n == "language_model.model.norm.weight"));
    assert!(
        f.names().all(|n| !n.starts_with("lm_head")),
        "tied head is not stored"
    );
    let (config2, model2) = pali_model::load_hf::<B>(dir.path(), &dev).unwrap();
    assert_eq!(config.text, config2.text);
    assert_eq!(config.vision, config2.vision);
    // Same tensors as the HF original, bit for bit.
    let orig = open(&fixture("tiny-gemma2"));
    for name in orig.names() {
        let (a, _) = f32s(&orig, name);
        let key = name.replace("vision_tower.", "vision_tower.vision_model.");
        let (b, _) = f32s(&f, &key);
        assert_eq!(a, b, "{name}");
    }
    assert!(probe_logits(&model, &config) == probe_logits(&model2, &config2));
}

#[test]
fn sharded_checkpoint_with_5x_names_loads_identically() {
    let dev = Default::default();
    let (config, model) = pali_model::load_hf::<B>(&fixture("tiny-gemma1"), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_config("tiny-gemma1", dir.path());
    let tensors = all_f32(&open(&fixture("tiny-gemma1")));
    let renamed: Vec<_> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            let n = if let Some(r) = n.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else {
                format!("model.{n}")
            };
            (n, s, v)
        })
        .collect();
    let (a, b) = renamed.split_at(renamed.len() / 2);
    // A 5.x in-memory style tied head is accepted and ignored.
    let mut b = b.to_vec();
    let emb = renamed
        .iter()
        .find(|(n, _, _)| n.ends_with("embed_tokens.weight"))
        .unwrap()
        .clone();
    b.push(("lm_head.weight".into(), emb.1, emb.2));
    write_f32(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_f32(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let mut map = serde_json::Map::new();
    for (n, _, _) in a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _, _) in &b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (_, sharded) = pali_model::load_hf::<B>(dir.path(), &dev).unwrap();
    assert!(probe_logits(&model, &config) == probe_logits(&sharded, &config));
}

fn fixture_without(
    variant: &str,
    edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_config(variant, dir.path());
    let mut t = all_f32(&open(&fixture(variant)));
    edit(&mut t);
    write_f32(&dir.path().join("model.safetensors"), &t);
    dir
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let name = "language_model.model.layers.1.mlp.up_proj.weight";
    let dir = fixture_without("tiny-gemma1", |t| t.retain(|(n, _, _)| n != name));
    let e = pali_model::load_hf::<B>(dir.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(name) && e.contains("[96, 48]") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let name = "vision_tower.encoder.layers.0.self_attn.q_proj.weight";
    let dir = fixture_without("tiny-gemma1", |t| {
        let e = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
        e.1 = vec![16, 64];
    });
    let e = pali_model::load_hf::<B>(dir.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(name) && e.contains("expected shape [32, 32]") && e.contains("found [16, 64]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_an_error() {
    let dir = fixture_without("tiny-gemma1", |t| {
        t.push((
            "vision_tower.head.probe.weight".into(),
            vec![2],
            vec![0.0, 1.0],
        ))
    });
    let e = pali_model::load_hf::<B>(dir.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected tensor `vision_tower.head.probe.weight`") && e.contains("[2]"),
        "{e}"
    );
}

#[test]
fn unimodal_towers_load_into_their_half() {
    let dev = Default::default();
    let (config, full) = pali_model::load_hf::<B>(&fixture("tiny-gemma2"), &dev).unwrap();
    let tensors = all_f32(&open(&fixture("tiny-gemma2")));
    let dir = tempfile::tempdir().unwrap();
    // A SiglipModel-style file (vision_model.* plus a text tower that must be ignored) …
    let mut siglip: Vec<_> = tensors
        .iter()
        .filter_map(|(n, s, v)| {
            n.strip_prefix("vision_tower.")
                .map(|r| (format!("vision_model.{r}"), s.clone(), v.clone()))
        })
        .collect();
    siglip.push((
        "text_model.embeddings.token_embedding.weight".into(),
        vec![2, 2],
        vec![0.0; 4],
    ));
    siglip.push(("logit_scale".into(), vec![1], vec![1.0]));
    let sp = dir.path().join("siglip.safetensors");
    write_f32(&sp, &siglip);
    // … and a Gemma2ForCausalLM-style file.
    let mut gemma: Vec<_> = tensors
        .iter()
        .filter_map(|(n, s, v)| {
            n.strip_prefix("language_model.model.")
                .map(|r| (format!("model.{r}"), s.clone(), v.clone()))
        })
        .collect();
    let emb = gemma
        .iter()
        .find(|(n, _, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    gemma.push(("lm_head.weight".into(), emb.1, emb.2));
    let gp = dir.path().join("gemma.safetensors");
    write_f32(&gp, &gemma);

    let fresh = config.init::<B>(&dev);
    let m = load_into(fresh, &TensorFile::open(&sp).unwrap(), Tower::Vision).unwrap();
    let m = load_into(m, &TensorFile::open(&gp).unwrap(), Tower::Language).unwrap();
    // Everything but the projector now equals the full checkpoint.
    let mut m = m;
    m.multi_modal_projector = full.multi_modal_projector.clone();
    assert!(probe_logits(&full, &config) == probe_logits(&m, &config));

    // A Gemma file given as SigLIP is refused with a named tensor.
    let e = load_into(
        config.init::<B>(&dev),
        &TensorFile::open(&gp).unwrap(),
        Tower::Vision,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing tensor `vision_tower.vision_model."),
        "{e}"
    );
}

/// Configs the fixtures never exercised — MHA, other image/patch sizes, soft-caps off, all-global
/// layers, an MLP connector, no image encoder — all build, run, and (where HF has an equivalent)
/// survive an HF round trip with identical logits.
#[test]
fn untested_configs_run_and_round_trip() {
    let dev = Default::default();
    let base = pali_model::presets::tiny(300, 299, 64);
    let mut variants = vec![base.clone()];
    let mut c = base.clone();
    c.text.num_kv_heads = 4;
    c.text.head_dim = 8;
    variants.push(c);
    let mut c = base.clone();
    if let ImageEncoder::Siglip(v) = &mut c.vision {
        v.image_size = 48;
        v.patch_size = 16;
    }
    c.text = c
        .text
        .clone()
        .with_post_norms(true)
        .with_query_pre_attn_scalar(Some(10.0))
        .with_sliding_window(Some(4))
        .with_layer_types(pali_model::presets::alternating(2));
    variants.push(c);
    // `<image>` is the last row (as in real checkpoints): it is never a prediction.
    let m = base.init::<B>(&dev);
    let n = base.num_image_tokens() + 6;
    assert_eq!(
        probe_logits(&m, &base).len(),
        2 * n * 299,
        "logits cover the 299 predictable rows only"
    );
    for (i, c) in variants.into_iter().enumerate() {
        let model = c.init::<B>(&dev);
        // Zero-initialised projector: image tokens contribute nothing until trained; perturb it.
        let mut model = model;
        model.multi_modal_projector = c.projector_config().with_zero_init(false).init(&dev);
        let l1 = probe_logits(&model, &c);
        assert!(l1.iter().all(|x| x.is_finite()), "variant {i}");
        let dir = tempfile::tempdir().unwrap();
        pali_model::save_hf(&model, &c, dir.path()).unwrap();
        let (c2, m2) = pali_model::load_hf::<B>(dir.path(), &dev).unwrap();
        assert_eq!(c.text, c2.text, "variant {i}");
        let l2 = probe_logits(&m2, &c2);
        assert_eq!(l1.len(), l2.len(), "variant {i}: logits size");
        assert!(
            l1 == l2,
            "variant {i}: logits differ after an HF round trip"
        );
        assert_eq!(
            count_params(&c).total(),
            model.num_params(),
            "variant {i}: count_params"
        );
    }
    // Architectures without an HF equivalent still run, and saving them says why it can't.
    let mut mlp = base.clone();
    mlp.projector = pali_model::ProjectorKind::Mlp;
    let m = mlp.init::<B>(&dev);
    assert_eq!(count_params(&mlp).total(), m.num_params());
    let e = pali_model::save_hf(&m, &mlp, tempfile::tempdir().unwrap().path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("MLP connector"), "{e}");
    let mut raw = base;
    raw.vision = ImageEncoder::RawPatches {
        image_size: 64,
        patch_size: 8,
    };
    let m = raw.init::<B>(&dev);
    assert_eq!(count_params(&raw).total(), m.num_params());
    assert!(probe_logits(&m, &raw).iter().all(|x| x.is_finite()));
    assert!(parameter_shapes::<B, _>(&m)
        .iter()
        .all(|(p, _)| !p.starts_with("vision_tower")));
}

/// The processor and generation files pali writes beside `config.json` equal, field by field,
/// those transformers 5.24 wrote for the fixtures' models (their `transformers_version` aside),
/// for both shapes; 4.x's `preprocessor_config.json` holds the same image processor.
#[test]
fn processor_files_match_transformers() {
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        let fx = fixture(variant);
        let read = |name: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(fx.join(name)).unwrap()).unwrap()
        };
        let config = pali_model::hf::parse_config(&fx.join("config.json")).unwrap();
        let ids = pali_model::hf::special_ids(&read("tokenizer.json"));
        let files: std::collections::HashMap<&str, serde_json::Value> =
            pali_model::hf::processor_files(&config, ids)
                .unwrap()
                .into_iter()
                .collect();
        for name in [
            "processor_config.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            let mut want = read(name);
            want.as_object_mut().unwrap().remove("transformers_version");
            assert_eq!(files[name], want, "{variant}: {name}");
        }
        let mut pre = read("processor_config.json")["image_processor"].clone();
        pre["processor_class"] = serde_json::json!("PaliGemmaProcessor");
        assert_eq!(files["preprocessor_config.json"], pre, "{variant}");
        assert_eq!(files["special_tokens_map.json"]["bos_token"], "<bos>");
    }
}
