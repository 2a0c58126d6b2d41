//! Pointwise activations.

use crate::config::Activation;
use rayon::prelude::*;

const PAR_MIN: usize = 1 << 15;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::QuickGelu => x * sigmoid(1.702 * x),
        Activation::Silu => x * sigmoid(x),
    }
}

/// x = act(x), in place.
pub fn apply_activation(x: &mut [f32], act: Activation) {
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = activate(act, *v)));
    } else {
        x.iter_mut().for_each(|v| *v = activate(act, *v));
    }
}

/// gate = silu(gate) * up, in place (LLaMA's SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let f = |(g, u): (&mut f32, &f32)| *g = activate(Activation::Silu, *g) * *u;
    if gate.len() >= PAR_MIN {
        gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| g.iter_mut().zip(u).for_each(f));
    } else {
        gate.iter_mut().zip(up).for_each(f);
    }
}
