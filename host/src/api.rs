//! The HTTP API (axum): JSON in, JSON out, errors as `{"error": {"code", "message"}}`.
//!
//! This module only translates: it parses and checks bodies (so nothing malformed reaches a
//! partition), calls the [`Runtime`], and maps its results and errors to status codes.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{Decision, Request, State, Verdict};
use crate::reload::InstallError;
use crate::runtime::{ReadError, Runtime, SubmitError};

/// What serves requests: this process's partitions, or a Kafka cluster's.
#[derive(Clone)]
pub enum Backend {
    /// `turnstile run` on its own: every partition is in this process.
    Local(Arc<Runtime>),
    /// Kafka mode: this process owns some partitions of a cluster.
    Kafka(Arc<crate::kafka::KafkaNode>),
}

/// What every handler shares.
#[derive(Clone)]
struct Api {
    backend: Backend,
    /// Largest request body accepted, in bytes.
    max_body_bytes: usize,
    /// Largest rule component accepted by `PUT /v1/admin/rule`, in bytes.
    max_module_bytes: usize,
    /// sha256 of the admin token; `None` turns the admin API off. Comparing digests keeps the
    /// comparison's time independent of the token's length and content.
    admin_token_digest: Option<[u8; 32]>,
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
}

/// The router with every endpoint, over `runtime`.
pub fn router(backend: Backend, settings: ApiSettings) -> Router {
    use sha2::Digest;
    Router::new()
        .route("/v1/admin/rule", get(admin_status).put(admin_install))
        .route("/v1/admin/rule/rollback", post(admin_rollback))
        .route("/healthz", get(healthz))
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
        .with_state(Api {
            backend,
            max_body_bytes: settings.max_body_bytes,
            max_module_bytes: settings.max_module_bytes,
            admin_token_digest: settings
                .admin_token
                .map(|t| sha2::Sha256::digest(t.as_bytes()).into()),
        })
}

/// An error response: status, stable code, message.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Api {
    /// The local runtime, or 501 for endpoints Kafka mode does not have.
    fn local(&self) -> Result<&Arc<Runtime>, ApiError> {
        match &self.backend {
            Backend::Local(runtime) => Ok(runtime),
            Backend::Kafka(_) => Err(ApiError {
                status: StatusCode::NOT_IMPLEMENTED,
                code: "not_in_kafka_mode",
                message: "this endpoint is not available in Kafka mode (see the README, Running a cluster)".into(),
            }),
        }
    }
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
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
            SubmitError::Backpressure(_) | SubmitError::ShuttingDown | SubmitError::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SubmitError::Rule(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SubmitError::IdConflict(_) => StatusCode::CONFLICT,
            SubmitError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let code = match &e {
            ReadError::Backpressure(_) => "backpressure",
            ReadError::ShuttingDown => "shutting_down",
            ReadError::Store(_) => "store_unavailable",
        };
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code,
            message: e.to_string(),
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
    key: Option<String>,
    user: String,
    payload: Option<Value>,
    id: Option<String>,
}

async fn healthz() -> Json {
    Json(json!({"status": "ok"}))
}

async fn metrics(AxumState(api): AxumState<Api>) -> Result<Response, ApiError> {
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        match &api.backend {
            Backend::Local(runtime) => runtime.render_metrics(),
            Backend::Kafka(node) => node.render_metrics(),
        },
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such endpoint".into(),
    }
}

async fn submit(AxumState(api): AxumState<Api>, body: Body) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, api.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::bad_request(format!(
                "request body is larger than {} bytes (server.max_body_bytes)",
                api.max_body_bytes
            ))
        })?;
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
    let request = Request {
        id: body.id,
        kind: body.kind,
        key: body.key,
        user: body.user,
        payload: body.payload.map(|p| p.to_string()),
    };
    let decision = match &api.backend {
        Backend::Local(runtime) => runtime.submit(request).await?,
        Backend::Kafka(node) => node.submit(request).await?,
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

fn not_owned(key: &str, error: crate::kafka::KeyReadError) -> ApiError {
    match error {
        crate::kafka::KeyReadError::NotOwned(partition) => ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_owned",
            message: format!(
                "key `{key}` is in partition {partition}, which another process of the cluster owns; ask that process"
            ),
        },
        crate::kafka::KeyReadError::Store(e) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "store_unavailable",
            message: e.to_string(),
        },
    }
}

