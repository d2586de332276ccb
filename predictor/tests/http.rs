//! The predictor over real HTTP with the real TorchScript model: every endpoint, every error a
//! client can cause, accuracy on held-out digits, batching, and misbehaving clients.
//! Needs libtorch: `LIBTORCH=$(scripts/setup-torch.sh --print-libtorch | tail -1) cargo test -p inflight-predictor`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: fail loudly

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hyper::StatusCode;
use inflight_predictor::batcher::{Loader, ModelStatus};
use inflight_predictor::model::{ModelError, TorchModel};
use inflight_predictor::server::{Server, DELAY_HEADER};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(crate_dir().join("samples").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata_endpoints() {
    let s = TestServer::start(test_config()).await;
    let cases: [(&str, Value); 9] = [
        ("/", json!({"status": "alive"})),
        ("/healthz", json!({"status": "alive"})),
        ("/v1/models", json!({"models": ["mnist"]})),
        ("/v1/models/mnist", json!({"name": "mnist", "ready": true})),
        ("/v2/health/live", json!({"live": true})),
        ("/v2/health/ready", json!({"ready": true})),
        (
            "/v2/models/mnist/ready",
            json!({"name": "mnist", "ready": true}),
        ),
        (
            "/v2/models/mnist/versions/1/ready",
            json!({"name": "mnist", "ready": true}),
        ),
        (
            "/v2",
            json!({"name": "inflight-predictor", "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
        ),
    ];
    for (path, want) in cases {
        let r = s.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(r.headers["content-type"], "application/json", "{path}");
        assert_eq!(r.json(), want, "{path}");
    }
    let meta = s.get("/v2/models/mnist").await.json();
    assert_eq!(meta["name"], "mnist");
    assert_eq!(meta["platform"], "pytorch_torchscript");
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "input-0", "datatype": "FP32", "shape": [-1, 1, 28, 28]})
    );
    assert_eq!(
        meta["outputs"][0],
        json!({"name": "predict", "datatype": "INT64", "shape": [-1]})
    );
    assert_eq!(
        meta["outputs"][1],
        json!({"name": "logits", "datatype": "FP32", "shape": [-1, 10]})
    );

    let metrics = s.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    for series in [
        "inflight_predictor_requests_total{route=\"health\",status=\"200\"}",
        "inflight_predictor_requests_total{route=\"metadata\",status=\"200\"}",
        "inflight_predictor_in_flight",
        "inflight_predictor_max_in_flight",
        "inflight_predictor_batch_size_count",
        "inflight_predictor_request_duration_seconds_count{route=\"health\"}",
    ] {
        metric(&text, series);
    }
    assert_eq!(
        metric(
            &text,
            "inflight_predictor_requests_total{route=\"health\",status=\"200\"}"
        ),
        6.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_sample_requests_are_answered() {
    let s = TestServer::start(test_config()).await;
    let r = s
        .post_json("/v1/models/mnist:predict", &sample("mnist.json"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!({"predictions": [2]}));
    // The same with the colon percent-encoded, as some clients send it.
    let r = s
        .post_json("/v1/models/mnist%3Apredict", &sample("mnist.json"))
        .await;
    assert_eq!(r.json(), json!({"predictions": [2]}));

    for name in ["mnist_v2.json", "mnist_v2_tensor.json"] {
        let mut request = sample(name);
        request["id"] = json!("req-42");
        let r = s.post_json("/v2/models/mnist/infer", &request).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({"model_name": "mnist", "id": "req-42", "outputs": [
                {"name": "predict", "shape": [1], "datatype": "INT64", "data": [2]}
            ]}),
            "{name}"
        );
    }
    s.stop().await;
}

/// The first held-out digit of each label, 0 to 9.
fn one_digit_per_label() -> Vec<Heldout> {
    let mut digits: Vec<Heldout> = Vec::new();
    for d in heldout() {
        if !digits.iter().any(|seen| seen.label == d.label) {
            digits.push(d);
        }
    }
    digits.sort_by_key(|d| d.label);
    assert_eq!(digits.len(), 10);
    digits
}

/// TorchServe's KServe v2 MNIST tensor request, as pytorch/serve ships it in
/// `kubernetes/kserve/kf_request_json/v2/mnist/mnist_v2_tensor.json` (and documents in that
/// folder's README): pretty-printed, an `id`, one input `input-0` of FP32 shape `[1, 28, 28]`
/// (C, H, W, as torchvision's `ToTensor` makes it), data nested as the shape with four
/// decimals. Here with a held-out digit in place of the sample's zero.
fn torchserve_v2_tensor_request(pixels: &[f32]) -> String {
    let rows: Vec<String> = pixels
        .chunks(28)
        .map(|row| {
            let values: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
            format!("        [{}]", values.join(", "))
        })
        .collect();
    format!(
        "{{\n  \"id\": \"d3b15cad-50a2-4eaf-80ce-8b0a428bd298\",\n  \"inputs\": [{{\n    \"name\": \"input-0\",\n    \"shape\": [1, 28, 28],\n    \"datatype\": \"FP32\",\n    \"data\": [\n      [\n{}\n      ]\n    ]\n  }}]\n}}\n",
        rows.join(",\n")
    )
}

/// KServe's own generator for the same request, `totensor.py` of
/// `docs/samples/v1beta1/torchserve/v2/tensor_conv` (kserve/kserve): `json.dump` of a
/// torchvision `ToTensor` `[1, 28, 28]` float32 tensor rounded to four decimals, nested, under
/// a random input name and without an `id`.
fn kserve_totensor_request(pixels: &[f32]) -> Value {
    let rounded = |v: f32| f64::from(((f64::from(v) * 1e4).round() / 1e4) as f32);
    let rows: Vec<Vec<f64>> = pixels
        .chunks(28)
        .map(|row| row.iter().map(|v| rounded(*v)).collect())
        .collect();
    json!({"inputs": [{
        "name": "479cdf23-3a65-48a6-ae16-8ccb96d9f19c",
        "shape": [1, 28, 28],
        "datatype": "FP32",
        "data": [rows]
    }]})
}

/// Issue #16: TorchServe's KServe v2 sample sends one image as FP32 `[1, 28, 28]`, nested.
/// It is answered like TorchServe answers it (`predict`, INT64 `[1]`, the id echoed), with
/// the class python computed for the same digit with the same model; KServe's `totensor.py`
/// form of it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchserve_kserve_v2_tensor_sample_is_answered() {
    let s = TestServer::start(test_config()).await;
    for d in one_digit_per_label() {
        let body = torchserve_v2_tensor_request(&d.pixels);
        let r = s.post("/v2/models/mnist/infer", body).await;
        assert_eq!(r.status, StatusCode::OK, "digit {}: {}", d.label, r.text());
        assert_eq!(
            r.json(),
            json!({"model_name": "mnist", "id": "d3b15cad-50a2-4eaf-80ce-8b0a428bd298", "outputs": [
                {"name": "predict", "shape": [1], "datatype": "INT64", "data": [d.python_prediction]}
            ]}),
            "digit {}",
            d.label
        );

        let r = s
            .post_json(
                "/v2/models/mnist/infer",
                &kserve_totensor_request(&d.pixels),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "digit {}: {}", d.label, r.text());
        assert_eq!(
            r.json(),
            json!({"model_name": "mnist", "outputs": [
                {"name": "predict", "shape": [1], "datatype": "INT64", "data": [d.python_prediction]}
            ]}),
            "digit {}",
            d.label
        );
    }
    s.stop().await;
}

/// Every FP32 layout, flat or nested, gets the answer of the model's own `[N, 1, 28, 28]`:
/// the same logits, `predict` INT64 `[N]` and `logits` FP32 `[N, 10]`, N = 1 for one image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fp32_layout_gets_the_answer_of_n_1_28_28() {
    let s = TestServer::start(test_config()).await;
    let digits = one_digit_per_label();
    let images: Vec<&[f32]> = digits.iter().map(|d| d.pixels.as_slice()).collect();
    let reference = s
        .post_json("/v2/models/mnist/infer", &v2_fp32_request(&images, "ref"))
        .await
        .json();
    let reference_logits: Vec<f64> = reference["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(reference_logits.len(), 100);

    let rows =
        |pixels: &[f32]| -> Vec<Vec<f32>> { pixels.chunks(28).map(<[f32]>::to_vec).collect() };
    let flat_all: Vec<f32> = images.concat();
    let nested_all: Vec<Vec<Vec<f32>>> = images.iter().map(|i| rows(i)).collect();
    let mut cases: Vec<(String, Value, Value, std::ops::Range<usize>)> = vec![
        (
            "[10, 28, 28] flat".into(),
            json!([10, 28, 28]),
            json!(flat_all),
            0..10,
        ),
        (
            "[10, 28, 28] nested".into(),
            json!([10, 28, 28]),
            json!(nested_all),
            0..10,
        ),
    ];
    for (k, pixels) in images.iter().enumerate() {
        cases.extend([
            (
                format!("digit {k} [1, 28, 28] flat"),
                json!([1, 28, 28]),
                json!(pixels),
                k..k + 1,
            ),
            (
                format!("digit {k} [1, 28, 28] nested"),
                json!([1, 28, 28]),
                json!([rows(pixels)]),
                k..k + 1,
            ),
            (
                format!("digit {k} [28, 28] flat"),
                json!([28, 28]),
                json!(pixels),
                k..k + 1,
            ),
            (
                format!("digit {k} [28, 28] nested"),
                json!([28, 28]),
                json!(rows(pixels)),
                k..k + 1,
            ),
        ]);
    }
    for (name, shape, data, range) in cases {
        let request = json!({
            "id": name,
            "inputs": [{"name": "input-0", "shape": shape, "datatype": "FP32", "data": data}],
            "outputs": [{"name": "predict"}, {"name": "logits"}]
        });
        let r = s.post_json("/v2/models/mnist/infer", &request).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
        let body = r.json();
        let n = range.len();
        let want_ids: Vec<usize> = digits[range.clone()]
            .iter()
            .map(|d| d.python_prediction)
            .collect();
        assert_eq!(body["id"], json!(name));
        assert_eq!(
            body["outputs"][0],
            json!({"name": "predict", "shape": [n], "datatype": "INT64", "data": want_ids}),
            "{name}"
        );
        assert_eq!(body["outputs"][1]["shape"], json!([n, 10]), "{name}");
        let logits = body["outputs"][1]["data"].as_array().unwrap();
        let want = &reference_logits[range.start * 10..range.end * 10];
        assert_eq!(logits.len(), want.len(), "{name}");
        for (got, want) in logits.iter().zip(want) {
            let got = got.as_f64().unwrap();
            assert!((got - want).abs() < 1e-4, "{name}: {got} vs {want}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_digit_fixture_is_recognised_through_both_protocols() {
    let s = TestServer::start(test_config()).await;
    let instances: Vec<Value> = (0..10)
        .map(|d| json!({"data": b64(&digit_png(d))}))
        .collect();
    let r = s
        .post_json("/v1/models/mnist:predict", &json!({"instances": instances}))
        .await;
    assert_eq!(
        r.json(),
        json!({"predictions": (0..10).collect::<Vec<_>>()})
    );

    let data: Vec<String> = (0..10).map(|d| b64(&digit_png(d))).collect();
    let request =
        json!({"inputs": [{"name": "x", "shape": [10], "datatype": "BYTES", "data": data}]});
    let r = s.post_json("/v2/models/mnist/infer", &request).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["outputs"][0]["data"],
        json!((0..10).collect::<Vec<_>>())
    );
    s.stop().await;
}

/// Held-out accuracy through the HTTP API, PNG over v1 and FP32 tensors over v2; both must
/// also agree exactly with what python computed with the same model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heldout_accuracy_through_http() {
    let s = TestServer::start(test_config()).await;
    let digits = heldout();
    assert!(digits.len() >= 300, "{} held-out digits", digits.len());
    let mut v1_correct = 0;
    let mut v2_correct = 0;
    for chunk in digits.chunks(40) {
        let instances: Vec<Value> = chunk.iter().map(|d| json!({"data": d.png_b64})).collect();
        let r = s
            .post_json("/v1/models/mnist:predict", &json!({"instances": instances}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let predictions = r.json()["predictions"].as_array().unwrap().clone();
        assert_eq!(predictions.len(), chunk.len());

        let images: Vec<&[f32]> = chunk.iter().map(|d| d.pixels.as_slice()).collect();
        let r = s
            .post_json("/v2/models/mnist/infer", &v2_fp32_request(&images, "acc"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let body = r.json();
        let ids = body["outputs"][0]["data"].as_array().unwrap().clone();
        let logits = body["outputs"][1]["data"].as_array().unwrap().clone();
        assert_eq!(body["outputs"][1]["shape"], json!([chunk.len(), 10]));

        for (k, d) in chunk.iter().enumerate() {
            let v1 = predictions[k].as_u64().unwrap() as usize;
            let v2 = ids[k].as_u64().unwrap() as usize;
            assert_eq!(v1, d.python_prediction, "v1 disagrees with python");
            assert_eq!(v2, d.python_prediction, "v2 disagrees with python");
            for (j, want) in d.python_logits.iter().enumerate() {
                let got = logits[k * 10 + j].as_f64().unwrap() as f32;
                assert!(
                    (got - want).abs() < 1e-3,
                    "logit {j}: rust {got} python {want}"
                );
            }
            v1_correct += usize::from(v1 == d.label);
            v2_correct += usize::from(v2 == d.label);
        }
    }
    let n = digits.len() as f64;
    let (v1_acc, v2_acc) = (v1_correct as f64 / n, v2_correct as f64 / n);
    println!(
        "held-out accuracy through HTTP: v1 PNG {v1_acc:.4}, v2 FP32 {v2_acc:.4} ({} digits)",
        digits.len()
    );
    assert!(v1_acc >= 0.95, "v1 accuracy {v1_acc}");
    assert!(v2_acc >= 0.95, "v2 accuracy {v2_acc}");
    s.stop().await;
}

struct Bad {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Bytes,
    status: StatusCode,
    message: &'static str,
}

fn bad_requests() -> Vec<Bad> {
    let good_png = b64(&digit_png(3));
    let json_body = |v: Value| Bytes::from(serde_json::to_vec(&v).unwrap());
    let v2 = |input: Value| json_body(json!({"inputs": [input]}));
    let case = |name, method, path, body, status, message| Bad {
        name,
        method,
        path,
        body,
        status,
        message,
    };
    use StatusCode as S;
    vec![
        case(
            "malformed JSON",
            "POST",
            "/v1/models/mnist:predict",
            Bytes::from_static(b"{\"instances\": [{\"data\": "),
            S::BAD_REQUEST,
            "malformed JSON",
        ),
        case(
            "malformed JSON v2",
            "POST",
            "/v2/models/mnist/infer",
            Bytes::from_static(b"not json"),
            S::BAD_REQUEST,
            "malformed JSON",
        ),
        case(
            "empty body",
            "POST",
            "/v1/models/mnist:predict",
            Bytes::new(),
            S::BAD_REQUEST,
            "body is empty",
        ),
        case(
            "empty instances",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": []})),
            S::BAD_REQUEST,
            "\"instances\" is empty",
        ),
        case(
            "no instances",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"data": good_png})),
            S::BAD_REQUEST,
            "needs an \"instances\" array",
        ),
        case(
            "bad base64",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": [{"data": "@@not base64@@"}]})),
            S::BAD_REQUEST,
            "instance 0: invalid base64",
        ),
        case(
            "not a PNG",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": [{"data": b64(b"GIF89a...")}]})),
            S::BAD_REQUEST,
            "not a PNG",
        ),
        case(
            "truncated PNG",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": [{"data": b64(&digit_png(1)[..60])}]})),
            S::BAD_REQUEST,
            "invalid PNG",
        ),
        case(
            "wrong image size",
            "POST",
            "/v1/models/mnist:predict",
            json_body(
                json!({"instances": [{"data": good_png}, {"data": b64(&png(8, 8, &[0; 64]))}]}),
            ),
            S::BAD_REQUEST,
            "instance 1: image is 8x8 pixels",
        ),
        case(
            "wrong tensor shape",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": [vec![vec![0.0; 28]; 14]]})),
            S::BAD_REQUEST,
            "dimension 0 has 14 elements, expected 28",
        ),
        case(
            "tensor out of range",
            "POST",
            "/v1/models/mnist:predict",
            json_body(json!({"instances": [vec![vec![255; 28]; 28]]})),
            S::BAD_REQUEST,
            "outside [0, 1]",
        ),
        case(
            "v2 wrong shape",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [1, 784], "datatype": "FP32", "data": vec![0.0; 784]})),
            S::BAD_REQUEST,
            "FP32 shape [1, 784] is not accepted; send [N, 1, 28, 28] or [N, 28, 28] for N images ([1, 28, 28] is one image as C×H×W), or [28, 28] for one",
        ),
        case(
            "v2 one CHW image, one value short",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": vec![0.0; 783]})),
            S::BAD_REQUEST,
            "shape [1, 28, 28] needs 784 values, data has 783",
        ),
        case(
            "v2 one CHW image, nested as HW",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": vec![vec![0.0; 28]; 28]})),
            S::BAD_REQUEST,
            "dimension 0 has 28 elements, expected 1 (shape [1, 28, 28])",
        ),
        case(
            // Nothing is allocated for the N the shape claims before the data holds it.
            "v2 N beyond the data",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [1_000_000_000_000_i64, 1, 28, 28], "datatype": "FP32", "data": vec![0.0; 784]})),
            S::BAD_REQUEST,
            "shape [1000000000000, 1, 28, 28] needs 784000000000000 values, data has 784",
        ),
        case(
            "v2 N beyond usize",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [i64::MAX, 1, 28, 28], "datatype": "FP32", "data": vec![0.0; 784]})),
            S::BAD_REQUEST,
            "needs 9223372036854775807 × 784 values, data has 784",
        ),
        case(
            "v2 wrong dtype",
            "POST",
            "/v2/models/mnist/infer",
            v2(
                json!({"name": "x", "shape": [1, 1, 28, 28], "datatype": "INT64", "data": vec![0; 784]}),
            ),
            S::BAD_REQUEST,
            "datatype INT64 is not supported",
        ),
        case(
            "v2 data count",
            "POST",
            "/v2/models/mnist/infer",
            v2(
                json!({"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": vec![0.0; 784]}),
            ),
            S::BAD_REQUEST,
            "needs 1568 values, data has 784",
        ),
        case(
            "v2 bad base64",
            "POST",
            "/v2/models/mnist/infer",
            v2(json!({"name": "x", "shape": [1], "datatype": "BYTES", "data": ["%%%"]})),
            S::BAD_REQUEST,
            "element 0: invalid base64",
        ),
        case(
            "v2 missing field",
            "POST",
            "/v2/models/mnist/infer",
            json_body(json!({"inputs": [{"name": "x", "datatype": "FP32", "data": []}]})),
            S::BAD_REQUEST,
            "missing field `shape`",
        ),
        case(
            "v2 unknown output",
            "POST",
            "/v2/models/mnist/infer",
            json_body(
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [good_png]}], "outputs": [{"name": "nope"}]}),
            ),
            S::BAD_REQUEST,
            "unknown output \"nope\"",
        ),
        case(
            "unknown model v1",
            "POST",
            "/v1/models/resnet:predict",
            json_body(json!({"instances": [{"data": good_png}]})),
            S::NOT_FOUND,
            "Model with name resnet does not exist",
        ),
        case(
            "unknown model v2",
            "POST",
            "/v2/models/resnet/infer",
            json_body(json!({})),
            S::NOT_FOUND,
            "Model with name resnet does not exist",
        ),
        case(
            "unknown model metadata",
            "GET",
            "/v2/models/resnet",
            Bytes::new(),
            S::NOT_FOUND,
            "Model with name resnet does not exist",
        ),
        case(
            "unknown model status",
            "GET",
            "/v1/models/resnet",
            Bytes::new(),
            S::NOT_FOUND,
            "Model with name resnet does not exist",
        ),
        case(
            "unknown route",
            "GET",
            "/v3/anything",
            Bytes::new(),
            S::NOT_FOUND,
            "no route for GET /v3/anything",
        ),
        case(
            "unknown verb",
            "POST",
            "/v1/models/mnist:explain",
            Bytes::new(),
            S::NOT_FOUND,
            "no route",
        ),
        case(
            "wrong method",
            "GET",
            "/v1/models/mnist:predict",
            Bytes::new(),
            S::METHOD_NOT_ALLOWED,
            "use POST",
        ),
        case(
            "wrong method v2",
            "PUT",
            "/v2/models/mnist/infer",
            Bytes::new(),
            S::METHOD_NOT_ALLOWED,
            "use POST",
        ),
        case(
            "body over limit",
            "POST",
            "/v1/models/mnist:predict",
            Bytes::from(vec![b' '; 70 * 1024]),
            S::PAYLOAD_TOO_LARGE,
            "larger than the limit of 65536 bytes",
        ),
    ]
}

