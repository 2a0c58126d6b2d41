//! Every bad input gives a clear error — never a panic — that names the offending file / key (and, for shape
//! mismatches, both shapes), and a failed load leaves nothing half-done.
//!
//! Each broken checkpoint is built in a fresh directory under `std::env::temp_dir()` by copying a fixture from
//! `tests/fixtures/llava/` (tools/gen_fixtures.py) and then breaking one thing. Safetensors files are read and
//! rewritten with the tiny reader/writer below, or crafted byte by byte (8-byte little-endian header length +
//! JSON header + data) for the header-level corruptions.

use engine::weights::WeightStore;
use engine::{EngineError, Model};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// -- helpers ------------------------------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llava")
}

fn image_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image").join(name)
}

/// f32, single file, tied, LoRA with old naming; text vocab 96, hidden 32, 4 heads / 2 kv heads.
const SINGLE: &str = "l15_4x_f32_gqa_tied_lora";
/// f32, two shards, untied.
const SHARDED: &str = "l15_4x_f32_sharded_full";
/// Another LLaVA with the same (4.x, old) adapter naming but hidden size 48: its adapter fits SINGLE's names but not its shapes.
const OTHER_BASE: &str = "l15_4x_bf16_gqa_rslora_old";
const TEXT_ONLY: &str = "llama_text_only";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("rlaifd-bad-inputs-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the (flat) directory `src` into a fresh temp dir.
fn copy_dir(src: &Path, tag: &str) -> TempDir {
    let t = TempDir::new(tag);
    for entry in std::fs::read_dir(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), t.path().join(entry.file_name())).unwrap();
        }
    }
    t
}

fn model_copy(case: &str) -> TempDir {
    copy_dir(&fixtures().join(case).join("model"), &format!("{case}-model"))
}

fn adapter_copy(case: &str) -> TempDir {
    copy_dir(&fixtures().join(case).join("adapter"), &format!("{case}-adapter"))
}

/// Runs `f`, turning a panic into a test failure that says the input panicked instead of erroring.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: PANICKED instead of returning an error: {msg}")
        }
    }
}

/// The error of `f`, which must fail without panicking.
fn expect_err<T>(what: &str, f: impl FnOnce() -> engine::Result<T>) -> EngineError {
    match no_panic(what, f) {
        Ok(_) => panic!("{what}: succeeded but should have failed"),
        Err(e) => {
            eprintln!("{what}: {e}");
            e
        }
    }
}

fn load_err(what: &str, dir: &Path) -> (EngineError, String) {
    let e = expect_err(what, || Model::load(dir));
    let msg = e.to_string();
    (e, msg)
}

fn assert_contains(what: &str, msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "{what}: error does not mention `{n}`:\n  {msg}");
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn expected(case: &str) -> Value {
    read_json(&fixtures().join(case).join("expected.json"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// -- a tiny safetensors reader / writer --------------------------------------------------------------------

struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

struct StFile {
    metadata: Option<Value>,
    tensors: Vec<Tensor>,
}

impl StFile {
    fn read(path: &Path) -> StFile {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let off: Vec<usize> =
                info["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            tensors.push(Tensor {
                name,
                dtype: info["dtype"].as_str().unwrap().to_string(),
                shape: info["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect(),
                data: data[off[0]..off[1]].to_vec(),
            });
        }
        StFile { metadata, tensors }
    }

    fn write(&self, path: &Path) {
        let mut header = serde_json::Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            let a = data.len();
            data.extend_from_slice(&t.data);
            header.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [a, data.len()]}));
        }
        write_raw(path, &serde_json::to_string(&header).unwrap(), None, &data);
    }

    fn get_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }

    fn remove(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(self.tensors.len() + 1, before, "fixture has no tensor {name}");
    }
}

