//! A `torch.nn.Linear` (weight (out, in), optional bias) that can carry a LoRA delta from an adapter.

use crate::adapter::Adapter;
use crate::error::Result;
use crate::ops::backward::{bias_bwd, matmul_nt_bwd_w, matmul_nt_bwd_x};
use crate::ops::{add_bias, matmul_nt, MatmulMode, PackedMatrix};
use crate::train::Grads;
use crate::weights::WeightStore;
use std::sync::Arc;

pub struct Linear {
    /// Canonical module name, e.g. `language_model.layers.0.self_attn.q_proj` (see `adapter::canonical_module`).
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Shared so a tied lm_head can point at the embedding table.
    pub weight: Arc<PackedMatrix>, // (out, in), packed
    pub bias: Option<Vec<f32>>, // (out)
    /// Wᵀ packed for the matmul kernel, made on first use by a backward pass (dx = dy · W).
    pub transposed: std::sync::OnceLock<PackedMatrix>,
    /// Prefix of this layer's parameter names for full fine-tuning (`{param}.weight`); differs from `name`
    /// only for a tied lm_head, whose weight is the embedding table.
    pub param: String,
}

impl Linear {
    /// Loads `{key}.weight` (and `{key}.bias` when `bias`); `keep_16bit` keeps F16/BF16 weights 16-bit.
    pub fn load(
        ws: &WeightStore,
        key: &str,
        name: String,
        in_features: usize,
        out_features: usize,
        bias: bool,
        keep_16bit: bool,
    ) -> Result<Self> {
        let weight = Arc::new(ws.packed(&format!("{key}.weight"), out_features, in_features, keep_16bit)?);
        let bias = if bias { Some(ws.f32(&format!("{key}.bias"), &[out_features])?) } else { None };
        Ok(Linear {
            param: name.clone(),
            name,
            in_features,
            out_features,
            weight,
            bias,
            transposed: Default::default(),
        })
    }

    /// y (rows, out) = x (rows, in) · Wᵀ + b + scale · (x · Aᵀ) · Bᵀ   (`Accumulate`: y += the same)
    pub fn forward(&self, y: &mut [f32], x: &[f32], rows: usize, adapter: Option<&Adapter>, mode: MatmulMode) {
        // An adapter may replace the whole layer (peft modules_to_save, e.g. a trained projector).
        match adapter.and_then(|a| a.saved_param(&format!("{}.weight", self.param))) {
            Some(w) => matmul_nt(y, x, w, rows, self.in_features, self.out_features, mode),
            None => self.weight.matmul(y, x, rows, mode),
        }
        let bias = adapter.and_then(|a| a.saved_param(&format!("{}.bias", self.param))).or(self.bias.as_deref());
        if let Some(b) = bias {
            add_bias(y, b);
        }
        if let (Some(ad), Some(lora)) = (adapter, adapter.and_then(|a| a.module(&self.name))) {
            let dropped = ad.dropout_input(&self.name, x);
            let xl = dropped.as_deref().unwrap_or(x); // LoRA's input (after dropout while training)
            let mut t = vec![0f32; rows * lora.r]; // (rows, r)
            matmul_nt(&mut t, xl, &lora.a, rows, self.in_features, lora.r, MatmulMode::Assign);
            t.iter_mut().for_each(|v| *v *= lora.scale);
            matmul_nt(y, &t, &lora.b, rows, lora.r, self.out_features, MatmulMode::Accumulate);
        }
    }

