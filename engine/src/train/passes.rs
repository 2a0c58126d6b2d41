//! The training passes of the whole model on the CPU: the image path (vision tower and projector) with its
//! activations kept, the decoder over a prompt and answer, and their backward passes. The GPU trainer has the same
//! passes under the same names (`cuda_train/`): the image path (`image_forward` / `image_backward`), a whole
//! sequence (`score_train` / `score_backward`, the GPU's `SeqTape`), or a DPO pair's prompt run once
//! (`forward_prompt`) with each answer attending its keys and values (`forward_answer`) and one backward pass for
//! all three (`backward_shared`).

use crate::adapter::Adapter;
use crate::clip::TowerTape;
use crate::config::FeatureSelect;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::llama::ChunkTape;
use crate::llava::{ImageFeatures, Model};
use crate::ops::backward::{activation_bwd, logprob_gather_fwd_bwd};
use crate::ops::{add_inplace, apply_activation, log_softmax_rows, MatmulMode};
use crate::train::Grads;

/// One image's (or anyres tile's) pass through the tower and the projector, kept for the backward pass.
struct TileTape {
    vision: TowerTape,
    proj_in: Vec<f32>, // (N, Dv) selected vision features
    proj_h: Vec<f32>,  // (N, C) linear_1 output, before the activation
    proj_a: Vec<f32>,  // (N, C) after the activation
}

/// The image path's activations for the backward pass.
pub struct ImageTape {
    tiles: Vec<TileTape>,
    /// LLaVA-NeXT: for each decoder image row, the tiles' feature row it came from (None: `image_newline`).
    packing: Option<Vec<Option<usize>>>,
    /// (N, C) projected features, the decoder's image rows (with Qwen2-VL's merged grid).
    pub features: ImageFeatures,
    /// Qwen2-VL's vision transformer, when an adapter trains it.
    qwen: Option<crate::qwen_vit::QwenVisionTape>,
}

/// The answer rows' head: the hidden rows that predict the answer's tokens, their logits and log-probs.
struct Head {
    targets: Vec<u32>,
    sel: Vec<f32>,    // (A, C) hidden rows before the final norm
    logits: Vec<f32>, // (A, V)
    /// log p of each answer token.
    token_logps: Vec<f32>,
}

impl Head {
    fn forward(model: &Model, sel: Vec<f32>, targets: Vec<u32>, adapter: Option<&Adapter>) -> Head {
        let logits = model.llm.head_forward(&sel, adapter);
        let v = model.llm.cfg.vocab_size;
        let mut lp = logits.clone();
        log_softmax_rows(&mut lp, v);
        let token_logps = targets.iter().enumerate().map(|(i, &tok)| lp[i * v + tok as usize]).collect();
        Head { targets, sel, logits, token_logps }
    }

    fn logp_sum(&self) -> f64 {
        self.token_logps.iter().map(|&v| v as f64).sum()
    }

    /// d sel (A, C) for the loss gradient `d_logp_sum` = dL / d(Σ answer log-probs).
    fn backward(
        &self,
        model: &Model,
        d_logp_sum: f32,
        adapter: Option<&Adapter>,
        grads: Option<&mut Grads>,
    ) -> Vec<f32> {
        let v = model.llm.cfg.vocab_size;
        let mut dlogits = vec![0f32; self.logits.len()];
        let dlogp = vec![d_logp_sum; self.targets.len()];
        logprob_gather_fwd_bwd(&mut dlogits, &self.logits, &self.targets, &dlogp, v);
        model.llm.head_backward(&self.sel, &dlogits, adapter, grads)
    }
}

/// One prompt + answer sequence scored under the policy, with its tape.
pub struct ScoredSeq {
    tape: ChunkTape,
    /// Rows (expanded positions) whose logits predict the answer tokens.
    rows: Vec<usize>,
    head: Head,
    /// (first row, count) of the image features inside the sequence.
    image_rows: Option<(usize, usize)>,
    /// All ids of the sequence and the row of each (for the embedding gradient).
    ids: Vec<u32>,
    id_rows: Vec<usize>,
}

impl ScoredSeq {
    pub fn logp_sum(&self) -> f64 {
        self.head.logp_sum()
    }

    /// log p of each answer token.
    pub fn token_logps(&self) -> &[f32] {
        &self.head.token_logps
    }

    /// The image rows (N, C) of a d-embeddings buffer (T, C) of this sequence.
    pub fn image_rows_grad(&self, d_embeds: &[f32]) -> Vec<f32> {
        image_rows_grad(self.image_rows, d_embeds, self.tape.rows)
    }
}

