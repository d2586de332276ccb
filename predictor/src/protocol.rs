//! KServe's two inference protocols, as JSON: v1 (`{"instances": [...]}` →
//! `{"predictions": [...]}`) and v2, the Open Inference Protocol (`inputs` / `outputs` tensors).
//!
//! v1 instances are either `{"data": "<base64 PNG>"}` (the form of KServe's torchserve MNIST
//! example; `{"b64": ...}` and `{"data": {"b64": ...}}` are accepted too) or a raw tensor,
//! a `28×28` or `1×28×28` nested array. Predictions are class ids, as that example returns.
//!
//! v2 takes one input: FP32 with shape `[N, 1, 28, 28]`, `[N, 28, 28]`, `[1, 28, 28]` (one
//! image as C×H×W, as TorchServe's KServe v2 MNIST sample sends it) or `[28, 28]`, data flat
//! in row-major order or nested as the shape; or BYTES with shape `[N]` whose elements are
//! base64 PNGs. Outputs: `predict` (INT64 `[N]`, class ids; the default) and `logits` (FP32
//! `[N, classes]`), chosen with the request's `outputs`; one image in, whatever its shape,
//! is N = 1 out.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::input::{decode_png_base64, flatten_flat, flatten_tensor, kind, shape_text};
use crate::model::{argmax, IMAGE_LEN, IMAGE_SIDE};

/// Images decoded from a request, ready for the model.
#[derive(Debug, Default, PartialEq)]
pub struct Images {
    pub values: Vec<f32>,
    pub count: usize,
}

/// Parses a v1 `:predict` body.
pub fn parse_v1(body: &[u8]) -> Result<Images, String> {
    let request: Value = parse_json(body)?;
    let instances = match request.get("instances") {
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(format!(
                "\"instances\" must be an array, got {}",
                kind(other)
            ))
        }
        None => {
            return Err(
                "the request needs an \"instances\" array, e.g. {\"instances\": [{\"data\": \"<base64 PNG>\"}]}"
                    .into(),
            )
        }
    };
    if instances.is_empty() {
        return Err("\"instances\" is empty: send at least one image".into());
    }
    let mut images = Images {
        values: Vec::with_capacity(instances.len() * IMAGE_LEN),
        count: instances.len(),
    };
    for (i, instance) in instances.iter().enumerate() {
        let what = format!("instance {i}");
        match instance {
            Value::Object(fields) => {
                let b64 = match (fields.get("data"), fields.get("b64")) {
                    (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s,
                    (Some(Value::Object(inner)), _) => match inner.get("b64") {
                        Some(Value::String(s)) => s,
                        _ => return Err(format!("{what}: \"data\" object needs a \"b64\" string")),
                    },
                    (Some(other), _) => {
                        return Err(format!(
                            "{what}: \"data\" must be a base64 PNG string, got {}",
                            kind(other)
                        ))
                    }
                    (None, _) => {
                        return Err(format!(
                            "{what}: expected {{\"data\": \"<base64 PNG>\"}}, got an object without \"data\""
                        ))
                    }
                };
                decode_png_base64(b64, &mut images.values).map_err(|e| format!("{what}: {e}"))?;
            }
            Value::Array(items) => {
                // 1×28×28 if the first element is itself an array of arrays, else 28×28.
                let three_d = matches!(items.first(), Some(Value::Array(rows)) if matches!(rows.first(), Some(Value::Array(_))));
                let shape: &[usize] = if three_d {
                    &[1, IMAGE_SIDE, IMAGE_SIDE]
                } else {
                    &[IMAGE_SIDE, IMAGE_SIDE]
                };
                flatten_tensor(instance, shape, &what, &mut images.values)?;
            }
            other => {
                return Err(format!(
                    "{what}: expected {{\"data\": \"<base64 PNG>\"}} or a 28x28 array of numbers, got {}",
                    kind(other)
                ))
            }
        }
    }
    Ok(images)
}

/// The v1 answer: one class id per instance.
pub fn v1_response(logits: &[f32], classes: usize) -> Value {
    let predictions: Vec<usize> = logits
        .chunks(classes.max(1))
        .map(|row| argmax(row).unwrap_or(0))
        .collect();
    serde_json::json!({ "predictions": predictions })
}

#[derive(Deserialize)]
struct V2Request {
    id: Option<String>,
    inputs: Vec<V2Input>,
    #[serde(default)]
    outputs: Option<Vec<V2RequestedOutput>>,
}

#[derive(Deserialize)]
struct V2Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct V2RequestedOutput {
    name: String,
}

