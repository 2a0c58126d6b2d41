//! Rotary position embeddings, transformers' "rotate half" convention (not interleaved).

use crate::config::RopeScaling;

pub struct Rope {
    /// (head_dim / 2) inverse frequencies after scaling.
    inv_freq: Vec<f32>,
    head_dim: usize,
    /// Multimodal RoPE (Qwen2-VL): for each frequency, which component (temporal, height, width) of a
    /// `mrope_position` it follows; empty for 1-D RoPE.
    section_of: Vec<u8>,
}

/// Marks a position that carries three components (`mrope_position`); plain positions are 1-D (all three
/// components equal under multimodal RoPE).
const MROPE_FLAG: usize = 1 << 63;
const MROPE_BITS: u32 = 21;
const MROPE_MASK: usize = (1 << MROPE_BITS) - 1;

/// Largest component a multimodal position can hold.
pub const MROPE_MAX: usize = MROPE_MASK;

/// A multimodal RoPE position (temporal, height, width) of an image row, packed for the `positions` slices the
/// decoder takes; text rows keep plain positions. Each component must be at most `MROPE_MAX`.
pub fn mrope_position(t: usize, h: usize, w: usize) -> usize {
    debug_assert!(t <= MROPE_MAX && h <= MROPE_MAX && w <= MROPE_MAX);
    MROPE_FLAG | (t & MROPE_MASK) | (h & MROPE_MASK) << MROPE_BITS | (w & MROPE_MASK) << (2 * MROPE_BITS)
}

/// The (temporal, height, width) components of a position.
pub(crate) fn components(pos: usize) -> [usize; 3] {
    if pos & MROPE_FLAG == 0 {
        [pos; 3]
    } else {
        [pos & MROPE_MASK, (pos >> MROPE_BITS) & MROPE_MASK, (pos >> (2 * MROPE_BITS)) & MROPE_MASK]
    }
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope { inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(), head_dim, section_of: Vec::new() }
    }

    /// Multimodal RoPE with `sections` (temporal, height, width) frequency pairs, summing to head_dim / 2: the
    /// first `sections[0]` frequencies follow a position's temporal component, the next its height, the rest its
    /// width (transformers' `mrope_section`).
    pub fn with_mrope(mut self, sections: Option<[usize; 3]>) -> Self {
        if let Some(s) = sections {
            self.section_of = (0..3u8).flat_map(|c| std::iter::repeat_n(c, s[c as usize])).collect();
            self.section_of.resize(self.head_dim / 2, 2);
        }
        self
    }

    /// Whether positions may carry three components.
    pub fn is_mrope(&self) -> bool {
        !self.section_of.is_empty()
    }

    /// cos and sin tables (max_pos, head_dim / 2), computed as `apply` does (f32 angle, accurate cos/sin): the
    /// CUDA rope kernel reads these.
    pub fn tables(&self, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let (mut c, mut s) = (Vec::with_capacity(max_pos * half), Vec::with_capacity(max_pos * half));
        for pos in 0..max_pos {
            for i in 0..half {
                let angle = (pos as f32 * self.inv_freq[i]) as f64;
                c.push(angle.cos() as f32);
                s.push(angle.sin() as f32);
            }
        }
        (c, s)
    }

    /// Rotates x (rows, heads, head_dim) in place; row r sits at position `positions[r]`.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize]) {
        self.rotate(x, heads, positions, 1.0);
    }

    /// Backward of `apply`: dx (rows, heads, head_dim), the gradient at the rotated output, becomes in place the
    /// gradient at the input. The rotation is orthogonal, so this is the rotation by the negative angle (same
    /// f32 angles as `apply`).
    pub fn apply_backward(&self, dx: &mut [f32], heads: usize, positions: &[usize]) {
        self.rotate(dx, heads, positions, -1.0);
    }

    /// Rotation by `sign` times each position's angles.
    fn rotate(&self, x: &mut [f32], heads: usize, positions: &[usize], sign: f32) {
        let hd = self.head_dim;
        let half = hd / 2;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (row, &pos) in x.chunks_exact_mut(heads * hd).zip(positions) {
            let comp = components(pos);
            for i in 0..half {
                let p = if self.section_of.is_empty() { pos } else { comp[self.section_of[i] as usize] };
                // f32 angle like transformers, then an accurate cos/sin of it.
                let angle = (p as f32 * self.inv_freq[i]) as f64;
                cos[i] = angle.cos() as f32;
                sin[i] = sign * angle.sin() as f32;
            }
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
