//! The HTTP side: an HTTP/1.1 server on hyper and tokio, KServe's routes, errors as KServe
//! answers them (`{"error": "..."}` with 400, 404, 405, 408, 413, 500 or 503), and a graceful
//! stop (stop accepting, let in-flight requests finish, close idle connections).
//!
//! Bodies are read here, not by the protocol code, so that a body over `--max-body-bytes`
//! (413) and a client that stops sending (408, after `--read-timeout`) cost nothing but their
//! own connection; neither is ever buffered past the limit. Headers get the same timeout from
//! hyper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::batcher::{Batcher, InferError, Loader, ModelStatus};
use crate::config::Config;
use crate::metrics::{Metrics, Route};
use crate::model::{ModelError, TorchModel};
use crate::protocol;

/// Request header honoured with `--delay-header`: hold the request this many milliseconds.
pub const DELAY_HEADER: &str = "x-predictor-delay-ms";
const MAX_TEST_DELAY: Duration = Duration::from_secs(60);

struct AppState {
    model_name: String,
    batcher: Batcher,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    read_timeout: Duration,
    delay_header: bool,
}

/// A bound, not yet serving, predictor.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    read_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Server {
    /// Binds `config.host:config.port` and starts loading the TorchScript model on the worker
    /// threads; until it is loaded the server answers 503 on inference and readiness routes.
    pub async fn bind(config: &Config) -> std::io::Result<Server> {
        let dir = config.model_dir.clone();
        let loader: Loader<TorchModel> = Arc::new(move || TorchModel::load(&dir));
        Server::bind_with(config, loader).await
    }

    /// As [`Server::bind`] with another model loader (tests use it to hold loading back).
    pub async fn bind_with<M: crate::model::Classify + 'static>(
        config: &Config,
        loader: Loader<M>,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind((config.host, config.port)).await?;
        let metrics = Metrics::new();
        let batcher = Batcher::start(loader, config.batch_options(), Arc::clone(&metrics))?;
        Ok(Server {
            listener,
            state: Arc::new(AppState {
                model_name: config.model_name.clone(),
                batcher,
                metrics,
                max_body_bytes: config.max_body_bytes,
                read_timeout: config.read_timeout,
                delay_header: config.delay_header,
            }),
            read_timeout: config.read_timeout,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn batcher(&self) -> Batcher {
        self.state.batcher.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.state.metrics)
    }

    /// Serves until `shutdown` completes, then stops accepting and waits (at most the
    /// shutdown timeout) for open requests to finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.read_timeout)
            .keep_alive(true);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        // Small responses: do not let Nagle hold them back.
                        let _ = stream.set_nodelay(true);
                        let state = Arc::clone(&self.state);
                        let service = service_fn(move |req| handle(Arc::clone(&state), req));
                        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                        tokio::spawn(async move {
                            // Errors here are the client's (reset, header timeout): nothing to do.
                            let _ = conn.await;
                        });
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        eprintln!("inflight-predictor: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        if tokio::time::timeout(self.shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            eprintln!(
                "inflight-predictor: requests still open after {:?}; stopping anyway",
                self.shutdown_timeout
            );
        }
        Ok(())
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint<'a> {
    Root,
    Metrics,
    V1Models,
    V1Model(&'a str),
    V1Predict(&'a str),
    V2Server,
    V2Live,
    V2Ready,
    V2Model(&'a str),
    V2ModelReady(&'a str),
    V2Infer(&'a str),
    NotFound,
    WrongMethod(&'static str),
}

impl Endpoint<'_> {
    fn route(&self) -> Route {
        match self {
            Endpoint::V1Predict(_) => Route::V1Predict,
            Endpoint::V2Infer(_) => Route::V2Infer,
            Endpoint::Root | Endpoint::V2Live | Endpoint::V2Ready | Endpoint::V2ModelReady(_) => {
                Route::Health
            }
            Endpoint::V1Models
            | Endpoint::V1Model(_)
            | Endpoint::V2Server
            | Endpoint::V2Model(_) => Route::Metadata,
            Endpoint::Metrics => Route::Metrics,
            Endpoint::NotFound | Endpoint::WrongMethod(_) => Route::Unknown,
        }
    }
}

fn resolve<'a>(method: &Method, path: &'a str) -> Endpoint<'a> {
    let get = |e: Endpoint<'a>| {
        if method == Method::GET || method == Method::HEAD {
            e
        } else {
            Endpoint::WrongMethod("GET")
        }
    };
    let post = |e: Endpoint<'a>| {
        if method == Method::POST {
            e
        } else {
            Endpoint::WrongMethod("POST")
        }
    };
    match path {
        "/" | "/healthz" => return get(Endpoint::Root),
        "/metrics" => return get(Endpoint::Metrics),
        "/v1/models" | "/v1/models/" => return get(Endpoint::V1Models),
        "/v2" => return get(Endpoint::V2Server),
        "/v2/health/live" => return get(Endpoint::V2Live),
        "/v2/health/ready" => return get(Endpoint::V2Ready),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/models/") {
        if rest.is_empty() || rest.contains('/') {
            return Endpoint::NotFound;
        }
        return match rest.split_once(':') {
            Some((name, "predict")) if !name.is_empty() => post(Endpoint::V1Predict(name)),
            Some(_) => Endpoint::NotFound,
            None => get(Endpoint::V1Model(rest)),
        };
    }
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        let mut parts = rest.split('/');
        let name = parts.next().unwrap_or("");
        if name.is_empty() {
            return Endpoint::NotFound;
        }
        // `/versions/V` may sit between the name and the verb; one version is served.
        let mut verb = parts.next();
        if verb == Some("versions") {
            if parts.next().is_none() {
                return Endpoint::NotFound;
            }
            verb = parts.next();
        }
        if parts.next().is_some() {
            return Endpoint::NotFound;
        }
        return match verb {
            None | Some("") => get(Endpoint::V2Model(name)),
            Some("ready") => get(Endpoint::V2ModelReady(name)),
            Some("infer") => post(Endpoint::V2Infer(name)),
            Some(_) => Endpoint::NotFound,
        };
    }
    Endpoint::NotFound
}

