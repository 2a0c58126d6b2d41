//! Continuous batching of chat requests on one engine. A request becomes a [`Job`] in the engine's queue; one
//! serve-priority task on the engine thread runs while any job is queued or decoding: between decode steps it
//! admits queued jobs (image decoded, prompt prefilled, first tokens sampled: `engine::batch::Batch::admit`)
//! up to `server.max_batch` answers, runs one step for every unfinished answer of every job, and sends each
//! job's tokens to its handler as they come. A job whose client went away (its receiver dropped) or whose time
//! ran out leaves at the next step; an answer its handler ended on a stop string leaves too.
//!
//! Every job in a batch runs on the adapter it arrived with: after a hot-swap, jobs of the new generation wait
//! until the old generation's jobs have finished (a swap never changes weights under a request). The batch is
//! made on the engine's device for its generation's adapter (`engine::batch::Batch::new`: on a CUDA engine its
//! rows' caches are allocated then, and kept while jobs of the same generation follow). A job with more answers
//! than a GPU batch has rows runs whole with `generate`, its tokens sent when it ends.

use crate::rlaif::Engine;
use crate::serve::Serving;
use crate::worker::Priority;
use engine::batch::{Batch, BatchRequest, Emitted};
use engine::generate::{FinishReason, GenerateRequest};
use engine::sampling::SamplingParams;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What a handler hears about its job.
#[derive(Debug)]
pub enum JobEvent {
    /// A token of an answer, or an answer's end.
    Token(Emitted),
    /// The job failed before or while decoding; nothing more follows.
    Failed(JobError),
}

/// Why a job failed: the client's input (400), its time budget (503) or the engine (500).
#[derive(Debug)]
pub enum JobError {
    Bad(String),
    Timeout(String),
    Engine(String),
}

/// A chat request for the batch.
pub struct Job {
    pub ids: Vec<u32>,
    /// Encoded image bytes, decoded on the engine thread.
    pub image: Option<Vec<u8>>,
    pub max_image_side: u32,
    pub seeds: Vec<u64>,
    pub params: SamplingParams,
    pub logprobs: Option<usize>,
    /// Tokens that end an answer; the model's eos ids when empty.
    pub stop_ids: Vec<u32>,
    pub serving: Arc<Serving>,
    /// When its time budget ends, and the budget (for the message).
    pub deadline: (Instant, Duration),
    pub events: UnboundedSender<JobEvent>,
    /// Answers the handler ended (a stop string): they leave the batch at the next step.
    pub stopped: Arc<Mutex<Vec<usize>>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    running: bool,
    /// `server.max_batch` as of the latest submission (a reloaded configuration applies from the next).
    max_batch: usize,
}

/// An engine's queue of chat jobs and whether its batch task is running.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    /// Decode steps run, and the answers they advanced (their ratio is the mean batch).
    steps: AtomicU64,
    answer_steps: AtomicU64,
}

/// A job in the batch: how to reach its handler, its limits, and how many answers are unfinished.
struct Live {
    events: UnboundedSender<JobEvent>,
    deadline: (Instant, Duration),
    stopped: Arc<Mutex<Vec<usize>>>,
    /// Which answers have ended (a finish event sent, or stopped by the handler).
    done: Vec<bool>,
}

impl Live {
    fn left(&self) -> usize {
        self.done.iter().filter(|d| !**d).count()
    }
}

impl Batcher {
    /// Queues `job` on `eng` and starts the engine's batch task if it is not running.
    pub fn submit(eng: &Arc<Engine>, job: Job, max_batch: usize) {
        let start = {
            let Ok(mut s) = eng.batcher.state.lock() else {
                let _ = job.events.send(JobEvent::Failed(JobError::Engine("the batch queue is poisoned".into())));
                return;
            };
            s.queue.push_back(job);
            s.max_batch = max_batch.max(1);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let e = eng.clone();
            actix_web::rt::spawn(async move {
                let worker = e.worker.clone();
                let e2 = e.clone();
                let r = worker.run(Priority::Serve, move |slice| run_batches(&e2, slice)).await;
                // The task ended with an error (the engine thread stopped): fail what is queued and let the next
                // submission start a new task.
                if let Err(err) = r {
                    let failed: Vec<Job> = match e.batcher.state.lock() {
                        Ok(mut s) => {
                            s.running = false;
                            s.queue.drain(..).collect()
                        }
                        Err(_) => Vec::new(),
                    };
                    for j in failed {
                        let _ = j.events.send(JobEvent::Failed(JobError::Engine(format!("{err:#}"))));
                    }
                }
            });
        }
    }

