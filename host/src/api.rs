//! The HTTP API (axum): JSON in, JSON out, errors as `{"error": {"code", "message"}}`.
//!
//! This module only translates: it parses and checks bodies (so nothing malformed reaches a
//! partition), calls the [`Service`](crate::service::Service), and maps its results and errors to status codes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{Decision, Request, State, Verdict};
use crate::reload::InstallError;
use crate::runtime::{ReadError, SubmitError};
use crate::service::{Service, ServiceError};

/// What every handler shares.
#[derive(Clone)]
struct Api {
    service: Service,
    /// Largest request body accepted, in bytes.
    max_body_bytes: usize,
    /// Largest rule component accepted by `PUT /v1/admin/rule`, in bytes.
    max_module_bytes: usize,
    /// sha256 of the admin token; `None` turns the admin API off. Comparing digests keeps the
    /// comparison's time independent of the token's length and content.
    admin_token_digest: Option<[u8; 32]>,
    /// Time a client has to send a body once its headers arrived.
    body_read_timeout: Duration,
    /// Longest a (non-admin) request may take to be answered.
    request_timeout: Duration,
    /// Set by the server when shutdown starts: requests still arriving get 503 `shutting_down`.
    shutting_down: Arc<AtomicBool>,
    /// Partition liveness, for `/readyz`.
    readiness: Arc<Readiness>,
    /// The online backups of this server (`/v1/admin/backup`).
    backups: Arc<crate::backup::Backups>,
}

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest rule component accepted by the admin API, in bytes.
    pub max_module_bytes: usize,
    /// The admin token; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// Time a client has to send a request body once its headers arrived (408 `body_timeout`).
    pub body_read_timeout: Duration,
    /// Longest a request other than the admin API's may take (503 `request_timeout`).
    pub request_timeout: Duration,
    /// How long a partition with queued work may go without completing a batch before
    /// `/readyz` says not ready.
    pub readiness_stall: Duration,
    /// Set when shutdown starts.
    pub shutting_down: Arc<AtomicBool>,
}

/// Partition liveness as `/readyz` judges it: per partition, the batch count last seen and
/// when it last moved (or the partition was idle). Sampled by a task the router starts, so a
/// stall is measured from when it began, not from the last probe.
pub struct Readiness {
    /// How long queued work may wait for a batch.
    stall: Duration,
    /// Per partition, what the last sample saw.
    progress: std::sync::Mutex<Vec<Watched>>,
}

/// One partition as [`Readiness`] last sampled it.
#[derive(Clone, Copy)]
struct Watched {
    /// Batches committed.
    batches: u64,
    /// Batches failed (counted in requests).
    failures: u64,
    /// When it last committed a batch, or was idle with no recent failure.
    progress_at: Instant,
    /// When a batch of it last failed.
    failed_at: Option<Instant>,
}

/// How often [`Readiness`] samples the partitions.
const READINESS_SAMPLE: Duration = Duration::from_millis(100);

impl Readiness {
    /// Samples the partitions once; returns the first stalled one as (partition, stalled for,
    /// queued).
    fn sample(&self, service: &Service) -> Option<(u32, Duration, usize)> {
        // Kafka mode: readiness is the cluster membership's business (see the README).
        let progress_now = service.partition_progress()?;
        let now = Instant::now();
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let mut stalled = None;
        for p in progress_now {
            let i = p.partition as usize;
            if progress.len() <= i {
                progress.resize(
                    i + 1,
                    Watched {
                        batches: p.batches,
                        failures: p.failed_batches,
                        progress_at: now,
                        failed_at: None,
                    },
                );
            }
            let w = &mut progress[i];
            if w.failures != p.failed_batches {
                w.failures = p.failed_batches;
                w.failed_at = Some(now);
            }
            // Progress is a committed batch. A partition with nothing queued is idle, not
            // stalled, unless its batches failed lately: a full disk answers at once, so the
            // queue stays short while every write is refused.
            let failed_lately = w
                .failed_at
                .is_some_and(|t| now.duration_since(t) < self.stall);
            if w.batches != p.batches || (p.queued == 0 && !failed_lately) {
                w.batches = p.batches;
                w.progress_at = now;
            } else if stalled.is_none() && now.duration_since(w.progress_at) > self.stall {
                stalled = Some((p.partition, now.duration_since(w.progress_at), p.queued));
            }
        }
        stalled
    }
}

