//! Checkpoints: safetensors files holding the weights under the reference
//! names, the EMA weights and the AdamW moments (prefixed `ema/`, `adam_m/`,
//! `adam_v/`), with the model configuration and the training state in the
//! metadata. Written to a temporary file, fsynced, then renamed, so a crash
//! mid-write leaves the previous checkpoint intact.

use crate::Error;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use did_core::model::{ModelConfig, ParamTable};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Format version written in the metadata.
pub const FORMAT: &str = "did-checkpoint-1";

/// Everything a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The model.
    pub config: ModelConfig,
    /// The trained weights, in [`ParamTable`] order.
    pub params: Vec<f32>,
    /// EMA weights.
    pub ema: Option<Vec<f32>>,
    /// AdamW first and second moments.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Optimizer steps taken.
    pub step: u32,
    /// The run's settings and state (seed, objective, data, …), as strings.
    pub run: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Weights trained elsewhere: no EMA, no optimizer state, step 0.
    pub fn imported(config: ModelConfig, params: Vec<f32>, run: BTreeMap<String, String>) -> Self {
        Self {
            config,
            params,
            ema: None,
            moments: None,
            step: 0,
            run,
        }
    }
}

fn config_to_meta(c: &ModelConfig, meta: &mut HashMap<String, String>) {
    let fields = [
        ("architecture", c.architecture.to_string()),
        ("vocab_size", c.vocab_size.to_string()),
        ("mask_id", c.mask_id.to_string()),
        ("layers", c.layers.to_string()),
        ("hidden", c.hidden.to_string()),
        ("heads", c.heads.to_string()),
        ("mlp_hidden", c.mlp_hidden.to_string()),
        ("context", c.context.to_string()),
        ("cond_dim", c.cond_dim.to_string()),
        ("dropout", format!("{:?}", c.dropout)),
        ("norm_eps", format!("{:?}", c.norm_eps)),
        ("rope_base", format!("{:?}", c.rope_base)),
    ];
    for (k, v) in fields {
        meta.insert(format!("model.{k}"), v);
    }
}

fn config_from_meta(meta: &HashMap<String, String>) -> Result<ModelConfig, Error> {
    let mut toml = String::from("[model]\n");
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.starts_with("model.")).collect();
    keys.sort();
    for k in keys {
        let v = &meta[k];
        let field = &k["model.".len()..];
        if !field.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            return Err(Error::Checkpoint(format!("unexpected metadata key `{k}`")));
        }
        if field == "architecture" {
            toml.push_str(&format!("{field} = \"{}\"\n", v.escape_default()));
        } else if v.parse::<f64>().is_ok() {
            toml.push_str(&format!("{field} = {v}\n"));
        } else {
            return Err(Error::Checkpoint(format!(
                "metadata `{k}` = {v:?} is not a number"
            )));
        }
    }
    crate::model_config::from_toml(&toml)
        .map_err(|e| Error::Checkpoint(format!("its model configuration is unreadable ({e})")))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `ckpt` to `path` atomically.
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<(), Error> {
    let table = ParamTable::new(&ckpt.config);
    if ckpt.params.len() != table.total() {
        return Err(Error::Checkpoint(format!(
            "checkpoint: {} parameters for a model of {}",
            ckpt.params.len(),
            table.total()
        )));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("step".to_string(), ckpt.step.to_string());
    config_to_meta(&ckpt.config, &mut meta);
    for (k, v) in &ckpt.run {
        meta.insert(format!("run.{k}"), v.clone());
    }
    let mut groups: Vec<(&str, &[f32])> = vec![("", &ckpt.params)];
    if let Some(e) = &ckpt.ema {
        groups.push(("ema/", e));
    }
    if let Some((m, v)) = &ckpt.moments {
        groups.push(("adam_m/", m));
        groups.push(("adam_v/", v));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = groups
        .iter()
        .flat_map(|(prefix, values)| {
            table.entries().iter().map(move |e| {
                (
                    format!("{prefix}{}", e.name),
                    e.shape.clone(),
                    f32_bytes(&values[e.offset..e.offset + e.len()]),
                )
            })
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Checkpoint(format!("checkpoint: {e}")))?;
    let data = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Checkpoint(format!("checkpoint: {e}")))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&data)
            .and_then(|()| z.finish())
            .map_err(|e| Error::Checkpoint(format!("checkpoint: compressing: {e}")))
            .and_then(|gz| write_atomically(path, &gz))
    } else {
        write_atomically(path, &data)
    }
}

