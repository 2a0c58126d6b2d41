//! The model a user points rlaifd at: LLaVA (CLIP + projector + LLaMA) or a text-only LLaMA, loaded from a
//! Hugging Face directory in any of the llava-hf key layouts.

use crate::adapter::{Adapter, ModelFamily};
use crate::clip::ClipVision;
use crate::config::{FeatureSelect, LlavaConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::image::{ImageProcessorConfig, PixelValues};
use crate::linear::Linear;
use crate::llama::{KvCache, Llama};
use crate::ops::{apply_activation, log_softmax_rows};
use crate::weights::WeightStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where each part's keys live in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    /// e.g. "transformers-4.x", "transformers-4.52", "transformers-5", "llama"
    pub name: &'static str,
    pub text: String,
    pub lm_head: String,
    pub vision: String,
    pub projector: String,
}

impl KeyLayout {
    pub fn detect(ws: &WeightStore, llava: bool) -> Result<KeyLayout> {
        if !llava {
            return Ok(KeyLayout {
                name: "llama",
                text: "model.".into(),
                lm_head: "lm_head".into(),
                vision: String::new(),
                projector: String::new(),
            });
        }
        // Each part is looked up on its own: the eras differ in every prefix, and some saves mix them.
        let find = |cands: &[&str], probe: &str| cands.iter().find(|p| ws.contains(&format!("{p}{probe}"))).map(|p| p.to_string());
        let text = find(&["language_model.model.", "model.language_model."], "embed_tokens.weight");
        let vision = find(
            &["vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower."],
            "embeddings.patch_embedding.weight",
        );
        let projector = find(&["multi_modal_projector.", "model.multi_modal_projector."], "linear_1.weight");
        let (Some(text), Some(vision), Some(projector)) = (text.clone(), vision.clone(), projector.clone()) else {
            let missing = [("decoder (…embed_tokens.weight)", text.is_none()), ("vision tower (…embeddings.patch_embedding.weight)", vision.is_none()), ("projector (…linear_1.weight)", projector.is_none())]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::MissingTensor {
                key: missing,
                searched: ws.source().to_string(),
                hint: "; the checkpoint matches none of the llava-hf key layouts (transformers 4.x: language_model.model.*, \
                       4.52+: model.language_model.*, 5.x: model.vision_tower.* without vision_model)"
                    .into(),
            });
        };
        let name = match (text.as_str(), vision.as_str()) {
            ("language_model.model.", _) => "transformers-4.x",
            (_, "model.vision_tower.vision_model.") => "transformers-4.52",
            _ => "transformers-5",
        };
        let lm_head = if text == "language_model.model." { "language_model.lm_head" } else { "lm_head" };
        Ok(KeyLayout { name, text, lm_head: lm_head.into(), vision, projector })
    }
}

/// How to hold the weights in memory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Keep F16/BF16 checkpoint weights 16-bit (half the memory and bytes streamed per token) and widen them
    /// inside the matmul; widening is exact, so outputs are identical to converting at load. Default true.
    pub keep_16bit: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { keep_16bit: true }
    }
}

pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: crate::config::Activation,
}

pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub layout: KeyLayout,
    pub vision: Option<ClipVision>,
    pub projector: Option<Projector>,
    pub llm: Llama,
    pub image_processor: Option<ImageProcessorConfig>,
    linear_shapes: HashMap<String, (usize, usize)>,
}

