//! Bounds on one generation request, checked before any model work: the positions it needs against the model's
//! context, and the memory its buffers take against a budget. The estimate is an upper bound of what the CPU
//! path allocates (f32 activations and KV cache); the CUDA path keeps fp16 and needs less.

use crate::error::{EngineError, Result};
use crate::llava::Model;

/// What one generation request asks of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestShape {
    /// Decoder positions of the prompt, the image's rows included.
    pub prompt_positions: usize,
    /// Answers decoded together.
    pub answers: usize,
    pub max_new_tokens: usize,
}

const MIB: u64 = 1 << 20;

impl Model {
    /// The decoder's context (config.json `max_position_embeddings`): prompt plus answer never exceed it.
    pub fn context_len(&self) -> usize {
        self.llm.cfg.max_position_embeddings
    }

    /// Decoder positions `ids` take once the image token is expanded into the image's rows.
    pub fn prompt_positions(&self, ids: &[u32]) -> usize {
        match self.image_token_id() {
            Some(image) => ids.iter().map(|&t| if t == image { self.image_seq_len() } else { 1 }).sum(),
            None => ids.len(),
        }
    }

    /// The most decoder rows one image can take: exact for LLaVA-1.5, the largest grid for LLaVA-NeXT, and for
    /// Qwen2-VL the merged patches of an image of its processor's `max_pixels`.
    pub fn image_seq_len(&self) -> usize {
        if let Some(l) = self.config.llava() {
            return l.image_seq_len();
        }
        match self.image_processor.as_ref().and_then(|ip| ip.patches) {
            Some(g) => (g.max_pixels / (g.factor() as u64 * g.factor() as u64)).max(1) as usize,
            None => 0,
        }
    }

    /// Upper estimate of the bytes one `generate` call of this shape allocates: the prompt's KV cache and prefill
    /// activations, each answer's own KV cache, decode activations and logits, and the image path.
    pub fn generate_memory_bytes(&self, s: RequestShape) -> u64 {
        let c = &self.llm.cfg;
        let f = 4u64; // f32
        let (p, n, g) = (s.prompt_positions as u64, s.answers as u64, s.max_new_tokens as u64);
        let (layers, hidden, inter) = (c.num_hidden_layers as u64, c.hidden_size as u64, c.intermediate_size as u64);
        let kv_width = (c.num_key_value_heads * c.head_dim) as u64;
        let q_width = (c.num_attention_heads * c.head_dim) as u64;
        // Per row of a forward: residual, norm, q, k, v, attention out, gate, up, act (8 buffers at most alive).
        let row = hidden * 3 + q_width * 2 + kv_width * 2 + inter * 3;
        let prompt_cache = layers * 2 * p * kv_width * f;
        let answer_caches = n * layers * 2 * g * kv_width * f;
        let prefill = p * row * f + p * (p + g) * f; // activations + one score row per position in flight
        let decode = n * (row + c.vocab_size as u64 + p + g) * f; // activations, logits, the tokens seen
        let image = match self.config.llava() {
            Some(l) => {
                let v = &l.vision;
                let t = (v.num_patches() + 1) as u64;
                let vrow = (v.hidden_size * 6 + v.intermediate_size * 2) as u64;
                t * vrow * f + t * t * v.num_attention_heads as u64 * f + l.image_seq_len() as u64 * hidden * f * 3
            }
            None => match (self.config.qwen_vl(), self.image_processor.as_ref().and_then(|ip| ip.patches)) {
                (Some(q), Some(g)) => {
                    // Every patch through the tower (window attention bounded by whole-image attention), then the
                    // merged rows.
                    let v = &q.vision;
                    let t = (g.max_pixels / (g.patch_size as u64 * g.patch_size as u64)).max(1);
                    let vrow = (v.hidden_size * 8 + v.intermediate_size * 3) as u64;
                    t * vrow * f + t * t * f + self.image_seq_len() as u64 * hidden * f * 3
                }
                _ => 0,
            },
        };
        prompt_cache + answer_caches + prefill + decode + image
    }

    /// Refuses a request that cannot fit: the prompt at or past the context, or its memory over `budget_bytes`
    /// (when set). Returns the answer length the context leaves room for: `max_new_tokens`, or less when prompt
    /// plus `max_new_tokens` would pass the context (the answers then end there, finishing with `Length`).
    pub fn check_request(&self, s: RequestShape, budget_bytes: Option<u64>) -> Result<usize> {
        let ctx = self.context_len();
        if s.prompt_positions >= ctx {
            return Err(EngineError::Input(format!(
                "the prompt takes {} positions (text and image), the model's context is {ctx}: no room for an answer; shorten the prompt",
                s.prompt_positions
            )));
        }
        let max_new = s.max_new_tokens.min(ctx - s.prompt_positions);
        if let Some(budget) = budget_bytes {
            let need = self.generate_memory_bytes(RequestShape { max_new_tokens: max_new, ..s });
            if need > budget {
                return Err(EngineError::Input(format!(
                    "the request needs about {} MiB ({} prompt positions, {} answers of up to {max_new} tokens), more than the engine's budget of {} MiB per request; ask for fewer answers or tokens",
                    need.div_ceil(MIB),
                    s.prompt_positions,
                    s.answers,
                    budget / MIB
                )));
            }
        }
        Ok(max_new)
    }

    /// The memory budget of one request, when one is set (`set_request_budget`).
    pub fn request_budget(&self) -> Option<u64> {
        self.request_budget
    }

    /// Sets the most bytes one generation request may take (None: only the context bounds it). `generate` refuses
    /// a request over it before allocating anything.
    pub fn set_request_budget(&mut self, bytes: Option<u64>) {
        self.request_budget = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_grows_with_every_dimension_of_the_request() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
        let m = Model::load(&dir).unwrap();
        let base = RequestShape { prompt_positions: 40, answers: 2, max_new_tokens: 32 };
        let b = m.generate_memory_bytes(base);
        for bigger in [
            RequestShape { prompt_positions: 80, ..base },
            RequestShape { answers: 4, ..base },
            RequestShape { max_new_tokens: 64, ..base },
        ] {
            assert!(m.generate_memory_bytes(bigger) > b, "{bigger:?}");
        }
        // The KV caches alone: 3 layers x 2 x 96 wide x 4 bytes per position, prompt once and each answer's own.
        assert!(b >= 3 * 2 * 96 * 4 * (40 + 2 * 32));
        assert_eq!(
            m.check_request(RequestShape { prompt_positions: 250, answers: 1, max_new_tokens: 32 }, None).unwrap(),
            6,
            "clamped to the context"
        );
        let e = m
            .check_request(RequestShape { prompt_positions: 256, answers: 1, max_new_tokens: 1 }, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("256") && e.contains("context"), "{e}");
        let e = m.check_request(base, Some(b - 1)).unwrap_err().to_string();
        assert!(e.contains("budget"), "{e}");
        assert_eq!(m.check_request(base, Some(b)).unwrap(), 32);
    }
}
