//! Where the model math of generation, scoring and training runs: the CPU backend (`cpu.rs`) or a CUDA device
//! (`cuda.rs`). A `Model` always carries one (`Model::set_backend`; the CPU unless the daemon or a command picked
//! a device with `--device` / `model.device`), and `generate::generate`, `Model::answer_logp`,
//! `Model::image_features` and `Model::branch_logits` dispatch through it, so every caller (the sampler, the
//! labeler's reference scoring, the server, best-of-n, evaluation) runs on the chosen device. Both backends
//! implement the same trait methods under the same names.
//!
//! The CUDA backend runs the decoder on the GPU (`cuda_llama::GpuLlama`, weights uploaded once as fp16, the
//! prompt prefilled once and the n answers decoded together against it, LoRA applied unmerged from
//! `cuda_lora::GpuLora::for_inference`). The vision tower and projector run on the device too
//! (`cuda_clip::GpuVision`, with an adapter's LoRA and replaced linear layers there: `cuda_clip::GpuVisionAdapter`);
//! the features are spliced into the prompt's embedding rows on the host and uploaded (`cuda_llama::Input::Embeds`).
//! Continuous batching (`crate::batch::Batch`) asks the backend for its rows (`Backend::batch_rows`): the CPU's
//! KV caches, or a GPU's batch cache of one slot per answer (`cuda_llama::GpuRows`).
//! Sampling is on the host, as on the CPU backend (`crate::sampling`: the same function and the same per-answer
//! RNG streams). What the GPU decoder cannot apply (an adapter with LoRA on the lm_head, or whole decoder
//! parameters) runs on the CPU backend, with a warning logged once per adapter.
//!
//! Training (`train::trainer::train_dpo`, `train::sft::train_sft`) asks the backend once where a run goes
//! (`Backend::training_placement`): the CUDA backend trains LoRA on any subset of the seven projections of every
//! decoder layer, with or without dropout, and adapters that also train the image path (LoRA on the vision
//! tower's and the projector's linear layers, the projector's weights and biases in full) when the image path runs
//! on the device, fresh or resumed from an optimizer state saved on either device (`cuda_train`). Any other run
//! goes to the CPU trainer, with the reason logged.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::generate::{Answer, GenerateRequest, GenerateStats};
use crate::llava::Model;
use crate::train::dpo::TokenPair;
use crate::train::optim::AdamW;
use crate::train::sft::{SftConfig, SftExample, SftStepLog};
use crate::train::trainer::{StepLog, TrainConfig};
use std::sync::Arc;

mod cpu;
mod cuda;

pub use cpu::CpuBackend;
pub use cuda::CudaBackend;