/// Writes `u64 LE header length` + header (space-padded to 8 bytes) + data. `len_override` replaces the length field.
fn write_raw(path: &Path, header: &str, len_override: Option<u64>, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = len_override.unwrap_or(h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect()
}

const Q0: &str = "language_model.model.layers.0.self_attn.q_proj.weight";

// -- checkpoint files ---------------------------------------------------------------------------------------

#[test]
fn missing_model_dir_config_or_weights() {
    let t = TempDir::new("nothing");
    let gone = t.path().join("no_such_model");
    let (_, msg) = load_err("nonexistent model dir", &gone);
    assert_contains("nonexistent model dir", &msg, &["no_such_model", "does not exist"]);

    let m = model_copy(SINGLE);
    std::fs::remove_file(m.path().join("config.json")).unwrap();
    let (e, msg) = load_err("no config.json", m.path());
    assert!(matches!(e, EngineError::Io { .. }), "{e:?}");
    assert_contains("no config.json", &msg, &["config.json"]);

    let m = model_copy(SINGLE);
    std::fs::remove_file(m.path().join("model.safetensors")).unwrap();
    let (_, msg) = load_err("no weights", m.path());
    assert_contains("no weights", &msg, &["model.safetensors", "model.safetensors.index.json"]);
}

#[test]
fn missing_shard_is_named() {
    let m = model_copy(SHARDED);
    std::fs::remove_file(m.path().join("model-00002-of-00002.safetensors")).unwrap();
    let (e, msg) = load_err("missing shard", m.path());
    assert!(matches!(e, EngineError::Io { .. }), "{e:?}");
    assert_contains(
        "missing shard",
        &msg,
        &["model-00002-of-00002.safetensors", "missing", "model.safetensors.index.json"],
    );
}

#[test]
fn index_naming_the_wrong_shard_is_an_error() {
    let m = model_copy(SHARDED);
    let index_path = m.path().join("model.safetensors.index.json");
    let mut index = read_json(&index_path);
    let map = index["weight_map"].as_object_mut().unwrap();
    let (key, shard) = map
        .iter()
        .find(|(_, v)| v.as_str() == Some("model-00001-of-00002.safetensors"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    assert_eq!(shard, "model-00001-of-00002.safetensors");
    map.insert(key.clone(), json!("model-00002-of-00002.safetensors"));
    write_json(&index_path, &index);
    let (_, msg) = load_err("index points at the wrong shard", m.path());
    assert_contains("index points at the wrong shard", &msg, &[&key, "model-00002-of-00002.safetensors"]);

    // An index that is not JSON names the index file.
    std::fs::write(&index_path, "{\"weight_map\": {").unwrap();
    let (e, msg) = load_err("index not JSON", m.path());
    assert!(matches!(e, EngineError::Json { .. }), "{e:?}");
    assert_contains("index not JSON", &msg, &["model.safetensors.index.json"]);
}

#[test]
fn truncated_safetensors_names_the_file() {
    // Single file cut in half.
    let m = model_copy(SINGLE);
    let p = m.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (e, msg) = load_err("truncated single file", m.path());
    assert!(matches!(e, EngineError::Safetensors { .. }), "{e:?}");
    assert_contains("truncated single file", &msg, &["model.safetensors", "truncated or corrupt"]);

    // One shard of a sharded checkpoint cut in half: the error names that shard.
    let m = model_copy(SHARDED);
    let p = m.path().join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (_, msg) = load_err("truncated shard", m.path());
    assert_contains("truncated shard", &msg, &["model-00001-of-00002.safetensors", "truncated or corrupt"]);

    // Cut inside the 8-byte length field, and an empty file.
    for (tag, keep) in [("4 bytes", 4usize), ("empty file", 0)] {
        let m = model_copy(SINGLE);
        let p = m.path().join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let (e, msg) = load_err(tag, m.path());
        assert!(matches!(e, EngineError::Safetensors { .. }), "{tag}: {e:?}");
        assert_contains(tag, &msg, &["model.safetensors", "truncated or corrupt"]);
    }
}

#[test]
fn crafted_bad_headers_name_the_file() {
    type Case<'a> = (&'a str, String, Option<u64>, Vec<u8>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "data offsets beyond the end of the file",
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#.into(),
            None,
            f32_bytes(2),
            vec!["incomplete"],
        ),
        (
            "overlapping data offsets",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#.into(),
            None,
            f32_bytes(6),
            vec!["offset", "`b`"],
        ),
        (
            "data offsets that disagree with shape and dtype",
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#.into(),
            None,
            f32_bytes(4),
            vec!["invalid"],
        ),
        (
            "header length larger than the file",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.into(),
            Some(10_000),
            f32_bytes(2),
            vec!["header length"],
        ),
        (
            "header length of u64::MAX",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.into(),
            Some(u64::MAX),
            f32_bytes(2),
            vec!["header"],
        ),
        ("header that is not JSON", "this is not json at all!".into(), None, vec![], vec!["JSON"]),
        ("header that is not UTF-8", String::new(), None, vec![], vec!["UTF-8"]),
    ];
    for (tag, header, len_override, data, needles) in cases {
        // Through Model::load (the file replaces a real checkpoint) ...
        let m = model_copy(SINGLE);
        let p = m.path().join("model.safetensors");
        if tag == "header that is not UTF-8" {
            let mut raw = 8u64.to_le_bytes().to_vec();
            raw.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xff, 0xfe, 0xfd, 0xfc]);
            std::fs::write(&p, raw).unwrap();
        } else {
            write_raw(&p, &header, len_override, &data);
        }
        let (e, msg) = load_err(tag, m.path());
        assert!(matches!(e, EngineError::Safetensors { .. }), "{tag}: {e:?}");
        assert_contains(tag, &msg, &["model.safetensors", "truncated or corrupt"]);
        assert_contains(tag, &msg, &needles);
        // ... and through WeightStore directly.
        let e = expect_err(tag, || WeightStore::open_files(std::slice::from_ref(&p)));
        assert_contains(tag, &e.to_string(), &["model.safetensors"]);
    }
}

