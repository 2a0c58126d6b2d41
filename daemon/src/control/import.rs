//! `import-prompts`: a JSONL file of prompts validated whole (JSON, the question against the model's context, every
//! image decoded) and stored in one transaction, all or nothing. Files are read only when they are regular files
//! within a size cap and a read timeout, their real path (symlinks resolved) inside the allowed folder; no error
//! shows a file's bytes.

use crate::serve::Daemon;
use crate::store;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most prompts one `import-prompts` file may hold.
pub const MAX_IMPORT: usize = 100_000;

/// Largest prompts file `import-prompts` reads.
pub const MAX_IMPORT_BYTES: u64 = 64 << 20;

/// Largest image file a prompts file may name.
pub const MAX_IMPORT_IMAGE_BYTES: u64 = 32 << 20;

/// Most image bytes one import holds in memory before it stores them (distinct files and repeats alike).
pub const MAX_IMPORT_TOTAL_IMAGE_BYTES: u64 = 512 << 20;

/// How long reading one named file may take.
pub const FILE_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A prompts file's image path: relative, inside the file's directory (no `..`, no absolute paths). Symlinks
/// are resolved when the file is read (`read_named_file`) and must stay inside too.
pub(crate) fn image_path(base: &Path, rel: &str, line: usize, file: &Path) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        bail!(
            "{} line {line}: image {rel:?} must be a path inside the file's directory (no absolute paths, no ..)",
            file.display()
        );
    }
    Ok(base.join(p))
}

/// Reads a file a control command names: its real path (symlinks resolved) inside `inside` when given, a regular
/// file (not a FIFO, device, socket or directory), at most `max` bytes, within `FILE_READ_TIMEOUT`. Returns the
/// real path and the bytes; errors name the path and never show the file's content.
pub async fn read_named_file(path: &Path, inside: Option<&Path>, max: u64) -> Result<(PathBuf, Vec<u8>)> {
    let (p, dir) = (path.to_path_buf(), inside.map(Path::to_path_buf));
    let task = tokio::task::spawn_blocking(move || read_named_file_now(&p, dir.as_deref(), max));
    match tokio::time::timeout(FILE_READ_TIMEOUT, task).await {
        Err(_) => bail!(
            "{}: not read within {} s (a stalled filesystem?); nothing changed",
            path.display(),
            FILE_READ_TIMEOUT.as_secs()
        ),
        Ok(Err(e)) => bail!("{}: reading failed: {e}", path.display()),
        Ok(Ok(r)) => r,
    }
}

pub(crate) fn read_named_file_now(path: &Path, inside: Option<&Path>, max: u64) -> Result<(PathBuf, Vec<u8>)> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let real = std::fs::canonicalize(path).with_context(|| format!("cannot find {}", path.display()))?;
    if let Some(dir) = inside {
        let dir = std::fs::canonicalize(dir).with_context(|| format!("cannot find the folder {}", dir.display()))?;
        if !real.starts_with(&dir) {
            bail!(
                "{} resolves to {}, outside {}: files must stay inside that folder (symlinks included)",
                path.display(),
                real.display(),
                dir.display()
            );
        }
    }
    // Non-blocking open: a FIFO never waits for a writer; no-follow: the resolved path cannot be swapped for a link.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&real)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        bail!("{} is {kind}: name a regular file", path.display());
    }
    if meta.len() > max {
        bail!("{} is {} bytes, more than the limit of {max} bytes", path.display(), meta.len());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} grew past the limit of {max} bytes while it was read", path.display());
    }
    Ok((real, bytes))
}