/// A device as the user names it: `auto`, `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| {
                    format!("device {s:?}: the part after \"cuda:\" must be a device number, e.g. cuda:0")
                }),
                None => Err(format!("unknown device {s:?}: use auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The operations whose math a backend runs. Both take the `Model` for its configuration, tokenizer-independent
/// input checks and the parts that stay on the CPU.
pub trait Backend: Send + Sync {
    /// What it runs on, e.g. "cpu" or "cuda:0 (NVIDIA H200, sm_90)".
    fn device(&self) -> String;
    /// The device as `select` takes it (a second model, e.g. a labeler, goes to the same one).
    fn spec(&self) -> DeviceSpec;
    /// `generate::generate_with_stats` on this backend.
    fn generate(
        &self,
        model: &Model,
        req: &GenerateRequest,
        adapter: Option<&Adapter>,
    ) -> Result<(Vec<Answer>, GenerateStats)>;
    /// `generate::generate_batch` on this backend: one answer to each of several text prompts. This default
    /// generates them one at a time with `generate`; the CPU backend computes their common beginning once and
    /// decodes them together.
    fn generate_batch(
        &self,
        model: &Model,
        prompts: &[&[u32]],
        seeds: &[u64],
        params: &crate::sampling::SamplingParams,
        stop_ids: &[u32],
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Answer>> {
        let mut out = Vec::with_capacity(prompts.len());
        for (ids, seed) in prompts.iter().zip(seeds) {
            let req = GenerateRequest {
                ids,
                pixels: None,
                seeds: std::slice::from_ref(seed),
                params: params.clone(),
                stop_ids: stop_ids.to_vec(),
            };
            let (answers, _) = self.generate(model, &req, adapter)?;
            out.extend(answers);
        }
        Ok(out)
    }
    /// The rows of a continuous batch (`crate::batch::Batch`) under `adapter`, for up to `max_answers` answers at
    /// once. This default keeps them on the CPU (`crate::batch::CpuRows`); the CUDA backend allocates them on its
    /// device, or keeps them on the CPU where the GPU decoder cannot apply the adapter.
    fn batch_rows(
        &self,
        _model: &Model,
        adapter: Option<Arc<Adapter>>,
        _max_answers: usize,
    ) -> Result<Box<dyn crate::batch::BatchRows>> {
        Ok(Box::new(crate::batch::CpuRows::new(adapter)))
    }
    /// `Model::answer_logp` on this backend.
    fn answer_logp(
        &self,
        model: &Model,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&crate::llava::ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<f64>;
    /// `Model::image_features` (vision tower and projector) on this backend.
    fn image_features(
        &self,
        model: &Model,
        pixels: &crate::image::PixelValues,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>>;
    /// `Model::branch_logits` (the labeler's yes/no verification) on this backend.
    fn branch_logits(
        &self,
        model: &Model,
        prefix: &[u32],
        continuations: &[&[u32]],
        feats: Option<&crate::llava::ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>>;
    /// Where a LoRA training run of `adapter` goes: on this backend's device, or on the CPU trainer (with the
    /// reason when this backend has a device but cannot train this adapter there).
    fn training_placement(&self, _model: &Model, _adapter: &Adapter) -> Placement {
        Placement::Cpu(None)
    }
    /// `train::trainer::train_dpo` on this backend's device, for a run `training_placement` put there.
    #[allow(clippy::too_many_arguments)]
    fn train_dpo(
        &self,
        _model: &Model,
        _adapter: &mut Adapter,
        _pairs: &[TokenPair],
        _refs: &[(f64, f64)],
        _cfg: &TrainConfig,
        _opt: &mut AdamW,
        _stop_after: Option<usize>,
        _on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<()> {
        Err(EngineError::Device(format!("{} has no device trainer", self.device())))
    }
    /// One rank of `train::parallel::train_dpo_parallel` on this backend's device: `train_dpo` over the rank's
    /// share of every batch, the gradients summed with the other ranks' before each optimizer step.
    #[allow(clippy::too_many_arguments)]
    fn train_dpo_rank(
        &self,
        _model: &Model,
        _adapter: &mut Adapter,
        _pairs: &[TokenPair],
        _refs: &[(f64, f64)],
        _cfg: &TrainConfig,
        _opt: &mut AdamW,
        _stop_after: Option<usize>,
        rank: &crate::train::parallel::Rank,
        _on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<()> {
        let why = format!("{} cannot be a data-parallel rank (GPUs only)", self.device());
        rank.meeting.abandon(rank.rank, &why);
        Err(EngineError::Device(why))
    }
    /// `train::sft::train_sft` of a LoRA adapter on this backend's device, for a run `training_placement` put
    /// there.
    #[allow(clippy::too_many_arguments)]
    fn train_sft(
        &self,
        _model: &Model,
        _adapter: &mut Adapter,
        _examples: &[SftExample],
        _cfg: &SftConfig,
        _opt: &mut AdamW,
        _stop_after: Option<usize>,
        _on_step: &mut dyn FnMut(&SftStepLog),
    ) -> Result<()> {
        Err(EngineError::Device(format!("{} has no device trainer", self.device())))
    }
}

/// Where a training run goes (`Backend::training_placement`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the backend's device (its label, e.g. "cuda:0 (NVIDIA H200, sm_90)").
    Device(String),
    /// On the CPU trainer; with the reason when a device was there but cannot train this run.
    Cpu(Option<String>),
}

impl Placement {
    pub fn on_device(&self) -> bool {
        matches!(self, Placement::Device(_))
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Placement::Device(d) => write!(f, "{d}"),
            Placement::Cpu(None) => write!(f, "cpu"),
            Placement::Cpu(Some(why)) => write!(f, "cpu ({why})"),
        }
    }
}

/// Opens the backend `spec` names for `model`. Returns it and a line saying what was chosen and, for `auto`
/// without a usable GPU, why not. An explicit `cuda[:N]` that cannot be used is an error naming the reason and the
/// way out.
/// The most devices one process drives (`expand_devices`): each holds a copy of the model.
pub const MAX_DEVICES: usize = 16;

/// The devices `model.devices` names, one engine each: "auto" (every CUDA device the driver reports, else the
/// CPU), "all" (every CUDA device; none is an error), or a list of device names ("cuda:0", "cuda:3", "cpu"; "cpu"
/// may repeat: one CPU engine thread each). A device named twice (other than "cpu") is refused, as is an empty list.
pub fn expand_devices(names: &[String]) -> std::result::Result<Vec<DeviceSpec>, String> {
    match names {
        [] => Err("no devices named (use \"auto\", \"all\" or a list such as [\"cuda:0\", \"cuda:1\"])".into()),
        [one] if one.trim() == "auto" || one.trim() == "all" => {
            let n = crate::cuda::device_count();
            match (n, one.trim()) {
                (0, "auto") => Ok(vec![DeviceSpec::Auto]),
                (0, _) => Err(format!(
                    "\"all\" asks for every GPU, but none is usable here ({})",
                    crate::cuda::driver_status().err().unwrap_or_else(|| "the driver reports 0 devices".into())
                )),
                (n, _) => Ok((0..n).map(DeviceSpec::Cuda).collect()),
            }
        }
        list if list.len() > MAX_DEVICES => {
            Err(format!("{} devices named: at most {MAX_DEVICES} (each loads its own copy of the model)", list.len()))
        }
        list => {
            let mut out: Vec<DeviceSpec> = Vec::with_capacity(list.len());
            for s in list {
                let d: DeviceSpec = s.parse()?;
                if matches!(d, DeviceSpec::Auto) {
                    return Err("\"auto\" goes alone (devices = \"auto\"), not in a list".into());
                }
                if d != DeviceSpec::Cpu && out.contains(&d) {
                    return Err(format!("device {d} is named twice"));
                }
                out.push(d);
            }
            Ok(out)
        }
    }
}

pub fn select(spec: DeviceSpec, model: &Model) -> Result<(Arc<dyn Backend>, String)> {
    match spec {
        DeviceSpec::Cpu => Ok((Arc::new(CpuBackend), "cpu (asked for)".into())),
        DeviceSpec::Cuda(n) => match CudaBackend::open(n, model) {
            Ok(b) => {
                let d = b.device();
                Ok((Arc::new(b), d))
            }
            Err(why) => Err(EngineError::Device(format!(
                "device cuda:{n} cannot be used: {why} (use --device cpu, or auto to fall back to the CPU)"
            ))),
        },
        DeviceSpec::Auto => match CudaBackend::open(0, model) {
            Ok(b) => {
                let d = b.device();
                Ok((Arc::new(b), d))
            }
            Err(why) => Ok((Arc::new(CpuBackend), format!("cpu (no usable GPU: {why})"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            (" cpu ", DeviceSpec::Cpu),
        ] {
            assert_eq!(s.parse::<DeviceSpec>(), Ok(d), "{s}");
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!("cuda".parse::<DeviceSpec>().map(|d| d.to_string()), Ok("cuda:0".into()));
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            expand_devices(&names(&["cuda:0", "cuda:3", "cpu", "cpu"])),
            Ok(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(3), DeviceSpec::Cpu, DeviceSpec::Cpu])
        );
        assert!(expand_devices(&names(&["cuda:1", "cuda:1"])).unwrap_err().contains("cuda:1 is named twice"));
        assert!(expand_devices(&names(&["auto", "cpu"])).unwrap_err().contains("goes alone"));
        assert!(expand_devices(&[]).unwrap_err().contains("no devices"));
        assert!(expand_devices(&vec!["cpu".to_string(); MAX_DEVICES + 1]).unwrap_err().contains("at most 16"));
        // "auto" is every GPU the driver reports, else the CPU (through the usual fallback).
        let auto = expand_devices(&names(&["auto"])).unwrap();
        match crate::cuda::device_count() {
            0 => assert_eq!(auto, vec![DeviceSpec::Auto]),
            n => assert_eq!(auto, (0..n).map(DeviceSpec::Cuda).collect::<Vec<_>>()),
        }
        let e = "gpu".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("\"gpu\"") && e.contains("cuda:N"), "{e}");
        let e = "cuda:x".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("device number"), "{e}");
        assert!("cuda:-1".parse::<DeviceSpec>().is_err());
    }
}