#[test]
fn wrong_tensor_shape_names_key_file_and_both_shapes() {
    // A 2-D weight: q_proj of layer 0 should be (32, 32); write it as (16, 32).
    let m = model_copy(SINGLE);
    let p = m.path().join("model.safetensors");
    let mut st = StFile::read(&p);
    {
        let t = st.get_mut(Q0);
        assert_eq!(t.shape, vec![32, 32]);
        t.shape = vec![16, 32];
        t.data.truncate(16 * 32 * 4);
    }
    st.write(&p);
    let (e, msg) = load_err("wrong q_proj shape", m.path());
    assert!(matches!(e, EngineError::Shape { .. }), "{e:?}");
    assert_contains("wrong q_proj shape", &msg, &[Q0, "model.safetensors", "[16, 32]", "[32, 32]"]);

    // A 1-D weight, same number of elements but a different rank: (32,) stored as (4, 8).
    let m = model_copy(SINGLE);
    let p = m.path().join("model.safetensors");
    let mut st = StFile::read(&p);
    let key = "language_model.model.norm.weight";
    st.get_mut(key).shape = vec![4, 8];
    st.write(&p);
    let (_, msg) = load_err("wrong norm rank", m.path());
    assert_contains("wrong norm rank", &msg, &[key, "model.safetensors", "[4, 8]", "[32]"]);

    // Inside a shard: the error names the shard, not the index.
    let m = model_copy(SHARDED);
    let index = read_json(&m.path().join("model.safetensors.index.json"));
    let shard = index["weight_map"][Q0].as_str().unwrap().to_string();
    let p = m.path().join(&shard);
    let mut st = StFile::read(&p);
    {
        let t = st.get_mut(Q0);
        let (o, i) = (t.shape[0], t.shape[1]);
        t.shape = vec![i, o + 1];
        t.data = f32_bytes(i * (o + 1));
    }
    st.write(&p);
    let (_, msg) = load_err("wrong shape in shard", m.path());
    assert_contains("wrong shape in shard", &msg, &[Q0, &shard]);
}

#[test]
fn unsupported_dtype_names_key_and_dtype() {
    for (dtype, width) in [("I64", 8usize), ("I32", 4), ("F64", 8), ("U8", 1), ("BOOL", 1)] {
        let m = model_copy(SINGLE);
        let p = m.path().join("model.safetensors");
        let mut st = StFile::read(&p);
        {
            let t = st.get_mut(Q0);
            let n: usize = t.shape.iter().product();
            t.dtype = dtype.into();
            t.data = vec![0u8; n * width];
        }
        st.write(&p);
        let (e, msg) = load_err(&format!("{dtype} weight"), m.path());
        assert!(matches!(e, EngineError::Dtype { .. }), "{dtype}: {e:?}");
        assert_contains(dtype, &msg, &[Q0, "model.safetensors", dtype, "F32, F16, BF16"]);
    }
    // A 16-bit checkpoint (its weights are kept 16-bit in memory, a different load path): I64 weight, and a wrong shape.
    let m = model_copy(OTHER_BASE);
    let p = m.path().join("model.safetensors");
    let mut st = StFile::read(&p);
    let (n, shape) = {
        let t = st.get_mut(Q0);
        assert_eq!(t.dtype, "BF16");
        let n: usize = t.shape.iter().product();
        t.dtype = "I64".into();
        t.data = vec![0u8; n * 8];
        (n, t.shape.clone())
    };
    st.write(&p);
    let (e, msg) = load_err("I64 weight in a bf16 checkpoint", m.path());
    assert!(matches!(e, EngineError::Dtype { .. }), "{e:?}");
    assert_contains("I64 weight in a bf16 checkpoint", &msg, &[Q0, "model.safetensors", "I64"]);
    {
        let t = st.get_mut(Q0);
        t.dtype = "BF16".into();
        t.shape = vec![shape[0] / 2, shape[1]];
        t.data = vec![0u8; n];
    }
    st.write(&p);
    let (e, msg) = load_err("wrong shape in a bf16 checkpoint", m.path());
    assert!(matches!(e, EngineError::Shape { .. }), "{e:?}");
    let (got, want) = (format!("{:?}", [shape[0] / 2, shape[1]]), format!("{shape:?}"));
    assert_contains("wrong shape in a bf16 checkpoint", &msg, &[Q0, "model.safetensors", &got, &want]);
}

