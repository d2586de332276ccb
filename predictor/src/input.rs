//! Turns what clients send into model input: base64 PNG digits and JSON tensors, each checked
//! and answered with a message that says what was wrong.
//!
//! A PNG must be 28×28; grayscale is used as is, colour is converted to gray with the ITU-R
//! 601 weights (as PIL's `convert("L")`), alpha is ignored, 16-bit samples keep their high
//! byte. Pixel `p` becomes `p / 255`. Tensor values must be numbers in `[0, 1]`, the same
//! scale: values outside it are refused rather than silently misclassified.

use base64::Engine as _;
use serde_json::Value;

use crate::model::{IMAGE_LEN, IMAGE_SIDE};

/// Decoded PNGs are at most this big in memory, whatever their header claims.
const PNG_MEMORY_LIMIT: usize = 1 << 20;

/// Decodes a base64 string (standard alphabet, padding optional, whitespace ignored) that
/// holds a PNG, and appends its [`IMAGE_LEN`] pixel values to `out`.
pub fn decode_png_base64(text: &str, out: &mut Vec<f32>) -> Result<(), String> {
    let bytes = decode_base64(text)?;
    decode_png(&bytes, out)
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let result = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        LENIENT.decode(compact)
    } else {
        LENIENT.decode(text)
    };
    result.map_err(|e| format!("invalid base64: {e}"))
}