/// A weights-only copy of `ckpt` for sampling, evaluation and sharing: the
/// EMA weights (or the trained ones with `trained = true`) as its weights, no
/// EMA and no optimizer state (so it cannot resume a run exactly).
pub fn weights_only(ckpt: &Checkpoint, trained: bool) -> Checkpoint {
    let params = match (&ckpt.ema, trained) {
        (Some(ema), false) => ema.clone(),
        _ => ckpt.params.clone(),
    };
    let mut run = ckpt.run.clone();
    run.insert(
        "weights".into(),
        if trained || ckpt.ema.is_none() {
            "trained"
        } else {
            "ema"
        }
        .into(),
    );
    Checkpoint {
        config: ckpt.config,
        params,
        ema: None,
        moments: None,
        step: ckpt.step,
        run,
    }
}

/// Writes `data` to a temporary file beside `path`, fsyncs it, and renames it over `path`.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), Error> {
    let io = |e: std::io::Error| {
        Error::Checkpoint(format!("cannot write the checkpoint {}: {e}; check that the folder is writable and has space (earlier checkpoints are untouched)", path.display()))
    };
    let tmp = path.with_extension("safetensors.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads and checks a checkpoint: every tensor present, named and shaped as the
/// configuration in its metadata says; the error names the tensor that is not.
///
/// A gzip-compressed checkpoint (`did export --out FILE.gz`) is decompressed first.
pub fn load(path: &Path) -> Result<Checkpoint, Error> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        Error::Checkpoint(format!(
            "checkpoint {}: cannot read it ({e})",
            path.display()
        ))
    })?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        // A bound, so a corrupt or hostile file cannot inflate without limit.
        flate2::read::GzDecoder::new(&bytes[..])
            .take(MAX_INFLATED)
            .read_to_end(&mut raw)
            .map_err(|e| {
                Error::Checkpoint(format!(
                    "checkpoint {}: a corrupt gzip file ({e})",
                    path.display()
                ))
            })?;
        bytes = raw;
    }
    load_bytes(&bytes).map_err(|e| Error::Checkpoint(format!("checkpoint {}: {e}", path.display())))
}

/// Largest decompressed checkpoint read (64 GiB).
const MAX_INFLATED: u64 = 64 << 30;