#[test]
fn missing_tensor_names_the_key() {
    for key in [Q0, "vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias", "multi_modal_projector.linear_2.weight"]
    {
        let m = model_copy(SINGLE);
        let p = m.path().join("model.safetensors");
        let mut st = StFile::read(&p);
        st.remove(key);
        st.write(&p);
        let (e, msg) = load_err(&format!("missing {key}"), m.path());
        assert!(matches!(e, EngineError::MissingTensor { .. }), "{key}: {e:?}");
        assert_contains(key, &msg, &[key, "model.safetensors"]);
    }
    // Untied model without its lm_head.
    let m = model_copy(TEXT_ONLY);
    let p = m.path().join("model.safetensors");
    let mut st = StFile::read(&p);
    st.remove("lm_head.weight");
    st.write(&p);
    let (_, msg) = load_err("missing lm_head", m.path());
    assert_contains("missing lm_head", &msg, &["lm_head.weight", "tie_word_embeddings"]);
    // A LLaVA config on a checkpoint with none of the LLaVA key layouts.
    let m = model_copy(SINGLE);
    let p = m.path().join("model.safetensors");
    let mut st = StFile::read(&p);
    for t in &mut st.tensors {
        t.name = format!("weird.{}", t.name);
    }
    st.write(&p);
    let (_, msg) = load_err("unknown key layout", m.path());
    assert_contains("unknown key layout", &msg, &["model.safetensors", "layout"]);
}

// -- config.json -------------------------------------------------------------------------------------------

fn edit_config(case: &str, f: impl FnOnce(&mut Value)) -> TempDir {
    let m = model_copy(case);
    let p = m.path().join("config.json");
    let mut cfg = read_json(&p);
    f(&mut cfg);
    write_json(&p, &cfg);
    m
}

#[test]
fn unknown_architecture() {
    let m = edit_config(TEXT_ONLY, |c| {
        c["architectures"] = json!(["MistralForCausalLM"]);
        c["model_type"] = json!("mistral");
    });
    let (e, msg) = load_err("MistralForCausalLM", m.path());
    assert!(matches!(e, EngineError::Config { .. }), "{e:?}");
    assert_contains(
        "MistralForCausalLM",
        &msg,
        &["config.json", "MistralForCausalLM", "unknown architecture", "LlavaForConditionalGeneration"],
    );

    // A LLaVA whose language model is neither LLaMA nor Mistral.
    let m = edit_config(SINGLE, |c| c["text_config"]["model_type"] = json!("gemma"));
    let (_, msg) = load_err("gemma text_config", m.path());
    assert_contains("gemma text_config", &msg, &["config.json", "text_config.model_type", "gemma", "llama or mistral"]);
}

#[test]
fn malformed_config_json_names_the_file() {
    for (tag, text) in [
        ("invalid JSON", "{\"architectures\": [\"LlavaForConditionalGeneration\",}"),
        ("empty", ""),
        ("a list", "[1, 2]"),
    ] {
        let m = model_copy(SINGLE);
        std::fs::write(m.path().join("config.json"), text).unwrap();
        let (_, msg) = load_err(tag, m.path());
        assert_contains(tag, &msg, &["config.json"]);
    }
    // A field of the wrong type names the field.
    let m = edit_config(SINGLE, |c| c["text_config"]["hidden_size"] = json!("thirty-two"));
    let (_, msg) = load_err("string hidden_size", m.path());
    assert_contains("string hidden_size", &msg, &["config.json", "text_config.hidden_size"]);
}