/// Every bad request in the table, one after the other, on the same server; then a good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_message() {
    let mut config = test_config();
    config.max_body_bytes = 64 * 1024;
    let s = TestServer::start(config).await;
    for bad in bad_requests() {
        let r = request(s.addr, bad.method, bad.path, &[], bad.body.clone()).await;
        assert_eq!(r.status, bad.status, "{}: {}", bad.name, r.text());
        assert_eq!(
            r.headers["content-type"], "application/json",
            "{}",
            bad.name
        );
        let message = r.error();
        assert!(
            message.contains(bad.message),
            "{}: {message:?} lacks {:?}",
            bad.name,
            bad.message
        );
    }
    let r = s
        .post_json(
            "/v1/models/mnist:predict",
            &json!({"instances": [{"data": b64(&digit_png(7))}]}),
        )
        .await;
    assert_eq!(r.json(), json!({"predictions": [7]}));
    let r = request(s.addr, "GET", "/v1/models/mnist:predict", &[], Bytes::new()).await;
    assert_eq!(r.headers["allow"], "POST");
    s.stop().await;
}

/// A chunked body (no content-length) over the limit is cut off at the limit with 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_limit_is_refused() {
    let mut config = test_config();
    config.max_body_bytes = 1024;
    let s = TestServer::start(config).await;
    let chunk = vec![b'x'; 600];
    let mut raw =
        b"POST /v1/models/mnist:predict HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(&chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(s.addr, &raw).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("larger than the limit of 1024 bytes"),
        "{answer}"
    );
    s.stop().await;
}

