//! What the fuzz targets exercise (`fuzz/`, cargo-fuzz, and the stable mutation runner in
//! `daemon/tests/fuzz_smoke.rs`): each takes arbitrary bytes, runs one parser of outside input to completion and
//! must return — an error is fine, a panic, hang or abort is a bug.

use std::io::Write;

/// A safetensors file: open it as a checkpoint and read every tensor as f32.
pub fn safetensors(data: &[u8]) {
    let dir =
        std::env::temp_dir().join(format!("rlaifd-fuzz-st-{}-{:?}", std::process::id(), std::thread::current().id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let path = dir.join("model.safetensors");
    let Ok(mut f) = std::fs::File::create(&path) else { return };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    if let Ok(store) = engine::weights::WeightStore::open_files(std::slice::from_ref(&path)) {
        let keys: Vec<String> = store.keys().map(str::to_string).collect();
        for k in keys {
            let _ = store.f32_any_shape(&k);
        }
    }
}

/// One control-socket line.
pub fn control(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = crate::control::parse(line);
    }
}

/// A configuration file.
pub fn config(data: &[u8]) {
    let _ = crate::config::Config::from_toml_bytes(data);
}

/// An image: decode (PNG/JPEG, with the size limits) and preprocess as the bundled model does.
pub fn image(data: &[u8]) {
    if let Ok(img) = engine::image::decode_rgb8(data, "fuzz input") {
        // The bundled model's processor (64 px), parsed once per call: cheap next to decoding.
        let json = include_str!("../../assets/shapes-base/preprocessor_config.json");
        if let Ok(cfg) =
            engine::image::ImageProcessorConfig::from_json_str(json, "assets/shapes-base/preprocessor_config.json")
        {
            let _ = engine::image::preprocess(&img, &cfg);
        }
    }
}

/// A chat-completions request body, validated against the default server limits.
pub fn chat(data: &[u8]) {
    let cfg = crate::config::Config::from_toml_bytes(b"").expect("the embedded defaults are valid").server;
    let _ = crate::http::validate_chat_request(data, &cfg);
}

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name.
pub const TARGETS: &[(&str, Target)] =
    &[("safetensors", safetensors), ("control", control), ("config", config), ("image", image), ("chat", chat)];