    /// (decode steps, answers advanced by them) since start.
    pub fn steps(&self) -> (u64, u64) {
        (self.steps.load(Ordering::Relaxed), self.answer_steps.load(Ordering::Relaxed))
    }

    /// Jobs waiting to join a batch.
    pub fn queued(&self) -> usize {
        self.state.lock().map(|s| s.queue.len()).unwrap_or(0)
    }
}

/// The batch task: runs until no job is queued or decoding.
fn run_batches(eng: &Engine, slice: &crate::worker::Slice) -> anyhow::Result<()> {
    // The batch and the generation it was made for; made again when an empty batch meets another generation.
    let mut current: Option<(Batch, Arc<Serving>)> = None;
    let mut live: HashMap<u64, Live> = HashMap::new();
    loop {
        // An empty batch: stop when nothing is queued, else make sure the batch is for the next job's generation.
        let (next, max_batch) = {
            let Ok(mut s) = eng.batcher.state.lock() else { anyhow::bail!("the batch queue is poisoned") };
            let empty = current.as_ref().is_none_or(|(b, _)| b.is_empty());
            if empty && s.queue.is_empty() {
                s.running = false;
                return Ok(());
            }
            (if empty { s.queue.front().map(|j| j.serving.clone()) } else { None }, s.max_batch)
        };
        if let Some(sv) = next {
            if current.as_ref().is_none_or(|(_, cur)| cur.generation != sv.generation) {
                current = None;
                match Batch::new(&eng.model, sv.adapter.clone(), max_batch) {
                    Ok(b) => current = Some((b, sv)),
                    Err(e) => {
                        // No batch for this generation (the device is out of memory, say): its first job fails.
                        let job = eng.batcher.state.lock().ok().and_then(|mut s| s.queue.pop_front());
                        if let Some(j) = job {
                            let _ = j.events.send(JobEvent::Failed(engine_error(e)));
                        }
                        continue;
                    }
                }
            }
        }
        let Some((batch, serving)) = current.as_mut() else { continue };
        // Admit what fits: jobs of the batch's generation, in arrival order.
        let admitted: Vec<Job> = {
            let Ok(mut s) = eng.batcher.state.lock() else { anyhow::bail!("the batch queue is poisoned") };
            let mut take = Vec::new();
            let limit = batch.capacity().map_or(s.max_batch, |c| c.min(s.max_batch));
            let mut room = limit.saturating_sub(batch.active_answers());
            while let Some(j) = s.queue.front() {
                // An empty batch takes a job larger than the room (n <= server.max_n) rather than never.
                if serving.generation != j.serving.generation
                    || (j.seeds.len() > room && !(batch.is_empty() && take.is_empty()))
                {
                    break;
                }
                let Some(j) = s.queue.pop_front() else { break };
                room = room.saturating_sub(j.seeds.len());
                take.push(j);
            }
            take
        };
        for job in admitted {
            if job.events.is_closed() {
                continue;
            }
            if Instant::now() >= job.deadline.0 {
                let _ = job.events.send(JobEvent::Failed(timeout(job.deadline.1)));
                continue;
            }
            admit(eng, batch, &mut live, job);
        }
        if batch.is_empty() {
            continue;
        }
        // Other serve-priority tasks (a hot-swap's adapter load, a best-of-N request) run between steps.
        slice.yield_to_peers();
        let rows = batch.active_answers() as u64;
        match batch.step(&eng.model) {
            Ok(events) => {
                eng.batcher.steps.fetch_add(1, Ordering::Relaxed);
                eng.batcher.answer_steps.fetch_add(rows, Ordering::Relaxed);
                dispatch(&mut live, events)
            }
            Err(e) => {
                // The step failed for every job in it; the next job gets a new batch.
                let msg = format!("{e:#}");
                for (_, l) in live.drain() {
                    let _ = l.events.send(JobEvent::Failed(JobError::Engine(msg.clone())));
                }
                current = None;
                continue;
            }
        }
        // Leave: jobs whose client went away or whose time ran out, answers ended on a stop string.
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, l) in live.iter_mut() {
            if l.events.is_closed() {
                gone.push(id);
            } else if now >= l.deadline.0 {
                let _ = l.events.send(JobEvent::Failed(timeout(l.deadline.1)));
                gone.push(id);
            } else {
                let stopped: Vec<usize> = l.stopped.lock().map(|mut s| s.drain(..).collect()).unwrap_or_default();
                for a in stopped {
                    batch.cancel_answer(id, a);
                    if let Some(d) = l.done.get_mut(a) {
                        *d = true;
                    }
                }
            }
        }
        for id in gone {
            batch.cancel(id);
            live.remove(&id);
        }
        live.retain(|_, l| l.left() > 0);
    }
}