/// A body declared far over the limit is refused from its headers alone, before it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_declared_body_is_refused_from_its_headers() {
    let s = TestServer::start(test_config()).await;
    let answer = raw_exchange(
        s.addr,
        b"POST /v2/models/mnist/infer HTTP/1.1\r\nhost: t\r\ncontent-length: 100000000000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        answer.contains("larger than the limit of 4194304 bytes"),
        "{answer}"
    );
    s.stop().await;
}

/// Bad and good requests at the same time: each gets its own answer, none disturbs another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bad_requests_do_not_disturb_good_ones() {
    let mut config = test_config();
    config.max_body_bytes = 64 * 1024;
    let s = TestServer::start(config).await;
    let bad = Arc::new(bad_requests());
    let mut tasks = Vec::new();
    for i in 0..120usize {
        let addr = s.addr;
        let bad = Arc::clone(&bad);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let digit = (i / 2) % 10;
                let body =
                    serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(digit))}]}))
                        .unwrap();
                let r = request(addr, "POST", "/v1/models/mnist:predict", &[], body.into()).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                assert_eq!(r.json(), json!({"predictions": [digit]}));
            } else {
                let b = &bad[(i / 2) % bad.len()];
                let r = request(addr, b.method, b.path, &[], b.body.clone()).await;
                assert_eq!(r.status, b.status, "{}: {}", b.name, r.text());
                assert!(r.error().contains(b.message), "{}", b.name);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = s.get("/metrics").await.text();
    assert_eq!(
        metric(
            &text,
            "inflight_predictor_requests_total{route=\"v1_predict\",status=\"200\"}"
        ),
        60.0
    );
    assert_eq!(metric(&text, "inflight_predictor_in_flight"), 0.0);
    s.stop().await;
}

