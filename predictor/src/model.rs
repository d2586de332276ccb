//! The model: a TorchScript module run through libtorch (tch) on the CPU.
//!
//! The contract, fixed by `scripts/train-model.py`: input float32 `[N, 1, 28, 28]` with pixel
//! values in `[0, 1]` (0 is black background, 1 is white ink; a 28×28 8-bit grayscale image
//! divided by 255), output logits float32 `[N, C]`; the class is the argmax. The model
//! normalises internally.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, Kind, Tensor};

/// Side of the square input image.
pub const IMAGE_SIDE: usize = 28;
/// Values per image (`1 × 28 × 28`).
pub const IMAGE_LEN: usize = IMAGE_SIDE * IMAGE_SIDE;
/// The file inside `--model-dir` that holds the TorchScript module.
pub const MODEL_FILE: &str = "model.pt";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path} does not exist: pass --model-dir with a directory that holds a TorchScript {MODEL_FILE} (the repo ships predictor/model/mnist)")]
    Missing { path: PathBuf },
    #[error("cannot load TorchScript model {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("model {path} does not answer [1, 1, 28, 28] with logits [1, C]: {message}")]
    Contract { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Something that turns images into logits. The real one is [`TorchModel`]; the batcher's
/// tests use fakes.
pub trait Classify {
    /// `images` holds `count` images of [`IMAGE_LEN`] values; returns `count × classes()` logits.
    fn logits(&self, images: &[f32], count: usize) -> Result<Vec<f32>, ModelError>;
    fn classes(&self) -> usize;
}

/// A TorchScript module on the CPU, in eval mode, run without autograd.
pub struct TorchModel {
    module: CModule,
    classes: usize,
}

impl TorchModel {
    /// Loads `dir/model.pt` and checks the contract with one forward pass (which also warms
    /// libtorch up, so the first request is not slow).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(MODEL_FILE);
        if !path.is_file() {
            return Err(ModelError::Missing { path });
        }
        let mut module =
            CModule::load_on_device(&path, Device::Cpu).map_err(|e| ModelError::Load {
                path: path.clone(),
                message: e.to_string(),
            })?;
        module.set_eval();
        let mut model = TorchModel { module, classes: 0 };
        let probe = model
            .forward(&[0.0; IMAGE_LEN], 1)
            .map_err(|e| ModelError::Contract {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let size = probe.size();
        match size.as_slice() {
            [1, classes] if *classes > 0 => model.classes = *classes as usize,
            other => {
                return Err(ModelError::Contract {
                    path,
                    message: format!("got output shape {other:?}"),
                })
            }
        }
        Ok(model)
    }

    fn forward(&self, images: &[f32], count: usize) -> Result<Tensor, tch::TchError> {
        // Grad mode is thread-local in libtorch: the guard lives for this call only.
        let _no_grad = tch::no_grad_guard();
        let input = Tensor::from_slice(images).f_view([count as i64, 1, 28, 28])?;
        self.module.forward_ts(&[input])
    }
}

impl Classify for TorchModel {
    fn logits(&self, images: &[f32], count: usize) -> Result<Vec<f32>, ModelError> {
        if images.len() != count * IMAGE_LEN {
            return Err(ModelError::Inference(format!(
                "{} values for {count} images",
                images.len()
            )));
        }
        let out = self
            .forward(images, count)
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let size = out.size();
        if size != [count as i64, self.classes as i64] {
            return Err(ModelError::Inference(format!(
                "model returned shape {size:?} for {count} images"
            )));
        }
        let flat = out
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_view([-1]))
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        Vec::<f32>::try_from(&flat).map_err(|e| ModelError::Inference(e.to_string()))
    }

    fn classes(&self) -> usize {
        self.classes
    }
}

/// Index of the largest value (the first one on ties); `None` for an empty slice.
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in values.iter().copied().enumerate() {
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_table() {
        let cases: [(&str, &[f32], Option<usize>); 4] = [
            ("empty", &[], None),
            ("single", &[0.5], Some(0)),
            ("last", &[-1.0, 0.0, 3.0], Some(2)),
            ("first on ties", &[2.0, 2.0, 1.0], Some(0)),
        ];
        for (name, values, want) in cases {
            assert_eq!(argmax(values), want, "{name}");
        }
    }

    #[test]
    fn missing_model_says_which_flag_to_pass() {
        let err = TorchModel::load(Path::new("/nonexistent-model-dir")).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("--model-dir"), "{text}");
    }
}