/// The router with every endpoint, over `runtime`. Called inside a tokio runtime, it starts the
/// task that samples partition liveness for `/readyz` (it stops when shutdown starts).
pub fn router(service: Service, settings: ApiSettings) -> Router {
    use sha2::Digest;
    let readiness = Arc::new(Readiness {
        stall: settings.readiness_stall,
        progress: std::sync::Mutex::new(Vec::new()),
    });
    if tokio::runtime::Handle::try_current().is_ok() {
        let readiness = readiness.clone();
        let service = service.clone();
        let shutting_down = settings.shutting_down.clone();
        tokio::spawn(async move {
            while !shutting_down.load(Ordering::Relaxed) {
                readiness.sample(&service);
                tokio::time::sleep(READINESS_SAMPLE).await;
            }
        });
    }
    let api = Api {
        service,
        max_body_bytes: settings.max_body_bytes,
        max_module_bytes: settings.max_module_bytes,
        admin_token_digest: settings
            .admin_token
            .map(|t| sha2::Sha256::digest(t.as_bytes()).into()),
        body_read_timeout: settings.body_read_timeout,
        request_timeout: settings.request_timeout,
        shutting_down: settings.shutting_down,
        readiness,
        backups: Arc::default(),
    };
    Router::new()
        .route("/v1/admin/rule", get(admin_status).put(admin_install))
        .route("/v1/admin/rule/rollback", post(admin_rollback))
        .route(
            "/v1/admin/backup",
            get(admin_backup_status).post(admin_backup),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/requests", post(submit))
        .route("/v1/keys/{key}", get(key))
        .route("/v1/users/{user}", get(user))
        .route("/v1/partitions", get(partitions))
        .route("/v1/dead-letters", get(dead_letters))
        .route(
            "/v1/dead-letters/{partition}/{seq}/resubmit",
            post(resubmit_dead_letter),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(api.clone(), admission))
        .with_state(api)
}

/// Every request passes here: 503 `shutting_down` once shutdown started (the connection is
/// closed after it), and 503 `request_timeout` past `server.request_timeout_ms` (the admin API
/// is exempt: compiling a rule may take longer, and it has no queue to stall on).
async fn admission(
    AxumState(api): AxumState<Api>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    if api.shutting_down.load(Ordering::SeqCst) {
        let mut response = ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "the server is shutting down; retry (with the same id) once it is back or on another instance".into(),
            details: None,
        }
        .into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    if request.uri().path().starts_with("/v1/admin/") {
        return next.run(request).await;
    }
    match tokio::time::timeout(api.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "request_timeout",
            message: format!(
                "no answer within {} ms (server.request_timeout_ms); a request may still be applied: retry with the same id to learn its answer",
                api.request_timeout.as_millis()
            ),
            details: None,
        }
        .into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "this endpoint does not take this method (see the README, HTTP API)".into(),
        details: None,
    }
}

/// A path parameter that did not parse (invalid percent-encoding or UTF-8, a non-number).
fn bad_path(e: PathRejection) -> ApiError {
    ApiError::bad_request(format!("invalid path: {}", e.body_text()))
}