pub(crate) async fn import_prompts(d: &Arc<Daemon>, file: &Path) -> Result<Value> {
    if !file.is_absolute() {
        bail!(
            "import-prompts: {} is not an absolute path (`rlaifd ctl` makes it absolute; raw clients must)",
            file.display()
        );
    }
    let cfg = d.config();
    let root = Some(cfg.control.import_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    let (real, text) = read_named_file(file, root, MAX_IMPORT_BYTES).await.context("import-prompts")?;
    let text = String::from_utf8(text).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", file.display()))?;
    // Images must stay inside the prompts file's (real) folder.
    let base = real.parent().unwrap_or(Path::new("/")).to_path_buf();
    let (e, max_side) = (&d.engine, cfg.server.max_image_side);
    let ctx = e.model.context_len();
    // Validate every line (and decode every image) before storing anything.
    let mut rows = Vec::new();
    let mut image_bytes = 0u64;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if rows.len() >= MAX_IMPORT {
            bail!("{}: more than {MAX_IMPORT} prompts; split the file", file.display());
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{} line {n}: not valid JSON: {e}", file.display()))?;
        let q = v
            .get("question")
            .and_then(|q| q.as_str())
            .filter(|q| !q.trim().is_empty())
            .with_context(|| format!("{} line {n}: missing \"question\" (non-empty text)", file.display()))?;
        let split = v.get("split").and_then(|s| s.as_str()).unwrap_or("train");
        if !matches!(split, "train" | "heldout") {
            bail!("{} line {n}: \"split\" must be train or heldout", file.display());
        }
        let image = match v.get("image").and_then(|x| x.as_str()) {
            Some(rel) => {
                let p = image_path(&base, rel, n, file)?;
                let (_, bytes) = read_named_file(&p, Some(&base), MAX_IMPORT_IMAGE_BYTES)
                    .await
                    .with_context(|| format!("{} line {n}: image", file.display()))?;
                image_bytes += bytes.len() as u64;
                if image_bytes > MAX_IMPORT_TOTAL_IMAGE_BYTES {
                    bail!("{}: its images add up to more than {MAX_IMPORT_TOTAL_IMAGE_BYTES} bytes by line {n}; split the file", file.display());
                }
                let what = p.display().to_string();
                // Refused from the header (side over server.max_image_side) before any pixel is decoded.
                let bytes = tokio::task::spawn_blocking(move || {
                    engine::image::decode_rgb8_within(&bytes, &what, max_side).map(|_| bytes)
                })
                .await
                .context("image decode task")?
                .with_context(|| format!("{} line {n}", file.display()))?;
                Some(bytes)
            }
            None => None,
        };
        // The question must leave room for an answer in the model's context (checked on the bytes first).
        let too_long = || {
            anyhow::anyhow!("{} line {n}: the question does not fit the model's context of {ctx} tokens with room for an answer; shorten it", file.display())
        };
        if q.len() > ctx.saturating_mul(crate::http::MAX_PROMPT_BYTES_PER_TOKEN) {
            return Err(too_long());
        }
        let template =
            if image.is_some() { engine::tokenizer::LLAVA_15_TEMPLATE } else { engine::tokenizer::TEXT_TEMPLATE };
        let ids = e
            .tok
            .encode_chat(template, q)
            .with_context(|| format!("{} line {n}: the question cannot be tokenized", file.display()))?;
        if e.model.prompt_positions(&ids) >= ctx {
            return Err(too_long());
        }
        rows.push((image, q.to_string(), split.to_string()));
    }
    if rows.is_empty() {
        bail!(
            "{} holds no prompts (one JSON object per line: {{\"image\": path, \"question\": text}})",
            file.display()
        );
    }
    let mut tx = d.pool.begin().await?;
    let before: i64 = store::count_all_prompts(&mut *tx).await?;
    for (image, q, split) in &rows {
        let sha = match image {
            Some(b) => Some(store::insert_image(&mut *tx, b).await?),
            None => None,
        };
        store::insert_prompt(
            &mut *tx,
            &store::NewPrompt {
                image_sha256: sha,
                instruction: q.clone(),
                source: format!("import:{}", file.display()),
                split: split.clone(),
                ground_truth: None,
            },
        )
        .await?;
    }
    let after: i64 = store::count_all_prompts(&mut *tx).await?;
    tx.commit().await?;
    Ok(
        json!({ "file": file.display().to_string(), "lines": rows.len(), "imported": after - before, "duplicates": rows.len() as i64 - (after - before) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_stay_inside_the_prompts_folder() {
        assert!(image_path(Path::new("/data"), "../etc/passwd", 1, Path::new("/data/p.jsonl")).is_err());
        assert!(image_path(Path::new("/data"), "/etc/passwd", 1, Path::new("/data/p.jsonl")).is_err());
        assert_eq!(
            image_path(Path::new("/data"), "img/a.png", 1, Path::new("/data/p.jsonl")).unwrap(),
            PathBuf::from("/data/img/a.png")
        );
    }

    #[tokio::test]
    async fn named_files_must_be_regular_bounded_and_inside_their_folder() {
        let d = std::env::temp_dir().join(format!("rlaifd-named-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("in")).unwrap();
        std::fs::write(d.join("in/a.jsonl"), "{}").unwrap();
        std::fs::write(d.join("out.jsonl"), "secret").unwrap();
        std::os::unix::fs::symlink(d.join("out.jsonl"), d.join("in/link.jsonl")).unwrap();
        let inside = Some(d.join("in"));
        let (real, bytes) = read_named_file(&d.join("in/a.jsonl"), inside.as_deref(), 10).await.unwrap();
        assert_eq!((real, bytes), (std::fs::canonicalize(d.join("in/a.jsonl")).unwrap(), b"{}".to_vec()));
        let e = format!("{:#}", read_named_file(&d.join("in/link.jsonl"), inside.as_deref(), 10).await.unwrap_err());
        assert!(e.contains("outside") && !e.contains("secret"), "{e}");
        let e = format!("{:#}", read_named_file(&d.join("in/../out.jsonl"), inside.as_deref(), 10).await.unwrap_err());
        assert!(e.contains("outside"), "{e}");
        let e = format!("{:#}", read_named_file(&d.join("in/a.jsonl"), inside.as_deref(), 1).await.unwrap_err());
        assert!(e.contains("more than the limit of 1 bytes"), "{e}");
        let e = format!("{:#}", read_named_file(Path::new("/dev/null"), None, 10).await.unwrap_err());
        assert!(e.contains("a device"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }
}
