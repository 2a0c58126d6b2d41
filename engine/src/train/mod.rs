//! Training: LoRA gradients through the whole LLaVA model (decoder, projector, vision tower) and the DPO loss.
//!
//! Gradient convention, everywhere in the engine: parameter gradients accumulate (`+=`), activation gradients
//! are assigned (`=`). So a batch's gradient is the sum of its examples' backward passes into one `LoraGrads`.

pub mod dpo;
pub mod optim;
pub mod trainer;

use crate::adapter::Adapter;
use std::collections::HashMap;

/// Gradients of one LoRA module's factors.
pub struct LoraModuleGrads {
    pub da: Vec<f32>, // (r, in)
    pub db: Vec<f32>, // (out, r)
}

/// Gradients for every module of an adapter, keyed by canonical module name.
pub struct LoraGrads {
    modules: HashMap<String, LoraModuleGrads>,
}

impl LoraGrads {
    /// Zero gradients shaped like `adapter`'s modules.
    pub fn zeros_like(adapter: &Adapter) -> Self {
        let modules = adapter
            .modules()
            .into_iter()
            .map(|(name, m)| (name.to_string(), LoraModuleGrads { da: vec![0.0; m.a.len()], db: vec![0.0; m.b.len()] }))
            .collect();
        LoraGrads { modules }
    }

    pub fn module_mut(&mut self, name: &str) -> Option<&mut LoraModuleGrads> {
        self.modules.get_mut(name)
    }

    pub fn module(&self, name: &str) -> Option<&LoraModuleGrads> {
        self.modules.get(name)
    }

    /// Multiplies every gradient by `s` (e.g. 1 / batch size).
    pub fn scale(&mut self, s: f32) {
        for g in self.modules.values_mut() {
            g.da.iter_mut().chain(g.db.iter_mut()).for_each(|v| *v *= s);
        }
    }

    /// (file key, shape, values) of every gradient tensor, under the adapter file's own key names.
    pub fn named_tensors<'a>(&'a self, adapter: &'a Adapter) -> Vec<(String, Vec<usize>, &'a [f32])> {
        let mut out = Vec::new();
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
