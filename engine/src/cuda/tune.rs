//! The GEMV tuner: which one-row kernel each (k, n) shape runs, measured at load.

use super::*;

/// How a one-row product (a batch-1 decode projection) runs: `gemv_m1_f16` with this many warps per output
/// feature, or cuBLASLt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvChoice {
    Gemv(usize),
    Blas,
}

impl std::fmt::Display for GemvChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GemvChoice::Gemv(s) => write!(f, "gemv/{s}"),
            GemvChoice::Blas => write!(f, "cublaslt"),
        }
    }
}

impl Gpu {
    /// How a one-row product of shape (k, n) runs, if `tune_gemv` measured it.
    pub fn gemv_choice(&self, k: usize, n: usize) -> Option<GemvChoice> {
        self.gemv_plan.lock().ok()?.get(&(k, n)).copied()
    }

    /// GPU time per call of `op(0..calls)` (us): a warm-up pass, then the median of 3 timed passes over the calls.
    pub fn time_passes(&self, calls: usize, op: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
        let mut pass = || -> Result<f64> {
            self.stream.synchronize().map_err(derr)?;
            let t = std::time::Instant::now();
            for i in 0..calls {
                op(i)?;
            }
            self.stream.synchronize().map_err(derr)?;
            Ok(t.elapsed().as_secs_f64() * 1e6 / calls.max(1) as f64)
        };
        pass()?;
        let mut t = [pass()?, pass()?, pass()?];
        t.sort_by(f64::total_cmp);
        Ok(t[1])
    }

    /// Measures, for each one-row product shape (k, n) with its weight matrices (a decoder's layers: together
    /// larger than the L2 cache, as a decode step reads them), `gemv_m1_f16` with 1, 2, 4 and 8 warps per output
    /// feature and cuBLASLt, and keeps the fastest for `matmul_dev`. Returns one line per shape: the times (us per
    /// product, median of 3 passes over the matrices after a warm-up pass) and the pick.
    pub fn tune_gemv(&self, shapes: &[(usize, usize, Vec<&CudaSlice<f16>>)]) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for (k, n, ws) in shapes {
            let (k, n) = (*k, *n);
            if ws.is_empty() || !k.is_multiple_of(8) {
                continue;
            }
            let x = self.stream.alloc_zeros::<f16>(k).map_err(derr)?;
            let mut y = self.stream.alloc_zeros::<f16>(n).map_err(derr)?;
            let mut best: Option<(GemvChoice, f64)> = None;
            let mut times = Vec::new();
            for choice in
                [GemvChoice::Gemv(1), GemvChoice::Gemv(2), GemvChoice::Gemv(4), GemvChoice::Gemv(8), GemvChoice::Blas]
            {
                let us = self.time_passes(ws.len(), &mut |i| match choice {
                    GemvChoice::Gemv(split) => self.gemv_split_dev(&x, ws[i], &mut y, k, n, split),
                    GemvChoice::Blas => self.linear_device(&x, ws[i], &mut y, 1, k, n),
                })?;
                times.push(format!("{choice} {us:.1}"));
                if best.is_none_or(|(_, b)| us < b) {
                    best = Some((choice, us));
                }
            }
            if let Some((choice, _)) = best {
                self.gemv_plan.lock().map_err(|_| err("the GEMV plan is poisoned"))?.insert((k, n), choice);
                lines.push(format!("k {k} n {n}: {} us -> {choice}", times.join(", ")));
            }
        }
        Ok(lines)
    }
}
