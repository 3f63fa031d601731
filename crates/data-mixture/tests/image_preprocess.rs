//! Image preprocessing against HF's SiglipImageProcessor on the fixtures' `image.png`: both of
//! its resize paths (torchvision antialias bicubic, PIL bicubic), within 2 uint8 levels.

use std::path::{Path, PathBuf};

use pali_data::image::{decode, load, preprocess, resize, ResizeMethod, Rgb};

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(variant)
}

fn tensor_bytes(file: &PathBuf, name: &str) -> (Vec<u8>, Vec<usize>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.data().to_vec(), t.shape().to_vec())
}

#[test]
fn png_decodes_to_the_source_pixels() {
    let dir = fixture("tiny-gemma1");
    let img = load(&dir.join("image.png")).unwrap();
    let (src, shape) = tensor_bytes(&dir.join("preprocess.safetensors"), "image_hwc_uint8");
    assert_eq!(shape, vec![img.height, img.width, 3]);
    assert_eq!(img.to_u8(), src);
}

#[test]
fn resize_and_normalise_match_hf_within_two_levels() {
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        let dir = fixture(variant);
        let img = load(&dir.join("image.png")).unwrap();
        let pre = dir.join("preprocess.safetensors");
        for path in ["torchvision", "pil"] {
            let (want, shape) = tensor_bytes(&pre, &format!("{path}.resized_chw_uint8"));
            let (h, w) = (shape[1], shape[2]);
            let got = resize(&img, w, h, ResizeMethod::Bicubic).to_u8();
            let mut max = 0i32;
            let mut differing = 0;
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let d = (got[(y * w + x) * 3 + c] as i32
                            - want[c * h * w + y * w + x] as i32)
                            .abs();
                        max = max.max(d);
                        differing += usize::from(d > 0);
                    }
                }
            }
            assert!(max <= 2, "{variant} {path}: max uint8 diff {max}");
            eprintln!(
                "{variant} {path}: max uint8 diff {max}, {differing} of {} values differ",
                3 * h * w
            );
            // pixel_values: (x/255 − 0.5)/0.5, within 2 levels = 0.016
            let (pv, _) = tensor_bytes(&pre, &format!("{path}.pixel_values"));
            let pv: Vec<f32> = pv
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let ours = preprocess(&img, h, ResizeMethod::Bicubic);
            let worst = ours
                .iter()
                .zip(&pv)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 2.0 / 127.5 + 1e-6,
                "{variant} {path}: pixel_values max diff {worst}"
            );
        }
    }
}

#[test]
fn identical_sizes_and_bilinear_variants() {
    let img = Rgb::from_u8(4, 2, &(0..24).map(|x| (x * 10) as u8).collect::<Vec<_>>());
    assert_eq!(resize(&img, 4, 2, ResizeMethod::Bicubic), img);
    // Downscale 4→2 without antialias samples between pixel pairs: mean of neighbours.
    let r = resize(&img, 2, 2, ResizeMethod::BilinearNoAntialias);
    assert_eq!(r.to_u8()[0], 15); // (0 + 30)/2
                                  // Constant images stay constant under every method.
    let flat = Rgb::from_u8(7, 5, &[200u8; 105]);
    for m in [
        ResizeMethod::Bicubic,
        ResizeMethod::Bilinear,
        ResizeMethod::BilinearNoAntialias,
    ] {
        assert!(
            resize(&flat, 3, 11, m).to_u8().iter().all(|x| *x == 200),
            "{m:?}"
        );
    }
}

#[test]
fn undecodable_bytes_name_the_file() {
    let e = decode(b"not an image", std::path::Path::new("data/x.jpg"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data/x.jpg") && e.contains("cannot decode"),
        "{e}"
    );
    let e = load(std::path::Path::new("/nonexistent/y.png"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/y.png"), "{e}");
}

/// A JPEG whose EXIF orientation says "rotate 90° clockwise" decodes upright (width and height
/// swapped, the left column becomes the top row).
#[test]
fn exif_orientation_is_applied() {
    // 8×4 image: left half black, right half white.
    let (w, h) = (8u32, 4u32);
    let px: Vec<u8> = (0..h)
        .flat_map(|_| (0..w).flat_map(|x| [if x < 4 { 0u8 } else { 255 }; 3]))
        .collect();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
        .encode(&px, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    // APP1 "Exif": little-endian TIFF, one IFD entry: Orientation (0x0112), SHORT, 1, value 6.
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend([1, 0]); // one entry
    tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
    tiff.extend([0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let len = (app1.len() + 2) as u16;
    let mut with_exif = vec![0xFF, 0xD8, 0xFF, 0xE1];
    with_exif.extend(len.to_be_bytes());
    with_exif.extend(app1);
    with_exif.extend(&jpeg[2..]);
    let plain = decode(&jpeg, std::path::Path::new("plain.jpg")).unwrap();
    assert_eq!((plain.width, plain.height), (8, 4));
    let img = decode(&with_exif, std::path::Path::new("rotated.jpg")).unwrap();
    assert_eq!(
        (img.width, img.height),
        (4, 8),
        "orientation 6 swaps width and height"
    );
    // Rotated 90° clockwise: the black left half is now the top half.
    let top = img.data[..3].iter().sum::<f32>();
    let bottom = img.data[img.data.len() - 3..].iter().sum::<f32>();
    assert!(top < 100.0 && bottom > 600.0, "top {top}, bottom {bottom}");
}

/// pHash against the `imagehash` package (scripts/phash_reference.py): pali resizes with
/// bicubic where imagehash uses Lanczos, so a bit or two may differ (0 on the synthetic images, 2
/// on the HF fixture image); near-duplicates stay within
/// the default threshold and distinct images far beyond it.
#[test]
fn phash_agrees_with_imagehash() {
    use pali_data::dedup::{hamming, phash};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("tests/fixtures/phash/reference.json")).unwrap();
    let want: std::collections::BTreeMap<String, u64> = serde_json::from_str(&text).unwrap();
    let mut ours = std::collections::BTreeMap::new();
    for (file, h) in &want {
        let got = phash(&load(&root.join(file)).unwrap());
        let d = hamming(got, *h);
        eprintln!("{file}: {d} bits from imagehash");
        assert!(d <= 2, "{file}: {d} bits from imagehash");
        ours.insert(file.clone(), got);
    }
    let a = ours["tests/fixtures/phash/000000.png"];
    assert!(hamming(a, ours["tests/fixtures/phash/000000-q50.jpg"]) <= 2);
    for (f, h) in &ours {
        if !f.contains("000000") {
            assert!(hamming(a, *h) > 12, "{f}: {}", hamming(a, *h));
        }
    }
}
