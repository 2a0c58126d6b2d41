//! The image path's training passes on the GPU: the vision tower's layers and the projector kept for the
//! backward pass (`ImageTape`), LoRA on their linear layers and the projector trained in full.

use super::*;

/// An example's image on the GPU trainer: each tile's tape, and LLaVA-NeXT's packing of the tiles' feature rows
/// (`Model::anyres_rows`; None: the tiles' rows in order).
pub(crate) struct ImageTapes {
    pub(crate) tiles: Vec<ImageTape>,
    pub(crate) packing: Option<Vec<Option<usize>>>,
}

/// The image path's forward pass under the adapter's image-path LoRA (`GpuLora::image_forward`), kept for its
/// backward.
pub(crate) struct ImageTape {
    /// Tokens of the tower (patches and the class token).
    pub(super) t: usize,
    /// The lowest tower layer with LoRA; the layers before it keep no tape (nothing below it is trained).
    pub(super) first: usize,
    pub(super) layers: Vec<ImageLayerTape>,
    /// The projector's input rows, its first layer's output before and after the activation, and x A^T of its
    /// two layers' LoRA.
    pub(super) sel: CudaSlice<f16>,
    pub(super) p1: CudaSlice<f16>,
    pub(super) pa: CudaSlice<f16>,
    pub(super) proj_t: [Option<CudaSlice<f16>>; 2],
    /// The projected features (rows, text hidden).
    pub(crate) features: CudaSlice<f16>,
    pub(crate) rows: usize,
    pub(super) drop: Option<u64>,
}

/// One tower layer's saved activations.
pub(super) struct ImageLayerTape {
    pub(super) x_in: CudaSlice<f16>,
    pub(super) h1: CudaSlice<f16>,
    pub(super) q: CudaSlice<f16>,
    pub(super) k: CudaSlice<f16>,
    pub(super) v: CudaSlice<f16>,
    pub(super) att: CudaSlice<f16>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) x_mid: CudaSlice<f16>,
    pub(super) h2: CudaSlice<f16>,
    /// fc1's output before and after the activation.
    pub(super) fpre: CudaSlice<f16>,
    pub(super) fact: CudaSlice<f16>,
    /// x A^T of q, k, v, out_proj, fc1, fc2 (None: no LoRA there).
    pub(super) t: [Option<CudaSlice<f16>>; 6],
}

pub(super) fn act_bwd_kernel(a: crate::config::Activation) -> Result<&'static str> {
    match a {
        crate::config::Activation::Gelu => Ok("gelu_bwd_f16"),
        crate::config::Activation::QuickGelu => Ok("quick_gelu_bwd_f16"),
        other => Err(err(format!("the GPU image path has no backward kernel for the activation {other:?}"))),
    }
}

impl GpuLora {
    /// The image-path module named `name`, if this copy trains it.
    pub(super) fn image_slot(&self, name: &str) -> Option<&ImageSlot> {
        self.image.iter().find(|sl| sl.name == name)
    }

    /// The weight (`weight`) or bias of image-path layer `layer` this copy trains in full, if it does.
    pub(super) fn image_param(&self, layer: &str, weight: bool) -> Option<&ImageParam> {
        self.image_params.iter().find(|p| p.layer == layer && p.weight == weight)
    }

    /// The weight image-path layer `lin` runs with: the one this copy trains, or the model's.
    pub(super) fn image_weight<'a>(&'a self, lin: &'a crate::cuda_clip::Lin) -> cudarc::driver::CudaView<'a, f16> {
        match self.image_param(&lin.name, true) {
            Some(pp) => self.p16.slice(pp.at..pp.at + pp.len),
            None => lin.w.slice(..),
        }
    }

    pub(super) fn image_geom(sl: &ImageSlot) -> Geom {
        Geom { a: sl.a, b: sl.b, n_in: sl.n_in, n_out: sl.n_out, r: sl.r, scale: sl.scale }
    }

    pub(super) fn image_mask(&self, sl: &ImageSlot, drop: Option<u64>) -> Option<(u64, f64)> {
        drop.filter(|_| self.dropout > 0.0).map(|seed| (seed ^ sl.mask_offset, self.dropout))
    }

