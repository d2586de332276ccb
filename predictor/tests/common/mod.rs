//! Helpers shared by the integration tests: an in-process server on 127.0.0.1:0, a small
//! HTTP/1.1 client, raw TCP for misbehaving clients, and the committed fixtures.
#![allow(dead_code)] // each test file uses a different part
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: fail loudly

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use inflight_predictor::batcher::{Batcher, ModelStatus};
use inflight_predictor::config::Config;
use inflight_predictor::metrics::Metrics;
use inflight_predictor::server::Server;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Config for tests: the committed model, loopback, a free port.
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.model_dir = crate_dir().join("model/mnist");
    config.host = [127, 0, 0, 1].into();
    config.port = 0;
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub batcher: Batcher,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the real model and waits until it is ready.
    pub async fn start(config: Config) -> TestServer {
        let server = Server::bind(&config).await.expect("bind 127.0.0.1:0");
        let started = TestServer::serve(server);
        match started.batcher.wait_loaded().await {
            ModelStatus::Ready { classes } => assert_eq!(classes, 10),
            other => panic!(
                "the model did not load ({other:?}); is libtorch installed (scripts/setup-torch.sh)?"
            ),
        }
        started
    }

    /// Serves an already bound server without waiting for its model.
    pub fn serve(server: Server) -> TestServer {
        let addr = server.local_addr().expect("local addr");
        let metrics = server.metrics();
        let batcher = server.batcher();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            metrics,
            batcher,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        request(self.addr, "POST", path, &[], body.into()).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, serde_json::to_vec(body).unwrap()).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` message of a KServe-style error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" in {}", String::from_utf8_lossy(&self.body)))
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Full::new(body)).unwrap())
        .await
        .expect("send request");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Writes raw bytes, then reads until the server closes the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A metric's value from /metrics text (the first line that starts with `series `).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn digit_png(label: usize) -> Vec<u8> {
    std::fs::read(crate_dir().join(format!("tests/fixtures/digits/{label}.png"))).unwrap()
}

pub fn png(width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(pixels).unwrap();
    writer.finish().unwrap();
    bytes
}

/// One held-out digit as written by scripts/train-model.py.
pub struct Heldout {
    pub label: usize,
    pub python_prediction: usize,
    pub pixels: Vec<f32>,
    pub png_b64: String,
    pub python_logits: Vec<f32>,
}

pub fn heldout() -> Vec<Heldout> {
    let text = std::fs::read_to_string(crate_dir().join("tests/fixtures/heldout.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(item["pixels"].as_str().unwrap())
                .unwrap();
            assert_eq!(raw.len(), 784);
            Heldout {
                label: item["label"].as_u64().unwrap() as usize,
                python_prediction: item["predicted"].as_u64().unwrap() as usize,
                pixels: raw.iter().map(|p| f32::from(*p) / 255.0).collect(),
                png_b64: item["png"].as_str().unwrap().to_string(),
                python_logits: item["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

/// A v2 FP32 request for these images, asking for both outputs.
pub fn v2_fp32_request(images: &[&[f32]], id: &str) -> Value {
    let data: Vec<f32> = images.iter().flat_map(|i| i.iter().copied()).collect();
    serde_json::json!({
        "id": id,
        "inputs": [{"name": "input-0", "shape": [images.len(), 1, 28, 28], "datatype": "FP32", "data": data}],
        "outputs": [{"name": "predict"}, {"name": "logits"}]
    })
}
