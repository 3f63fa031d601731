//! Equality with HF's PaliGemmaProcessor (transformers 5.24) on the fixtures' tokenizer: the ids,
//! token types and labels of both examples, and every `tokenizer_cases` string in meta.json.

use std::path::PathBuf;

use pali_data::sequence::hf_processor_form;
use pali_data::tokenizer::{NUM_LOC, NUM_SEG};
use pali_data::{PaliTokenizer, SequenceBuilder, Truncation};

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(variant)
}

fn meta(variant: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("meta.json")).unwrap())
        .unwrap()
}

fn tokenizer(variant: &str) -> PaliTokenizer {
    PaliTokenizer::from_file(&fixture(variant).join("tokenizer.json")).unwrap()
}

fn i64s(file: &PathBuf, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn special_ids_are_looked_up() {
    let m = meta("tiny-gemma1");
    let t = tokenizer("tiny-gemma1");
    let ids = &m["token_ids"];
    assert_eq!(t.pad as u64, ids["pad"].as_u64().unwrap());
    assert_eq!(t.eos as u64, ids["eos"].as_u64().unwrap());
    assert_eq!(t.bos as u64, ids["bos"].as_u64().unwrap());
    assert_eq!(t.image as u64, ids["image"].as_u64().unwrap());
    assert_eq!(t.loc[0] as u64, ids["loc0000"].as_u64().unwrap());
    assert_eq!(t.loc[1023] as u64, ids["loc1023"].as_u64().unwrap());
    assert_eq!(t.seg[127] as u64, ids["seg127"].as_u64().unwrap());
}

#[test]
fn every_loc_and_seg_token_is_one_id_and_decodes_back() {
    let t = tokenizer("tiny-gemma2");
    let names = (0..NUM_LOC)
        .map(|i| format!("<loc{i:04}>"))
        .chain((0..NUM_SEG).map(|i| format!("<seg{i:03}>")));
    let mut n = 0;
    for (k, name) in names.enumerate() {
        let ids = t.encode(&name).unwrap();
        let want = if k < NUM_LOC {
            t.loc[k]
        } else {
            t.seg[k - NUM_LOC]
        };
        assert_eq!(ids, vec![want], "{name}");
        assert_eq!(t.decode(&ids).unwrap(), name);
        n += 1;
    }
    assert_eq!(n, 1152);
    // and inside text, never stripped as "special"
    let ids = t.encode("<loc0001><loc1023><seg042> car").unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "<loc0001><loc1023><seg042> car");
}

#[test]
fn tokenizer_cases_match_hf() {
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        let m = meta(variant);
        let t = tokenizer(variant);
        for case in m["tokenizer_cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(t.encode(text).unwrap(), want, "{variant}: ids of {text:?}");
            let dec = case["decoded_keep_special"].as_str().unwrap();
            // HF keeps specials in this decode; ours drops only BOS/EOS/PAD.
            let stripped = dec
                .replace("<bos>", "")
                .replace("<eos>", "")
                .replace("<pad>", "");
            assert_eq!(
                t.decode(&want).unwrap(),
                stripped,
                "{variant}: decode of {text:?}"
            );
        }
    }
}

#[test]
fn processor_ids_types_and_labels_match_hf() {
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        let m = meta(variant);
        let t = tokenizer(variant);
        let ex: Vec<(String, String)> = m["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["prefix"].as_str().unwrap().to_string(),
                    e["suffix"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let pairs: Vec<(&str, &str)> = ex.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let n_img = m["config_summary"]["vision"]["num_image_tokens"]
            .as_u64()
            .unwrap() as usize;
        let (ids, tt, labels) = hf_processor_form(&t, &pairs, n_img).unwrap();
        let file = fixture(variant).join("inputs.safetensors");
        let flat = |v: Vec<Vec<i64>>| v.into_iter().flatten().collect::<Vec<_>>();
        assert_eq!(flat(ids), i64s(&file, "input_ids"), "{variant} input_ids");
        assert_eq!(
            flat(tt),
            i64s(&file, "token_type_ids"),
            "{variant} token_type_ids"
        );
        assert_eq!(flat(labels), i64s(&file, "labels"), "{variant} labels");
    }
}

#[test]
fn big_vision_masks_and_padding() {
    let t = tokenizer("tiny-gemma1");
    let b = SequenceBuilder::new(16);
    let ex = b.train(&t, "caption en", "a cat").unwrap();
    assert_eq!(ex.ids.len(), 17);
    let np = ex.prefix_len;
    assert_eq!(ex.ids[0], t.bos);
    assert_eq!(ex.ids[np - 1], t.encode("\n").unwrap()[0]);
    let eos_at = ex.ids.iter().position(|i| *i == t.eos).unwrap();
    for i in 0..17 {
        assert_eq!(ex.mask_ar[i], u8::from(i >= np), "mask_ar[{i}]");
        assert_eq!(
            ex.mask_loss[i],
            u8::from(i >= np && i <= eos_at),
            "mask_loss[{i}]"
        );
        assert_eq!(ex.mask_input[i], u8::from(i <= eos_at), "mask_input[{i}]");
        if i > eos_at {
            assert_eq!(ex.ids[i], t.pad);
        }
    }
    let p = b.prompt(&t, "caption en").unwrap();
    assert_eq!(p.ids.len(), 16);
    assert_eq!(&p.ids[..np], &ex.ids[..np]);
    assert!(p.mask_ar[np..].iter().all(|x| *x == 1) && p.mask_input[np..].iter().all(|x| *x == 0));
}

#[test]
fn truncation_policies() {
    let t = tokenizer("tiny-gemma1");
    let long = "a horse on the grass a horse on the grass a horse on the grass";
    let mut b = SequenceBuilder::new(12);
    let ex = b.train(&t, "caption en", long).unwrap();
    assert!(ex.truncated && !ex.eos_cut);
    assert_eq!(ex.ids.len(), 13);
    assert_eq!(*ex.ids.last().unwrap(), t.eos, "keep_eos keeps the EOS");
    b.truncation = Truncation::Cut;
    let ex = b.train(&t, "caption en", long).unwrap();
    assert!(ex.truncated && ex.eos_cut && !ex.ids.contains(&t.eos));
    b.truncation = Truncation::Error;
    let e = b.train(&t, "caption en", long).unwrap_err().to_string();
    assert!(
        e.contains("text too long") && e.contains("text_len+1 = 13"),
        "{e}"
    );
    // Loss on the prefix too (ablation)
    let mut b = SequenceBuilder::new(32);
    b.loss_on_prefix = true;
    let ex = b.train(&t, "caption en", "a cat").unwrap();
    assert!(ex.mask_loss[..ex.prefix_len].iter().all(|x| *x == 1));
}