fn image_rows_grad(image_rows: Option<(usize, usize)>, d_embeds: &[f32], rows: usize) -> Vec<f32> {
    let c = d_embeds.len() / rows.max(1);
    match image_rows {
        Some((start, n)) => d_embeds[start * c..(start + n) * c].to_vec(),
        None => Vec::new(),
    }
}

/// A prompt's forward pass (image rows included), shared by the answers scored after it.
pub struct PromptTape {
    chunk: ChunkTape,
    image_rows: Option<(usize, usize)>,
    ids: Vec<u32>,
    id_rows: Vec<usize>,
}

impl PromptTape {
    /// The image rows (N, C) of the prompt's d embeddings (T, C).
    pub fn image_rows_grad(&self, d_embeds: &[f32]) -> Vec<f32> {
        image_rows_grad(self.image_rows, d_embeds, self.chunk.rows)
    }
}

/// An answer's forward pass after a shared prompt.
pub struct AnswerTape {
    chunk: ChunkTape,
    /// Rows: the prompt's last row, then the answer's but its last.
    head: Head,
    ids: Vec<u32>,
}

impl AnswerTape {
    pub fn logp_sum(&self) -> f64 {
        self.head.logp_sum()
    }
}

impl Model {
    /// Adds the embedding rows' gradients of `ids` (rows `id_rows` of `d_embeds`, the image token skipped) into
    /// the embedding table's gradient, when the run trains it.
    fn embed_backward(&self, ids: &[u32], id_rows: &[usize], d_embeds: &[f32], grads: Option<&mut Grads>) {
        if let Some(table) = grads.and_then(|g| g.param_mut("language_model.embed_tokens.weight")) {
            let c = self.llm.cfg.hidden_size;
            let image = self.image_token_id();
            for (&id, &row) in ids.iter().zip(id_rows) {
                if Some(id) != image {
                    add_inplace(&mut table[id as usize * c..(id as usize + 1) * c], &d_embeds[row * c..(row + 1) * c]);
                }
            }
        }
    }

