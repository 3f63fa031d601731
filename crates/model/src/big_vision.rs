//! big_vision PaliGemma checkpoints (`.npz`, the official release format) → HF checkpoint
//! directories that every loader here reads (`init_hf`, `pali eval`, transformers).
//!
//! The layout is HF transformers' own converters' (`convert_paligemma_weights_to_hf.py`,
//! `convert_paligemma2_weights_to_hf.py`): keys `params/img/...` and `params/llm/...` (or without
//! `params/`, as big_vision's fine-tuning colab saves them), per-layer arrays scanned on a
//! leading layer axis, flax kernels `[in…, out…]`, einsum weights `q [H, D, Dh]`,
//! `kv [2, K, D, Dh]`, `attn_vec [H, Dh, D]`, `gating [2, D, F]`. RMSNorm scales are stored as
//! `1 + scale` is applied on both sides, so they are copied. The image head is the projector.
//! Gemma 1's HF `post_attention_layernorm` is big_vision's `pre_ffw_norm`; Gemma 2 keeps four
//! norms per layer.
//!
//! Arrays are read one at a time and their tensors streamed to `model.safetensors` (or HF's
//! 5 GB shards) in the file's own dtype (bf16 stays bf16), so memory holds one array, not the model. The file
//! carries no hyper-parameters: the model is the preset whose shapes match every array, or a
//! given config whose shapes must.

use std::path::{Path, PathBuf};

use crate::config::{ImageEncoder, PaliGemmaConfig};
use crate::error::{io_err, Error, Result};
use crate::npz::{Archive, Data, Dtype};
use crate::shards::{Entry, Writer, SHARD_BYTES};

/// One HF tensor cut from a big_vision array: `index` picks along the array's leading axes
/// (layer, then k/v or gate/up); the rest is viewed as `view`, axes permuted by `perm`, and
/// stored with `rows` rows (more than it has: zero rows appended).
#[derive(Clone)]
struct Cut {
    name: String,
    index: Vec<usize>,
    view: Vec<usize>,
    perm: Vec<usize>,
    shape: Vec<usize>,
}

/// A big_vision array (key without `params/`), its shape, and the tensors cut from it.
struct Array {
    key: String,
    shape: Vec<usize>,
    cuts: Vec<Cut>,
}

fn array(key: &str, shape: &[usize], cuts: Vec<Cut>) -> Array {
    Array {
        key: key.to_string(),
        shape: shape.to_vec(),
        cuts,
    }
}

/// A cut of the whole array (after `index`), permuted.
fn cut(name: String, index: &[usize], view: &[usize], perm: &[usize]) -> Cut {
    let shape = perm.iter().map(|&p| view[p]).collect();
    Cut {
        name,
        index: index.to_vec(),
        view: view.to_vec(),
        perm: perm.to_vec(),
        shape,
    }
}

/// The same cut of every layer `i` of a scanned array.
fn layers(
    key: &str,
    n: usize,
    shape: &[usize],
    name: impl Fn(usize) -> String,
    perm: &[usize],
) -> Array {
    let mut full = vec![n];
    full.extend(shape);
    let cuts = (0..n).map(|i| cut(name(i), &[i], shape, perm)).collect();
    array(key, &full, cuts)
}

/// The cuts of a scanned array of pairs `[L, 2, …]` (k/v, gate/up): layer i, member j is
/// `names[j]`'s weight.
fn pairs(
    l: usize,
    names: [&str; 2],
    layer: &dyn Fn(usize, &str) -> String,
    view: &[usize],
    perm: &[usize],
) -> Vec<Cut> {
    (0..l)
        .flat_map(|i| (0..2).map(move |j| (i, j)))
        .map(|(i, j)| {
            cut(
                layer(i, &format!("{}.weight", names[j])),
                &[i, j],
                view,
                perm,
            )
        })
        .collect()
}

/// `a` with every cut stored as `shape` (the permuted axes merged: einsum heads flattened).
fn stored_as(mut a: Array, shape: [usize; 2]) -> Array {
    for c in &mut a.cuts {
        c.shape = shape.to_vec();
    }
    a
}

