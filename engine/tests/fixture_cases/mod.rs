//! Shared by the family parity tests (next_parity, qwen_parity): the cases a fixture generator listed in its
//! `manifest.json`, each with its directory and `expected.json`.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

/// `tests/fixtures/<set>` of the repository.
pub fn fixtures(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(set)
}

/// (name, directory, expected.json) of every case in `tests/fixtures/<set>/manifest.json`; at least `min` of them.
pub fn cases(set: &str, min: usize) -> Vec<(String, PathBuf, Value)> {
    let root = fixtures(set);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).expect("manifest.json"))
            .expect("manifest json");
    let out: Vec<_> = manifest
        .as_array()
        .expect("case list")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_string();
            let dir = root.join(&name);
            let exp: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"))
                    .expect("json");
            (name, dir, exp)
        })
        .collect();
    assert!(out.len() >= min, "expected the full fixture set of {set}, found {}", out.len());
    out
}

/// Token ids of a JSON list.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