    /// Scores prompt + answer with the decoder, keeping what `score_backward` needs.
    pub fn score_train(
        &self,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<ScoredSeq> {
        let (x, rows, targets, image_rows, ids, id_rows) =
            self.answer_rows(prompt, answer, feats.map(|f| &f.rows[..]))?;
        let at = self.rope_positions(&ids, feats);
        let tape = self.llm.forward_chunk_at(x, None, at, adapter);
        let c = self.llm.cfg.hidden_size;
        let sel: Vec<f32> = rows.iter().flat_map(|&r| tape.x_final[r * c..(r + 1) * c].iter().copied()).collect();
        let head = Head::forward(self, sel, targets, adapter);
        Ok(ScoredSeq { tape, rows, head, image_rows, ids, id_rows })
    }

    /// Backward of `score_train` for the loss gradient `d_logp_sum` = dL / d(Σ answer log-probs). Returns
    /// d embeddings (T, C); LoRA gradients accumulate into `grads`.
    pub fn score_backward(
        &self,
        seq: &ScoredSeq,
        d_logp_sum: f32,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) -> Result<Vec<f32>> {
        let c = self.llm.cfg.hidden_size;
        let dsel = seq.head.backward(self, d_logp_sum, adapter, grads.as_deref_mut());
        let mut d_final = vec![0f32; seq.tape.rows * c];
        for (i, &row) in seq.rows.iter().enumerate() {
            add_inplace(&mut d_final[row * c..(row + 1) * c], &dsel[i * c..(i + 1) * c]);
        }
        let d_embeds = self.llm.backward(&seq.tape, d_final, adapter, grads.as_deref_mut());
        self.embed_backward(&seq.ids, &seq.id_rows, &d_embeds, grads);
        Ok(d_embeds)
    }

    /// A prompt's decoder pass (ids with the image token once when `feats` is given), kept for `forward_answer`
    /// and `backward_shared`.
    pub fn forward_prompt(
        &self,
        prompt: &[u32],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<PromptTape> {
        if prompt.is_empty() {
            return Err(EngineError::Input("empty prompt".into()));
        }
        let (x, id_rows) = self.embed_inputs(prompt, feats.map(|f| &f.rows[..]))?;
        let image_rows = self.image_token_id().and_then(|it| prompt.iter().position(|&t| t == it)).map(|p| {
            let n = feats.map_or(0, |f| f.len() / self.llm.cfg.hidden_size);
            (id_rows[p], n)
        });
        let at = self.rope_positions(prompt, feats);
        let chunk = self.llm.forward_chunk_at(x, None, at, adapter);
        Ok(PromptTape { chunk, image_rows, ids: prompt.to_vec(), id_rows })
    }

    /// An answer's decoder pass after `prompt` (its rows attend the prompt's keys and values), with the log-probs
    /// of its tokens.
    pub fn forward_answer(&self, prompt: &PromptTape, answer: &[u32], adapter: Option<&Adapter>) -> Result<AnswerTape> {
        if answer.is_empty() {
            return Err(EngineError::Input("the answer must not be empty".into()));
        }
        if let Some(&tok) = answer.iter().find(|&&t| Some(t) == self.image_token_id()) {
            return Err(EngineError::Input(format!("answer holds the image token {tok}")));
        }
        let (x, _) = self.embed_inputs(answer, None)?;
        let chunk = self.llm.forward_chunk(x, Some(&prompt.chunk), adapter);
        let c = self.llm.cfg.hidden_size;
        let (p, a) = (prompt.chunk.rows, chunk.rows);
        let mut sel = Vec::with_capacity(a * c);
        sel.extend_from_slice(&prompt.chunk.x_final[(p - 1) * c..p * c]);
        sel.extend_from_slice(&chunk.x_final[..(a - 1) * c]);
        let head = Head::forward(self, sel, answer.to_vec(), adapter);
        Ok(AnswerTape { chunk, head, ids: answer.to_vec() })
    }

    /// Backward of a prompt and the answers scored after it, each answer with its loss gradient `d_logp_sum`.
    /// Returns the prompt's d embeddings (T, C); gradients accumulate into `grads`.
    pub fn backward_shared(
        &self,
        prompt: &PromptTape,
        answers: &[(&AnswerTape, f32)],
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) -> Result<Vec<f32>> {
        let c = self.llm.cfg.hidden_size;
        let p = prompt.chunk.rows;
        let mut d_prompt = vec![0f32; p * c];
        let mut d_answers = Vec::with_capacity(answers.len());
        for &(t, d_logp_sum) in answers {
            let dsel = t.head.backward(self, d_logp_sum, adapter, grads.as_deref_mut());
            // Row 0 predicted from the prompt's last row; row i (i > 0) from the answer's row i - 1.
            add_inplace(&mut d_prompt[(p - 1) * c..], &dsel[..c]);
            let mut d_final = vec![0f32; t.chunk.rows * c];
            d_final[..dsel.len() - c].copy_from_slice(&dsel[c..]);
            d_answers.push((&t.chunk, d_final));
        }
        let (d_prompt, d_embeds) =
            self.llm.backward_shared(&prompt.chunk, d_prompt, d_answers, adapter, grads.as_deref_mut());
        for (&(t, _), d) in answers.iter().zip(&d_embeds) {
            let rows: Vec<usize> = (0..t.ids.len()).collect();
            self.embed_backward(&t.ids, &rows, d, grads.as_deref_mut());
        }
        self.embed_backward(&prompt.ids, &prompt.id_rows, &d_prompt, grads);
        Ok(d_prompt)
    }

    /// Vision tower + projector keeping activations (every tile of an anyres image, then packed).
    pub fn image_forward(&self, pixels: &PixelValues, adapter: Option<&Adapter>) -> Result<ImageTape> {
        if let Some(qv) = &self.qwen_vision {
            // Qwen2-VL's vision transformer keeps a tape only when the adapter trains something in it.
            let trains = adapter.is_some_and(|a| a.module_names().iter().any(|m| m.starts_with("visual.")));
            let grid = pixels.grid.ok_or_else(|| {
                EngineError::Input("Qwen2-VL takes the patches of its own image processor (a patch grid)".into())
            })?;
            let (rows, qwen) = if trains {
                let (rows, tape) = qv.forward_train(&pixels.data, grid, adapter)?;
                (rows, Some(tape))
            } else {
                (qv.forward(&pixels.data, grid, adapter)?, None)
            };
            let features = ImageFeatures { rows, grid: self.feature_grid(pixels) };
            return Ok(ImageTape { tiles: Vec::new(), packing: None, features, qwen });
        }
        let (Some(lc), Some(vision), Some(proj)) = (self.config.llava(), &self.vision, &self.projector) else {
            return Err(EngineError::Input("this model has no vision tower".into()));
        };
        self.check_tiles(pixels)?;
        let dv = lc.vision.hidden_size;
        let mut tiles = Vec::with_capacity(pixels.tiles);
        let mut features = Vec::new();
        for i in 0..pixels.tiles {
            let vt = vision.tower_forward(pixels.tile(i), lc.vision_layers_needed(), adapter)?;
            let proj_in = match lc.vision_feature_select_strategy {
                FeatureSelect::Default => vt.hidden[dv..].to_vec(),
                FeatureSelect::Full => vt.hidden.clone(),
            };
            let n = proj_in.len() / dv;
            let proj_h = proj.linear_1.apply(&proj_in, n, adapter);
            let mut proj_a = proj_h.clone();
            apply_activation(&mut proj_a, proj.act);
            features.extend(proj.linear_2.apply(&proj_a, n, adapter));
            tiles.push(TileTape { vision: vt, proj_in, proj_h, proj_a });
        }
        if !lc.anyres() {
            return Ok(ImageTape { tiles, packing: None, features: ImageFeatures::plain(features), qwen: None });
        }
        let packing = self.anyres_rows(pixels)?;
        let features = ImageFeatures::plain(self.pack_anyres(&features, &packing)?);
        Ok(ImageTape { tiles, packing: Some(packing), features, qwen: None })
    }

    /// Backward of `image_forward` from d features (N, C). Does nothing when neither the projector nor
    /// the vision tower has anything to train (no LoRA there, no saved modules, no base parameters).
    pub fn image_backward(
        &self,
        tape: &ImageTape,
        d_features: Vec<f32>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        if let (Some(qv), Some(qt)) = (&self.qwen_vision, &tape.qwen) {
            qv.backward(qt, &d_features, adapter, grads);
            return;
        }
        let Some(lc) = self.config.llava() else { return };
        let image_side = |n: &str| n.starts_with("vision_tower.") || n.starts_with("multi_modal_projector.");
        let trains = adapter.is_some_and(|a| {
            a.module_names().iter().any(|n| image_side(n)) || a.saved_params().any(|(n, _)| image_side(n))
        }) || grads
            .as_deref()
            .is_some_and(|g| g.trains_params_under("vision_tower.") || g.trains_params_under("multi_modal_projector."));
        if !trains {
            return;
        }
        let c = lc.text.hidden_size;
        let d_tiles = match &tape.packing {
            None => d_features,
            Some(packing) => {
                let per_tile = tape.tiles.first().map_or(0, |t| t.proj_h.len());
                let mut d = vec![0f32; per_tile * tape.tiles.len()];
                for (i, src) in packing.iter().enumerate() {
                    if let (Some(r), Some(g)) = (src, d_features.get(i * c..(i + 1) * c)) {
                        add_inplace(&mut d[r * c..(r + 1) * c], g);
                    }
                }
                d
            }
        };
        let mut at = 0;
        for tile in &tape.tiles {
            let n = tile.proj_h.len();
            self.tile_backward(tile, d_tiles[at..at + n].to_vec(), adapter, grads.as_deref_mut());
            at += n;
        }
    }

    /// `image_backward` of one tile from d features (N, C).
    fn tile_backward(
        &self,
        tape: &TileTape,
        d_features: Vec<f32>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        let (Some(lc), Some(vision), Some(proj)) = (self.config.llava(), &self.vision, &self.projector) else { return };
        let c = lc.text.hidden_size;
        let dv = lc.vision.hidden_size;
        let n = d_features.len() / c;
        let mut d_a = vec![0f32; n * c];
        proj.linear_2.backward(
            &mut d_a,
            &d_features,
            &tape.proj_a,
            n,
            adapter,
            grads.as_deref_mut(),
            MatmulMode::Assign,
        );
        let mut d_h = vec![0f32; n * c];
        activation_bwd(&mut d_h, &d_a, &tape.proj_h, proj.act);
        let mut d_in = vec![0f32; n * dv];
        proj.linear_1.backward(&mut d_in, &d_h, &tape.proj_in, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut d_hidden = vec![0f32; tape.vision.tokens * dv];
        let off = match lc.vision_feature_select_strategy {
            FeatureSelect::Default => dv,
            FeatureSelect::Full => 0,
        };
        d_hidden[off..off + d_in.len()].copy_from_slice(&d_in);
        vision.tower_backward(&tape.vision, d_hidden, adapter, grads);
    }
}