/// Reads a request body of at most `limit` bytes within `server.body_read_timeout_ms`: 413 over
/// the limit (by `Content-Length` before reading anything), 408 when the client stalls, 400 when
/// it is cut short or its chunked encoding is malformed.
async fn read_body(
    api: &Api,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    limit_key: &str,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "body_too_large",
        message: format!("request body is larger than {limit} bytes ({limit_key})"),
        details: None,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(api.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "body_timeout",
            message: format!(
                "the request body did not arrive within {} ms (server.body_read_timeout_ms)",
                api.body_read_timeout.as_millis()
            ),
            details: None,
        }),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "the request body could not be read (cut short, or malformed chunked encoding): {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// An error response: status, stable code, message.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// More fields of the error object, e.g. the `owner` of a partition another process has.
    details: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Api {
    /// The partitioner, the same in both modes.
    fn partitioner(&self) -> crate::router::Partitioner {
        self.service.partitioner()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Read(e) => e.into(),
            ServiceError::Submit(e) => e.into(),
            ServiceError::NotOwned { ref owner, .. } => ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_owned",
                message: e.to_string(),
                details: owner_details(owner),
            },
            ServiceError::Moving { ref owner, .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "partition_moving",
                message: e.to_string(),
                details: owner_details(owner),
            },
        }
    }
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
            details: None,
        }
    }
}

/// `{"owner": {...}}` for an error about a partition another process has.
fn owner_details(
    owner: &Option<crate::kafka::OwnerRecord>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let owner = owner.as_ref()?;
    let mut details = serde_json::Map::new();
    details.insert(
        "owner".into(),
        serde_json::to_value(owner).expect("owner records serialize"),
    );
    Some(details)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        for (name, value) in self.details.into_iter().flatten() {
            error.insert(name, value);
        }
        let body = Json(json!({ "error": error }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let status = match &e {
            SubmitError::Invalid(_) => StatusCode::BAD_REQUEST,
            SubmitError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            SubmitError::Backpressure(_)
            | SubmitError::ShuttingDown
            | SubmitError::Store(_)
            | SubmitError::Quarantined { .. }
            | SubmitError::ClusterUnavailable(_)
            | SubmitError::ClusterDataLost(_) => StatusCode::SERVICE_UNAVAILABLE,
            SubmitError::Rule(_) | SubmitError::Damaged(_) | SubmitError::RecordDamaged(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            SubmitError::IdConflict(_) => StatusCode::CONFLICT,
            SubmitError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
            details: None,
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let (status, code) = match &e {
            ReadError::Backpressure(_) => (StatusCode::SERVICE_UNAVAILABLE, "backpressure"),
            ReadError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ReadError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ReadError::Damaged(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_damaged"),
            ReadError::RecordDamaged(_) => (StatusCode::INTERNAL_SERVER_ERROR, "record_damaged"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
            details: None,
        }
    }
}

/// A JSON response body (axum's `Json` with the `json` feature is only used for output here:
/// input is parsed by hand for better messages).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// The body of `POST /v1/requests`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    kind: String,
    /// `None`: left out; `Some(None)`: sent as `null`, which is refused rather than read as
    /// left out (a present field must be a non-empty string).
    #[serde(default, deserialize_with = "present")]
    key: Option<Option<String>>,
    user: String,
    payload: Option<Value>,
    /// As `key`.
    #[serde(default, deserialize_with = "present")]
    id: Option<Option<String>>,
}

/// Marks an optional field as present, `null` included, so that `"key": null` can be told
/// apart from a request without a key.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

async fn healthz() -> Json {
    Json(json!({"status": "ok"}))
}

/// 200 when every partition makes progress on its work; 503 `not_ready` when one has had work
/// queued for longer than `server.readiness_stall_ms` without completing a batch.
async fn readyz(AxumState(api): AxumState<Api>) -> Result<Json, ApiError> {
    // Kafka mode: a process whose broker is away, or lost the cluster's data, serves nothing;
    // one whose group is still forming would only make requests wait.
    if let Some(reason) = api.service.cluster_not_ready() {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: reason,
            details: None,
        });
    }
    match api.readiness.sample(&api.service) {
        None => Ok(Json(json!({"status": "ready"}))),
        Some((partition, stalled, queued)) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: format!(
                "partition {partition} has not completed a batch for {} ms with {queued} requests queued or its writes failing (server.readiness_stall_ms = {}); its disk or rule may be stalled, or its disk full",
                stalled.as_millis(),
                api.readiness.stall.as_millis()
            ),
            details: None,
        }),
    }
}