/// Concurrent single-image requests merged into batches answer exactly what each image gets
/// alone (within float rounding), and batches really formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_unbatched() {
    let mut unbatched = test_config();
    unbatched.max_batch_size = 1;
    let alone = TestServer::start(unbatched).await;
    let mut batched = test_config();
    batched.max_batch_size = 16;
    batched.max_batch_delay = Duration::from_millis(50);
    let together = TestServer::start(batched).await;

    let digits: Arc<Vec<Heldout>> = Arc::new(heldout().into_iter().take(48).collect());
    let mut expected = Vec::new();
    for d in digits.iter() {
        let r = alone
            .post_json(
                "/v2/models/mnist/infer",
                &v2_fp32_request(&[&d.pixels], "1"),
            )
            .await;
        expected.push(r.json()["outputs"][1]["data"].clone());
    }
    let mut tasks = Vec::new();
    for i in 0..digits.len() {
        let digits = Arc::clone(&digits);
        let addr = together.addr;
        tasks.push(tokio::spawn(async move {
            let body =
                serde_json::to_vec(&v2_fp32_request(&[&digits[i].pixels], &i.to_string())).unwrap();
            let r = request(addr, "POST", "/v2/models/mnist/infer", &[], body.into()).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            let body = r.json();
            assert_eq!(body["id"], json!(i.to_string()));
            (i, body["outputs"][1]["data"].clone())
        }));
    }
    for t in tasks {
        let (i, logits) = t.await.unwrap();
        let (got, want) = (logits.as_array().unwrap(), expected[i].as_array().unwrap());
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-4, "image {i}: batched {g} alone {w}");
        }
    }
    let text = together.get("/metrics").await.text();
    let passes = metric(&text, "inflight_predictor_batch_size_count");
    let images = metric(&text, "inflight_predictor_batch_size_sum");
    assert_eq!(images, 48.0, "every image went through the model once");
    assert!(
        passes < 48.0,
        "no batch formed: {passes} passes for 48 images"
    );
    alone.stop().await;
    together.stop().await;
}