impl Model {
    /// Loads config.json, the safetensors weights and (for LLaVA) preprocessor_config.json from `dir`.
    /// 16-bit weights stay 16-bit in memory (see `load_with`).
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let keep = opts.keep_16bit;
        if !dir.is_dir() {
            return Err(EngineError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model directory does not exist")));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ws = WeightStore::open_dir(dir, "model")?;
        let layout = KeyLayout::detect(&ws, config.llava().is_some())?;
        let text = config.text();
        let lm_head_key = if text.tie_word_embeddings {
            None
        } else if ws.contains(&format!("{}.weight", layout.lm_head)) {
            Some(layout.lm_head.as_str())
        } else {
            return Err(EngineError::MissingTensor {
                key: format!("{}.weight", layout.lm_head),
                searched: ws.source().to_string(),
                hint: "; config.json says tie_word_embeddings is false, so the checkpoint needs its own lm_head".into(),
            });
        };
        let llm = Llama::load(&ws, &layout.text, lm_head_key, text, keep)?;
        let (vision, projector, image_processor) = match config.llava() {
            None => (None, None, None),
            Some(lc) => {
                let vision = ClipVision::load(&ws, &layout.vision, &lc.vision, lc.vision_layers_needed(), keep)?;
                let vin = lc.vision.hidden_size;
                let c = lc.text.hidden_size;
                let projector = Projector {
                    linear_1: Linear::load(&ws, &format!("{}linear_1", layout.projector), "multi_modal_projector.linear_1".into(), vin, c, lc.projector_bias, keep)?,
                    linear_2: Linear::load(&ws, &format!("{}linear_2", layout.projector), "multi_modal_projector.linear_2".into(), c, c, lc.projector_bias, keep)?,
                    act: lc.projector_hidden_act,
                };
                let pp = dir.join("preprocessor_config.json");
                let ip = if pp.is_file() {
                    ImageProcessorConfig::from_file(&pp)?
                } else {
                    // No preprocessor_config.json: CLIP's processor at the tower's resolution.
                    let n = lc.vision.image_size as u32;
                    ImageProcessorConfig {
                        size: crate::image::ResizeSize::ShortestEdge(n),
                        crop_height: n,
                        crop_width: n,
                        ..Default::default()
                    }
                };
                let mut ip = ip;
                ip.pad_to_square |= lc.pad_to_square;
                let (h, w) = ip.output_size();
                if h != lc.vision.image_size || w != lc.vision.image_size {
                    return Err(EngineError::config(
                        &pp,
                        format!("produces {h}x{w} images but the vision tower takes {0}x{0}; fix crop_size", lc.vision.image_size),
                    ));
                }
                (Some(vision), Some(projector), Some(ip))
            }
        };
        let mut linear_shapes = HashMap::new();
        let linears = llm.linears().chain(vision.iter().flat_map(|v| v.linears())).chain(projector.iter().flat_map(|p| [&p.linear_1, &p.linear_2]));
        for l in linears {
            linear_shapes.insert(l.name.clone(), (l.in_features, l.out_features));
        }
        // Vision layers past `vision_feature_layer` are never run, but adapters trained with peft may still
        // carry LoRA weights for them (e.g. target "q_proj" matches every CLIP layer): accept and ignore them.
        if let Some(lc) = config.llava() {
            let (d, i) = (lc.vision.hidden_size, lc.vision.intermediate_size);
            for l in lc.vision_layers_needed()..lc.vision.num_hidden_layers {
                for (m, shape) in [("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)), ("mlp.fc1", (d, i)), ("mlp.fc2", (i, d))] {
                    linear_shapes.insert(format!("vision_tower.encoder.layers.{l}.{m}"), shape);
                }
            }
        }
        Ok(Model { dir: dir.to_path_buf(), config, layout, vision, projector, llm, image_processor, linear_shapes })
    }

    /// How the decoder's weights are held in memory: "f32", "bf16" or "f16".
    pub fn weight_dtype(&self) -> &'static str {
        self.llm.embed.dtype()
    }

    pub fn family(&self) -> ModelFamily {
        if self.config.llava().is_some() {
            ModelFamily::Llava
        } else {
            ModelFamily::Llama
        }
    }

    /// Loads a PEFT LoRA adapter made for this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<Adapter> {
        Adapter::load(dir, self.family(), &self.linear_shapes)
    }

    pub fn image_token_id(&self) -> Option<u32> {
        self.config.llava().map(|c| c.image_token_id)
    }

    /// Decodes and preprocesses an image file for this model.
    pub fn load_image(&self, path: &Path) -> Result<PixelValues> {
        let ip = self.image_processor.as_ref().ok_or_else(|| EngineError::Input(format!("{} is a text-only model; it takes no image", self.dir.display())))?;
        let img = crate::image::load_rgb8(path)?;
        Ok(crate::image::preprocess(&img, ip)?)
    }

    /// Projected image features (N_img, C) for the decoder.
    pub fn image_features(&self, pixels: &PixelValues, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let (Some(lc), Some(vision), Some(proj)) = (self.config.llava(), &self.vision, &self.projector) else {
            return Err(EngineError::Input("this model has no vision tower".into()));
        };
        let hidden = vision.forward(&pixels.data, lc.vision_layers_needed(), adapter)?; // (N + 1, Dv)
        let dv = lc.vision.hidden_size;
        let feats = match lc.vision_feature_select_strategy {
            FeatureSelect::Default => &hidden[dv..],
            FeatureSelect::Full => &hidden[..],
        };
        let n = feats.len() / dv;
        let mut h = proj.linear_1.apply(feats, n, adapter); // (N, C)
        apply_activation(&mut h, proj.act);
        Ok(proj.linear_2.apply(&h, n, adapter))
    }

