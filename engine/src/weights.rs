//! Memory-mapped safetensors checkpoints, single-file or sharded, with F32/F16/BF16 converted to f32.

use crate::error::{EngineError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

struct TensorInfo {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's mmap.
    start: usize,
    len: usize,
}

/// All tensors of a checkpoint, addressed by their state-dict key.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorInfo>,
    /// What was opened, for error messages.
    source: String,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    // SAFETY: the mapping is read-only; checkpoints are treated as immutable while loaded.
    unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))
}

impl WeightStore {
    /// Drops the pages of the mapped files from this process's memory (they are read again from the files on the
    /// next access): a `Model` keeps its store open for a device backend to upload from, without holding a
    /// second copy of the weights resident. Advisory; an error is ignored.
    pub fn release_pages(&self) {
        for (_, m) in &self.files {
            // SAFETY: read-only file mappings: after MADV_DONTNEED a read faults the page in from the file again,
            // so no content is lost, and nothing holds a reference into the pages across this call.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Opens `DIR/model.safetensors`, or the shards listed in `DIR/model.safetensors.index.json`.
    /// `stem` is the file stem, e.g. "model" or "adapter_model".
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            Self::open_sharded(&index)
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            let mut hint = String::new();
            if dir.join("pytorch_model.bin").exists() || dir.join("adapter_model.bin").exists() {
                hint = " (PyTorch .bin checkpoints are not supported: convert them to safetensors)".into();
            }
            Err(EngineError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "neither {stem}.safetensors nor {stem}.safetensors.index.json exists in {}{hint}",
                        dir.display()
                    ),
                ),
            })
        }
    }

    /// Opens a sharded checkpoint through its index (`{"weight_map": {key: shard file}}`).
    pub fn open_sharded(index_path: &Path) -> Result<Self> {
        let index: serde_json::Value = crate::error::read_json(index_path)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::config(index_path, "missing object \"weight_map\""))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names = BTreeSet::new();
        for (key, file) in map {
            let name = file
                .as_str()
                .ok_or_else(|| EngineError::config(index_path, format!("weight_map[\"{key}\"] must be a file name")))?;
            if name.contains("..") || Path::new(name).is_absolute() {
                return Err(EngineError::config(
                    index_path,
                    format!("weight_map[\"{key}\"] = \"{name}\" must be a file inside the checkpoint directory"),
                ));
            }
            shard_names.insert(name.to_string());
        }
        let paths: Vec<PathBuf> = shard_names.iter().map(|n| dir.join(n)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(EngineError::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("shard listed in {} is missing; the download is incomplete", index_path.display()),
                    ),
                });
            }
        }
        let mut store = Self::open_files(&paths)?;
        store.source = index_path.display().to_string();
        // Every key the index promises must be in the shard it names.
        for (key, file) in map {
            let want = dir.join(file.as_str().unwrap_or_default());
            match store.tensors.get(key) {
                Some(info) if store.files[info.file].0 == want => {}
                _ => {
                    return Err(EngineError::Safetensors {
                        path: want,
                        msg: format!("{} says it holds `{key}`, but it does not", index_path.display()),
                    })
                }
            }
        }
        Ok(store)
    }

    /// Opens one or more safetensors files as one key space (keys must be unique across files).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| EngineError::Safetensors {
                path: path.clone(),
                msg: format!("{e} (the file is truncated or corrupt; download it again)"),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let info = TensorInfo {
                    file: fi,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start: data.as_ptr() as usize - base,
                    len: data.len(),
                };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(EngineError::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor `{name}` appears in more than one file"),
                    });
                }
            }
            files.push((path.clone(), mmap));
        }
        let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(WeightStore { files, tensors, source })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file a key lives in (for error messages).
    pub fn path_of(&self, key: &str) -> Option<&Path> {
        self.tensors.get(key).map(|t| self.files[t.file].0.as_path())
    }

    fn info(&self, key: &str) -> Result<&TensorInfo> {
        self.tensors.get(key).ok_or_else(|| {
            // Point at near misses: same suffix under another prefix usually means an unexpected key layout.
            let tail = key.rsplit('.').take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(".");
            let mut similar: Vec<&str> = self.keys().filter(|k| k.ends_with(&tail)).take(3).collect();
            similar.sort();
            let hint = if similar.is_empty() { String::new() } else { format!("; similar keys present: {similar:?}") };
            EngineError::MissingTensor { key: key.to_string(), searched: self.source.clone(), hint }
        })
    }

    /// Loads `key` as f32, checking its shape against `expected`.
    pub fn f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(key)?;
        let path = &self.files[info.file].0;
        if info.shape != expected {
            return Err(EngineError::Shape {
                path: path.clone(),
                key: key.into(),
                expected: expected.to_vec(),
                got: info.shape.clone(),
            });
        }
        self.f32_any_shape(key)
    }

    /// Loads a (n, k) matrix packed for the matmul kernel; with `keep_16bit`, F16/BF16 tensors stay 16-bit.
    pub fn packed(&self, key: &str, n: usize, k: usize, keep_16bit: bool) -> Result<crate::ops::PackedMatrix> {
        use crate::ops::PackedMatrix;
        let info = self.info(key)?;
        let (path, mmap) = &self.files[info.file];
        if info.shape != [n, k] {
            return Err(EngineError::Shape {
                path: path.clone(),
                key: key.into(),
                expected: vec![n, k],
                got: info.shape.clone(),
            });
        }
        let bytes = &mmap[info.start..info.start + info.len];
        Ok(match (info.dtype, keep_16bit) {
            (Dtype::BF16, true) => {
                let v: Vec<half::bf16> =
                    bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect();
                PackedMatrix::from_bf16(&v, n, k)
            }
            (Dtype::F16, true) => {
                let v: Vec<half::f16> = bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
                PackedMatrix::from_f16(&v, n, k)
            }
            _ => PackedMatrix::from_f32(&self.f32_any_shape(key)?, n, k),
        })
    }

    /// Loads `key` as f32 whatever its shape.
    pub fn f32_any_shape(&self, key: &str) -> Result<Vec<f32>> {
        let info = self.info(key)?;
        let (path, mmap) = &self.files[info.file];
        let bytes = &mmap[info.start..info.start + info.len];
        Ok(match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(EngineError::Dtype { path: path.clone(), key: key.into(), dtype: format!("{other:?}") })
            }
        })
    }
}

/// f32 tensors serialized as a safetensors file image. `what` names the destination in errors.
pub fn f32_safetensors_bytes(what: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| EngineError::Safetensors { path: what.into(), msg: format!("tensor `{name}`: {e}") })?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, None).map_err(|e| EngineError::Safetensors { path: what.into(), msg: e.to_string() })
}

/// Writes f32 tensors to a safetensors file atomically (temp file in the same directory, fsync, rename), so
/// a crash never leaves a half-written file under `path`.
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    use std::io::Write;
    let data = f32_safetensors_bytes(path, tensors)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("out"), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::write(path, e)
    })
}