async fn key(AxumState(api): AxumState<Api>, Path(key): Path<String>) -> Result<Json, ApiError> {
    let (partition, state) = match &api.backend {
        Backend::Local(runtime) => runtime.key_state(&key).await?,
        Backend::Kafka(node) => node.key_state(&key).await.map_err(|e| not_owned(&key, e))?,
    };
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
        }),
    }
}

async fn user(AxumState(api): AxumState<Api>, Path(user): Path<String>) -> Result<Json, ApiError> {
    let view = match &api.backend {
        Backend::Local(runtime) => runtime.user(&user).await?,
        Backend::Kafka(node) => match node.route(&user) {
            None => None,
            Some(route) => {
                let (partition, state) = node
                    .key_state(&route.key)
                    .await
                    .map_err(|e| not_owned(&route.key, e))?;
                Some(crate::runtime::UserView {
                    key: route.key,
                    partition,
                    recorded_at_ms: route.recorded_at_ms,
                    state,
                })
            }
        },
    };
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
        }),
    }
}

async fn partitions(AxumState(api): AxumState<Api>) -> Json {
    match &api.backend {
        Backend::Local(runtime) => {
            let partitioner = runtime.partitioner();
            Json(json!({
                "count": partitioner.partitions(),
                "hash": partitioner.hash().name(),
                "partitions": runtime.partitions(),
            }))
        }
        Backend::Kafka(node) => {
            let partitioner = node.partitioner();
            Json(json!({
                "mode": "kafka",
                "node": node.node_id(),
                "count": partitioner.partitions(),
                "hash": partitioner.hash().name(),
                "partitions": node.owned_partitions(),
            }))
        }
    }
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
    query: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let runtime = api.local()?;
    let n = runtime.partitioner().partitions();
    let partitions: Vec<u32> = match query.partition {
        Some(p) if p >= n => {
            return Err(ApiError::bad_request(format!(
                "partition {p} does not exist (there are {n})"
            )));
        }
        Some(p) => vec![p],
        None => (0..n).collect(),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let mut letters = Vec::new();
    for p in partitions {
        letters.extend(
            runtime
                .dead_letters(p, query.after.unwrap_or(0), limit)
                .await?,
        );
    }
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
        }
    }
}

async fn resubmit_dead_letter(
    AxumState(api): AxumState<Api>,
    Path((partition, seq)): Path<(u32, u64)>,
) -> Result<Response, ApiError> {
    let runtime = api.local()?;
    let n = runtime.partitioner().partitions();
    if partition >= n {
        return Err(ApiError::bad_request(format!(
            "partition {partition} does not exist (there are {n})"
        )));
    }
    match runtime.resubmit_dead_letter(partition, seq).await? {
        Some(decision) => Ok(decision_response(&decision)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_dead_letter",
            message: format!("partition {partition} has no dead letter {seq}"),
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
        });
    };
    let unauthorized = || ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "missing or wrong bearer token (Authorization: Bearer <admin token>)".into(),
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
    authorize(&api, &headers)?;
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
    let report = api
        .local()?
        .install_rule(bytes.to_vec(), query.partitions.as_deref(), label)
        .await?;
    Ok(install_json(&report))
}

async fn admin_rollback(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
) -> Result<Json, ApiError> {
    authorize(&api, &headers)?;
    let report = api.local()?.rollback_rule().await?;
    Ok(install_json(&report))
}

async fn admin_status(
    AxumState(api): AxumState<Api>,
    headers: HeaderMap,
) -> Result<Json, ApiError> {
    authorize(&api, &headers)?;
    let runtime = api.local()?;
    let running = runtime.running_versions();
    Ok(Json(json!({
        "partitions": running
            .iter()
            .enumerate()
            .map(|(id, version)| json!({"id": id, "version": version}))
            .collect::<Vec<_>>(),
        "history": runtime.rule_history(),
    })))
}
