//! AdamW over a LoRA adapter's tensors, with gradient-norm clipping and a cosine schedule with linear warmup
//! (transformers' `get_cosine_schedule_with_warmup`). Moments are f32; the state saves and restores exactly.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::train::Grads;
use std::collections::BTreeMap;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay; applied to matrices only (every LoRA factor is a matrix).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            total_steps: 1,
        }
    }
}

impl AdamWConfig {
    /// Learning rate at optimizer step `step` (0-based): linear warmup from 0, then cosine decay to 0 — exactly
    /// transformers' `get_cosine_schedule_with_warmup` (whose first warmup step has lr 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// First and second moments per tensor, keyed by the adapter file's tensor names.
#[derive(Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimizer steps of the schedule done, skipped fp16 overflow steps included (the learning rate and the
    /// batches follow it).
    pub step: usize,
    moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    /// The GPU trainer's dynamic loss scale once a run has trained on the GPU (None: fresh, or CPU only). Its
    /// `skipped` steps updated nothing, so the moments' bias correction counts `step - skipped` updates; a run
    /// paused on one device resumes on either with the same moments, scale and count.
    pub scaler: Option<crate::cuda::LossScaler>,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepInfo {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, step: 0, moments: BTreeMap::new(), scaler: None }
    }

    /// Updates the moments have had: steps taken, less those skipped on fp16 overflow (the bias correction's t).
    pub fn updates(&self) -> usize {
        self.step.saturating_sub(self.scaler.as_ref().map_or(0, |s| s.skipped as usize))
    }

    /// The (first, second) moments of tensor `key`, None before its first update.
    pub fn moments(&self, key: &str) -> Option<(&[f32], &[f32])> {
        self.moments.get(key).map(|(m, v)| (m.as_slice(), v.as_slice()))
    }

    /// Replaces the moments of tensor `key` (a device trainer hands its state back).
    pub fn set_moments(&mut self, key: &str, m: Vec<f32>, v: Vec<f32>) {
        self.moments.insert(key.to_string(), (m, v));
    }

    /// Global gradient norm of the given gradient tensors; error if it is not finite.
    fn norm_and_clip(&self, grads: &[&[f32]]) -> Result<(f64, f64)> {
        let sq: f64 = grads.iter().map(|g| g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum();
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(EngineError::Input(format!(
                "gradient norm is {grad_norm}; the step is skipped (NaN/inf in the loss?)"
            )));
        }
        let clip = if self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        Ok((grad_norm, clip))
    }

    /// AdamW on one tensor (decoupled weight decay when `decay`).
    #[allow(clippy::too_many_arguments)]
    fn update(&mut self, key: &str, p: &mut [f32], g: &[f32], lr: f64, clip: f64, decay: bool) {
        let t = self.updates() as f64;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let wd = if decay { self.cfg.weight_decay } else { 0.0 };
        let eps = self.cfg.eps;
        let (m1, m2) = self.moments.entry(key.to_string()).or_insert_with(|| (vec![0.0; p.len()], vec![0.0; p.len()]));
        for i in 0..p.len() {
            let gi = g[i] as f64 * clip;
            let mi = b1 * m1[i] as f64 + (1.0 - b1) * gi;
            let vi = b2 * m2[i] as f64 + (1.0 - b2) * gi * gi;
            m1[i] = mi as f32;
            m2[i] = vi as f32;
            let mut w = p[i] as f64;
            w *= 1.0 - lr * wd;
            w -= lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
            p[i] = w as f32;
        }
    }

    /// One update of every adapter tensor from `grads` (already averaged over the batch).
    pub fn step(&mut self, adapter: &mut Adapter, grads: &Grads) -> Result<StepInfo> {
        let names: Vec<String> = adapter.module_names().iter().map(|s| s.to_string()).collect();
        let mut gs: Vec<&[f32]> =
            names.iter().filter_map(|n| grads.module(n)).flat_map(|g| [g.da.as_slice(), g.db.as_slice()]).collect();
        gs.extend(adapter.saved_params().filter_map(|(n, _)| grads.param(n)));
        let (grad_norm, clip) = self.norm_and_clip(&gs)?;
        let lr = self.cfg.lr_at(self.step);
        self.step += 1;
        for n in &names {
            let (Some(g), Some(m)) = (grads.module(n), adapter.module_mut(n)) else { continue };
            let (ka, kb) = m.keys.clone();
            self.update(&ka, &mut m.a, &g.da, lr, clip, true);
            self.update(&kb, &mut m.b, &g.db, lr, clip, true);
        }
        for (name, p) in adapter.saved_params_mut() {
            if let Some(g) = grads.param(name) {
                let decay = p.shape.len() >= 2;
                self.update(&p.key, &mut p.values, g, lr, clip, decay);
            }
        }
        Ok(StepInfo { lr, grad_norm })
    }

    /// One update of base parameters (full fine-tuning): `master` holds f32 master weights by canonical name
    /// with their shapes; weight decay applies to matrices only. The caller writes them back into the model.
    pub fn step_params(
        &mut self,
        master: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        grads: &Grads,
    ) -> Result<StepInfo> {
        let gs: Vec<&[f32]> = master.keys().filter_map(|n| grads.param(n)).collect();
        let (grad_norm, clip) = self.norm_and_clip(&gs)?;
        let lr = self.cfg.lr_at(self.step);
        self.step += 1;
        for (name, (shape, values)) in master.iter_mut() {
            if let Some(g) = grads.param(name) {
                let decay = shape.len() >= 2;
                self.update(name, values, g, lr, clip, decay);
            }
        }
        Ok(StepInfo { lr, grad_norm })
    }

    /// The moments as (name, values) tensors for saving: `{key}.exp_avg` and `{key}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for (k, (m1, m2)) in &self.moments {
            out.push((format!("{k}.exp_avg"), vec![m1.len()], m1.as_slice()));
            out.push((format!("{k}.exp_avg_sq"), vec![m2.len()], m2.as_slice()));
        }
        out
    }

    /// Restores moments saved by `state_tensors`.
    pub fn load_state(&mut self, step: usize, store: &crate::weights::WeightStore) -> Result<()> {
        self.step = step;
        self.moments.clear();
        let mut keys: Vec<&str> = store.keys().filter(|k| k.ends_with(".exp_avg")).collect();
        keys.sort();
        for k in keys {
            let base = k.trim_end_matches(".exp_avg");
            let m1 = store.f32_any_shape(k)?;
            let m2 = store.f32_any_shape(&format!("{base}.exp_avg_sq"))?;
            if m1.len() != m2.len() {
                return Err(EngineError::Input(format!("optimizer state for `{base}` has mismatched moment sizes")));
            }
            self.moments.insert(base.to_string(), (m1, m2));
        }
        Ok(())
    }
}