/// Readiness is false and inference refused with 503 until the model is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_model_is_loaded() {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let dir = crate_dir().join("model/mnist");
    let loader: Loader<TorchModel> = Arc::new(move || {
        let _ = gate.lock().unwrap().recv();
        TorchModel::load(&dir)
    });
    let server = Server::bind_with(&test_config(), loader).await.unwrap();
    let s = TestServer::serve(server);
    let live = s.get("/v2/health/live").await;
    assert_eq!(live.status, StatusCode::OK);
    for path in [
        "/v2/health/ready",
        "/v2/models/mnist/ready",
        "/v1/models/mnist",
        "/v2/models/mnist",
    ] {
        let r = s.get(path).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            r.error().contains("not ready: it is still loading"),
            "{path}: {}",
            r.error()
        );
    }
    let body = json!({"instances": [{"data": b64(&digit_png(4))}]});
    let r = s.post_json("/v1/models/mnist:predict", &body).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    release.send(()).unwrap();
    assert_eq!(
        s.batcher.wait_loaded().await,
        ModelStatus::Ready { classes: 10 }
    );
    assert_eq!(s.get("/v2/health/ready").await.status, StatusCode::OK);
    assert_eq!(
        s.post_json("/v1/models/mnist:predict", &body).await.json(),
        json!({"predictions": [4]})
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_is_never_ready() {
    let loader: Loader<TorchModel> =
        Arc::new(|| TorchModel::load(std::path::Path::new("/nonexistent")));
    let server = Server::bind_with(&test_config(), loader).await.unwrap();
    let s = TestServer::serve(server);
    assert!(matches!(
        s.batcher.wait_loaded().await,
        ModelStatus::Failed(_)
    ));
    let r = s.get("/v2/health/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error().contains("loading failed"), "{}", r.error());
    assert!(r.error().contains("--model-dir"), "{}", r.error());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_model_file_is_reported() {
    let dir =
        std::env::temp_dir().join(format!("inflight-predictor-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.pt"), b"this is not a torchscript archive").unwrap();
    let err = TorchModel::load(&dir)
        .err()
        .expect("a corrupt model must not load");
    assert!(matches!(err, ModelError::Load { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client that sends part of a body and stops gets 408 after the read timeout; one that
/// never finishes its headers is disconnected; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_time_out_without_blocking_others() {
    let mut config = test_config();
    config.read_timeout = Duration::from_millis(400);
    let s = TestServer::start(config).await;

    let mut slow_body = TcpStream::connect(s.addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/models/mnist:predict HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n{\"instances\": [")
        .await
        .unwrap();
    let mut slow_headers = TcpStream::connect(s.addr).await.unwrap();
    slow_headers
        .write_all(b"POST /v1/models/mnist:predict HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();

    // Others are served while both hang.
    for d in 0..10 {
        let r = s
            .post_json(
                "/v1/models/mnist:predict",
                &json!({"instances": [{"data": b64(&digit_png(d))}]}),
            )
            .await;
        assert_eq!(r.json(), json!({"predictions": [d]}));
    }

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow_body.read_to_end(&mut answer))
        .await
        .expect("the server must answer a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 400ms"), "{answer}");

    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow_headers.read_to_end(&mut rest))
        .await
        .expect("the server must close a connection whose headers stall");
    assert!(
        closed.is_err() || !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{rest:?}"
    );
    let text = s.get("/metrics").await.text();
    assert_eq!(
        metric(
            &text,
            "inflight_predictor_requests_total{route=\"v1_predict\",status=\"408\"}"
        ),
        1.0
    );
    s.stop().await;
}

/// A client that disconnects while its request waits leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_leaves_no_trace() {
    let mut config = test_config();
    config.delay_header = true;
    let s = TestServer::start(config).await;
    let body = serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(5))}]})).unwrap();
    let mut raw = format!(
        "POST /v1/models/mnist:predict HTTP/1.1\r\nhost: t\r\n{DELAY_HEADER}: 5000\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    client.write_all(&raw).await.unwrap();
    while s.metrics.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    drop(client);
    // hyper drops the request's future when it sees the connection close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while s.metrics.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request still in flight after disconnect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = s.post("/v1/models/mnist:predict", body).await;
    assert_eq!(r.json(), json!({"predictions": [5]}));
    s.stop().await;
}

