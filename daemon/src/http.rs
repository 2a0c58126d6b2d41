//! The Server actor: actix-web with OpenAI-compatible `POST /v1/chat/completions` (text and an image as a data
//! URL; `n`, `temperature`, `top_p`, `max_tokens`, `seed`, `best_of`), `GET /v1/models` (the served checkpoint
//! and its lineage), `GET /healthz` and `GET /metrics` (Prometheus text). Each request takes the served
//! generation once, at its start, and finishes on it: a hot-swap never changes weights under a request.

use crate::batcher::{Batcher, JobError, JobEvent};
use crate::serve::Daemon;
use crate::store;
use crate::worker::{Priority, PRIORITIES};
use actix_web::dev::Service as _;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::{Context, Result};
use base64::Engine as _;
use engine::batch::Emitted;
use engine::generate::{FinishReason, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::tokenizer::{Role, Turn};
use std::sync::atomic::Ordering;
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
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    /// vLLM's extension for benchmarks: answers run to their max tokens, past end-of-sequence tokens.
    ignore_eos: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
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
    content: Option<Content>,
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
    /// The conversation, ending with a user turn.
    turns: Vec<Turn>,
    /// The last user turn's text (what joins the prompt pool).
    text: String,
    image: Option<Vec<u8>>,
    /// An http(s) image URL on an allowed host, fetched after parsing (`image` is then None until fetched).
    image_url: Option<String>,
    /// Answer as server-sent events; with the usage in a last chunk.
    stream: bool,
    include_usage: bool,
    /// Some(k): each token's log-probability and the k most likely alternatives.
    logprobs: Option<usize>,
    /// Tokens that end an answer (empty: the model's eos ids).
    stop_ids: Vec<u32>,
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
        return Err(ApiError::bad("image_url.url must be a data URL (data:image/png;base64,...), or an http(s) URL on a host of server.image_url_hosts"));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::bad("image_url.url: a data URL needs a comma before its data"));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad("image_url.url: the data URL must be base64-encoded (data:image/png;base64,...)"));
    }
    let mime = meta.trim_end_matches(";base64");
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg" | "image/webp" | "image/gif" | "image/bmp") {
        return Err(ApiError::bad(format!(
            "image_url.url: media type {mime:?} is not supported (image/png, image/jpeg, image/webp, image/gif or image/bmp)"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(format!("image_url.url: invalid base64 data: {e}")))
}

/// An http(s) image URL is taken only when its host is in `server.image_url_hosts` (empty by default: none).
fn check_image_url(url: &str, cfg: &crate::config::ServerConfig) -> Result<(), ApiError> {
    if cfg.image_url_hosts.is_empty() {
        return Err(ApiError::bad(
            "image_url.url: this server does not fetch image URLs (server.image_url_hosts is empty); send the image as a data URL (data:image/png;base64,...)",
        ));
    }
    let uri: ureq::http::Uri =
        url.parse().map_err(|e| ApiError::bad(format!("image_url.url is not a valid URL: {e}")))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ApiError::bad("image_url.url: URLs with credentials (user@host) are not fetched"));
    }
    let host = uri.host().unwrap_or("");
    if !cfg.image_url_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(ApiError::bad(format!(
            "image_url.url: the host {host:?} is not in server.image_url_hosts; send the image as a data URL or from an allowed host"
        )));
    }
    Ok(())
}

/// Fetches an allowed image URL off the async threads: no redirects, at most `max_bytes`, within `timeout_s`
/// (connecting included). Errors are 400s naming the URL's host and the limit.
async fn fetch_image(url: String, max_bytes: u64, timeout_s: f64) -> Result<Vec<u8>, ApiError> {
    let host = url.parse::<ureq::http::Uri>().ok().and_then(|u| u.host().map(str::to_string)).unwrap_or_default();
    let what = format!("fetching the image from {host}");
    let r = web::block(move || -> Result<Vec<u8>, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs_f64(timeout_s)))
            .max_redirects(0)
            .max_redirects_will_error(false)
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = agent.get(&url).call().map_err(|e| match e {
            ureq::Error::Timeout(_) => format!("no answer within {timeout_s} s (server.image_url_timeout_s)"),
            other => other.to_string(),
        })?;
        let status = resp.status();
        if status != 200 {
            return Err(format!("the server answered HTTP {status} (redirects are not followed)"));
        }
        resp.body_mut().with_config().limit(max_bytes).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                format!("the image is larger than {max_bytes} bytes (server.image_url_max_bytes)")
            }
            ureq::Error::Timeout(_) => format!("not received within {timeout_s} s (server.image_url_timeout_s)"),
            other => other.to_string(),
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}")))?;
    r.map_err(|e| ApiError::bad(format!("image_url.url: {what}: {e}")))
}