    /// y = x W^T + b of a linear layer of the image path, plus its LoRA when this copy trains one there (x dropped
    /// out under `drop`); returns x A^T for the backward.
    pub(super) fn image_linear(
        &self,
        gpu: &Gpu,
        lin: &crate::cuda_clip::Lin,
        x: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        rows: usize,
        drop: Option<u64>,
    ) -> Result<Option<CudaSlice<f16>>> {
        gpu.gemm(
            &x.slice(..),
            lin.n_in,
            false,
            &self.image_weight(lin),
            lin.n_in,
            true,
            &mut y.slice_mut(..),
            lin.n_out,
            rows,
            lin.n_out,
            lin.n_in,
            1.0,
            0.0,
        )?;
        match self.image_param(&lin.name, false) {
            Some(pp) => crate::cuda_clip::bias_add(gpu, y, &self.p16.slice(pp.at..pp.at + pp.len), rows, lin.n_out)?,
            None => {
                if let Some(b) = &lin.b {
                    crate::cuda_clip::bias_add(gpu, y, &b.slice(..), rows, lin.n_out)?;
                }
            }
        }
        let Some(sl) = self.image_slot(&lin.name) else { return Ok(None) };
        let mut t = gpu.stream.alloc_zeros::<f16>(rows * sl.r).map_err(derr)?;
        lora_apply(gpu, &self.p16, Self::image_geom(sl), x, &mut t, y, 0, lin.n_out, rows, self.image_mask(sl, drop))?;
        Ok(Some(t))
    }