async fn metrics(AxumState(api): AxumState<Api>) -> Result<Response, ApiError> {
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        api.service.render_metrics(),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such endpoint".into(),
        details: None,
    }
}

async fn submit(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(
        &api,
        &headers,
        body,
        api.max_body_bytes,
        "server.max_body_bytes",
    )
    .await?;
    // A body that finished arriving after shutdown began is not queued: the partitions are
    // about to stop, and a clear 503 beats a reset connection.
    if api.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "the server is shutting down; the request was not applied: retry it (with the same id) once the server is back".into(),
            details: None,
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; send a JSON object with `kind` and `user`",
        ));
    }
    let body: RequestBody = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("request body is not a valid request: {e}")))?;
    for (field, value) in [("kind", &body.kind), ("user", &body.user)] {
        if value.trim().is_empty() {
            return Err(ApiError::bad_request(format!(
                "`{field}` must not be empty or only whitespace"
            )));
        }
    }
    for (field, value) in [("key", &body.key), ("id", &body.id)] {
        if matches!(value, Some(None)) {
            return Err(ApiError::bad_request(format!(
                "`{field}` must be a string when present, not null; leave it out instead"
            )));
        }
    }
    let request = Request {
        id: body.id.flatten(),
        kind: body.kind,
        key: body.key.flatten(),
        user: body.user,
        payload: body.payload.map(|p| p.to_string()),
    };
    let decision = match api.service.submit(request).await {
        Ok(decision) => decision,
        // A quarantined key says when it is let through again (whole seconds, rounded up).
        Err(e @ SubmitError::Quarantined { retry_after_ms, .. }) => {
            let mut response = ApiError::from(e).into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                retry_after_ms.div_ceil(1000).max(1).into(),
            );
            return Ok(response);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(decision_response(&decision))
}

/// 200 with the new state for a transition, 409 with the reason for a reject.
fn decision_response(decision: &Decision) -> Response {
    match &decision.verdict {
        Verdict::Transition(state) => (
            StatusCode::OK,
            Json(json!({
                "outcome": "transition",
                "id": decision.id,
                "key": decision.key,
                "partition": decision.partition,
                "seq": decision.seq,
                "state": state_json(state),
            })),
        )
            .into_response(),
        Verdict::Reject(reason) => (
            StatusCode::CONFLICT,
            Json(json!({
                "outcome": "reject",
                "id": decision.id,
                "key": decision.key,
                "partition": decision.partition,
                "seq": decision.seq,
                "reason": reason,
                "rule_version": decision.rule_version,
            })),
        )
            .into_response(),
    }
}

/// A state as the API shows it: `data` as JSON (it was checked to be JSON before it was stored).
pub fn state_json(state: &State) -> Value {
    json!({
        "status": state.status,
        "user": state.user,
        "data": serde_json::from_str::<Value>(&state.data).unwrap_or(Value::String(state.data.clone())),
        "version": state.version,
        "rule_version": state.rule_version,
        "updated_at_ms": state.updated_at_ms,
    })
}

async fn key(
    AxumState(api): AxumState<Api>,
    key: Result<Path<String>, PathRejection>,
) -> Result<Json, ApiError> {
    let Path(key) = key.map_err(bad_path)?;
    check_path_field("key", &key)?;
    let (partition, state) = api.service.key_state(&key).await?;
    match state {
        Some(state) => Ok(Json(json!({
            "key": key,
            "partition": partition,
            "state": state_json(&state),
        }))),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_key",
            message: format!("key `{key}` has no state (partition {partition})"),
            details: None,
        }),
    }
}