/// Every array a big_vision checkpoint of model `c` holds, with its HF tensors.
fn layout(c: &PaliGemmaConfig) -> std::result::Result<Vec<Array>, String> {
    let ImageEncoder::Siglip(v) = &c.vision else {
        return Err("a model without an image encoder has no big_vision layout".into());
    };
    let (w, heads, lv, fv, p) = (
        v.hidden_size,
        v.num_heads,
        v.num_layers,
        v.intermediate_size,
        v.patch_size,
    );
    let dh = w / heads;
    let t = &c.text;
    let (d, h, k, hd, l, f) = (
        t.hidden_size,
        t.num_heads,
        t.num_kv_heads,
        t.head_dim,
        t.num_layers,
        t.intermediate_size,
    );
    let vt = |rest: &str| format!("vision_tower.vision_model.{rest}");
    let vl = |i: usize, rest: &str| vt(&format!("encoder.layers.{i}.{rest}"));
    let tl = |i: usize, rest: &str| format!("language_model.model.layers.{i}.{rest}");
    let blk = "img/Transformer/encoderblock";
    let att = format!("{blk}/MultiHeadDotProductAttention_0");
    let mut a = vec![
        array(
            "img/embedding/kernel",
            &[p, p, 3, w],
            vec![cut(
                vt("embeddings.patch_embedding.weight"),
                &[],
                &[p, p, 3, w],
                &[3, 2, 0, 1],
            )],
        ),
        array(
            "img/embedding/bias",
            &[w],
            vec![cut(vt("embeddings.patch_embedding.bias"), &[], &[w], &[0])],
        ),
        array(
            "img/pos_embedding",
            &[1, v.num_patches(), w],
            vec![cut(
                vt("embeddings.position_embedding.weight"),
                &[0],
                &[v.num_patches(), w],
                &[0, 1],
            )],
        ),
    ];
    for (ln, hf) in [
        ("LayerNorm_0", "layer_norm1"),
        ("LayerNorm_1", "layer_norm2"),
    ] {
        for (part, hfp) in [("scale", "weight"), ("bias", "bias")] {
            a.push(layers(
                &format!("{blk}/{ln}/{part}"),
                lv,
                &[w],
                |i| vl(i, &format!("{hf}.{hfp}")),
                &[0],
            ));
        }
    }
    for (dense, hf, io) in [("Dense_0", "fc1", [w, fv]), ("Dense_1", "fc2", [fv, w])] {
        let mlp = format!("{blk}/MlpBlock_0/{dense}");
        a.push(layers(
            &format!("{mlp}/kernel"),
            lv,
            &io,
            |i| vl(i, &format!("mlp.{hf}.weight")),
            &[1, 0],
        ));
        a.push(layers(
            &format!("{mlp}/bias"),
            lv,
            &[io[1]],
            |i| vl(i, &format!("mlp.{hf}.bias")),
            &[0],
        ));
    }
    for (name, hf) in [("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")] {
        // [W, heads, dh] → [W, heads·dh] → transposed.
        let mut kernel = layers(
            &format!("{att}/{name}/kernel"),
            lv,
            &[w, heads * dh],
            |i| vl(i, &format!("self_attn.{hf}.weight")),
            &[1, 0],
        );
        kernel.shape = vec![lv, w, heads, dh];
        a.push(kernel);
        let mut bias = layers(
            &format!("{att}/{name}/bias"),
            lv,
            &[heads * dh],
            |i| vl(i, &format!("self_attn.{hf}.bias")),
            &[0],
        );
        bias.shape = vec![lv, heads, dh];
        a.push(bias);
    }
    let mut out = layers(
        &format!("{att}/out/kernel"),
        lv,
        &[heads * dh, w],
        |i| vl(i, "self_attn.out_proj.weight"),
        &[1, 0],
    );
    out.shape = vec![lv, heads, dh, w];
    a.push(out);
    a.push(layers(
        &format!("{att}/out/bias"),
        lv,
        &[w],
        |i| vl(i, "self_attn.out_proj.bias"),
        &[0],
    ));
    for (part, hfp) in [("scale", "weight"), ("bias", "bias")] {
        a.push(array(
            &format!("img/Transformer/encoder_norm/{part}"),
            &[w],
            vec![cut(vt(&format!("post_layernorm.{hfp}")), &[], &[w], &[0])],
        ));
    }
    a.push(array(
        "img/head/kernel",
        &[w, d],
        vec![cut(
            "multi_modal_projector.linear.weight".into(),
            &[],
            &[w, d],
            &[1, 0],
        )],
    ));
    a.push(array(
        "img/head/bias",
        &[d],
        vec![cut(
            "multi_modal_projector.linear.bias".into(),
            &[],
            &[d],
            &[0],
        )],
    ));
    // The embedder may have fewer rows than the model (257152 of 257216): see `rows_of`.
    let mut emb = cut(
        "language_model.model.embed_tokens.weight".into(),
        &[],
        &[t.vocab_size, d],
        &[0, 1],
    );
    emb.shape = vec![t.vocab_size, d];
    a.push(array(
        "llm/embedder/input_embedding",
        &[t.vocab_size, d],
        vec![emb],
    ));
    // q [H, D, Dh] → [H, Dh, D] = [H·Dh, D].
    a.push(stored_as(
        layers(
            "llm/layers/attn/q_einsum/w",
            l,
            &[h, d, hd],
            |i| tl(i, "self_attn.q_proj.weight"),
            &[0, 2, 1],
        ),
        [h * hd, d],
    ));
    let kv_cuts = pairs(
        l,
        ["self_attn.k_proj", "self_attn.v_proj"],
        &tl,
        &[k, d, hd],
        &[0, 2, 1],
    );
    a.push(stored_as(
        array("llm/layers/attn/kv_einsum/w", &[l, 2, k, d, hd], kv_cuts),
        [k * hd, d],
    ));
    // attn_vec [H, Dh, D] → [D, H, Dh] = [D, H·Dh].
    a.push(stored_as(
        layers(
            "llm/layers/attn/attn_vec_einsum/w",
            l,
            &[h, hd, d],
            |i| tl(i, "self_attn.o_proj.weight"),
            &[2, 0, 1],
        ),
        [d, h * hd],
    ));
    let gate_cuts = pairs(l, ["mlp.gate_proj", "mlp.up_proj"], &tl, &[d, f], &[1, 0]);
    a.push(array(
        "llm/layers/mlp/gating_einsum",
        &[l, 2, d, f],
        gate_cuts,
    ));
    a.push(layers(
        "llm/layers/mlp/linear",
        l,
        &[f, d],
        |i| tl(i, "mlp.down_proj.weight"),
        &[1, 0],
    ));
    let norms: &[(&str, &str)] = if t.post_norms {
        &[
            ("pre_attention_norm", "input_layernorm"),
            ("pre_ffw_norm", "pre_feedforward_layernorm"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ]
    } else {
        &[
            ("pre_attention_norm", "input_layernorm"),
            ("pre_ffw_norm", "post_attention_layernorm"),
        ]
    };
    for (bv, hf) in norms {
        a.push(layers(
            &format!("llm/layers/{bv}/scale"),
            l,
            &[d],
            |i| tl(i, &format!("{hf}.weight")),
            &[0],
        ));
    }
    a.push(array(
        "llm/final_norm/scale",
        &[d],
        vec![cut(
            "language_model.model.norm.weight".into(),
            &[],
            &[d],
            &[0],
        )],
    ));
    Ok(a)
}

/// An array of the file: key (without `params/`), name in the file, shape, dtype.
type Found = (String, String, Vec<usize>, Dtype);

/// The arrays of a big_vision `.npz`.
fn contents(archive: &mut Archive) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for name in archive.names() {
        let h = archive.header(&name)?;
        let key = name.strip_prefix("params/").unwrap_or(&name).to_string();
        out.push((key, name, h.shape, h.dtype));
    }
    Ok(out)
}