/// Decodes PNG bytes of a 28×28 image into `out`.
pub fn decode_png(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if !bytes.starts_with(&SIGNATURE) {
        return Err("not a PNG image (the decoded bytes lack the PNG signature)".into());
    }
    let mut decoder = png::Decoder::new_with_limits(
        bytes,
        png::Limits {
            bytes: PNG_MEMORY_LIMIT,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("invalid PNG: {e}"))?;
    let (width, height) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    if (width, height) != (IMAGE_SIDE, IMAGE_SIDE) {
        return Err(format!(
            "image is {width}x{height} pixels; the model takes {IMAGE_SIDE}x{IMAGE_SIDE} grayscale digits"
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("invalid PNG: {e}"))?;
    let channels = frame.color_type.samples();
    let data = buf.get(..frame.buffer_size()).unwrap_or(&[]);
    if data.len() < IMAGE_LEN * channels {
        return Err("invalid PNG: truncated pixel data".into());
    }
    out.reserve(IMAGE_LEN);
    for y in 0..IMAGE_SIDE {
        let row = &data[y * frame.line_size..];
        for x in 0..IMAGE_SIDE {
            let px = &row[x * channels..x * channels + channels];
            let gray = match px {
                [g] | [g, _] => f32::from(*g),
                [r, g, b] | [r, g, b, _] => {
                    // PIL's L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded.
                    let l = (u32::from(*r) * 299 + u32::from(*g) * 587 + u32::from(*b) * 114 + 500)
                        / 1000;
                    l as f32
                }
                _ => return Err("invalid PNG: unsupported pixel layout".into()),
            };
            out.push(gray / 255.0);
        }
    }
    Ok(())
}

/// Appends the numbers of a nested JSON array of exactly `shape` to `out`, checking every
/// value is a number in `[0, 1]`. `what` names the value in messages ("instance 3").
pub fn flatten_tensor(
    value: &Value,
    shape: &[usize],
    what: &str,
    out: &mut Vec<f32>,
) -> Result<(), String> {
    let start = out.len();
    flatten_into(value, shape, 0, what, out).inspect_err(|_| out.truncate(start))
}

fn flatten_into(
    value: &Value,
    shape: &[usize],
    depth: usize,
    what: &str,
    out: &mut Vec<f32>,
) -> Result<(), String> {
    match (shape.get(depth), value) {
        (Some(&len), Value::Array(items)) => {
            if items.len() != len {
                return Err(format!(
                    "{what}: dimension {depth} has {} elements, expected {len} (shape {})",
                    items.len(),
                    shape_text(shape)
                ));
            }
            for item in items {
                flatten_into(item, shape, depth + 1, what, out)?;
            }
            Ok(())
        }
        (Some(_), other) => Err(format!(
            "{what}: expected an array at depth {depth} for shape {}, got {}",
            shape_text(shape),
            kind(other)
        )),
        (None, Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            push_pixel(v, what, out)
        }
        (None, other) => Err(format!(
            "{what}: expected a number at depth {depth}, got {}",
            kind(other)
        )),
    }
}

/// Appends a flat list of numbers (v2 `data` in row-major order) to `out`.
pub fn flatten_flat(items: &[Value], what: &str, out: &mut Vec<f32>) -> Result<(), String> {
    out.reserve(items.len());
    for item in items {
        match item {
            Value::Number(n) => push_pixel(n.as_f64().unwrap_or(f64::NAN), what, out)?,
            other => {
                return Err(format!("{what}: expected numbers, got {}", kind(other)));
            }
        }
    }
    Ok(())
}

fn push_pixel(v: f64, what: &str, out: &mut Vec<f32>) -> Result<(), String> {
    if !(0.0..=1.0).contains(&v) {
        return Err(format!(
            "{what}: value {v} is outside [0, 1]; send pixel / 255 (0 = background, 1 = ink)"
        ));
    }
    out.push(v as f32);
    Ok(())
}

pub fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// A JSON value's kind, for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn png(width: u32, height: u32, color: png::ColorType, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(pixels).unwrap();
        writer.finish().unwrap();
        bytes
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn gray_png_becomes_pixels_over_255() {
        let mut pixels = vec![0u8; IMAGE_LEN];
        pixels[0] = 255;
        pixels[29] = 51;
        let mut out = Vec::new();
        decode_png_base64(
            &b64(&png(28, 28, png::ColorType::Grayscale, &pixels)),
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), IMAGE_LEN);
        assert_eq!((out[0], out[1], out[29]), (1.0, 0.0, 0.2));
    }

    #[test]
    fn rgb_png_is_converted_like_pil() {
        let mut pixels = vec![0u8; IMAGE_LEN * 3];
        pixels[..3].copy_from_slice(&[255, 0, 0]); // red: L = 76
        pixels[3..6].copy_from_slice(&[255, 255, 255]);
        let mut out = Vec::new();
        decode_png(&png(28, 28, png::ColorType::Rgb, &pixels), &mut out).unwrap();
        assert_eq!(out[0], 76.0 / 255.0);
        assert_eq!(out[1], 1.0);
    }

    #[test]
    fn base64_without_padding_or_with_newlines_is_accepted() {
        let bytes = png(28, 28, png::ColorType::Grayscale, &[0u8; IMAGE_LEN]);
        let text = b64(&bytes);
        let unpadded = text.trim_end_matches('=');
        let wrapped: String = text
            .as_bytes()
            .chunks(60)
            .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
            .collect();
        for (name, input) in [("unpadded", unpadded.to_string()), ("wrapped", wrapped)] {
            let mut out = Vec::new();
            decode_png_base64(&input, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn bad_images_are_explained() {
        let small = png(8, 8, png::ColorType::Grayscale, &[0u8; 64]);
        let good = png(28, 28, png::ColorType::Grayscale, &[0u8; IMAGE_LEN]);
        let cases: [(&str, String, &str); 5] = [
            ("bad base64", "not base64!!".into(), "invalid base64"),
            ("not a png", b64(b"GIF89a this is not a png"), "not a PNG"),
            ("wrong size", b64(&small), "8x8 pixels"),
            ("truncated", b64(&good[..good.len() / 2]), "invalid PNG"),
            ("empty", String::new(), "not a PNG"),
        ];
        for (name, input, want) in cases {
            let mut out = Vec::new();
            let err = decode_png_base64(&input, &mut out).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn tensors_of_the_right_shape_flatten() {
        let row = vec![0.5; 28];
        let image = json!(vec![row; 28]);
        let mut out = Vec::new();
        flatten_tensor(&image, &[28, 28], "instance 0", &mut out).unwrap();
        flatten_tensor(&json!([image]), &[1, 28, 28], "instance 1", &mut out).unwrap();
        assert_eq!(out.len(), 2 * IMAGE_LEN);
    }

    #[test]
    fn bad_tensors_are_explained_and_leave_no_partial_output() {
        let cases = [
            (
                "short row",
                json!([vec![0.0; 27]]),
                &[1usize, 28][..],
                "has 27 elements, expected 28",
            ),
            (
                "too few rows",
                json!([[0.0]]),
                &[2, 1][..],
                "has 1 elements, expected 2",
            ),
            ("string", json!([[0.0], ["x"]]), &[2, 1][..], "got a string"),
            (
                "above one",
                json!([[0.5], [255]]),
                &[2, 1][..],
                "value 255 is outside [0, 1]",
            ),
            ("negative", json!([[-0.1]]), &[1, 1][..], "outside [0, 1]"),
            (
                "too deep",
                json!([[[0.0]]]),
                &[1, 1][..],
                "expected a number at depth 2, got an array",
            ),
            (
                "too shallow",
                json!([0.0]),
                &[1, 1][..],
                "expected an array at depth 1",
            ),
        ];
        for (name, value, shape, want) in cases {
            let mut out = vec![9.0];
            let err = flatten_tensor(&value, shape, "instance 0", &mut out).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains("instance 0"), "{name}: {err}");
            assert_eq!(out, vec![9.0], "{name}");
        }
    }
}