#[test]
fn inconsistent_config_values() {
    let m = edit_config(SINGLE, |c| c["text_config"]["num_key_value_heads"] = json!(3));
    let (e, msg) = load_err("heads % kv heads != 0", m.path());
    assert!(matches!(e, EngineError::Config { .. }), "{e:?}");
    assert_contains("heads % kv heads", &msg, &["config.json", "num_attention_heads (4)", "num_key_value_heads (3)"]);

    let m = edit_config(SINGLE, |c| c["text_config"]["num_key_value_heads"] = json!(0));
    let (_, msg) = load_err("zero kv heads", m.path());
    assert_contains("zero kv heads", &msg, &["config.json", "num_key_value_heads (0)"]);

    let m = edit_config(SINGLE, |c| c["text_config"]["num_attention_heads"] = json!(0));
    let (_, msg) = load_err("zero heads", m.path());
    assert_contains("zero heads", &msg, &["config.json", "num_attention_heads"]);

    let m = edit_config(SINGLE, |c| c["vision_feature_layer"] = json!(-9));
    let (_, msg) = load_err("feature layer out of range", m.path());
    assert_contains("feature layer out of range", &msg, &["config.json", "vision_feature_layer", "-9"]);

    let m = edit_config(SINGLE, |c| c["vision_config"]["patch_size"] = json!(5));
    let (_, msg) = load_err("image_size % patch_size", m.path());
    assert_contains("image_size % patch_size", &msg, &["config.json", "patch_size"]);

    // Config and weights disagree: a vocab larger than the embedding table.
    let m = edit_config(SINGLE, |c| c["text_config"]["vocab_size"] = json!(100));
    let (e, msg) = load_err("vocab_size vs embeddings", m.path());
    assert!(matches!(e, EngineError::Shape { .. }), "{e:?}");
    assert_contains(
        "vocab_size vs embeddings",
        &msg,
        &["embed_tokens.weight", "model.safetensors", "[96, 32]", "[100, 32]"],
    );

    // More layers than the checkpoint holds.
    let m = edit_config(SINGLE, |c| c["text_config"]["num_hidden_layers"] = json!(3));
    let (e, msg) = load_err("too many layers", m.path());
    assert!(matches!(e, EngineError::MissingTensor { .. }), "{e:?}");
    assert_contains("too many layers", &msg, &["layers.2."]);
}

// -- images -------------------------------------------------------------------------------------------------

#[test]
fn corrupt_and_truncated_images_via_model() {
    let model = Model::load(&fixtures().join(SINGLE).join("model")).unwrap();
    for name in [
        "corrupt.png",
        "truncated.png",
        "truncated_header.png",
        "bad_idat.png",
        "empty.png",
        "not_an_image.png",
        "no_such_image.png",
    ] {
        let e = expect_err(name, || model.load_image(&image_fixture(name)));
        assert_contains(name, &e.to_string(), &[name]);
    }
    // A text-only model takes no image.
    let text = Model::load(&fixtures().join(TEXT_ONLY).join("model")).unwrap();
    let e = expect_err("image for text-only model", || text.load_image(&fixtures().join(SINGLE).join("image.png")));
    assert_contains("image for text-only model", &e.to_string(), &["text-only"]);
}

#[test]
fn malformed_preprocessor_config_names_the_file() {
    let m = model_copy(SINGLE);
    std::fs::write(m.path().join("preprocessor_config.json"), "{\"crop_size\": ").unwrap();
    let (_, msg) = load_err("bad preprocessor_config.json", m.path());
    assert_contains("bad preprocessor_config.json", &msg, &["preprocessor_config.json"]);

    // A crop size the vision tower cannot take.
    let m = model_copy(SINGLE);
    let p = m.path().join("preprocessor_config.json");
    let mut pp = read_json(&p);
    pp["crop_size"] = json!({"height": 20, "width": 20});
    write_json(&p, &pp);
    let (_, msg) = load_err("crop size mismatch", m.path());
    assert_contains("crop size mismatch", &msg, &["preprocessor_config.json", "20x20", "28x28"]);
}

// -- adapters -----------------------------------------------------------------------------------------------

fn single_model() -> Model {
    Model::load(&fixtures().join(SINGLE).join("model")).unwrap()
}