/// Which tensors the client wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V2Outputs {
    pub predict: bool,
    pub logits: bool,
}

/// A parsed v2 `/infer` request.
#[derive(Debug)]
pub struct V2Infer {
    pub id: Option<String>,
    pub images: Images,
    pub outputs: V2Outputs,
}

pub const V2_INPUT_NAME: &str = "input-0";

/// Parses a v2 `/infer` body.
pub fn parse_v2(body: &[u8]) -> Result<V2Infer, String> {
    let request: Value = parse_json(body)?;
    let request: V2Request =
        serde_json::from_value(request).map_err(|e| format!("not a v2 inference request: {e}"))?;
    let input = match request.inputs.as_slice() {
        [one] => one,
        [] => return Err("\"inputs\" is empty: send one input tensor".into()),
        more => {
            return Err(format!(
            "got {} inputs; this model takes one: FP32 ({FP32_SHAPES}) or BYTES [N] (base64 PNG)",
            more.len()
        ))
        }
    };
    let what = format!("input {:?}", input.name);
    let images = match input.datatype.as_str() {
        "FP32" => parse_v2_fp32(input, &what)?,
        "BYTES" => parse_v2_bytes(input, &what)?,
        other => {
            return Err(format!(
                "{what}: datatype {other} is not supported; send FP32 ({FP32_SHAPES}) or BYTES [N] (base64 PNG)"
            ))
        }
    };
    let outputs = match &request.outputs {
        None => V2Outputs {
            predict: true,
            logits: false,
        },
        Some(list) if list.is_empty() => V2Outputs {
            predict: true,
            logits: false,
        },
        Some(list) => {
            let mut wanted = V2Outputs {
                predict: false,
                logits: false,
            };
            for output in list {
                match output.name.as_str() {
                    "predict" => wanted.predict = true,
                    "logits" => wanted.logits = true,
                    other => {
                        return Err(format!(
                            "unknown output {other:?}: this model has outputs \"predict\" and \"logits\""
                        ))
                    }
                }
            }
            wanted
        }
    };
    Ok(V2Infer {
        id: request.id,
        images,
        outputs,
    })
}

/// The FP32 shapes the model takes, for messages.
const FP32_SHAPES: &str = "[N, 1, 28, 28] or [N, 28, 28] for N images ([1, 28, 28] is one image as C×H×W), or [28, 28] for one";

/// How many images an FP32 input of `shape` holds: N for `[N, 1, 28, 28]` (the model's own
/// layout) and `[N, 28, 28]`, one for `[28, 28]`. `[1, 28, 28]` is one image as C×H×W, the
/// form torchvision's `ToTensor` makes and TorchServe's KServe v2 MNIST sample sends; read as
/// `[N, 28, 28]` with N = 1 it is the same 784 values. `None` for any other shape; N is not
/// checked here.
fn fp32_image_count(shape: &[i64]) -> Option<i64> {
    match shape {
        [n, 1, 28, 28] | [n, 28, 28] => Some(*n),
        [28, 28] => Some(1),
        _ => None,
    }
}

fn parse_v2_fp32(input: &V2Input, what: &str) -> Result<Images, String> {
    let shape = input.shape.as_slice();
    let count = match fp32_image_count(shape) {
        Some(n) if n > 0 => {
            usize::try_from(n).map_err(|_| format!("{what}: N = {n} is too large"))?
        }
        Some(n) => {
            return Err(format!(
                "{what}: shape {shape:?} has N = {n}: send at least one image"
            ))
        }
        None => {
            return Err(format!(
                "{what}: FP32 shape {shape:?} is not accepted; send {FP32_SHAPES}"
            ))
        }
    };
    // Every dimension is positive now: N was checked, the others are 1 or 28.
    let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
    let Value::Array(items) = &input.data else {
        return Err(format!(
            "{what}: \"data\" must be an array, got {}",
            kind(&input.data)
        ));
    };
    // Reserve no more than the data can hold, never the N the shape claims: the shape is the
    // client's word, the data is what arrived (bounded by --max-body-bytes). Nested, the outer
    // length bounds the images (for `[28, 28]` it counts rows, and N is 1).
    let nested = items.first().is_some_and(Value::is_array);
    let arrived = if nested {
        items.len()
    } else {
        items.len() / IMAGE_LEN
    };
    let mut images = Images {
        values: Vec::with_capacity(count.min(arrived) * IMAGE_LEN),
        count,
    };
    if nested {
        flatten_tensor(&input.data, &dims, what, &mut images.values)?;
    } else {
        let needed = count.checked_mul(IMAGE_LEN);
        if needed != Some(items.len()) {
            return Err(format!(
                "{what}: shape {} needs {} values, data has {}",
                shape_text(&dims),
                needed.map_or_else(|| format!("{count} × {IMAGE_LEN}"), |n| n.to_string()),
                items.len()
            ));
        }
        flatten_flat(items, what, &mut images.values)?;
    }
    Ok(images)
}