/// A key or user in a path is held to the limit a request's fields have: nothing longer can
/// exist, and an error must not echo an unbounded string back.
fn check_path_field(name: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > crate::runtime::MAX_FIELD_BYTES {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!(
                "`{name}` is {} bytes; at most {} are allowed",
                value.len(),
                crate::runtime::MAX_FIELD_BYTES
            ),
            details: None,
        });
    }
    Ok(())
}

async fn user(
    AxumState(api): AxumState<Api>,
    user: Result<Path<String>, PathRejection>,
) -> Result<Json, ApiError> {
    let Path(user) = user.map_err(bad_path)?;
    check_path_field("user", &user)?;
    let view = api.service.user(&user).await?;
    match view {
        Some(view) => Ok(Json(json!({
            "user": user,
            "key": view.key,
            "partition": view.partition,
            "route_recorded_at_ms": view.recorded_at_ms,
            "state": view.state.as_ref().map(state_json),
        }))),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_route",
            message: format!("no route for user `{user}`"),
            details: None,
        }),
    }
}

async fn partitions(AxumState(api): AxumState<Api>) -> Json {
    Json(api.service.partitions_json())
}

/// Query of `GET /v1/dead-letters`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    /// Only this partition (default: all).
    partition: Option<u32>,
    /// Only letters with a sequence number above this (per partition).
    after: Option<u64>,
    /// Most letters per partition (default 100, at most 1000).
    limit: Option<usize>,
}

