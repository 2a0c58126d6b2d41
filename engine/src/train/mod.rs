//! Training: LoRA gradients through the whole LLaVA model (decoder, projector, vision tower) and the DPO loss.
//!
//! Gradient convention, everywhere in the engine: parameter gradients accumulate (`+=`), activation gradients
//! are assigned (`=`). So a batch's gradient is the sum of its examples' backward passes into one `Grads`.

pub mod dpo;
pub mod optim;
pub mod parallel;
pub mod passes;
pub mod schedule;
pub mod sft;
pub mod trainer;

use crate::adapter::Adapter;
use std::collections::HashMap;

/// Gradients of one LoRA module's factors.
pub struct LoraModuleGrads {
    pub da: Vec<f32>, // (r, in)
    pub db: Vec<f32>, // (out, r)
}

/// Gradients of what is being trained: LoRA factors by canonical module name, and (for full fine-tuning)
/// base parameters by canonical parameter name (`language_model.layers.0.self_attn.q_proj.weight`, see
/// `Model::trainable_params`). Only entries present here are computed.
pub struct Grads {
    modules: HashMap<String, LoraModuleGrads>,
    params: HashMap<String, Vec<f32>>,
}

impl Grads {
    /// Zero gradients shaped like `adapter`'s modules.
    pub fn zeros_like(adapter: &Adapter) -> Self {
        let modules = adapter
            .modules()
            .into_iter()
            .map(|(name, m)| (name.to_string(), LoraModuleGrads { da: vec![0.0; m.a.len()], db: vec![0.0; m.b.len()] }))
            .collect();
        // Whole parameters the adapter trains (modules_to_save) get base-style gradients.
        let params = adapter.saved_params().map(|(name, p)| (name.to_string(), vec![0.0; p.values.len()])).collect();
        Grads { modules, params }
    }

    pub fn module_mut(&mut self, name: &str) -> Option<&mut LoraModuleGrads> {
        self.modules.get_mut(name)
    }

    pub fn module(&self, name: &str) -> Option<&LoraModuleGrads> {
        self.modules.get(name)
    }

    /// Zero gradients for base parameters (name, element count), and none for LoRA.
    pub fn zeros_for_params(params: &[(String, usize)]) -> Self {
        Grads { modules: HashMap::new(), params: params.iter().map(|(n, len)| (n.clone(), vec![0.0; *len])).collect() }
    }

    /// The gradient buffer of base parameter `name`, if it is being trained.
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        self.params.get_mut(name)
    }

    /// Takes a parameter gradient out (to borrow two at once); `put_param` returns it.
    pub fn take_param(&mut self, name: &str) -> Option<Vec<f32>> {
        self.params.remove(name)
    }

    pub fn put_param(&mut self, name: String, grad: Vec<f32>) {
        self.params.insert(name, grad);
    }

    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.params.get(name).map(|v| v.as_slice())
    }

    /// Whether any base parameter under `prefix` is trained (lets a backward pass stop early).
    pub fn trains_params_under(&self, prefix: &str) -> bool {
        self.params.keys().any(|k| k.starts_with(prefix))
    }

    /// Adds `other` (same shapes) into `self`, then zeroes `other` so its buffers can be reused.
    pub fn absorb(&mut self, other: &mut Grads) {
        for (name, g) in other.modules.iter_mut() {
            if let Some(acc) = self.modules.get_mut(name) {
                acc.da.iter_mut().zip(g.da.iter_mut()).chain(acc.db.iter_mut().zip(g.db.iter_mut())).for_each(
                    |(a, b)| {
                        *a += *b;
                        *b = 0.0;
                    },
                );
            }
        }
        for (name, g) in other.params.iter_mut() {
            if let Some(acc) = self.params.get_mut(name) {
                acc.iter_mut().zip(g.iter_mut()).for_each(|(a, b)| {
                    *a += *b;
                    *b = 0.0;
                });
            }
        }
    }

    /// Multiplies every gradient by `s` (e.g. 1 / batch size).
    pub fn scale(&mut self, s: f32) {
        for g in self.modules.values_mut() {
            g.da.iter_mut().chain(g.db.iter_mut()).for_each(|v| *v *= s);
        }
        for g in self.params.values_mut() {
            g.iter_mut().for_each(|v| *v *= s);
        }
    }

    /// (file key, shape, values) of every gradient tensor, under the adapter file's own key names.
    pub fn named_tensors<'a>(&'a self, adapter: &'a Adapter) -> Vec<(String, Vec<usize>, &'a [f32])> {
        let mut out = Vec::new();
        for (name, p) in adapter.saved_params() {
            if let Some(g) = self.params.get(name) {
                out.push((p.key.clone(), p.shape.clone(), g.as_slice()));
            }
        }
        for (name, m) in adapter.modules() {
            if let Some(g) = self.modules.get(name) {
                let inf = m.a.len() / m.r;
                let outf = m.b.len() / m.r;
                out.push((m.keys.0.clone(), vec![m.r, inf], g.da.as_slice()));
                out.push((m.keys.1.clone(), vec![outf, m.r], g.db.as_slice()));
            }
        }
        out
    }
}