fn parse_v2_bytes(input: &V2Input, what: &str) -> Result<Images, String> {
    let Value::Array(items) = &input.data else {
        return Err(format!(
            "{what}: \"data\" must be an array of base64 PNG strings, got {}",
            kind(&input.data)
        ));
    };
    match input.shape.as_slice() {
        [n] if *n == -1 || *n == items.len() as i64 => {}
        [n] => {
            return Err(format!(
                "{what}: shape [{n}] does not match the {} elements of data",
                items.len()
            ))
        }
        other => return Err(format!("{what}: BYTES shape {other:?} is not [N]")),
    }
    if items.is_empty() {
        return Err(format!(
            "{what}: \"data\" is empty: send at least one image"
        ));
    }
    let mut images = Images {
        values: Vec::with_capacity(items.len() * IMAGE_LEN),
        count: items.len(),
    };
    for (i, item) in items.iter().enumerate() {
        let Value::String(b64) = item else {
            return Err(format!(
                "{what}: element {i} must be a base64 PNG string, got {}",
                kind(item)
            ));
        };
        decode_png_base64(b64, &mut images.values)
            .map_err(|e| format!("{what}: element {i}: {e}"))?;
    }
    Ok(images)
}

#[derive(Serialize)]
struct V2Output {
    name: &'static str,
    shape: Vec<usize>,
    datatype: &'static str,
    data: Value,
}

#[derive(Serialize)]
struct V2Response<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<V2Output>,
}

/// The v2 answer with the requested outputs.
pub fn v2_response(model_name: &str, request: &V2Infer, logits: &[f32], classes: usize) -> Value {
    let count = request.images.count;
    let mut outputs = Vec::new();
    if request.outputs.predict {
        let ids: Vec<usize> = logits
            .chunks(classes.max(1))
            .map(|row| argmax(row).unwrap_or(0))
            .collect();
        outputs.push(V2Output {
            name: "predict",
            shape: vec![count],
            datatype: "INT64",
            data: serde_json::json!(ids),
        });
    }
    if request.outputs.logits {
        outputs.push(V2Output {
            name: "logits",
            shape: vec![count, classes],
            datatype: "FP32",
            data: serde_json::json!(logits),
        });
    }
    serde_json::to_value(V2Response {
        model_name,
        id: request.id.as_deref(),
        outputs,
    })
    .unwrap_or(Value::Null)
}

/// v2 model metadata.
pub fn v2_metadata(model_name: &str, classes: usize) -> Value {
    serde_json::json!({
        "name": model_name,
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": V2_INPUT_NAME, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [-1]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]}
        ]
    })
}