/// An error answered as KServe does: a status and `{"error": message}`.
#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    NotFound(String),
    WrongMethod {
        allow: &'static str,
        message: String,
    },
    Timeout(String),
    TooLarge(String),
    NotReady(String),
    Overloaded(String),
    Internal(String),
}

impl ApiError {
    fn into_response(self) -> Response<Full<Bytes>> {
        let (status, message) = match &self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::WrongMethod { message, .. } => (StatusCode::METHOD_NOT_ALLOWED, message),
            ApiError::Timeout(m) => (StatusCode::REQUEST_TIMEOUT, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::NotReady(m) | ApiError::Overloaded(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        let mut response = json_response(status, &json!({ "error": message }));
        let headers = response.headers_mut();
        match self {
            ApiError::WrongMethod { allow, .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body was not read: this connection cannot carry another request.
            ApiError::Timeout(_) | ApiError::TooLarge(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Overloaded(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Overloaded(_) => ApiError::Overloaded(e.to_string()),
            InferError::Stopped => ApiError::NotReady(e.to_string()),
            InferError::Model(ModelError::Inference(m)) => {
                ApiError::Internal(format!("inference failed: {m}"))
            }
            InferError::Model(m) => ApiError::Internal(m.to_string()),
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    // Some clients send `:predict` as `%3Apredict`.
    let path = percent_decode(req.uri().path());
    let endpoint = resolve(req.method(), &path);
    let route = endpoint.route();
    let _in_flight = route
        .is_inference()
        .then(|| state.metrics.start_inference());
    let response = match answer(&state, endpoint, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .record_request(route, response.status().as_u16(), started.elapsed());
    Ok(response)
}

async fn answer(
    state: &AppState,
    endpoint: Endpoint<'_>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value));
    match endpoint {
        Endpoint::Root => ok(json!({"status": "alive"})),
        Endpoint::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        Endpoint::V1Models => ok(json!({"models": [state.model_name]})),
        Endpoint::V1Model(name) => {
            state.known(name)?;
            state.ready(name)?;
            ok(json!({"name": name, "ready": true}))
        }
        Endpoint::V2Server => ok(json!({
            "name": "inflight-predictor",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": []
        })),
        Endpoint::V2Live => ok(json!({"live": true})),
        Endpoint::V2Ready => {
            state.ready(&state.model_name)?;
            ok(json!({"ready": true}))
        }
        Endpoint::V2Model(name) => {
            state.known(name)?;
            let classes = state.ready(name)?;
            ok(protocol::v2_metadata(name, classes))
        }
        Endpoint::V2ModelReady(name) => {
            state.known(name)?;
            state.ready(name)?;
            ok(json!({"name": name, "ready": true}))
        }
        Endpoint::V1Predict(name) => {
            state.known(name)?;
            let classes = state.ready(name)?;
            let delay = state.test_delay(&req);
            let body = state.read_body(req).await?;
            let images = protocol::parse_v1(&body).map_err(ApiError::BadRequest)?;
            hold(delay).await;
            let logits = state.batcher.infer(images.values, images.count).await?;
            ok(protocol::v1_response(&logits, classes))
        }
        Endpoint::V2Infer(name) => {
            state.known(name)?;
            let classes = state.ready(name)?;
            let delay = state.test_delay(&req);
            let body = state.read_body(req).await?;
            let mut request = protocol::parse_v2(&body).map_err(ApiError::BadRequest)?;
            hold(delay).await;
            let values = std::mem::take(&mut request.images.values);
            let logits = state.batcher.infer(values, request.images.count).await?;
            ok(protocol::v2_response(name, &request, &logits, classes))
        }
        Endpoint::NotFound => Err(ApiError::NotFound(format!(
            "no route for {} {}; see /v1/models and /v2/models/{}",
            req.method(),
            req.uri().path(),
            state.model_name
        ))),
        Endpoint::WrongMethod(allow) => Err(ApiError::WrongMethod {
            allow,
            message: format!(
                "method {} is not allowed on {}; use {allow}",
                req.method(),
                req.uri().path()
            ),
        }),
    }
}

/// Decodes `%XX` escapes in a path; a path with a broken escape or that would not be UTF-8
/// stays as it is (and then matches no model).
fn percent_decode(path: &str) -> String {
    if !path.contains('%') {
        return path.to_owned();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => match (hex(h), hex(l)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => return path.to_owned(),
            },
            (b'%', _, _) => return path.to_owned(),
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

async fn hold(delay: Option<Duration>) {
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

impl AppState {
    fn known(&self, name: &str) -> Result<(), ApiError> {
        if name == self.model_name {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!(
                "Model with name {name} does not exist; this server has {}",
                self.model_name
            )))
        }
    }

    /// The model's class count if it is loaded; 503 otherwise.
    fn ready(&self, name: &str) -> Result<usize, ApiError> {
        match self.batcher.status() {
            ModelStatus::Ready { classes } => Ok(classes),
            ModelStatus::Loading => Err(ApiError::NotReady(format!(
                "Model with name {name} is not ready: it is still loading"
            ))),
            ModelStatus::Failed(e) => Err(ApiError::NotReady(format!(
                "Model with name {name} is not ready: loading failed: {e}"
            ))),
        }
    }

    fn test_delay(&self, req: &Request<Incoming>) -> Option<Duration> {
        if !self.delay_header {
            return None;
        }
        let ms: u64 = req
            .headers()
            .get(DELAY_HEADER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_millis(ms).min(MAX_TEST_DELAY))
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.max_body_bytes;
        // Past the limit the rest of the body is still read (and dropped) up to this much, so
        // that the 413 reaches the client: closing a socket with unread data makes the kernel
        // reset the connection, and the client may lose the answer. Beyond it, just close.
        let drain_cap = limit.saturating_mul(2).max(1 << 20);
        let too_large = || {
            ApiError::TooLarge(format!(
                "the request body is larger than the limit of {limit} bytes (--max-body-bytes); send fewer images per request"
            ))
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > drain_cap as u64) {
            return Err(too_large());
        }
        let read = read_limited(req.into_body(), limit, drain_cap);
        match tokio::time::timeout(self.read_timeout, read).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "the request body did not arrive within {:?} (--read-timeout)",
                self.read_timeout
            ))),
            Ok(BodyRead::Complete(bytes)) => Ok(bytes),
            Ok(BodyRead::TooLarge) => Err(too_large()),
            Ok(BodyRead::Failed(e)) => Err(ApiError::BadRequest(format!(
                "cannot read the request body: {e}"
            ))),
        }
    }
}

enum BodyRead {
    Complete(Bytes),
    TooLarge,
    Failed(hyper::Error),
}

/// Reads a body of at most `limit` bytes; a longer one is read on to its end, or to
/// `drain_cap` bytes, and dropped. A body in one frame (the usual case) is not copied.
async fn read_limited(mut body: Incoming, limit: usize, drain_cap: usize) -> BodyRead {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<bytes::BytesMut> = None;
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers
            },
            Err(e) => return BodyRead::Failed(e),
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            first = None;
            rest = None;
            if seen > drain_cap {
                break;
            }
            continue;
        }
        match (&mut first, &mut rest) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let mut buf = bytes::BytesMut::with_capacity(head.len() + data.len());
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                first = None;
                rest = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    if seen > limit {
        return BodyRead::TooLarge;
    }
    match (first, rest) {
        (_, Some(buf)) => BodyRead::Complete(buf.freeze()),
        (Some(bytes), None) => BodyRead::Complete(bytes),
        (None, None) => BodyRead::Complete(Bytes::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_table() {
        let cases = [
            (
                "plain",
                "/v1/models/mnist:predict",
                "/v1/models/mnist:predict",
            ),
            (
                "colon",
                "/v1/models/mnist%3Apredict",
                "/v1/models/mnist:predict",
            ),
            (
                "lower hex",
                "/v1/models/mnist%3apredict",
                "/v1/models/mnist:predict",
            ),
            ("broken escape", "/v1/models/mnist%3", "/v1/models/mnist%3"),
            ("not hex", "/a%zz", "/a%zz"),
            ("not utf-8", "/a%ff", "/a%ff"),
        ];
        for (name, input, want) in cases {
            assert_eq!(percent_decode(input), want, "{name}");
        }
    }

    #[test]
    fn routes_table() {
        use Endpoint::*;
        let cases = [
            ("GET", "/", Root),
            ("GET", "/healthz", Root),
            ("GET", "/metrics", Metrics),
            ("GET", "/v1/models", V1Models),
            ("GET", "/v1/models/mnist", V1Model("mnist")),
            ("POST", "/v1/models/mnist:predict", V1Predict("mnist")),
            ("GET", "/v1/models/mnist:predict", WrongMethod("POST")),
            ("POST", "/v1/models/mnist:explain", NotFound),
            ("POST", "/v1/models/:predict", NotFound),
            ("GET", "/v1/models/a/b", NotFound),
            ("GET", "/v2", V2Server),
            ("GET", "/v2/health/live", V2Live),
            ("GET", "/v2/health/ready", V2Ready),
            ("GET", "/v2/models/mnist", V2Model("mnist")),
            ("GET", "/v2/models/mnist/ready", V2ModelReady("mnist")),
            ("POST", "/v2/models/mnist/infer", V2Infer("mnist")),
            (
                "POST",
                "/v2/models/mnist/versions/1/infer",
                V2Infer("mnist"),
            ),
            ("GET", "/v2/models/mnist/infer", WrongMethod("POST")),
            ("POST", "/v2/models/mnist", WrongMethod("GET")),
            ("GET", "/v2/models/mnist/other", NotFound),
            ("GET", "/v2/models/mnist/ready/x", NotFound),
            ("GET", "/v2/models/", NotFound),
            ("GET", "/nope", NotFound),
        ];
        for (method, path, want) in cases {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(resolve(&method, path), want, "{method} {path}");
        }
    }
}