    /// Backward of `image_linear` from dy: dx = dy W (added into dx with `acc`), plus the LoRA path's share, whose
    /// factor gradients go into `g16_img`. `dx` None: the input gradient is not needed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn image_linear_bwd(
        &mut self,
        gpu: &Gpu,
        lin: &crate::cuda_clip::Lin,
        x: &CudaSlice<f16>,
        t: Option<&CudaSlice<f16>>,
        dy: &CudaSlice<f16>,
        mut dx: Option<&mut CudaSlice<f16>>,
        rows: usize,
        acc: bool,
        drop: Option<u64>,
    ) -> Result<()> {
        if let Some(dx) = dx.as_deref_mut() {
            gpu.gemm(
                &dy.slice(..),
                lin.n_out,
                false,
                &self.image_weight(lin),
                lin.n_in,
                false,
                &mut dx.slice_mut(..),
                lin.n_in,
                rows,
                lin.n_in,
                lin.n_out,
                1.0,
                if acc { 1.0 } else { 0.0 },
            )?;
        }
        // A weight trained in full: dW = dy^T x (the input before any LoRA dropout); a bias: the column sums of dy.
        let base = self.dec_total;
        if let Some(pp) = self.image_param(&lin.name, true).cloned() {
            gpu.gemm(
                &dy.slice(..),
                lin.n_out,
                true,
                &x.slice(..),
                lin.n_in,
                false,
                &mut self.g16_img.slice_mut(pp.at - base..pp.at - base + pp.len),
                lin.n_in,
                lin.n_out,
                lin.n_in,
                rows,
                1.0,
                0.0,
            )?;
        }
        if let Some(pp) = self.image_param(&lin.name, false).cloned() {
            let db = &mut self.g16_img.slice_mut(pp.at - base..pp.at - base + pp.len);
            column_sums(gpu, &mut self.ones, dy, rows, lin.n_out, db, 0.0)?;
        }
        let Some(sl) = self.image_slot(&lin.name).cloned() else { return Ok(()) };
        let t = t.ok_or_else(|| err(format!("no saved x A^T of {}", lin.name)))?;
        let mask = self.image_mask(&sl, drop);
        // Each image-path module runs once per image: its gradients overwrite the last image's.
        lora_grads(
            gpu,
            &self.p16,
            &mut self.g16_img,
            self.dec_total,
            Self::image_geom(&sl),
            x,
            t,
            dy,
            0,
            lin.n_out,
            dx,
            rows,
            0.0,
            mask,
        )
    }

    /// The image path's forward pass for preprocessed pixels under base + this copy's image-path LoRA (dropout
    /// masks from `drop`, as the CPU trainer's image part draws them), keeping what `image_backward` needs.
    pub(crate) fn image_forward(
        &self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        pixels: &[f32],
        drop: Option<u64>,
    ) -> Result<ImageTape> {
        use crate::cuda_clip::{act_kernel, activation_dev};
        let d = vision.cfg.hidden_size;
        let st = &gpu.stream;
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let (mut x, t) = vision.embed(gpu, pixels)?;
        let trained = |lin: &crate::cuda_clip::Lin| {
            self.image_slot(&lin.name).is_some() || self.image_params.iter().any(|p| p.layer == lin.name)
        };
        let first = vision
            .layers
            .iter()
            .position(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2].into_iter().any(trained))
            .unwrap_or(vision.layers.len());
        let mut layers = Vec::new();
        for (li, l) in vision.layers.iter().enumerate() {
            // Below the lowest trained layer nothing is kept.
            if let Some(tape) = self.image_layer_forward(gpu, vision, l, &mut x, t, li >= first, drop)? {
                layers.push(tape);
            }
        }
        let (row0, rows) = vision.selected(t);
        let ct = vision.proj1.n_out;
        let mut sel = a(rows * d)?;
        st.memcpy_dtod(&x.slice(row0 * d..t * d), &mut sel.slice_mut(..)).map_err(derr)?;
        let mut p1 = a(rows * ct)?;
        let t1 = self.image_linear(gpu, &vision.proj1, &sel, &mut p1, rows, drop)?;
        let mut pa = p1.try_clone().map_err(derr)?;
        activation_dev(
            gpu,
            act_kernel(vision.proj_act).ok_or_else(|| err("projector activation"))?,
            &mut pa,
            rows * ct,
        )?;
        let mut features = a(rows * ct)?;
        let t2 = self.image_linear(gpu, &vision.proj2, &pa, &mut features, rows, drop)?;
        Ok(ImageTape { t, first, layers, sel, p1, pa, proj_t: [t1, t2], features, rows, drop })
    }

    /// Backward of `image_forward` from the features' gradient `dfeat` (rows, text hidden; loss-scaled): the
    /// image path's LoRA gradients, added into the fp32 accumulators.
    pub(crate) fn image_backward(
        &mut self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        tape: &ImageTape,
        dfeat: &CudaSlice<f16>,
    ) -> Result<()> {
        let d = vision.cfg.hidden_size;
        let st = gpu.stream.clone();
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let (t, rows, dseed) = (tape.t, tape.rows, tape.drop);
        let ct = vision.proj1.n_out;
        // The projector: features = linear_2(act(linear_1(sel))).
        let mut dpa = a(rows * ct)?;
        self.image_linear_bwd(
            gpu,
            &vision.proj2,
            &tape.pa,
            tape.proj_t[1].as_ref(),
            dfeat,
            Some(&mut dpa),
            rows,
            false,
            dseed,
        )?;
        let mut dp1 = a(rows * ct)?;
        gpu.activation_bwd_dev(act_bwd_kernel(vision.proj_act)?, &mut dp1, &dpa, &tape.p1, rows * ct)?;
        drop(dpa);
        let tower = tape.first < vision.layers.len();
        let mut dsel = if tower { Some(a(rows * d)?) } else { None };
        self.image_linear_bwd(
            gpu,
            &vision.proj1,
            &tape.sel,
            tape.proj_t[0].as_ref(),
            &dp1,
            dsel.as_mut(),
            rows,
            false,
            dseed,
        )?;
        if let Some(dsel) = dsel {
            // The tower's output rows the projector read get their gradient; the rest (the class token's) none.
            let mut dx = a(t * d)?;
            let (row0, _) = vision.selected(t);
            st.memcpy_dtod(&dsel.slice(..), &mut dx.slice_mut(row0 * d..(row0 + rows) * d)).map_err(derr)?;
            for li in (tape.first..vision.layers.len()).rev() {
                let (l, lt) = (&vision.layers[li], &tape.layers[li - tape.first]);
                // The lowest trained layer needs no input gradient.
                self.image_layer_backward(gpu, vision, l, lt, &mut dx, t, li > tape.first, dseed)?;
            }
        }
        let base = self.dec_total;
        gpu.grad_accumulate_at(&mut self.g32, base, &self.g16_img)
    }

    /// One tower layer over x (t, D), in place, as `clip::ClipVision::image_layer_forward` computes it on the CPU;
    /// returns its tape when `keep` (layers at and above the lowest trained one).
    #[allow(clippy::too_many_arguments)]
    fn image_layer_forward(
        &self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        l: &crate::cuda_clip::ClipLayer,
        x: &mut CudaSlice<f16>,
        t: usize,
        keep: bool,
        drop: Option<u64>,
    ) -> Result<Option<ImageLayerTape>> {
        use crate::cuda_clip::{act_kernel, activation_dev, layernorm_dev};
        let cfg = &vision.cfg;
        let (d, inter, heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps as f32;
        let st = &gpu.stream;
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let act = act_kernel(cfg.hidden_act).ok_or_else(|| err("vision activation"))?;
        let x_in = if keep { Some(x.try_clone().map_err(derr)?) } else { None };
        let mut h1 = a(t * d)?;
        layernorm_dev(gpu, &mut h1, x, &l.ln1, t, d, eps)?;
        let (mut q, mut k, mut v) = (a(t * d)?, a(t * d)?, a(t * d)?);
        let tq = self.image_linear(gpu, &l.q, &h1, &mut q, t, drop)?;
        let tk = self.image_linear(gpu, &l.k, &h1, &mut k, t, drop)?;
        let tv = self.image_linear(gpu, &l.v, &h1, &mut v, t, drop)?;
        let mut att = a(t * d)?;
        let mut lse = st.alloc_zeros::<f32>(t * heads).map_err(derr)?;
        gpu.attention_prefill_strided_dev(
            &mut att,
            Some(&mut lse),
            &q,
            d,
            &k,
            &v,
            t,
            t,
            heads,
            heads,
            cfg.head_dim(),
            crate::ops::Mask::Full,
        )?;
        let mut tmp = a(t * d)?;
        let to = self.image_linear(gpu, &l.o, &att, &mut tmp, t, drop)?;
        gpu.residual_add_dev(x, &tmp, t * d)?;
        let x_mid = if keep { Some(x.try_clone().map_err(derr)?) } else { None };
        let mut h2 = a(t * d)?;
        layernorm_dev(gpu, &mut h2, x, &l.ln2, t, d, eps)?;
        let mut fpre = a(t * inter)?;
        let tf1 = self.image_linear(gpu, &l.fc1, &h2, &mut fpre, t, drop)?;
        let mut fact = fpre.try_clone().map_err(derr)?;
        activation_dev(gpu, act, &mut fact, t * inter)?;
        let tf2 = self.image_linear(gpu, &l.fc2, &fact, &mut tmp, t, drop)?;
        gpu.residual_add_dev(x, &tmp, t * d)?;
        Ok(match (x_in, x_mid) {
            (Some(x_in), Some(x_mid)) => Some(ImageLayerTape {
                x_in,
                h1,
                q,
                k,
                v,
                att,
                lse,
                x_mid,
                h2,
                fpre,
                fact,
                t: [tq, tk, tv, to, tf1, tf2],
            }),
            _ => None,
        })
    }

    /// Backward of `image_layer_forward` from `dx` (the layer output's gradient, t x D), replaced by the layer
    /// input's gradient when `below` (a trained layer lies below this one); LoRA gradients go to the accumulators.
    #[allow(clippy::too_many_arguments)]
    fn image_layer_backward(
        &mut self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        l: &crate::cuda_clip::ClipLayer,
        lt: &ImageLayerTape,
        dx: &mut CudaSlice<f16>,
        t: usize,
        below: bool,
        dseed: Option<u64>,
    ) -> Result<()> {
        let cfg = &vision.cfg;
        let (d, inter, heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps as f32;
        let st = gpu.stream.clone();
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let act = act_bwd_kernel(cfg.hidden_act)?;
        // MLP: x_out = x_mid + fc2(act(fc1(ln2(x_mid)))).
        let mut dfact = a(t * inter)?;
        self.image_linear_bwd(gpu, &l.fc2, &lt.fact, lt.t[5].as_ref(), dx, Some(&mut dfact), t, false, dseed)?;
        let mut dfpre = a(t * inter)?;
        gpu.activation_bwd_dev(act, &mut dfpre, &dfact, &lt.fpre, t * inter)?;
        drop(dfact);
        let mut dh = a(t * d)?;
        self.image_linear_bwd(gpu, &l.fc1, &lt.h2, lt.t[4].as_ref(), &dfpre, Some(&mut dh), t, false, dseed)?;
        let mut tmp = a(t * d)?;
        gpu.layernorm_bwd_dx_dev(&mut tmp, &dh, &lt.x_mid, &l.ln2.0, t, d, eps)?;
        gpu.residual_add_dev(dx, &tmp, t * d)?;
        // Attention: x_mid = x_in + out_proj(attention(q, k, v of ln1(x_in))), no mask.
        let mut datt = a(t * d)?;
        self.image_linear_bwd(gpu, &l.o, &lt.att, lt.t[3].as_ref(), dx, Some(&mut datt), t, false, dseed)?;
        let (mut dq, mut dk, mut dv) = (a(t * d)?, a(t * d)?, a(t * d)?);
        gpu.attention_bwd_dev(
            &mut dq,
            &mut dk,
            &mut dv,
            &lt.q,
            &lt.k,
            &lt.v,
            &lt.att,
            &lt.lse,
            &datt,
            t,
            t,
            heads,
            heads,
            cfg.head_dim(),
            crate::ops::Mask::Full,
        )?;
        drop(datt);
        let mut dh1 = if below { Some(a(t * d)?) } else { None };
        self.image_linear_bwd(gpu, &l.q, &lt.h1, lt.t[0].as_ref(), &dq, dh1.as_mut(), t, false, dseed)?;
        self.image_linear_bwd(gpu, &l.k, &lt.h1, lt.t[1].as_ref(), &dk, dh1.as_mut(), t, true, dseed)?;
        self.image_linear_bwd(gpu, &l.v, &lt.h1, lt.t[2].as_ref(), &dv, dh1.as_mut(), t, true, dseed)?;
        if let Some(dh1) = dh1 {
            gpu.layernorm_bwd_dx_dev(&mut tmp, &dh1, &lt.x_in, &l.ln1.0, t, d, eps)?;
            gpu.residual_add_dev(dx, &tmp, t * d)?;
        }
        Ok(())
    }

    /// The image path's backward from the decoder's input gradients `dxs` (loss-scaled, added): the image's
    /// feature rows start at row `row0` (c wide); LLaVA-NeXT's packed rows go back to the tiles they came from
    /// (`image_newline` rows get nothing), then each tile's tape runs backward, its gradients added.
    pub(super) fn image_backward_from_rows(
        &mut self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        tapes: &ImageTapes,
        dxs: &[CudaSlice<f16>],
        row0: usize,
        c: usize,
    ) -> Result<()> {
        let per_tile = tapes.tiles.first().map_or(0, |t| t.rows);
        let rows = match &tapes.packing {
            Some(p) => p.len(),
            None => per_tile * tapes.tiles.len(),
        };
        let n = rows * c;
        let st = gpu.stream.clone();
        let mut dfeat = st.alloc_zeros::<f16>(n.max(1)).map_err(derr)?;
        let mut part = st.alloc_zeros::<f16>(n.max(1)).map_err(derr)?;
        for dx in dxs {
            if dx.len() < (row0 * c) + n {
                return Err(err(format!(
                    "the decoder's input gradient has {} rows, the image's features end at row {}",
                    dx.len() / c,
                    row0 + rows
                )));
            }
            st.memcpy_dtod(&dx.slice(row0 * c..row0 * c + n), &mut part.slice_mut(..n)).map_err(derr)?;
            gpu.residual_add_dev(&mut dfeat, &part, n)?;
        }
        let unpacked = match &tapes.packing {
            None => dfeat,
            Some(packing) => {
                // Each packed row's gradient to the tile row it came from (fp32 on the host, as the CPU adds them).
                let d = gpu.download_f16(&dfeat)?;
                let mut tiles = vec![0f32; per_tile * tapes.tiles.len() * c];
                for (i, src) in packing.iter().enumerate() {
                    if let Some(r) = src {
                        let to = tiles
                            .get_mut(r * c..(r + 1) * c)
                            .ok_or_else(|| err(format!("anyres packing reads tile row {r}")))?;
                        for (a, b) in to.iter_mut().zip(&d[i * c..(i + 1) * c]) {
                            *a += b;
                        }
                    }
                }
                gpu.upload_f16(&tiles)?
            }
        };
        for (i, tape) in tapes.tiles.iter().enumerate() {
            let mut d = st.alloc_zeros::<f16>(per_tile * c).map_err(derr)?;
            st.memcpy_dtod(&unpacked.slice(i * per_tile * c..(i + 1) * per_tile * c), &mut d.slice_mut(..))
                .map_err(derr)?;
            self.image_backward(gpu, vision, tape, &d)?;
        }
        Ok(())
    }
}