async fn dead_letters(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json, ApiError> {
    // Dead letters hold every user's failed requests with their payloads: admin only.
    authorize(&api, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let n = api.partitioner().partitions();
    if let Some(p) = query.partition
        && p >= n
    {
        return Err(ApiError::bad_request(format!(
            "partition {p} does not exist (there are {n})"
        )));
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let letters = api
        .service
        .dead_letters(query.partition, query.after.unwrap_or(0), limit)
        .await?;
    Ok(Json(json!({ "dead_letters": letters })))
}

impl From<InstallError> for ApiError {
    fn from(e: InstallError) -> Self {
        let (status, code) = match &e {
            InstallError::Refused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rule_refused"),
            InstallError::BadPartitions(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            InstallError::NothingToRollBack => (StatusCode::CONFLICT, "nothing_to_roll_back"),
            InstallError::SwapFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "swap_failed"),
            InstallError::Persist(_) => (StatusCode::INTERNAL_SERVER_ERROR, "persist_failed"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
            details: None,
        }
    }
}

async fn resubmit_dead_letter(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
    path: Result<Path<(u32, u64)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((partition, seq)) = path.map_err(bad_path)?;
    // A resubmit applies another user's request: only the operator may decide that.
    authorize(&api, &headers)?;
    let n = api.partitioner().partitions();
    if partition >= n {
        return Err(ApiError::bad_request(format!(
            "partition {partition} does not exist (there are {n})"
        )));
    }
    let resubmitted = api.service.resubmit_dead_letter(partition, seq).await?;
    match resubmitted {
        Some(decision) => Ok(decision_response(&decision)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_dead_letter",
            message: format!("partition {partition} has no dead letter {seq}"),
            details: None,
        }),
    }
}

/// Lets a request through only with the right bearer token.
fn authorize(api: &Api, headers: &HeaderMap) -> Result<(), ApiError> {
    use sha2::Digest;
    let Some(expected) = &api.admin_token_digest else {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "admin_disabled",
            message: "the admin API is off: set admin.token in the configuration or TURNSTILE_ADMIN_TOKEN".into(),
            details: None,
        });
    };
    let unauthorized = || ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "missing or wrong bearer token (Authorization: Bearer <admin token>)".into(),
        details: None,
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?;
    let given: [u8; 32] = sha2::Sha256::digest(given.trim().as_bytes()).into();
    let difference = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if difference == 0 {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

/// Query of `PUT /v1/admin/rule`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallQuery {
    /// A canary: only these partitions, e.g. `0,3`.
    partitions: Option<String>,
    /// Kept in the history entry, e.g. the git sha the component was built from.
    label: Option<String>,
}

/// Longest install label: a sha, a tag or a short note, not a document.
const MAX_LABEL_BYTES: usize = 200;

fn install_json(report: &crate::reload::InstallReport) -> Json {
    let mut versions = report.versions.clone();
    versions.dedup();
    Json(json!({
        "version": if versions.len() == 1 { Value::from(versions[0].clone()) } else { Value::Null },
        "partitions": report.partitions,
        "versions": report.versions,
        "pause_us": report.pause_us,
        "elapsed_ms": report.elapsed_ms,
    }))
}

async fn admin_install(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
    query: Result<Query<InstallQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Json, ApiError> {
    if let Err(refused) = authorize(&api, &headers) {
        // Read what the client is sending (bounded) before refusing, so it gets the 401
        // instead of a connection closed under its upload.
        let _ = axum::body::to_bytes(body, api.max_module_bytes).await;
        return Err(refused);
    }
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let label = match query.label {
        Some(label) if label.len() > MAX_LABEL_BYTES || label.chars().any(char::is_control) => {
            return Err(ApiError::bad_request(format!(
                "`label` must be at most {MAX_LABEL_BYTES} bytes without control characters"
            )));
        }
        label => label.filter(|l| !l.is_empty()),
    };
    let bytes = axum::body::to_bytes(body, api.max_module_bytes)
        .await
        .map_err(|_| {
            ApiError::from(InstallError::Refused(crate::sandbox::LoadError::TooLarge {
                size: api.max_module_bytes + 1,
                max: api.max_module_bytes,
            }))
        })?;
    let partitions = query.partitions.as_deref();
    let report = api
        .service
        .install_rule(bytes.to_vec(), partitions, label)
        .await?;
    Ok(install_json(&report))
}

async fn admin_rollback(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
) -> Result<Json, ApiError> {
    authorize(&api, &headers)?;
    let report = api.service.rollback_rule().await?;
    Ok(install_json(&report))
}

/// Query of `POST /v1/admin/backup`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupQuery {
    /// The directory to write, on the server's host: new, or empty.
    out: String,
}

/// Starts an online backup (see [`crate::backup`]); 202 with its status.
async fn admin_backup(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
    query: Result<Query<BackupQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&api, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if query.out.trim().is_empty() {
        return Err(ApiError::bad_request("`out` must name a directory"));
    }
    let runtime = match &api.service {
        Service::Local(runtime) => runtime.clone(),
        Service::Kafka(_) => {
            return Err(ApiError {
                status: StatusCode::NOT_IMPLEMENTED,
                code: "backup_unsupported",
                message: "Kafka mode keeps its state in the changelog topic: back up the topics, not a process".into(),
                details: None,
            });
        }
    };
    let source: Arc<dyn crate::backup::Source> = runtime;
    match api.backups.start(source, query.out.into()) {
        Ok(status) => Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response()),
        Err(e @ crate::backup::StartError::Running(_)) => Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "backup_running",
            message: e.to_string(),
            details: None,
        }),
        Err(e @ crate::backup::StartError::Invalid(_)) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// The last backup's status and progress.
async fn admin_backup_status(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, &headers)?;
    Ok(axum::Json(api.backups.status()).into_response())
}

async fn admin_status(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
) -> Result<Json, ApiError> {
    authorize(&api, &headers)?;
    let (running, history) = api.service.rules();
    Ok(Json(json!({
        "partitions": running
            .iter()
            .enumerate()
            .map(|(id, version)| json!({"id": id, "version": version}))
            .collect::<Vec<_>>(),
        "history": history,
    })))
}
