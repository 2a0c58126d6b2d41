//! The Server actor: actix-web with OpenAI-compatible `POST /v1/chat/completions` (text and an image as a data
//! URL; `n`, `temperature`, `top_p`, `max_tokens`, `seed`, `best_of`), `GET /v1/models` (the served checkpoint
//! and its lineage), `GET /healthz` and `GET /metrics` (Prometheus text). Each request takes the served
//! generation once, at its start, and finishes on it: a hot-swap never changes weights under a request.

use crate::serve::Daemon;
use crate::store;
use crate::worker::{Priority, PRIORITIES};
use actix_web::dev::Service as _;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::{Context, Result};
use base64::Engine as _;
use engine::generate::{generate, FinishReason, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::tokenizer::{LLAVA_15_TEMPLATE, TEXT_TEMPLATE};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// An error answered as OpenAI does: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let kind = match self.status.as_u16() {
            400 | 413 | 415 | 404 | 405 => "invalid_request_error",
            429 => "rate_limit_error",
            401 => "authentication_error",
            503 => "unavailable",
            _ => "server_error",
        };
        HttpResponse::build(self.status).json(
            serde_json::json!({ "error": { "message": self.message, "type": kind, "code": self.status.as_u16() } }),
        )
    }
}

#[derive(serde::Deserialize)]
struct ChatRequest {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<Message>,
    n: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens` (taken first when both are given).
    max_completion_tokens: Option<usize>,
    /// Up to 4 strings that end an answer where they first appear (not included in it).
    stop: Option<Stop>,
    seed: Option<u64>,
    best_of: Option<usize>,
    stream: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The most stop strings a request may give (OpenAI's limit), and the longest one.
const MAX_STOP: usize = 4;
const MAX_STOP_BYTES: usize = 256;

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(serde::Deserialize)]
#[serde(tag = "type")]
enum Part {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(rename = "image_url")]
    ImageUrl { image_url: ImageUrl },
}

#[derive(serde::Deserialize)]
struct ImageUrl {
    url: String,
}

/// The request reduced to what the model takes.
struct Parsed {
    text: String,
    image: Option<Vec<u8>>,
    n: usize,
    best_of: Option<usize>,
    /// `params.max_new_tokens` is `max_tokens` when the client gave it, else the server's default (which the
    /// prompt's length may lower to fit the context).
    params: SamplingParams,
    max_tokens_given: bool,
    seed: u64,
    /// Answers end before the first of these (finish_reason "stop").
    stop: Vec<String>,
}

/// A prompt longer than this many bytes per token of the model's context cannot fit (no vocabulary this engine
/// loads has tokens that long): refused before tokenizing, so tokenizing is bounded too.
pub const MAX_PROMPT_BYTES_PER_TOKEN: usize = 64;

/// Open HTTP connections per server worker.
pub const MAX_CONNECTIONS_PER_WORKER: usize = 1024;

/// How long a client may take to send its body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn decode_data_url(url: &str) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::bad("image_url.url must be a data URL (data:image/png;base64,... or data:image/jpeg;base64,...); rlaifd does not fetch URLs"));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::bad("image_url.url: a data URL needs a comma before its data"));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad("image_url.url: the data URL must be base64-encoded (data:image/png;base64,...)"));
    }
    let mime = meta.trim_end_matches(";base64");
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
        return Err(ApiError::bad(format!(
            "image_url.url: media type {mime:?} is not supported (image/png or image/jpeg)"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(format!("image_url.url: invalid base64 data: {e}")))
}

/// Validates a chat request body against the server's limits (what `POST /v1/chat/completions` does before any
/// model work): Err with the message a client would get. The fuzz targets call this.
pub fn validate_chat_request(body: &[u8], cfg: &crate::config::ServerConfig) -> Result<(), String> {
    parse(body, cfg).map(|_| ()).map_err(|e| e.message)
}

fn parse(body: &[u8], cfg: &crate::config::ServerConfig) -> Result<Parsed, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not a valid chat request: {e}")))?;
    if req.stream == Some(true) {
        return Err(ApiError::bad("stream: true is not supported; omit it for one JSON response"));
    }
    let mut text = String::new();
    let mut image = None;
    let mut users = 0;
    for (i, m) in req.messages.iter().enumerate() {
        match m.role.as_str() {
            "system" | "developer" | "user" => {}
            "assistant" | "tool" => return Err(ApiError::bad(format!("messages[{i}]: multi-turn conversations are not supported; send one user message (and an optional system message)"))),
            other => return Err(ApiError::bad(format!("messages[{i}].role {other:?}: expected system, developer or user"))),
        }
        users += usize::from(m.role == "user");
        let parts: Vec<&Part> = match &m.content {
            Content::Text(t) => {
                push_text(&mut text, t);
                Vec::new()
            }
            Content::Parts(p) => p.iter().collect(),
        };
        for p in parts {
            match p {
                Part::Text { text: t } => push_text(&mut text, t),
                Part::ImageUrl { image_url } => {
                    if m.role != "user" {
                        return Err(ApiError::bad(format!("messages[{i}]: images go in the user message")));
                    }
                    if image.is_some() {
                        return Err(ApiError::bad("only one image per request is supported"));
                    }
                    image = Some(decode_data_url(&image_url.url)?);
                }
            }
        }
    }
    if users != 1 {
        return Err(ApiError::bad(format!("messages: expected exactly one user message, got {users}")));
    }
    if text.trim().is_empty() {
        return Err(ApiError::bad("messages: the user message has no text"));
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > cfg.max_n {
        return Err(ApiError::bad(format!("n must be between 1 and {} (server.max_n), got {n}", cfg.max_n)));
    }
    if let Some(b) = req.best_of {
        if b < n || b > cfg.max_n {
            return Err(ApiError::bad(format!(
                "best_of must be between n ({n}) and {} (server.max_n), got {b}",
                cfg.max_n
            )));
        }
    }
    let given = req.max_completion_tokens.or(req.max_tokens);
    let max_tokens = given.unwrap_or(cfg.max_tokens.min(256));
    if max_tokens == 0 || max_tokens > cfg.max_tokens {
        return Err(ApiError::bad(format!(
            "max_completion_tokens (max_tokens) must be between 1 and {} (server.max_tokens), got {max_tokens}",
            cfg.max_tokens
        )));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(format!(
            "stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        max_new_tokens: max_tokens,
        ..Default::default()
    };
    params.validate().map_err(ApiError::bad)?;
    let seed = req.seed.unwrap_or_else(|| {
        engine::rng::SplitMix64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos() as u64)
                .unwrap_or(0),
        )
        .next_u64()
            >> 1
    });
    Ok(Parsed { text, image, n, best_of: req.best_of, params, max_tokens_given: given.is_some(), seed, stop })
}

fn push_text(acc: &mut String, t: &str) {
    if !acc.is_empty() && !t.is_empty() {
        acc.push('\n');
    }
    acc.push_str(t);
}

fn check_auth(req: &HttpRequest, d: &Daemon) -> Result<(), ApiError> {
    check_token(req, &d.config().server.token)
}

fn check_token(req: &HttpRequest, token: &crate::config::Secret) -> Result<(), ApiError> {
    let token = token.expose();
    if token.is_empty() {
        return Ok(());
    }
    let given = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison.
    let ok = given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer TOKEN)"))
    }
}

/// One chat request in flight (`server.max_pending`); the count drops when it is dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn admit(count: &'a AtomicUsize, max: usize) -> Option<InFlight<'a>> {
        if count.fetch_add(1, Ordering::SeqCst) >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight(count))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the model will be asked: the prompt's ids and the answer length, checked against the context and the
/// engine's memory budget before any model work.
struct Planned {
    ids: Vec<u32>,
    max_new_tokens: usize,
}

/// Bounds a parsed request before it reaches the engine: the prompt's bytes (before tokenizing), the image's
/// side (from its header), prompt plus `max_tokens` against the model's context, and the request's memory.
fn plan(p: &Parsed, e: &crate::rlaif::Engine, max_image_side: u32) -> Result<Planned, ApiError> {
    let ctx = e.model.context_len();
    let max_bytes = ctx.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN);
    if p.text.len() > max_bytes {
        return Err(ApiError::bad(format!(
            "the prompt is {} bytes, more than the model's context of {ctx} tokens can hold (at most {max_bytes} bytes); shorten it",
            p.text.len()
        )));
    }
    if let Some(bytes) = &p.image {
        let (w, h) =
            engine::image::header_dimensions(bytes, "request image").map_err(|e| ApiError::bad(e.to_string()))?;
        if w > max_image_side || h > max_image_side {
            return Err(ApiError::bad(format!(
                "the image is {w}x{h}, larger than {max_image_side} pixels per side (server.max_image_side)"
            )));
        }
    }
    let template = if p.image.is_some() { LLAVA_15_TEMPLATE } else { TEXT_TEMPLATE };
    let ids = e
        .tok
        .encode_chat(template, &p.text)
        .map_err(|e| ApiError::bad(format!("the prompt cannot be tokenized: {e}")))?;
    let positions = e.model.prompt_positions(&ids);
    let asked = p.params.max_new_tokens;
    let max_new_tokens = if p.max_tokens_given {
        if positions + asked > ctx {
            return Err(ApiError::bad(format!(
                "the prompt takes {positions} tokens (template and image included) and max_tokens is {asked}: {} in all, more than the model's context of {ctx} tokens; shorten the prompt or lower max_tokens",
                positions + asked
            )));
        }
        asked
    } else {
        // No max_tokens: as long as the context allows, up to the server's default.
        asked.min(ctx.saturating_sub(positions))
    };
    if max_new_tokens == 0 {
        return Err(ApiError::bad(format!("the prompt takes {positions} tokens (template and image included), the model's whole context of {ctx}: no room for an answer; shorten the prompt")));
    }
    let shape =
        engine::limits::RequestShape { prompt_positions: positions, answers: p.best_of.unwrap_or(p.n), max_new_tokens };
    e.model.check_request(shape, e.model.request_budget()).map_err(|e| ApiError::bad(format!("{e}")))?;
    Ok(Planned { ids, max_new_tokens })
}

/// An error from the engine thread as the client sees it: a bad input 400, a spent time budget or a stopped
/// engine 503, anything else 500.
fn engine_failure(e: anyhow::Error, timeout_s: f64) -> ApiError {
    if let Some(ApiErrorKind::Bad(m)) = e.downcast_ref::<ApiErrorKind>() {
        return ApiError::bad(m.clone());
    }
    match e.downcast_ref::<engine::EngineError>() {
        Some(engine::EngineError::Input(m)) => ApiError::bad(m.clone()),
        Some(engine::EngineError::Image(i)) => ApiError::bad(i.to_string()),
        Some(engine::EngineError::Interrupted(why)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why} (server.request_timeout_s = {timeout_s}); retry with a smaller max_tokens or n, or later"),
        ),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn chat(req: HttpRequest, payload: web::Payload, d: web::Data<Arc<Daemon>>) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    // One snapshot of the configuration for the whole request (a reload-config meanwhile applies to the next).
    let cfg = d.config();
    let server_cfg = &cfg.server;
    check_token(&req, &server_cfg.token)?;
    if !cfg.daemon.has_role("serve") {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this daemon does not serve chat requests (daemon.roles = {:?}): send them to a daemon with the \"serve\" role", cfg.daemon.roles),
        ));
    }
    if let Some(peer) = req.peer_addr() {
        if !d.metrics.admit(peer.ip(), server_cfg.rate_per_s, server_cfg.rate_burst) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "rate limit: at most {} requests per second per client (server.rate_per_s)",
                    server_cfg.rate_per_s
                ),
            ));
        }
    }
    let ct = req.headers().get("content-type").and_then(|h| h.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json (got {ct:?})"),
        ));
    }
    // Before the body is read: requests in flight hold at most max_pending bodies.
    let Some(_in_flight) = InFlight::admit(&d.chat_in_flight, server_cfg.max_pending) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy: {} chat requests in flight (server.max_pending); retry later",
                server_cfg.max_pending
            ),
        ));
    };
    let limit = server_cfg.max_body_bytes;
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, payload.to_bytes_limited(limit)).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
            ))
        }
        Ok(Ok(Ok(b))) => b,
        Ok(Ok(Err(e))) => return Err(ApiError::bad(format!("reading the body: {e}"))),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes (server.max_body_bytes)"),
            ))
        }
    };
    let p = parse(&body, server_cfg)?;
    drop(body);
    let (max_side, beta, timeout_s) = (server_cfg.max_image_side, cfg.loop_.beta, server_cfg.request_timeout_s);
    // The least-loaded engine takes the request (one per device of `model.devices`).
    let eng = d.least_loaded();
    let _counted = eng.busy();
    let planned = plan(&p, &eng, max_side)?;
    let serving = d.serving();
    let (ee, s) = (eng.clone(), serving.clone());
    let image = p.image.clone();
    let (n, best_of, seed, stop) = (p.n, p.best_of, p.seed, p.stop.clone());
    let params = SamplingParams { max_new_tokens: planned.max_new_tokens, ..p.params.clone() };
    let ids = planned.ids;
    let budget = std::time::Duration::from_secs_f64(timeout_s).saturating_sub(arrived.elapsed());
    let t0 = Instant::now();
    let out = eng
        .worker
        .run_within(Priority::Serve, Some(budget), move |_| {
            crate::failpoint::stall("engine_stall");
            let e = &ee;
            let pixels = match &image {
                Some(bytes) => {
                    let img = engine::image::decode_rgb8_within(bytes, "request image", max_side)
                        .map_err(|e| anyhow::anyhow!(ApiErrorKind::Bad(e.to_string())))?;
                    Some(
                        engine::image::preprocess(&img, &e.ip)
                            .map_err(|e| anyhow::anyhow!(ApiErrorKind::Bad(e.to_string())))?,
                    )
                }
                None => None,
            };
            let count = best_of.unwrap_or(n);
            let seeds: Vec<u64> = (0..count as u64).map(|i| seed.wrapping_add(i)).collect();
            let req = GenerateRequest { ids: &ids, pixels: pixels.as_ref(), seeds: &seeds, params, stop_ids: vec![] };
            let (answers, rewards) = match best_of {
                Some(_) => {
                    let b = engine::feedback::reward::best_of_n(
                        &e.model,
                        s.adapter.as_deref(),
                        s.reference.as_deref(),
                        &req,
                        beta,
                    )?;
                    let mut order: Vec<usize> = (0..b.answers.len()).collect();
                    order.sort_by(|&x, &y| b.rewards[y].total_cmp(&b.rewards[x]).then(x.cmp(&y)));
                    order.truncate(n);
                    (
                        order.iter().map(|&i| b.answers[i].clone()).collect::<Vec<_>>(),
                        Some(order.iter().map(|&i| b.rewards[i]).collect::<Vec<f64>>()),
                    )
                }
                None => (generate(&e.model, &req, s.adapter.as_deref())?, None),
            };
            // Stop strings: each answer ends before the first one it contains. Sampling is the same token by token
            // whatever comes later, so cutting the finished answer gives what stopping there would have given.
            let mut texts = Vec::with_capacity(answers.len());
            let mut ends = Vec::with_capacity(answers.len());
            for a in &answers {
                let text = e.tok.decode(&a.tokens)?;
                match cut_at_stop(&text, &stop) {
                    Some(cut) => {
                        // The tokens it took to write the stop string (usage counts them).
                        let used = (1..=a.tokens.len())
                            .find(|&k| e.tok.decode(&a.tokens[..k]).map(|t| t.len() >= cut.1).unwrap_or(false))
                            .unwrap_or(a.tokens.len());
                        texts.push(text[..cut.0].to_string());
                        ends.push((true, used));
                    }
                    None => {
                        texts.push(text);
                        ends.push((a.finish == FinishReason::Stop, a.tokens.len()));
                    }
                }
            }
            Ok((
                e.model.prompt_positions(&ids),
                ends,
                texts,
                rewards,
                answers.iter().map(|a| a.seed).collect::<Vec<_>>(),
            ))
        })
        .await;
    let (prompt_tokens, ends, texts, rewards, seeds) = out.map_err(|e| engine_failure(e, timeout_s))?;
    let completion: usize = ends.iter().map(|e| e.1).sum();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs()).unwrap_or(0);
    let choices: Vec<serde_json::Value> = texts
        .iter()
        .zip(&ends)
        .enumerate()
        .map(|(i, (t, (stopped, _)))| {
            serde_json::json!({ "index": i, "message": { "role": "assistant", "content": t },
                "finish_reason": if *stopped { "stop" } else { "length" } })
        })
        .collect();
    if server_cfg.join_prompt_pool {
        if let Some(bytes) = &p.image {
            join_pool(&d, bytes, &p.text).await;
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": format!("chatcmpl-{}-{}", serving.generation, seed),
        "object": "chat.completion",
        "created": created,
        "model": format!("rlaifd-checkpoint-{}", serving.checkpoint.id),
        "choices": choices,
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion },
        "rlaifd": { "checkpoint": serving.checkpoint.id, "generation": serving.generation, "seed": seed,
                    "seeds": seeds, "rewards": rewards, "engine_s": t0.elapsed().as_secs_f64() },
    })))
}

/// Where `text` ends for the earliest stop string it contains: (the answer's length, the end of that stop string).
fn cut_at_stop(text: &str, stop: &[String]) -> Option<(usize, usize)> {
    stop.iter().filter_map(|s| text.find(s.as_str()).map(|at| (at, at + s.len()))).min()
}

/// A request-side error raised on the engine thread (a bad image): answered 400, not 500.
#[derive(Debug)]
enum ApiErrorKind {
    Bad(String),
}
impl std::fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiErrorKind::Bad(m) => f.write_str(m),
        }
    }
}
impl std::error::Error for ApiErrorKind {}

/// Opt-in (server.join_prompt_pool): a served image prompt joins the training pool.
async fn join_pool(d: &Daemon, image: &[u8], text: &str) {
    let r = async {
        let sha = store::insert_image(&d.pool, image).await?;
        store::insert_prompt(
            &d.pool,
            &store::NewPrompt {
                image_sha256: Some(sha),
                instruction: text.to_string(),
                source: "served".into(),
                split: "train".into(),
                ground_truth: None,
            },
        )
        .await
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %format!("{e:#}"), "a served prompt could not join the prompt pool");
    }
}

/// The served checkpoint as an OpenAI model object, with its lineage and metrics.
async fn model_object(d: &Daemon) -> serde_json::Value {
    let s = d.serving();
    let mut lineage = Vec::new();
    for id in &s.lineage {
        if let Ok(c) = store::checkpoint(&d.pool, *id).await {
            lineage.push(serde_json::json!({ "checkpoint": c.id, "iteration": c.iteration, "status": c.status, "metrics": c.metrics }));
        }
    }
    serde_json::json!({
        "id": format!("rlaifd-checkpoint-{}", s.checkpoint.id), "object": "model", "created": d.started_unix, "owned_by": "rlaifd",
        "checkpoint": s.checkpoint.id, "generation": s.generation, "iteration": s.checkpoint.iteration,
        "adapter": if s.checkpoint.kind == store::CheckpointKind::Base { serde_json::Value::Null } else { s.checkpoint.path.clone().into() },
        "metrics": s.checkpoint.metrics, "lineage": lineage })
}

async fn models(req: HttpRequest, d: web::Data<Arc<Daemon>>) -> Result<HttpResponse, ApiError> {
    check_auth(&req, &d)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": [model_object(&d).await] })))
}

/// `GET /v1/models/{id}`: the served model (`client.models.retrieve`); any other id is 404 naming the served one.
async fn model(req: HttpRequest, id: web::Path<String>, d: web::Data<Arc<Daemon>>) -> Result<HttpResponse, ApiError> {
    check_auth(&req, &d)?;
    let served = format!("rlaifd-checkpoint-{}", d.serving().checkpoint.id);
    if *id != served {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model {:?} does not exist here: this daemon serves {served:?} (GET /v1/models)", id.as_str()),
        ));
    }
    Ok(HttpResponse::Ok().json(model_object(&d).await))
}

async fn healthz(d: web::Data<Arc<Daemon>>) -> HttpResponse {
    let s = d.serving();
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "checkpoint": s.checkpoint.id, "generation": s.generation,
        "paused": d.paused.load(Ordering::SeqCst), "draining": d.draining.load(Ordering::SeqCst), "device": d.engine.model.device(),
        "devices": d.engines.iter().zip(&d.workers).map(|(e, w)| serde_json::json!({ "device": e.model.device(), "worker": w, "in_flight": e.chat_load() })).collect::<Vec<_>>() }))
}

async fn metrics(req: HttpRequest, d: web::Data<Arc<Daemon>>) -> Result<HttpResponse, ApiError> {
    check_auth(&req, &d)?;
    let m = &d.metrics;
    // Summed over the engines (one per device).
    let mut depths = vec![0usize; PRIORITIES.len()];
    for e in &d.engines {
        for (sum, n) in depths.iter_mut().zip(e.worker.depths()) {
            *sum += n;
        }
    }
    for (p, n) in PRIORITIES.iter().zip(depths) {
        m.queue_depth.with_label_values(&[p.name()]).set(n as i64);
    }
    for (i, e) in d.engines.iter().enumerate() {
        let labels = [i.to_string(), e.device_spec().to_string()];
        m.chat_in_flight.with_label_values(&labels).set(e.chat_load() as i64);
        let c = m.chat_requests.with_label_values(&labels);
        c.inc_by(e.chats_total().saturating_sub(c.get()));
    }
    m.jobs.reset();
    for (k, s, n) in store::jobs_by_kind_and_status(&d.pool, false).await.unwrap_or_default() {
        m.jobs.with_label_values(&[k.as_str(), s.as_str()]).set(n);
    }
    m.iteration.set(store::max_iteration(&d.pool).await.unwrap_or(None).unwrap_or(0) as i64);
    let pairs = store::count_pairs(&d.pool).await.unwrap_or(0).max(0) as u64;
    m.pairs.inc_by(pairs.saturating_sub(m.pairs.get()));
    let s = d.serving();
    m.serving_checkpoint.set(s.checkpoint.id);
    m.serving_generation.set(s.generation as i64);
    m.paused.set(i64::from(d.paused.load(Ordering::SeqCst)));
    m.hallucination.reset();
    if let Some(metrics) = &s.checkpoint.metrics {
        for k in ["chair_i", "chair_s", "cover"] {
            if let Some(v) = metrics.get(k).and_then(|v| v.as_f64()) {
                m.hallucination.with_label_values(&[k, &s.checkpoint.id.to_string()]).set(v);
            }
        }
    }
    let body = prometheus::TextEncoder::new()
        .encode_to_string(&m.registry.gather())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics exposition failed: {e}")))?;
    Ok(HttpResponse::Ok().content_type(prometheus::TEXT_FORMAT).body(body))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {} (routes: POST /v1/chat/completions, GET /v1/models, /healthz, /metrics)",
            req.method(),
            req.path()
        ),
    ))
}

/// Binds the HTTP server (server.bind; port 0 picks one) and writes the bound address to STATE/server.addr.
pub fn start(d: Arc<Daemon>) -> Result<actix_web::dev::Server> {
    let cfg = d.config();
    let data = web::Data::new(d.clone());
    let dm = d.clone();
    let server = HttpServer::new(move || {
        let dm = dm.clone();
        App::new()
            .app_data(data.clone())
            .wrap_fn(move |req, srv| {
                let t0 = Instant::now();
                let route = req.match_pattern().unwrap_or_else(|| "other".into());
                let fut = srv.call(req);
                let dm = dm.clone();
                async move {
                    let res = fut.await?;
                    dm.metrics.observe(&route, res.status().as_u16(), t0.elapsed().as_secs_f64());
                    Ok(res)
                }
            })
            .route("/v1/chat/completions", web::post().to(chat))
            .route("/v1/models", web::get().to(models))
            .route("/v1/models/{id}", web::get().to(model))
            .route("/healthz", web::get().to(healthz))
            .route("/metrics", web::get().to(metrics))
            .default_service(web::to(not_found))
    })
    .workers(cfg.server.workers)
    // Bounded connections per worker (each holds buffers); clients get 5 s to send their headers.
    .max_connections(MAX_CONNECTIONS_PER_WORKER)
    .client_request_timeout(std::time::Duration::from_secs(5))
    .disable_signals()
    .shutdown_timeout(60)
    .bind(&cfg.server.bind)
    .with_context(|| format!("cannot listen on server.bind {}", cfg.server.bind))?;
    let addrs = server.addrs();
    let addr = addrs.first().context("the server bound no address")?;
    std::fs::write(cfg.state.dir.join("server.addr"), addr.to_string())
        .with_context(|| format!("cannot write {}/server.addr", cfg.state.dir.display()))?;
    tracing::info!(%addr, "HTTP server listening");
    Ok(server.run())
}