fn parse_json(body: &[u8]) -> Result<Value, String> {
    if body.is_empty() {
        return Err("the request body is empty: send a JSON object".into());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!(
            "the request must be a JSON object, got {}",
            kind(&value)
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn png_b64(value: u8) -> String {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 28, 28);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[value; IMAGE_LEN]).unwrap();
        writer.finish().unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn v1_accepts_every_instance_form() {
        let image = vec![vec![0.0; 28]; 28];
        let request = json!({"instances": [
            {"data": png_b64(255)},
            {"b64": png_b64(0)},
            {"data": {"b64": png_b64(0)}},
            image,
            [image],
        ]});
        let images = parse_v1(&body(request)).unwrap();
        assert_eq!(images.count, 5);
        assert_eq!(images.values.len(), 5 * IMAGE_LEN);
        assert_eq!(images.values[0], 1.0);
    }

    #[test]
    fn v1_errors_say_what_was_wrong() {
        let cases: [(&str, Vec<u8>, &str); 9] = [
            ("empty body", vec![], "body is empty"),
            ("malformed", b"{\"instances\": [".to_vec(), "malformed JSON"),
            ("not an object", body(json!([1])), "must be a JSON object"),
            (
                "no instances",
                body(json!({"inputs": []})),
                "needs an \"instances\" array",
            ),
            (
                "instances not array",
                body(json!({"instances": 3})),
                "must be an array",
            ),
            (
                "empty instances",
                body(json!({"instances": []})),
                "is empty",
            ),
            (
                "number instance",
                body(json!({"instances": [1]})),
                "instance 0: expected",
            ),
            (
                "bad base64",
                body(json!({"instances": [{"data": png_b64(0)}, {"data": "%%%"}]})),
                "instance 1: invalid base64",
            ),
            (
                "wrong shape",
                body(json!({"instances": [vec![vec![0.0; 28]; 27]]})),
                "instance 0: dimension 0 has 27",
            ),
        ];
        for (name, input, want) in cases {
            let err = parse_v1(&input).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn v1_response_is_class_ids() {
        let logits = [0.0, 2.0, 1.0, 5.0, 0.0, 0.0];
        assert_eq!(v1_response(&logits, 3), json!({"predictions": [1, 0]}));
    }

    #[test]
    fn v2_fp32_flat_and_nested_and_bytes() {
        let flat = json!({"id": "r1", "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": vec![0.25; 2 * IMAGE_LEN]}]});
        let parsed = parse_v2(&body(flat)).unwrap();
        assert_eq!((parsed.images.count, parsed.id.as_deref()), (2, Some("r1")));
        assert_eq!(
            parsed.outputs,
            V2Outputs {
                predict: true,
                logits: false
            }
        );

        let nested = json!({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [[vec![vec![0.5; 28]; 28]]]}], "outputs": [{"name": "logits"}]});
        let parsed = parse_v2(&body(nested)).unwrap();
        assert_eq!(parsed.images.values, vec![0.5; IMAGE_LEN]);
        assert_eq!(
            parsed.outputs,
            V2Outputs {
                predict: false,
                logits: true
            }
        );

        for shape in [json!([2]), json!([-1])] {
            let bytes = json!({"inputs": [{"name": "x", "shape": shape, "datatype": "BYTES", "data": [png_b64(0), png_b64(255)]}]});
            let parsed = parse_v2(&body(bytes)).unwrap();
            assert_eq!(parsed.images.count, 2);
        }
    }

    /// Every FP32 layout the model takes, flat and nested, gives the same images in the same
    /// order; the image count is the batch the answer reports.
    #[test]
    fn v2_fp32_takes_every_image_layout_flat_and_nested() {
        // Pixel i of image k is distinct, so a transposed or shifted reading would show.
        let pixel = |k: usize, i: usize| ((k * IMAGE_LEN + i) % 1000) as f32 / 1000.0;
        let image = |k: usize| -> Vec<Vec<f32>> {
            (0..IMAGE_SIDE)
                .map(|y| {
                    (0..IMAGE_SIDE)
                        .map(|x| pixel(k, y * IMAGE_SIDE + x))
                        .collect()
                })
                .collect()
        };
        let flat = |n: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|k| (0..IMAGE_LEN).map(move |i| pixel(k, i)))
                .collect()
        };
        let cases: [(&str, Value, Value, usize); 10] = [
            ("NCHW flat", json!([2, 1, 28, 28]), json!(flat(2)), 2),
            (
                "NCHW nested",
                json!([2, 1, 28, 28]),
                json!([[image(0)], [image(1)]]),
                2,
            ),
            ("NHW flat", json!([3, 28, 28]), json!(flat(3)), 3),
            (
                "NHW nested",
                json!([3, 28, 28]),
                json!([image(0), image(1), image(2)]),
                3,
            ),
            (
                "CHW flat (TorchServe's ToTensor)",
                json!([1, 28, 28]),
                json!(flat(1)),
                1,
            ),
            (
                "CHW nested (TorchServe's sample)",
                json!([1, 28, 28]),
                json!([image(0)]),
                1,
            ),
            ("HW flat", json!([28, 28]), json!(flat(1)), 1),
            ("HW nested", json!([28, 28]), json!(image(0)), 1),
            ("one NCHW flat", json!([1, 1, 28, 28]), json!(flat(1)), 1),
            (
                "one NCHW nested",
                json!([1, 1, 28, 28]),
                json!([[image(0)]]),
                1,
            ),
        ];
        for (name, shape, data, count) in cases {
            let request = json!({"inputs": [{"name": "input-0", "shape": shape, "datatype": "FP32", "data": data}]});
            let parsed = parse_v2(&body(request)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(parsed.images.count, count, "{name}");
            assert_eq!(parsed.images.values, flat(count), "{name}");
        }
    }

    #[test]
    fn v2_errors_say_what_was_wrong() {
        let fp32 = |shape: Value, data: Value| json!({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]});
        let cases: [(&str, Value, &str); 22] = [
            (
                "no inputs field",
                json!({"id": "1"}),
                "missing field `inputs`",
            ),
            ("empty inputs", json!({"inputs": []}), "\"inputs\" is empty"),
            (
                "two inputs",
                json!({"inputs": [fp32(json!([1]), json!([]))["inputs"][0], fp32(json!([1]), json!([]))["inputs"][0]]}),
                "got 2 inputs",
            ),
            (
                "dtype",
                json!({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": []}]}),
                "datatype INT32 is not supported",
            ),
            (
                "shape",
                fp32(json!([1, 784]), json!(vec![0.0; IMAGE_LEN])),
                "FP32 shape [1, 784] is not accepted; send [N, 1, 28, 28] or [N, 28, 28] for N images ([1, 28, 28] is one image as C×H×W), or [28, 28] for one",
            ),
            (
                "channels last",
                fp32(json!([1, 28, 28, 1]), json!(vec![0.0; IMAGE_LEN])),
                "FP32 shape [1, 28, 28, 1] is not accepted",
            ),
            (
                "three channels",
                fp32(json!([3, 1, 28, 28, 1]), json!(vec![0.0; IMAGE_LEN])),
                "FP32 shape [3, 1, 28, 28, 1] is not accepted",
            ),
            ("zero n", fp32(json!([0, 1, 28, 28]), json!([])), "N = 0"),
            ("zero n hw", fp32(json!([0, 28, 28]), json!([])), "N = 0"),
            (
                "negative n",
                fp32(json!([-1, 28, 28]), json!(vec![0.0; IMAGE_LEN])),
                "N = -1: send at least one image",
            ),
            (
                "huge n flat",
                fp32(json!([i64::MAX, 1, 28, 28]), json!(vec![0.0; IMAGE_LEN])),
                "needs 9223372036854775807 × 784 values, data has 784",
            ),
            (
                "huge n nested",
                fp32(json!([i64::MAX, 28, 28]), json!([vec![vec![0.0; 28]; 28]])),
                "dimension 0 has 1 elements, expected 9223372036854775807",
            ),
            (
                "chw count",
                fp32(json!([1, 28, 28]), json!(vec![0.0; IMAGE_LEN - 1])),
                "shape [1, 28, 28] needs 784 values, data has 783",
            ),
            (
                "hw count",
                fp32(json!([28, 28]), json!(vec![0.0; 2 * IMAGE_LEN])),
                "shape [28, 28] needs 784 values, data has 1568",
            ),
            (
                "nested not as the shape",
                fp32(json!([1, 28, 28]), json!([vec![0.0; IMAGE_LEN]])),
                "dimension 1 has 784 elements, expected 28 (shape [1, 28, 28])",
            ),
            (
                "nested one level short",
                fp32(json!([1, 1, 28, 28]), json!([vec![vec![0.0; 28]; 28]])),
                "dimension 1 has 28 elements, expected 1 (shape [1, 1, 28, 28])",
            ),
            (
                "count",
                fp32(json!([2, 1, 28, 28]), json!(vec![0.0; IMAGE_LEN])),
                "needs 1568 values, data has 784",
            ),
            (
                "string data",
                fp32(json!([1, 1, 28, 28]), json!("abc")),
                "must be an array",
            ),
            (
                "not numbers",
                fp32(json!([1, 1, 28, 28]), json!(vec!["a"; IMAGE_LEN])),
                "expected numbers, got a string",
            ),
            (
                "bytes shape",
                json!({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": [png_b64(0)]}]}),
                "shape [3] does not match the 1 elements",
            ),
            (
                "bytes not string",
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [7]}]}),
                "element 0 must be a base64 PNG string",
            ),
            (
                "unknown output",
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [png_b64(0)]}], "outputs": [{"name": "probabilities"}]}),
                "unknown output \"probabilities\"",
            ),
        ];
        for (name, request, want) in cases {
            let err = parse_v2(&body(request)).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn v2_response_has_requested_outputs_and_echoes_the_id() {
        let request = V2Infer {
            id: Some("abc".into()),
            images: Images {
                values: vec![],
                count: 2,
            },
            outputs: V2Outputs {
                predict: true,
                logits: true,
            },
        };
        let out = v2_response("mnist", &request, &[0.0, 1.0, 3.0, 2.0], 2);
        assert_eq!(
            out,
            json!({"model_name": "mnist", "id": "abc", "outputs": [
                {"name": "predict", "shape": [2], "datatype": "INT64", "data": [1, 0]},
                {"name": "logits", "shape": [2, 2], "datatype": "FP32", "data": [0.0, 1.0, 3.0, 2.0]}
            ]})
        );
    }
}