/// Validates a chat request body against the server's limits (what `POST /v1/chat/completions` does before any
/// model work): Err with the message a client would get. The fuzz targets call this.
pub fn validate_chat_request(body: &[u8], cfg: &crate::config::ServerConfig) -> Result<(), String> {
    parse(body, cfg).map(|_| ()).map_err(|e| e.message)
}

fn parse(body: &[u8], cfg: &crate::config::ServerConfig) -> Result<Parsed, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not a valid chat request: {e}")))?;
    let stream = req.stream == Some(true);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::bad("stream_options is only allowed with stream: true"));
    }
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => return Err(ApiError::bad("top_logprobs needs logprobs: true")),
        _ => None,
    };
    if let Some(k) = logprobs {
        if k > engine::batch::MAX_TOP_LOGPROBS {
            return Err(ApiError::bad(format!(
                "top_logprobs must be between 0 and {}, got {k}",
                engine::batch::MAX_TOP_LOGPROBS
            )));
        }
    }
    if req.best_of.is_some() && (stream || logprobs.is_some()) {
        return Err(ApiError::bad(
            "best_of cannot be combined with stream or logprobs (the answers are ranked after they are all written)",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages: the conversation is empty; send at least one user message"));
    }
    let mut turns: Vec<Turn> = Vec::with_capacity(req.messages.len());
    let mut image = None;
    let mut image_url = None;
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => {
                return Err(ApiError::bad(format!(
                    "messages[{i}]: {} messages are not supported (rlaifd does not call tools)",
                    m.role
                )))
            }
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}].role {other:?}: expected system, developer, user or assistant"
                )))
            }
        };
        let mut turn = Turn { role, text: String::new(), image: false };
        match &m.content {
            None => return Err(ApiError::bad(format!("messages[{i}]: content is missing"))),
            Some(Content::Text(t)) => push_text(&mut turn.text, t),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match p {
                        Part::Text { text: t } => push_text(&mut turn.text, t),
                        Part::ImageUrl { image_url: image_url_part } => {
                            if role != Role::User {
                                return Err(ApiError::bad(format!(
                                    "messages[{i}]: images go in user messages, not in {} ones",
                                    m.role
                                )));
                            }
                            if image.is_some() || image_url.is_some() {
                                return Err(ApiError::bad("only one image per request is supported"));
                            }
                            let url = &image_url_part.url;
                            if url.starts_with("http://") || url.starts_with("https://") {
                                check_image_url(url, cfg)?;
                                image_url = Some(url.clone());
                            } else {
                                image = Some(decode_data_url(url)?);
                            }
                            turn.image = true;
                        }
                    }
                }
            }
        }
        turns.push(turn);
    }
    let last = turns.last().map(|t| (t.role, t.text.clone()));
    let text = match last {
        Some((Role::User, t)) => t,
        _ => return Err(ApiError::bad("messages: the last message must be from the user (the model answers it)")),
    };
    if turns.iter().all(|t| t.text.trim().is_empty()) {
        return Err(ApiError::bad("messages: the conversation has no text"));
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
    Ok(Parsed {
        turns,
        text,
        image,
        image_url,
        stream,
        include_usage,
        logprobs,
        // ignore_eos: no token ends an answer (an id outside every vocabulary stands in for the stop tokens).
        stop_ids: if req.ignore_eos == Some(true) { vec![u32::MAX] } else { Vec::new() },
        n,
        best_of: req.best_of,
        params,
        max_tokens_given: given.is_some(),
        seed,
        stop,
    })
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

/// One chat request in flight (`server.max_pending`); the count drops when it is dropped (for a streamed answer,
/// when its stream ends).
struct InFlight(Arc<Daemon>);

impl InFlight {
    fn admit(d: &Arc<Daemon>, max: usize) -> Option<InFlight> {
        if d.chat_in_flight.fetch_add(1, Ordering::SeqCst) >= max {
            d.chat_in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight(d.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.chat_in_flight.fetch_sub(1, Ordering::SeqCst);
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
    let bytes: usize = p.turns.iter().map(|t| t.text.len()).sum();
    if bytes > max_bytes {
        return Err(ApiError::bad(format!(
            "the conversation is {bytes} bytes, more than the model's context of {ctx} tokens can hold (at most {max_bytes} bytes); shorten it"
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
    let ids = e
        .tok
        .encode_conversation(&p.turns)
        .map_err(|e| ApiError::bad(format!("the conversation cannot be rendered or tokenized: {e}")))?;
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
    let Some(in_flight) = InFlight::admit(&d, server_cfg.max_pending) else {
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
    let mut p = parse(&body, server_cfg)?;
    drop(body);
    if let Some(url) = p.image_url.take() {
        p.image = Some(fetch_image(url, server_cfg.image_url_max_bytes, server_cfg.image_url_timeout_s).await?);
    }
    let (max_side, beta, timeout_s) = (server_cfg.max_image_side, cfg.loop_.beta, server_cfg.request_timeout_s);
    // The least-loaded engine takes the request (one per device of `model.devices`).
    let eng = d.least_loaded();
    let counted = eng.busy();
    let planned = plan(&p, &eng, max_side)?;
    let serving = d.serving();
    let params = SamplingParams { max_new_tokens: planned.max_new_tokens, ..p.params.clone() };
    let budget = std::time::Duration::from_secs_f64(timeout_s).saturating_sub(arrived.elapsed());
    let prompt_tokens = eng.model.prompt_positions(&planned.ids);
    let t0 = Instant::now();
    let head = Head {
        id: format!("chatcmpl-{}-{}", serving.generation, p.seed),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs()).unwrap_or(0),
        model: format!("rlaifd-checkpoint-{}", serving.checkpoint.id),
    };
    if let Some(best_of) = p.best_of {
        // Best-of-N ranks whole answers by the implicit reward: one engine task, not batched.
        let (ee, s, image, ids, stop_ids) =
            (eng.clone(), serving.clone(), p.image.clone(), planned.ids.clone(), p.stop_ids.clone());
        let (n, seed) = (p.n, p.seed);
        let out = eng
            .worker
            .run_within(Priority::Serve, Some(budget), move |_| {
                crate::failpoint::stall("engine_stall");
                let e = &ee;
                let pixels = image
                    .as_deref()
                    .map(|b| crate::batcher::prepare_image(e, b, max_side))
                    .transpose()
                    .map_err(|m| anyhow::anyhow!(ApiErrorKind::Bad(m)))?;
                let seeds: Vec<u64> = (0..best_of as u64).map(|i| seed.wrapping_add(i)).collect();
                let req = GenerateRequest { ids: &ids, pixels: pixels.as_ref(), seeds: &seeds, params, stop_ids };
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
                Ok(order.iter().map(|&i| (b.answers[i].clone(), b.rewards[i])).collect::<Vec<_>>())
            })
            .await;
        let ranked = out.map_err(|e| engine_failure(e, timeout_s))?;
        let mut asm = Assembler::new(&eng, ranked.len(), p.stop.clone(), None, None);
        for (i, (a, _)) in ranked.iter().enumerate() {
            for e in crate::batcher::answer_events(i, a) {
                asm.feed(e);
            }
        }
        let rewards: Vec<f64> = ranked.iter().map(|r| r.1).collect();
        let seeds: Vec<u64> = ranked.iter().map(|r| r.0.seed).collect();
        if server_cfg.join_prompt_pool {
            if let Some(bytes) = &p.image {
                join_pool(&d, bytes, &p.text).await;
            }
        }
        let extra = serde_json::json!({ "checkpoint": serving.checkpoint.id, "generation": serving.generation,
            "seed": p.seed, "seeds": seeds, "rewards": rewards, "engine_s": t0.elapsed().as_secs_f64() });
        return Ok(HttpResponse::Ok().json(asm.completion(&head, prompt_tokens, extra)));
    }
    // Continuous batching: the request joins its engine's batch and hears its tokens as they come.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stopped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seeds: Vec<u64> = (0..p.n as u64).map(|i| p.seed.wrapping_add(i)).collect();
    let job = crate::batcher::Job {
        ids: planned.ids,
        image: p.image.clone(),
        max_image_side: max_side,
        seeds: seeds.clone(),
        params,
        logprobs: p.logprobs,
        stop_ids: p.stop_ids.clone(),
        serving: serving.clone(),
        deadline: (Instant::now() + budget, std::time::Duration::from_secs_f64(timeout_s)),
        events: tx,
        stopped: stopped.clone(),
    };
    Batcher::submit(&eng, job, server_cfg.max_batch);
    let mut asm = Assembler::new(&eng, p.n, p.stop.clone(), p.logprobs, Some(stopped));
    // The first event decides the status: a request refused on the engine thread (a bad image) is a 400, not a
    // stream that fails.
    let first = rx.recv().await;
    let first = match first {
        Some(JobEvent::Failed(e)) => return Err(job_failure(e, timeout_s)),
        Some(JobEvent::Token(t)) => t,
        None => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request")),
    };
    if server_cfg.join_prompt_pool {
        if let Some(bytes) = &p.image {
            join_pool(&d, bytes, &p.text).await;
        }
    }
    let extra = move |asm: &Assembler| {
        serde_json::json!({ "checkpoint": serving.checkpoint.id, "generation": serving.generation, "seed": p.seed,
            "seeds": seeds, "rewards": serde_json::Value::Null, "engine_s": t0.elapsed().as_secs_f64(),
            "answers_done": asm.finished() })
    };
    if !p.stream {
        asm.feed(first);
        while let Some(ev) = rx.recv().await {
            match ev {
                JobEvent::Token(t) => {
                    asm.feed(t);
                }
                JobEvent::Failed(e) => return Err(job_failure(e, timeout_s)),
            }
        }
        let x = extra(&asm);
        return Ok(HttpResponse::Ok().json(asm.completion(&head, prompt_tokens, x)));
    }
    // Server-sent events in OpenAI's chunk format; the guards live as long as the stream.
    let include_usage = p.include_usage;
    let mut state = Some(SseState {
        rx,
        asm,
        head,
        first: Some(first),
        prompt_tokens,
        include_usage,
        sent_role: false,
        timeout_s,
        _guards: (in_flight, counted),
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        let Some(st) = state.as_mut() else { return std::task::Poll::Ready(None) };
        match st.poll_chunk(cx) {
            std::task::Poll::Ready(Some(bytes)) => {
                std::task::Poll::Ready(Some(Ok::<_, std::convert::Infallible>(bytes)))
            }
            std::task::Poll::Ready(None) => {
                state = None;
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(body))
}

/// Where a streamed answer stands: the events still to come, what is assembled, and the guards that keep the
/// request counted until the stream ends.
struct SseState {
    rx: tokio::sync::mpsc::UnboundedReceiver<JobEvent>,
    asm: Assembler,
    head: Head,
    first: Option<Emitted>,
    prompt_tokens: usize,
    include_usage: bool,
    sent_role: bool,
    timeout_s: f64,
    _guards: (InFlight, crate::rlaif::InFlight),
}

impl SseState {
    /// The next bytes of the stream: the role chunk, one chunk per batch of events, the usage chunk, [DONE].
    fn poll_chunk(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<web::Bytes>> {
        use std::task::Poll;
        if !self.sent_role {
            self.sent_role = true;
            let choices: Vec<serde_json::Value> = (0..self.asm.choices.len())
                .map(|i| serde_json::json!({ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }))
                .collect();
            return Poll::Ready(Some(self.chunk(choices, None)));
        }
        if self.rx.is_closed() && self.first.is_none() && self.asm.choices.is_empty() {
            return Poll::Ready(None);
        }
        let mut events = Vec::new();
        if let Some(f) = self.first.take() {
            events.push(f);
        }
        let mut ended = false;
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(JobEvent::Token(t))) => events.push(t),
                Poll::Ready(Some(JobEvent::Failed(e))) => {
                    let err = job_failure(e, self.timeout_s);
                    let body = serde_json::json!({ "error": { "message": err.message, "type": "server_error", "code": err.status.as_u16() } });
                    self.asm.choices.clear();
                    self.rx.close();
                    return Poll::Ready(Some(web::Bytes::from(format!("data: {body}\n\ndata: [DONE]\n\n"))));
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
            if events.len() >= 64 {
                break;
            }
        }
        if events.is_empty() && !ended {
            return Poll::Pending;
        }
        let mut out = String::new();
        let mut deltas: Vec<serde_json::Value> = Vec::new();
        for e in events {
            let i = e.answer;
            if let Some(d) = self.asm.feed(e) {
                let mut delta = serde_json::Map::new();
                if !d.text.is_empty() {
                    delta.insert("content".into(), d.text.into());
                }
                let logprobs = if self.asm.logprobs.is_some() {
                    serde_json::json!({ "content": d.logprobs })
                } else {
                    serde_json::Value::Null
                };
                if delta.is_empty() && d.finish.is_none() && d.logprobs.is_empty() {
                    continue;
                }
                deltas.push(
                    serde_json::json!({ "index": i, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish }),
                );
            }
        }
        if !deltas.is_empty() {
            out.push_str(&self.chunk_text(deltas, None));
        }
        if ended {
            if self.include_usage {
                out.push_str(&self.chunk_text(Vec::new(), Some(self.asm.usage(self.prompt_tokens))));
            }
            out.push_str("data: [DONE]\n\n");
            self.asm.choices.clear();
        }
        if out.is_empty() {
            // Nothing to say yet (a held-back stop-string prefix): wait for more.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Some(web::Bytes::from(out)))
    }

    fn chunk_text(&self, choices: Vec<serde_json::Value>, usage: Option<serde_json::Value>) -> String {
        let mut c = serde_json::json!({ "id": self.head.id, "object": "chat.completion.chunk", "created": self.head.created,
            "model": self.head.model, "choices": choices });
        if self.include_usage {
            c["usage"] = usage.unwrap_or(serde_json::Value::Null);
        }
        format!("data: {c}\n\n")
    }

    fn chunk(&self, choices: Vec<serde_json::Value>, usage: Option<serde_json::Value>) -> web::Bytes {
        web::Bytes::from(self.chunk_text(choices, usage))
    }
}

/// The identity every chunk and the completion carry.
struct Head {
    id: String,
    created: u64,
    model: String,
}

/// One answer as it is written: its tokens, the text handed out so far, its log-probabilities, how it ended.
#[derive(Default)]
struct Choice {
    tokens: Vec<u32>,
    /// The answer's text so far (decoded a few tokens at a time; cut at a stop string when one appears).
    full: String,
    /// Bytes of `full` handed out (short of a possible stop-string start).
    sent: usize,
    /// Incremental decoding: tokens from `prefix_off` are decoded with and without those from `read_off`, and the
    /// difference is the new text (a token's leading space and a character split across tokens come out right
    /// without decoding the whole answer again).
    prefix_off: usize,
    read_off: usize,
    logprobs: Vec<serde_json::Value>,
    finish: Option<&'static str>,
}

/// What one event adds to an answer: text, log-probability entries, and its end.
struct Delta {
    text: String,
    logprobs: Vec<serde_json::Value>,
    finish: Option<&'static str>,
}

/// Turns the engine's token events into OpenAI choices: incremental decoding (text is handed out only when it is
/// whole UTF-8 and cannot be the start of a stop string), stop strings (the answer ends before the first one;
/// the batch is told to drop it), log-probability entries. The streamed deltas and the non-streamed message are
/// both what this writes, so they are the same text.
struct Assembler {
    eng: Arc<crate::rlaif::Engine>,
    choices: Vec<Choice>,
    stop: Vec<String>,
    logprobs: Option<usize>,
    stopped: Option<Arc<std::sync::Mutex<Vec<usize>>>>,
}

impl Assembler {
    fn new(
        eng: &Arc<crate::rlaif::Engine>,
        n: usize,
        stop: Vec<String>,
        logprobs: Option<usize>,
        stopped: Option<Arc<std::sync::Mutex<Vec<usize>>>>,
    ) -> Assembler {
        Assembler { eng: eng.clone(), choices: (0..n).map(|_| Choice::default()).collect(), stop, logprobs, stopped }
    }

    fn finished(&self) -> usize {
        self.choices.iter().filter(|c| c.finish.is_some()).count()
    }

    fn token_text(&self, id: u32) -> String {
        self.eng.tok.decode(&[id]).unwrap_or_default()
    }

    fn entry(&self, text: &str, logprob: f32, top: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::json!({ "token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": top })
    }

    /// Adds one event; None when its answer had already ended (events after a stop string).
    fn feed(&mut self, e: Emitted) -> Option<Delta> {
        let i = e.answer;
        if self.choices.get(i).is_none_or(|c| c.finish.is_some()) {
            return None;
        }
        let mut d = Delta { text: String::new(), logprobs: Vec::new(), finish: None };
        if let Some(t) = e.token {
            let tok = &self.eng.tok;
            let c = &mut self.choices[i];
            c.tokens.push(t);
            let before = tok.decode(&c.tokens[c.prefix_off..c.read_off]).unwrap_or_default();
            let now = tok.decode(&c.tokens[c.prefix_off..]).unwrap_or_default();
            // Held while the new tokens end inside a character.
            let piece = match now.strip_prefix(before.as_str()) {
                Some(p) if !p.is_empty() && !p.ends_with('\u{FFFD}') => {
                    (c.prefix_off, c.read_off) = (c.read_off, c.tokens.len());
                    c.full.push_str(p);
                    p.to_string()
                }
                _ => String::new(),
            };
            if let Some(lp) = &e.logprob {
                let piece = if piece.is_empty() { self.token_text(t) } else { piece };
                let top = lp
                    .top
                    .iter()
                    .map(|&(id, l)| {
                        let s = self.token_text(id);
                        serde_json::json!({ "token": s, "logprob": l, "bytes": s.as_bytes() })
                    })
                    .collect();
                d.logprobs.push(self.entry(&piece, lp.logprob, top));
            }
            let c = &mut self.choices[i];
            if let Some((cut, _)) = cut_at_stop(&c.full, &self.stop) {
                c.full.truncate(cut);
                d.text = c.full.get(c.sent..).unwrap_or("").to_string();
                c.sent = c.full.len();
                c.finish = Some("stop");
                d.finish = c.finish;
                if let Some(s) = &self.stopped {
                    if let Ok(mut s) = s.lock() {
                        s.push(i);
                    }
                }
            } else {
                let safe = c.full.len() - held_back(&c.full, &self.stop);
                if safe > c.sent {
                    d.text = c.full[c.sent..safe].to_string();
                    c.sent = safe;
                }
            }
            c.logprobs.extend(d.logprobs.iter().cloned());
        }
        if let Some(f) = e.finish {
            let tok = &self.eng.tok;
            let c = &mut self.choices[i];
            if c.finish.is_none() {
                // Whatever is still held: the end of a character that never completed, a stop-string start.
                let before = tok.decode(&c.tokens[c.prefix_off..c.read_off]).unwrap_or_default();
                let now = tok.decode(&c.tokens[c.prefix_off..]).unwrap_or_default();
                if let Some(rest) = now.strip_prefix(before.as_str()) {
                    c.full.push_str(rest);
                }
                d.text.push_str(&c.full[c.sent..]);
                c.sent = c.full.len();
                c.finish = Some(if f == FinishReason::Stop { "stop" } else { "length" });
                d.finish = c.finish;
            }
        }
        Some(d)
    }

    fn usage(&self, prompt_tokens: usize) -> serde_json::Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens.len()).sum();
        serde_json::json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion })
    }

    /// The non-streamed response.
    fn completion(&self, head: &Head, prompt_tokens: usize, extra: serde_json::Value) -> serde_json::Value {
        let choices: Vec<serde_json::Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let logprobs = if self.logprobs.is_some() {
                    serde_json::json!({ "content": c.logprobs })
                } else {
                    serde_json::Value::Null
                };
                serde_json::json!({ "index": i, "message": { "role": "assistant", "content": &c.full[..c.sent] },
                    "logprobs": logprobs, "finish_reason": c.finish.unwrap_or("length") })
            })
            .collect();
        serde_json::json!({ "id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
            "choices": choices, "usage": self.usage(prompt_tokens), "rlaifd": extra })
    }
}

/// How many bytes at the end of `text` could be the start of a stop string (held back until it is known).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut keep = 0;
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if k > keep && text.ends_with(&s[..k]) {
                keep = k;
            }
        }
    }
    keep
}

/// A job's failure as the client sees it.
fn job_failure(e: JobError, timeout_s: f64) -> ApiError {
    match e {
        JobError::Bad(m) => ApiError::bad(m),
        JobError::Timeout(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why} (server.request_timeout_s = {timeout_s}); retry with a smaller max_tokens or n, or later"),
        ),
        JobError::Engine(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
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
        let (steps, answers) = e.batcher.steps();
        let c = m.batch_steps.with_label_values(&labels);
        c.inc_by(steps.saturating_sub(c.get()));
        let c = m.batch_answer_steps.with_label_values(&labels);
        c.inc_by(answers.saturating_sub(c.get()));
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
