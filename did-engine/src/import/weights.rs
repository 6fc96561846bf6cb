//! The named tensors of a Hugging Face model folder, whichever file holds
//! them: `model.safetensors`, a sharded `model.safetensors.index.json`, or a
//! PyTorch `pytorch_model.bin`. Every importer reads through this, so every
//! format serves every architecture.

use crate::Error;
use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use super::torch_pickle;

/// One tensor, as f32 in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub values: Vec<f32>,
}

/// Named tensors and the file they came from (for messages).
#[derive(Debug, Clone)]
pub struct Tensors {
    /// `model.safetensors`, `pytorch_model.bin`, ….
    pub file: String,
    map: BTreeMap<String, Tensor>,
}

impl Tensors {
    /// Tensors from their names and values.
    pub fn new(
        file: impl Into<String>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Self {
        Self {
            file: file.into(),
            map: tensors.into_iter().collect(),
        }
    }

    /// The tensors of a safetensors file (f32, f16, bf16 or f64).
    pub fn from_safetensors(file: &str, bytes: &[u8]) -> Result<Self, Error> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Import(format!("{file}: not a readable safetensors file ({e})")))?;
        let mut map = BTreeMap::new();
        for (name, t) in st.tensors() {
            let values = values(&name, &t).map_err(|e| Error::Import(format!("{file}: {e}")))?;
            map.insert(
                name,
                Tensor {
                    shape: t.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Self {
            file: file.into(),
            map,
        })
    }

    /// The tensors of a `torch.save`d state dict (`pytorch_model.bin`).
    pub fn from_pytorch(file: &str, bytes: &[u8]) -> Result<Self, Error> {
        let tensors =
            torch_pickle::read(bytes).map_err(|e| Error::Import(format!("{file}: {e}")))?;
        Ok(Self::new(file, tensors))
    }

    /// The weights of a model folder: `model.safetensors`, the shards a
    /// `model.safetensors.index.json` lists, or `pytorch_model.bin`, in that order.
    pub fn read_dir(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                Error::Import(format!("cannot read {}: {e}", dir.join(name).display()))
            })
        };
        if dir.join("model.safetensors").exists() {
            return Self::from_safetensors("model.safetensors", &read("model.safetensors")?);
        }
        if dir.join("model.safetensors.index.json").exists() {
            let index: serde_json::Value =
                serde_json::from_slice(&read("model.safetensors.index.json")?)
                    .map_err(|e| Error::Import(format!("model.safetensors.index.json: {e}")))?;
            let shards: std::collections::BTreeSet<&str> = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or(Error::Import(
                    "model.safetensors.index.json has no weight_map".into(),
                ))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            let mut all = Self::new("model.safetensors.index.json", []);
            for shard in shards {
                if shard.contains('/') || shard.contains('\\') {
                    return Err(Error::Import(format!(
                        "model.safetensors.index.json names {shard:?}, outside the folder"
                    )));
                }
                all.map
                    .extend(Self::from_safetensors(shard, &read(shard)?)?.map);
            }
            return Ok(all);
        }
        if dir.join("pytorch_model.bin").exists() {
            return Self::from_pytorch("pytorch_model.bin", &read("pytorch_model.bin")?);
        }
        Err(Error::Import(format!(
            "{} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
            dir.display()
        )))
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// Every name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Renames every tensor (strips a prefix, say).
    pub fn rename(self, f: impl Fn(&str) -> String) -> Self {
        Self {
            file: self.file,
            map: self.map.into_iter().map(|(k, v)| (f(&k), v)).collect(),
        }
    }

    /// An error naming the first tensor `known` does not accept: an importer
    /// never drops weights silently.
    pub fn refuse_unknown(&self, known: impl Fn(&str) -> bool, model: &str) -> Result<(), Error> {
        match self.names().find(|k| !known(k)) {
            Some(k) => Err(Error::Import(format!(
                "{} holds {k}, which {model} does not have",
                self.file
            ))),
            None => Ok(()),
        }
    }

    /// The tensor `name` with exactly `shape`, or an error naming both.
    pub fn require(&self, name: &str, shape: &[usize], needed_for: &str) -> Result<&Tensor, Error> {
        let t = self.get(name).ok_or_else(|| {
            Error::Import(format!(
                "{} has no tensor {name} (needed for {needed_for})",
                self.file
            ))
        })?;
        if t.shape != shape {
            return Err(Error::Import(format!(
                "tensor {name} in {} has shape {:?}; this configuration needs {shape:?}",
                self.file, t.shape
            )));
        }
        Ok(t)
    }
}

/// Converts one stored tensor to f32 values.
fn values(name: &str, t: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, Error> {
    let b = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Import(format!(
                "tensor {name} is {other:?}; f32, f64, f16 and bf16 are read"
            )))
        }
    })
}