/// [`load`] from the file's bytes.
pub fn load_bytes(bytes: &[u8]) -> Result<Checkpoint, Error> {
    let ctx = Error::Checkpoint;
    let st = SafeTensors::deserialize(bytes).map_err(|e| ctx(format!("not a readable safetensors file ({e}); it may be truncated — use an earlier checkpoint")))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| ctx(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(ctx(format!("not a did checkpoint (metadata `format` should be {FORMAT:?}); import other checkpoints with `did import`")));
    }
    let config = config_from_meta(&meta)?;
    // The weights alone need 4 bytes per parameter: refuse before allocating for a configuration the file cannot hold.
    if config.parameter_count().saturating_mul(4) > bytes.len() {
        return Err(Error::Checkpoint(format!(
            "its configuration has {} parameters but the file holds {} bytes; it may be truncated — use an earlier checkpoint",
            config.parameter_count(),
            bytes.len()
        )));
    }
    let table = ParamTable::new(&config);
    let read_group = |prefix: &str, required: bool| -> Result<Option<Vec<f32>>, Error> {
        let mut out = vec![0.0f32; table.total()];
        for (i, e) in table.entries().iter().enumerate() {
            let name = format!("{prefix}{}", e.name);
            let t = match st.tensor(&name) {
                Ok(t) => t,
                Err(_) if !required && i == 0 => return Ok(None),
                Err(_) => return Err(Error::Checkpoint(format!("tensor `{name}` is missing"))),
            };
            if t.dtype() != Dtype::F32 || t.shape() != e.shape.as_slice() {
                return Err(Error::Checkpoint(format!(
                    "tensor `{name}` is {:?} {:?}, the model needs F32 {:?}",
                    t.dtype(),
                    t.shape(),
                    e.shape
                )));
            }
            for (o, c) in out[e.offset..e.offset + e.len()]
                .iter_mut()
                .zip(t.data().chunks_exact(4))
            {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(Some(out))
    };
    let params = read_group("", true)?.unwrap_or_default();
    let ema = read_group("ema/", false)?;
    let m = read_group("adam_m/", false)?;
    let v = read_group("adam_v/", false)?;
    let expected = table.entries().len()
        * (1 + usize::from(ema.is_some()) + 2 * usize::from(m.is_some() && v.is_some()));
    if st.names().len() != expected {
        return Err(ctx(format!(
            "{} tensors where the model has {expected}: unexpected extra tensors",
            st.names().len()
        )));
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ctx("metadata `step` is missing".into()))?;
    let run = meta
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("run.").map(|k| (k.to_string(), v.clone())))
        .collect();
    Ok(Checkpoint {
        config,
        params,
        ema,
        moments: m.zip(v),
        step,
        run,
    })
}

/// Checkpoints in `dir` (`ckpt-<step>.safetensors`), oldest first.
pub fn list(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let step = name
                .strip_prefix("ckpt-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// The path of the checkpoint of `step` in `dir`.
pub fn path_for(dir: &Path, step: u32) -> PathBuf {
    dir.join(format!("ckpt-{step:08}.safetensors"))
}

/// Deletes all but the newest `keep` checkpoints in `dir`.
pub fn prune(dir: &Path, keep: usize) {
    let all = list(dir);
    for (_, p) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_core::model::Architecture;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 12,
            mask_id: 11,
            layers: 1,
            hidden: 8,
            heads: 2,
            mlp_hidden: 16,
            context: 8,
            cond_dim: 4,
            ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
        }
    }

    #[test]
    fn weights_only_gzip_round_trip_and_a_corrupt_gzip() {
        let dir = std::env::temp_dir().join(format!("did-ckpt-gz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = tiny();
        let n = ParamTable::new(&config).total();
        let ckpt = Checkpoint {
            config,
            params: (0..n).map(|i| i as f32).collect(),
            ema: Some((0..n).map(|i| -(i as f32)).collect()),
            moments: Some((vec![0.5; n], vec![0.25; n])),
            step: 9,
            run: BTreeMap::new(),
        };
        let slim = weights_only(&ckpt, false);
        assert_eq!(slim.params, *ckpt.ema.as_ref().unwrap());
        assert!(slim.ema.is_none() && slim.moments.is_none());
        assert_eq!(slim.run["weights"], "ema");
        assert_eq!(weights_only(&ckpt, true).params, ckpt.params);
        let path = dir.join("w.safetensors.gz");
        save(&path, &slim).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[..2], [0x1f, 0x8b]);
        assert_eq!(load(&path).unwrap(), slim);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("corrupt gzip") || err.contains("truncated"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("did-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = tiny();
        let n = ParamTable::new(&config).total();
        let params: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let ckpt = Checkpoint {
            config,
            params: params.clone(),
            ema: Some(params.iter().map(|x| x + 1.0).collect()),
            moments: Some((vec![0.25; n], vec![0.125; n])),
            step: 7,
            run: [("seed".to_string(), "3".to_string())].into(),
        };
        let path = path_for(&dir, 7);
        save(&path, &ckpt).unwrap();
        assert_eq!(load(&path).unwrap(), ckpt);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(
            load(&path).unwrap_err().to_string().contains("truncated"),
            "{}",
            load(&path).unwrap_err()
        );
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path).is_err());
        // Another configuration's weights under the same names: the first bad tensor is named.
        let other = Checkpoint {
            config: ModelConfig {
                hidden: 12,
                heads: 2,
                ..tiny()
            },
            params: vec![
                0.0;
                ParamTable::new(&ModelConfig {
                    hidden: 12,
                    heads: 2,
                    ..tiny()
                })
                .total()
            ],
            ema: None,
            moments: None,
            step: 1,
            run: BTreeMap::new(),
        };
        save(&path, &other).unwrap();
        assert_eq!(load(&path).unwrap().config.hidden, 12);
        assert_eq!(list(&dir).len(), 1);
        save(&path_for(&dir, 8), &ckpt).unwrap();
        save(&path_for(&dir, 9), &ckpt).unwrap();
        prune(&dir, 2);
        assert_eq!(
            list(&dir).iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![8, 9]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod seed_corpus {
    /// Writes a small valid checkpoint as the fuzz seed (`cargo test -p did-cli write_fuzz_seed -- --ignored`).
    #[test]
    #[ignore]
    fn write_fuzz_seed() {
        use super::*;
        use did_core::model::Architecture;
        let config = ModelConfig {
            vocab_size: 6,
            mask_id: 5,
            layers: 1,
            hidden: 4,
            heads: 2,
            mlp_hidden: 4,
            context: 4,
            cond_dim: 2,
            ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
        };
        let n = ParamTable::new(&config).total();
        let ckpt = Checkpoint {
            config,
            params: vec![0.5; n],
            ema: None,
            moments: None,
            step: 1,
            run: BTreeMap::new(),
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/checkpoint_load/micro.safetensors");
        save(&path, &ckpt).unwrap();
    }
}