    fn llava_cfg(&self) -> Option<&LlavaConfig> {
        self.config.llava()
    }

    /// Decoder input (T, C) for `ids`, with the single image token replaced by the image features.
    /// Returns the embeddings and, for each id, the row of its embedding (the image token's first row).
    pub fn embed_inputs(&self, ids: &[u32], image_features: Option<&[f32]>) -> Result<(Vec<f32>, Vec<usize>)> {
        let c = self.llm.cfg.hidden_size;
        let vocab = self.llm.cfg.vocab_size;
        let image_token = self.llava_cfg().map(|l| l.image_token_id);
        let n_image_tokens = ids.iter().filter(|&&t| Some(t) == image_token).count();
        match (n_image_tokens, image_features.is_some()) {
            (0, false) | (1, true) => {}
            (0, true) => return Err(EngineError::Input(format!("an image was given but the input ids hold no image token ({})", image_token.unwrap_or(0)))),
            (1, false) => return Err(EngineError::Input("the input ids hold the image token but no image was given".into())),
            (n, _) => return Err(EngineError::Input(format!("the input ids hold the image token {n} times; put it exactly once (rlaifd expands it)"))),
        }
        let mut out = Vec::with_capacity((ids.len() + 1024) * c);
        let mut rows = Vec::with_capacity(ids.len());
        for (j, &id) in ids.iter().enumerate() {
            rows.push(out.len() / c);
            if Some(id) == image_token {
                out.extend_from_slice(image_features.unwrap_or_default());
            } else if (id as usize) < vocab {
                self.llm.embed_into(&mut out, &[id]);
            } else {
                return Err(EngineError::Input(format!("token id {id} at position {j} is outside the vocabulary (size {vocab})")));
            }
        }
        Ok((out, rows))
    }

    /// log p(ids[j] | ids[..j], image) for every j >= 1 whose id is not the image token.
    pub fn logprobs(&self, ids: &[u32], pixels: Option<&PixelValues>, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(EngineError::Input("need at least 2 input ids to score".into()));
        }
        let feats = match pixels {
            Some(p) => Some(self.image_features(p, adapter)?),
            None => None,
        };
        let (mut x, rows) = self.embed_inputs(ids, feats.as_deref())?;
        let c = self.llm.cfg.hidden_size;
        let t = x.len() / c;
        let mut cache = KvCache::new(self.llm.cfg.num_hidden_layers);
        self.llm.forward_cached(&mut x, t, &mut cache, adapter);
        // Only the rows that predict a scored token need the lm_head.
        let image_token = self.image_token_id();
        let targets: Vec<(usize, u32)> =
            (1..ids.len()).filter(|&j| Some(ids[j]) != image_token).map(|j| (rows[j] - 1, ids[j])).collect();
        let mut sel = Vec::with_capacity(targets.len() * c);
        for &(r, _) in &targets {
            sel.extend_from_slice(&x[r * c..(r + 1) * c]);
        }
        let v = self.llm.cfg.vocab_size;
        let mut logits = self.llm.logits(&sel, targets.len(), adapter);
        log_softmax_rows(&mut logits, v);
        Ok(targets.iter().enumerate().map(|(i, &(_, tok))| logits[i * v + tok as usize]).collect())
    }

    /// Prefill: runs the prompt, returns its KV cache and the logits (V) of the next token.
    pub fn prefill(&self, ids: &[u32], image_features: Option<&[f32]>, adapter: Option<&Adapter>) -> Result<(KvCache, Vec<f32>)> {
        let (mut x, _) = self.embed_inputs(ids, image_features)?;
        let c = self.llm.cfg.hidden_size;
        let t = x.len() / c;
        if t == 0 {
            return Err(EngineError::Input("empty prompt".into()));
        }
        let mut cache = KvCache::new(self.llm.cfg.num_hidden_layers);
        self.llm.forward_cached(&mut x, t, &mut cache, adapter);
        let logits = self.llm.logits(&x[(t - 1) * c..], 1, adapter);
        Ok((cache, logits))
    }
}