/// Why `c` does not fit the file's arrays, or None. The embedder may have fewer rows than the
/// model's vocabulary (big_vision 257152, HF padded to 257216).
fn mismatch(c: &PaliGemmaConfig, found: &[Found]) -> Option<String> {
    let want = match layout(c) {
        Ok(w) => w,
        Err(e) => return Some(e),
    };
    for a in &want {
        let Some((_, name, shape, _)) = found.iter().find(|(k, ..)| *k == a.key) else {
            return Some(format!(
                "no array `{}` (expected shape {:?})",
                a.key, a.shape
            ));
        };
        let fits = if a.key == "llm/embedder/input_embedding" {
            shape.len() == 2 && shape[1] == a.shape[1] && shape[0] <= a.shape[0]
        } else {
            *shape == a.shape
        };
        if !fits {
            return Some(format!(
                "array `{name}`: expected shape {:?}, found {shape:?}",
                a.shape
            ));
        }
    }
    found
        .iter()
        .find(|(k, ..)| !want.iter().any(|a| a.key == *k))
        .map(|(_, name, shape, _)| {
            format!(
                "unexpected array `{name}` (shape {shape:?}): no PaliGemma tensor comes from it"
            )
        })
}

/// Why the arrays' dtypes differ (a shard of mixed widths would misalign its tensors), or None.
fn uniform_dtype(found: &[Found]) -> Option<String> {
    let width = |d: Dtype| st_dtype(d);
    let (_, first, _, d0) = found.first()?;
    found
        .iter()
        .find(|(.., d)| width(*d) != width(*d0))
        .map(|(_, name, _, d)| {
            format!(
                "arrays of mixed dtypes (`{first}` is {d0:?}, `{name}` {d:?}); convert them to one"
            )
        })
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

/// The preset whose shapes match every array of `npz` (the file names no model).
pub fn infer_config(npz: &Path) -> Result<(&'static str, PaliGemmaConfig)> {
    let mut archive = Archive::open(npz)?;
    let found = contents(&mut archive)?;
    for name in crate::presets::PRESETS {
        let Ok(c) = crate::presets::preset(name) else {
            continue; // `tiny` is sized by a tokenizer
        };
        if mismatch(&c, &found).is_none() {
            return Ok((name, c));
        }
    }
    let shape = |k: &str| {
        found
            .iter()
            .find(|(key, ..)| key == k)
            .map(|(_, _, s, _)| format!("{s:?}"))
            .unwrap_or_else(|| "absent".into())
    };
    Err(bad(
        npz,
        format!(
            "no preset has these shapes (q_einsum {}, img/embedding/kernel {}, img/pos_embedding \
             {}); give the model's config.json",
            shape("llm/layers/attn/q_einsum/w"),
            shape("img/embedding/kernel"),
            shape("img/pos_embedding")
        ),
    ))
}

/// Checks that model `c` fits every array of `npz` (reading only their headers).
pub fn check(npz: &Path, c: &PaliGemmaConfig) -> Result<()> {
    let mut archive = Archive::open(npz)?;
    let found = contents(&mut archive)?;
    match mismatch(c, &found) {
        Some(m) => Err(bad(npz, m)),
        None => Ok(()),
    }
}

/// Picks `c.index` of the leading axes of `data` (shape `shape`), views the rest as `c.view`,
/// permutes it and appends zero rows up to `c.shape`.
fn apply<T: Copy + Default>(data: &[T], shape: &[usize], c: &Cut) -> Vec<T> {
    let mut offset = 0;
    let mut block: usize = shape.iter().product();
    for (axis, &i) in c.index.iter().enumerate() {
        block /= shape[axis];
        offset += i * block;
    }
    let sub = &data[offset..offset + block];
    // The embedder's cut is viewed as the model's rows; the file may hold fewer (padded below).
    let identity = c.perm.iter().enumerate().all(|(j, &p)| j == p);
    assert!(
        identity || sub.len() == c.view.iter().product::<usize>(),
        "a permuted cut must match its view"
    );
    let mut out = permute(sub, &c.view, &c.perm);
    out.resize(c.shape.iter().product(), T::default());
    out
}

/// `data` of shape `shape` with its axes permuted (`out` axis j = input axis `perm[j]`).
fn permute<T: Copy>(data: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    if perm.iter().enumerate().all(|(j, &p)| j == p) {
        return data.to_vec();
    }
    let n = shape.len();
    let mut stride = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let step: Vec<usize> = perm.iter().map(|&p| stride[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; n];
    let mut at = 0usize;
    for _ in 0..data.len() {
        out.push(data[at]);
        for d in (0..n).rev() {
            idx[d] += 1;
            at += step[d];
            if idx[d] < out_shape[d] {
                break;
            }
            at -= step[d] * idx[d];
            idx[d] = 0;
        }
    }
    out
}

fn le_bytes(data: &Data, shape: &[usize], c: &Cut) -> Vec<u8> {
    match data {
        Data::F32(v) => apply(v, shape, c)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        Data::F16(v) | Data::Bf16(v) => apply(v, shape, c)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    }
}

fn st_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F32 | Dtype::F64 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::Bf16 => safetensors::Dtype::BF16,
    }
}