fn adapter_err(model: &Model, what: &str, dir: &Path) -> (EngineError, String) {
    let e = expect_err(what, || model.load_adapter(dir));
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn adapter_for_a_different_base_model() {
    let model = single_model();
    // Same module names (4.x layout, old naming), hidden size 48 instead of 32.
    let dir = fixtures().join(OTHER_BASE).join("adapter");
    let (e, msg) = adapter_err(&model, "adapter of another base model", &dir);
    // The error names the key, the file, both shapes and the likely cause (another base model).
    assert!(matches!(e, EngineError::Adapter { .. }), "{e:?}");
    assert_contains(
        "adapter of another base model",
        &msg,
        &["base_model.model.", "lora_", "adapter_model.safetensors", "has shape [", "needs [", "different base model"],
    );

    // An adapter for a LLaVA loaded on a text-only LLaMA: its modules do not exist there.
    let text = Model::load(&fixtures().join(TEXT_ONLY).join("model")).unwrap();
    let (e, msg) = adapter_err(&text, "LLaVA adapter on text-only model", &fixtures().join(SINGLE).join("adapter"));
    assert!(matches!(e, EngineError::Adapter { .. }), "{e:?}");
    assert_contains(
        "LLaVA adapter on text-only model",
        &msg,
        &["adapter_model.safetensors", "not a linear layer of this base model"],
    );

    // Same shapes but an extra module the base does not have (layer 7).
    let a = adapter_copy(SINGLE);
    let p = a.path().join("adapter_model.safetensors");
    let mut st = StFile::read(&p);
    let extra: Vec<Tensor> = st
        .tensors
        .iter()
        .filter(|t| t.name.contains(".layers.1.self_attn.q_proj.") && t.name.contains("language_model"))
        .map(|t| Tensor {
            name: t.name.replace(".layers.1.", ".layers.7."),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            data: t.data.clone(),
        })
        .collect();
    assert_eq!(extra.len(), 2);
    st.tensors.extend(extra);
    st.write(&p);
    let (_, msg) = adapter_err(&model, "adapter module for layer 7", a.path());
    assert_contains("adapter module for layer 7", &msg, &["layers.7.self_attn.q_proj", "adapter_model.safetensors"]);
}

#[test]
fn adapter_config_problems() {
    let model = single_model();
    let edit = |tag: &str, f: &dyn Fn(&mut Value)| -> String {
        let a = adapter_copy(SINGLE);
        let p = a.path().join("adapter_config.json");
        let mut cfg = read_json(&p);
        f(&mut cfg);
        write_json(&p, &cfg);
        let (_, msg) = adapter_err(&model, tag, a.path());
        assert_contains(tag, &msg, &[&a.path().display().to_string()]);
        msg
    };
    let msg = edit("use_dora", &|c| c["use_dora"] = json!(true));
    assert_contains("use_dora", &msg, &["use_dora", "DoRA"]);
    let msg = edit("peft_type", &|c| c["peft_type"] = json!("IA3"));
    assert_contains("peft_type", &msg, &["IA3", "LORA"]);
    let msg = edit("fan_in_fan_out", &|c| c["fan_in_fan_out"] = json!(true));
    assert_contains("fan_in_fan_out", &msg, &["fan_in_fan_out"]);
    let msg = edit("bias", &|c| c["bias"] = json!("all"));
    assert_contains("bias", &msg, &["bias"]);
    let msg = edit("modules_to_save", &|c| c["modules_to_save"] = json!(["lm_head"]));
    assert_contains("modules_to_save", &msg, &["modules_to_save", "lm_head", "holds no tensors"]);
    let msg = edit("r = 0", &|c| c["r"] = json!(0));
    assert_contains("r = 0", &msg, &["r must be > 0"]);
    // A different r than the weights were saved with: a shape error naming the key and both shapes.
    let msg = edit("r = 4", &|c| c["r"] = json!(4));
    assert_contains("r = 4", &msg, &["adapter_model.safetensors", "lora_A", "[4, ", "[8, "]);
    let msg = edit("r missing", &|c| {
        c.as_object_mut().unwrap().remove("r");
    });
    assert_contains("r missing", &msg, &["adapter_config.json", "`r`"]);

    // Not JSON at all / missing.
    let a = adapter_copy(SINGLE);
    std::fs::write(a.path().join("adapter_config.json"), "not json").unwrap();
    let (_, msg) = adapter_err(&model, "adapter_config.json not JSON", a.path());
    assert_contains("adapter_config.json not JSON", &msg, &["adapter_config.json"]);
    std::fs::remove_file(a.path().join("adapter_config.json")).unwrap();
    let (_, msg) = adapter_err(&model, "no adapter_config.json", a.path());
    assert_contains("no adapter_config.json", &msg, &["adapter_config.json"]);

    // Not a directory.
    let t = TempDir::new("no-adapter");
    let (_, msg) = adapter_err(&model, "adapter dir does not exist", &t.path().join("nope"));
    assert_contains("adapter dir does not exist", &msg, &["nope", "not a directory"]);
}

#[test]
fn adapter_weight_problems() {
    let model = single_model();
    let edit = |tag: &str, f: &dyn Fn(&mut StFile)| -> String {
        let a = adapter_copy(SINGLE);
        let p = a.path().join("adapter_model.safetensors");
        let mut st = StFile::read(&p);
        f(&mut st);
        st.write(&p);
        let (_, msg) = adapter_err(&model, tag, a.path());
        msg
    };

    // Keys without the PEFT prefix (which key is reported first depends on hash order: check only its form).
    let msg = edit("keys without base_model.model.", &|st| {
        for t in &mut st.tensors {
            t.name = t.name.trim_start_matches("base_model.model.").to_string();
        }
    });
    assert_contains(
        "keys without base_model.model.",
        &msg,
        &["adapter_model.safetensors", "base_model.model.", ".lora_"],
    );

    // lora_A without its lora_B.
    let b_key = "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let msg = edit("lora_A without lora_B", &|st| st.remove(b_key));
    assert_contains(
        "lora_A without lora_B",
        &msg,
        &["adapter_model.safetensors", "language_model.model.layers.0.self_attn.q_proj", "lora_A/lora_B"],
    );

    // A key that is neither lora_A nor lora_B (e.g. a DoRA magnitude vector).
    let msg = edit("lora_magnitude_vector", &|st| {
        st.tensors.push(Tensor {
            name: "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
            dtype: "F32".into(),
            shape: vec![32],
            data: f32_bytes(32),
        })
    });
    assert_contains("lora_magnitude_vector", &msg, &["adapter_model.safetensors", "lora_magnitude_vector"]);

    // Wrong shape of one lora_B.
    let msg = edit("lora_B shape", &|st| {
        let t = st.get_mut(b_key);
        assert_eq!(t.shape, vec![32, 8]);
        t.shape = vec![8, 32];
    });
    assert_contains("lora_B shape", &msg, &[b_key, "adapter_model.safetensors", "[8, 32]", "[32, 8]"]);

    // Unsupported dtype in the adapter.
    let msg = edit("I64 lora_B", &|st| {
        let t = st.get_mut(b_key);
        t.dtype = "I64".into();
        t.data = vec![0; 32 * 8 * 8];
    });
    assert_contains("I64 lora_B", &msg, &[b_key, "adapter_model.safetensors", "I64"]);

    // NaN weights.
    let msg = edit("NaN weights", &|st| {
        let t = st.get_mut(b_key);
        t.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_contains("NaN weights", &msg, &["adapter_model.safetensors", "NaN"]);

    // No tensors at all.
    let msg = edit("empty adapter", &|st| st.tensors.clear());
    assert_contains("empty adapter", &msg, &["adapter_model.safetensors", "no LoRA weights"]);

    // Truncated adapter file.
    let a = adapter_copy(SINGLE);
    let p = a.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (_, msg) = adapter_err(&model, "truncated adapter", a.path());
    assert_contains("truncated adapter", &msg, &["adapter_model.safetensors", "truncated or corrupt"]);

    // No weights file.
    std::fs::remove_file(&p).unwrap();
    let (_, msg) = adapter_err(&model, "no adapter weights", a.path());
    assert_contains("no adapter weights", &msg, &["adapter_model.safetensors"]);
}

// -- input ids ----------------------------------------------------------------------------------------------

#[test]
fn bad_input_ids_via_logprobs() {
    let model = single_model();
    let exp = expected(SINGLE);
    let good = ids(&exp["input_ids"]);
    let img = model.image_token_id().unwrap();
    assert_eq!(img, 64);
    let pixels = model.load_image(&fixtures().join(SINGLE).join("image.png")).unwrap();
    let vocab = model.llm.cfg.vocab_size;
    assert_eq!(vocab, 96);

    let lp = |what: &str, ids: &[u32], with_image: bool| -> String {
        let e = expect_err(what, || model.logprobs(ids, if with_image { Some(&pixels) } else { None }, None));
        assert!(matches!(e, EngineError::Input(_)), "{what}: {e:?}");
        e.to_string()
    };

    let mut bad = good.clone();
    bad[5] = vocab as u32;
    let msg = lp("id == vocab", &bad, true);
    assert_contains("id == vocab", &msg, &["96", "position 5", "vocabulary"]);
    bad[5] = u32::MAX;
    let msg = lp("id == u32::MAX", &bad, true);
    assert_contains("id == u32::MAX", &msg, &[&u32::MAX.to_string(), "vocabulary"]);

    let mut twice = good.clone();
    twice.insert(6, img);
    let msg = lp("image token twice", &twice, true);
    assert_contains("image token twice", &msg, &["image token", "2 times"]);

    let msg = lp("image token, no image", &good, false);
    assert_contains("image token, no image", &msg, &["image token", "no image"]);

    let no_token: Vec<u32> = good.iter().copied().filter(|&t| t != img).collect();
    let msg = lp("image, no image token", &no_token, true);
    assert_contains("image, no image token", &msg, &["no image token"]);

    for short in [vec![], vec![1u32]] {
        let msg = lp("fewer than 2 ids", &short, false);
        assert_contains("fewer than 2 ids", &msg, &["at least 2"]);
    }

    // Text-only model: out-of-vocabulary id, and pixels given to a model with no vision tower.
    let text = Model::load(&fixtures().join(TEXT_ONLY).join("model")).unwrap();
    let tv = text.llm.cfg.vocab_size as u32;
    let e = expect_err("text-only id >= vocab", || text.logprobs(&[1, 3, tv], None, None));
    assert_contains("text-only id >= vocab", &e.to_string(), &[&tv.to_string(), "vocabulary"]);
    let e = expect_err("text-only with pixels", || text.logprobs(&[1, 3, 5], Some(&pixels), None));
    assert_contains("text-only with pixels", &e.to_string(), &["no vision tower"]);

    // The model is still fine after all that.
    let got = model.logprobs(&good, Some(&pixels), None).unwrap();
    assert!(max_abs_diff(&got, &floats(&exp["logprobs"])) <= 1e-3);
}

// -- nothing half-done --------------------------------------------------------------------------------------

fn snapshot(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut v: Vec<(String, u64, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), bytes.len() as u64, bytes)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn failed_load_leaves_directory_untouched_and_a_retry_works() {
    let exp = expected(SHARDED);
    let m = model_copy(SHARDED);
    let shard = m.path().join("model-00002-of-00002.safetensors");
    let keep = TempDir::new("shard-backup");
    let backup = keep.path().join("shard");
    std::fs::rename(&shard, &backup).unwrap();
    let before = snapshot(m.path());
    for _ in 0..2 {
        let (_, msg) = load_err("missing shard", m.path());
        assert_contains("missing shard", &msg, &["model-00002-of-00002.safetensors"]);
    }
    assert!(snapshot(m.path()) == before, "a failed load changed the model directory");

    // Putting the shard back makes the very same directory load and score correctly: no stale state.
    std::fs::rename(&backup, &shard).unwrap();
    let model = no_panic("reload after fix", || Model::load(m.path())).expect("load after restoring the shard");
    let pixels = model.load_image(&fixtures().join(SHARDED).join("image.png")).unwrap();
    let got = model.logprobs(&ids(&exp["input_ids"]), Some(&pixels), None).unwrap();
    let d = max_abs_diff(&got, &floats(&exp["logprobs"]));
    assert!(d <= 1e-3, "log-probs after a failed load differ by {d}");

    // Same for a half-broken file that is later repaired in place.
    let p = m.path().join("model-00001-of-00002.safetensors");
    let good = std::fs::read(&p).unwrap();
    std::fs::write(&p, &good[..good.len() - 7]).unwrap();
    load_err("truncated shard", m.path());
    std::fs::write(&p, &good).unwrap();
    let model2 = Model::load(m.path()).expect("load after repairing the shard");
    let got2 = model2.logprobs(&ids(&exp["input_ids"]), Some(&pixels), None).unwrap();
    assert_eq!(got, got2, "reloading the repaired checkpoint gives different log-probs");
}

#[test]
fn failed_adapter_load_leaves_the_model_and_other_adapters_intact() {
    let model = single_model();
    let exp = expected(SINGLE);
    let input = ids(&exp["input_ids"]);
    let pixels = model.load_image(&fixtures().join(SINGLE).join("image.png")).unwrap();
    let base_before = model.logprobs(&input, Some(&pixels), None).unwrap();
    let good = model.load_adapter(&fixtures().join(SINGLE).join("adapter")).unwrap();
    let with_before = model.logprobs(&input, Some(&pixels), Some(&good)).unwrap();

    // Several adapters that fail part-way through (after some modules were already read).
    let other = expect_err("other base", || model.load_adapter(&fixtures().join(OTHER_BASE).join("adapter")));
    assert!(
        matches!(other, EngineError::Adapter { .. }) && other.to_string().contains("different base model"),
        "{other:?}"
    );
    let a = adapter_copy(SINGLE);
    let p = a.path().join("adapter_model.safetensors");
    let mut st = StFile::read(&p);
    // The last module in key order gets a wrong shape, so every module before it loads first.
    let last = st.tensors.iter().map(|t| t.name.clone()).filter(|n| n.ends_with("lora_B.weight")).max().unwrap();
    st.get_mut(&last).shape.reverse();
    st.write(&p);
    let e = expect_err("last module bad", || model.load_adapter(a.path()));
    assert_contains("last module bad", &e.to_string(), &[&last]);

    let base_after = model.logprobs(&input, Some(&pixels), None).unwrap();
    let with_after = model.logprobs(&input, Some(&pixels), Some(&good)).unwrap();
    assert_eq!(base_before, base_after, "a failed adapter load changed the base model");
    assert_eq!(with_before, with_after, "a failed adapter load changed another adapter");
    assert!(max_abs_diff(&base_after, &floats(&exp["logprobs"])) <= 1e-3);
    assert!(max_abs_diff(&with_after, &floats(&exp["logprobs_adapter"])) <= 1e-3);
}