fn timeout(budget: Duration) -> JobError {
    JobError::Timeout(format!("the request ran past its time budget of {:.1} s", budget.as_secs_f64()))
}

/// Decodes the job's image and joins it to the batch, or (more answers than a GPU batch has rows) generates it
/// whole and sends its tokens at the end; or tells its handler why not.
fn admit(eng: &Engine, batch: &mut Batch, live: &mut HashMap<u64, Live>, job: Job) {
    crate::failpoint::stall("engine_stall");
    let pixels = match job.image.as_deref().map(|b| prepare_image(eng, b, job.max_image_side)).transpose() {
        Ok(p) => p,
        Err(e) => {
            let _ = job.events.send(JobEvent::Failed(JobError::Bad(e)));
            return;
        }
    };
    let request = GenerateRequest {
        ids: &job.ids,
        pixels: pixels.as_ref(),
        seeds: &job.seeds,
        params: job.params.clone(),
        stop_ids: job.stop_ids.clone(),
    };
    if batch.capacity().is_some_and(|c| job.seeds.len() > c) {
        if job.logprobs.is_some() {
            let why = format!(
                "logprobs with n = {} on {}: its batch holds {} answers; ask for fewer answers",
                job.seeds.len(),
                batch.device(),
                batch.capacity().unwrap_or(0)
            );
            let _ = job.events.send(JobEvent::Failed(JobError::Bad(why)));
            return;
        }
        let adapter = job.serving.adapter.as_deref();
        match engine::generate::generate(&eng.model, &request, adapter) {
            Ok(answers) => {
                for (i, a) in answers.iter().enumerate() {
                    for e in answer_events(i, a) {
                        let _ = job.events.send(JobEvent::Token(e));
                    }
                }
            }
            Err(e) => {
                let _ = job.events.send(JobEvent::Failed(engine_error(e)));
            }
        }
        return;
    }
    match batch.admit(&eng.model, &BatchRequest { request, logprobs: job.logprobs }) {
        Ok((id, events)) => {
            let done = vec![false; job.seeds.len()];
            let mut l = Live { events: job.events, deadline: job.deadline, stopped: job.stopped, done };
            for e in events {
                send(&mut l, e);
            }
            if l.left() > 0 {
                live.insert(id, l);
            }
        }
        Err(e) => {
            let _ = job.events.send(JobEvent::Failed(engine_error(e)));
        }
    }
}

/// A finished answer as the events a batch would have sent for it: one per token, the last carrying the end (a
/// stop token, or an empty answer, gets an event of its own).
pub fn answer_events(index: usize, a: &engine::generate::Answer) -> Vec<Emitted> {
    let n = a.tokens.len();
    let mut out: Vec<Emitted> = a
        .tokens
        .iter()
        .enumerate()
        .map(|(k, &t)| {
            let finish = (k + 1 == n && a.finish == FinishReason::Length).then_some(FinishReason::Length);
            Emitted { request: 0, answer: index, token: Some(t), logprob: None, finish }
        })
        .collect();
    if a.finish == FinishReason::Stop || n == 0 {
        out.push(Emitted { request: 0, answer: index, token: None, logprob: None, finish: Some(a.finish) });
    }
    out
}

/// A request's encoded image, decoded within `max_side` and preprocessed for the engine's model (on the engine
/// thread). Err: what is wrong with the image (the client's error).
pub fn prepare_image(eng: &Engine, bytes: &[u8], max_side: u32) -> Result<engine::image::PixelValues, String> {
    let img = engine::image::decode_rgb8_within(bytes, "request image", max_side).map_err(|e| e.to_string())?;
    engine::image::preprocess(&img, &eng.ip).map_err(|e| e.to_string())
}

fn engine_error(e: engine::EngineError) -> JobError {
    match e {
        engine::EngineError::Input(m) => JobError::Bad(m),
        engine::EngineError::Image(i) => JobError::Bad(i.to_string()),
        engine::EngineError::Interrupted(why) => JobError::Timeout(why),
        other => JobError::Engine(other.to_string()),
    }
}

fn send(l: &mut Live, e: Emitted) {
    if e.finish.is_some() {
        if let Some(d) = l.done.get_mut(e.answer) {
            *d = true;
        }
    }
    let _ = l.events.send(JobEvent::Token(e));
}

fn dispatch(live: &mut HashMap<u64, Live>, events: Vec<Emitted>) {
    for e in events {
        if let Some(l) = live.get_mut(&e.request) {
            send(l, e);
        }
    }
}