/// A sibling of `out` to build it in (`out` appears by one rename): `DIR/.NAME.partial-PID`.
pub fn partial_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = out.parent().unwrap_or(Path::new("."));
    parent.join(format!(".{name}.partial-{}", std::process::id()))
}

/// Converts `npz` for model `c` into the HF checkpoint directory `out` (`model.safetensors`,
/// `config.json`, and `extra` files such as the tokenizer), which must not exist; it appears
/// whole or not at all. Returns the number of tensors written.
pub fn convert(
    npz: &Path,
    c: &PaliGemmaConfig,
    extra: &[(&str, Vec<u8>)],
    out: &Path,
) -> Result<usize> {
    if out.exists() {
        return Err(bad(out, "already exists; choose a new directory"));
    }
    let config = crate::hf::to_hf_config(c).map_err(Error::Input)?;
    let mut archive = Archive::open(npz)?;
    let found = contents(&mut archive)?;
    if let Some(m) = mismatch(c, &found) {
        return Err(bad(npz, m));
    }
    let want = layout(c).map_err(Error::Input)?;
    if let Some(d) = uniform_dtype(&found) {
        return Err(bad(npz, d));
    }
    let tmp = partial_dir(out);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let n = write_tensors(&mut archive, &found, &want, &tmp)?;
        let cp = tmp.join("config.json");
        std::fs::write(&cp, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(io_err(&cp))?;
        for (name, bytes) in extra {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(io_err(&p))?;
        }
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Streams every cut into `dir` (HF's 5 GB shards), one array at a time.
fn write_tensors(
    archive: &mut Archive,
    found: &[Found],
    want: &[Array],
    dir: &Path,
) -> Result<usize> {
    let file_of = |key: &str| {
        found
            .iter()
            .find(|(k, ..)| k == key)
            .expect("checked by `mismatch`")
    };
    let entries: Vec<Entry> = want
        .iter()
        .flat_map(|a| {
            let dtype = st_dtype(file_of(&a.key).3);
            a.cuts.iter().map(move |c| Entry {
                name: c.name.clone(),
                dtype,
                shape: c.shape.clone(),
            })
        })
        .collect();
    let n = entries.len();
    let meta = [("format", "pt"), ("source", "big_vision npz")];
    let mut w = Writer::create(dir, "model", entries, SHARD_BYTES, &meta)?;
    for a in want {
        let (_, name, shape, _) = file_of(&a.key);
        // The file's bytes once; each cut's block (one layer of a scanned array) is decoded on
        // its own, so memory holds the array's bytes and one tensor.
        let (header, bytes, start) = archive.raw(name)?;
        let size = header.dtype.size();
        for c in &a.cuts {
            let mut offset = 0;
            let mut block: usize = shape.iter().product();
            for (axis, &i) in c.index.iter().enumerate() {
                block /= shape[axis];
                offset += i * block;
            }
            let piece = &bytes[start + offset * size..start + (offset + block) * size];
            let data = crate::npz::decode(header.dtype, piece);
            let whole = Cut {
                index: Vec::new(),
                ..c.clone()
            };
            w.put(&le_bytes(&data, &[block], &whole))?;
        }
    }
    w.finish()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_moves_axes() {
        // [2, 3] → [3, 2]
        let a = [0, 1, 2, 3, 4, 5];
        assert_eq!(permute(&a, &[2, 3], &[1, 0]), [0, 3, 1, 4, 2, 5]);
        // [2, 1, 3] with (2, 0, 1): out[k][i][j] = a[i][j][k]
        assert_eq!(permute(&a, &[2, 1, 3], &[2, 0, 1]), [0, 3, 1, 4, 2, 5]);
        let b: Vec<i32> = (0..24).collect();
        let p = permute(&b, &[2, 3, 4], &[1, 2, 0]);
        // out[j][k][i] = b[i][j][k] = 12 i + 4 j + k
        for j in 0..3 {
            for k in 0..4 {
                for i in 0..2 {
                    assert_eq!(p[j * 8 + k * 2 + i], (12 * i + 4 * j + k) as i32);
                }
            }
        }
    }

    #[test]
    fn cuts_index_leading_axes_and_pad_rows() {
        let a: Vec<f32> = (0..12).map(|x| x as f32).collect();
        // Shape [2, 3, 2]: layer 1, transposed.
        let c = cut("x".into(), &[1], &[3, 2], &[1, 0]);
        assert_eq!(apply(&a, &[2, 3, 2], &c), [6., 8., 10., 7., 9., 11.]);
        let mut pad = cut("e".into(), &[], &[4, 2], &[0, 1]);
        pad.shape = vec![5, 2];
        let e: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(apply(&e, &[4, 2], &pad)[8..], [0., 0.]);
    }
}