    /// Backward of `forward` for input x (rows, in) and upstream dy (rows, out):
    /// dx = dy · W + scale · (dy · B) · A, assigned or accumulated per `mode`. Into `grads`, when it holds them:
    /// LoRA dA += scale · (dy · B)ᵀ · x, dB += scale · dyᵀ · (x · Aᵀ); base dW += dyᵀ · x, db += Σ_rows dy
    /// (full fine-tuning, keyed `{name}.weight` / `{name}.bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        rows: usize,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
        mode: MatmulMode,
    ) {
        let (inf, outf) = (self.in_features, self.out_features);
        match adapter.and_then(|a| a.saved_param(&format!("{}.weight", self.param))) {
            Some(w) => matmul_nt_bwd_x(dx, dy, w, rows, inf, outf, mode),
            None => self.transposed.get_or_init(|| self.weight.transposed()).matmul(dx, dy, rows, mode),
        }
        if let (Some(ad), Some(lora)) = (adapter, adapter.and_then(|a| a.module(&self.name))) {
            let r = lora.r;
            // With dropout the LoRA branch saw xl = mask ⊙ x / (1-p): regenerate it (same mask as the forward).
            let dropped = ad.dropout_input(&self.name, x);
            let xl = dropped.as_deref().unwrap_or(x);
            let mut u = vec![0f32; rows * r]; // (rows, r) = dy · B
            matmul_nt_bwd_x(&mut u, dy, &lora.b, rows, r, outf, MatmulMode::Assign);
            u.iter_mut().for_each(|v| *v *= lora.scale);
            if dropped.is_some() {
                // d xl = u · A, then through the mask: d x = d xl ⊙ (xl / x) = d xl ⊙ mask / (1-p).
                let mut dxl = vec![0f32; rows * inf];
                matmul_nt_bwd_x(&mut dxl, &u, &lora.a, rows, inf, r, MatmulMode::Assign);
                // The same mask applied to ones is exactly mask / (1-p).
                let scale = ad.dropout_input(&self.name, &vec![1.0; rows * inf]).unwrap_or_default();
                for ((d, g), m) in dx.iter_mut().zip(&dxl).zip(&scale) {
                    *d += g * m;
                }
            } else {
                matmul_nt_bwd_x(dx, &u, &lora.a, rows, inf, r, MatmulMode::Accumulate);
            }
            if let Some(g) = grads.as_deref_mut().and_then(|g| g.module_mut(&self.name)) {
                matmul_nt_bwd_w(&mut g.da, &u, xl, rows, inf, r);
                let mut t = vec![0f32; rows * r]; // (rows, r) = xl · Aᵀ
                matmul_nt(&mut t, xl, &lora.a, rows, inf, r, MatmulMode::Assign);
                t.iter_mut().for_each(|v| *v *= lora.scale);
                matmul_nt_bwd_w(&mut g.db, dy, &t, rows, r, outf);
            }
        }
        if let Some(g) = grads {
            if let Some(dw) = g.param_mut(&format!("{}.weight", self.param)) {
                matmul_nt_bwd_w(dw, dy, x, rows, inf, outf);
            }
            if let Some(db) = g.param_mut(&format!("{}.bias", self.param)) {
                bias_bwd(db, dy);
            }
        }
    }

    /// `{name}.weight` / `{name}.bias` as f32, for a parameter name of this layer (None otherwise).
    pub fn get_param(&self, param: &str) -> Option<Vec<f32>> {
        if param.strip_suffix(".weight") == Some(self.param.as_str()) && self.param == self.name {
            return Some(self.weight.unpack_f32());
        }
        if param.strip_suffix(".bias") == Some(self.param.as_str()) {
            return self.bias.clone();
        }
        None
    }

    /// Overwrites `{name}.weight` or `{name}.bias`; false if `param` is not one of this layer's (a tied head's
    /// weight is the embedding table and is set through it).
    pub fn set_param(&mut self, param: &str, values: &[f32]) -> bool {
        if param.strip_suffix(".weight") == Some(self.param.as_str()) && self.param == self.name {
            self.set_weight(values);
            return true;
        }
        if param.strip_suffix(".bias") == Some(self.param.as_str()) {
            if let Some(b) = self.bias.as_mut() {
                b.copy_from_slice(values);
                return true;
            }
        }
        false
    }

    /// Replaces the weight (and bias) with new f32 values (full fine-tuning updates).
    pub fn set_weight(&mut self, w: &[f32]) {
        self.weight = Arc::new(PackedMatrix::from_f32(w, self.out_features, self.in_features));
        self.transposed = Default::default();
    }

    /// Convenience: returns a fresh (rows, out) buffer.
    pub fn apply(&self, x: &[f32], rows: usize, adapter: Option<&Adapter>) -> Vec<f32> {
        let mut y = vec![0f32; rows * self.out_features];
        self.forward(&mut y, x, rows, adapter, MatmulMode::Assign);
        y
    }
}