/// With --delay-header, requests are held; max in-flight records the peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_header_holds_requests_and_max_in_flight_records_the_peak() {
    let mut config = test_config();
    config.delay_header = true;
    let s = TestServer::start(config).await;
    let body = Bytes::from(
        serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(6))}]})).unwrap(),
    );
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (addr, body) = (s.addr, body.clone());
            tokio::spawn(async move {
                request(
                    addr,
                    "POST",
                    "/v1/models/mnist:predict",
                    &[(DELAY_HEADER, "300")],
                    body,
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().json(), json!({"predictions": [6]}));
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    let text = s.get("/metrics").await.text();
    assert_eq!(metric(&text, "inflight_predictor_max_in_flight"), 8.0);
    assert_eq!(metric(&text, "inflight_predictor_in_flight"), 0.0);
    s.stop().await;
}

/// Graceful stop in-process: a request in flight when the stop begins still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_finishes_in_flight_requests() {
    let mut config = test_config();
    config.delay_header = true;
    let s = TestServer::start(config).await;
    let body = Bytes::from(
        serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(8))}]})).unwrap(),
    );
    let addr = s.addr;
    let pending = tokio::spawn(async move {
        request(
            addr,
            "POST",
            "/v1/models/mnist:predict",
            &[(DELAY_HEADER, "300")],
            body,
        )
        .await
    });
    while s.metrics.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    s.stop().await;
    let r = pending.await.unwrap();
    assert_eq!(r.json(), json!({"predictions": [8]}));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after stop"
    );
}
