//! Hugging Face checkpoints: `config.json` plus `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), the way Llama-family models are published on the Hub.
//!
//! The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
//! tensor name to its dtype, shape and byte range, then the data. Files are memory-mapped; F32,
//! F16 and BF16 tensors are read (as the matching GGML float type, so the CPU engine multiplies
//! them directly). Weights are already in Hugging Face's layout: nothing is permuted.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::LlamaConfig;
use super::weights::{Proj, RawMatrix};
use crate::gguf::GgmlType;

/// What went wrong reading a checkpoint; names the file and the tensor or key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct SafetensorsError {
    pub path: PathBuf,
    pub problem: String,
}

#[derive(Debug)]
struct Entry {
    file: usize,
    ty: GgmlType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: LlamaConfig,
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    tensors: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir` (with `config.json` and the safetensors files).
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint, SafetensorsError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let err = |path: &Path, problem: String| SafetensorsError {
            path: path.to_path_buf(),
            problem,
        };
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| err(&config_path, e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(&config_path, format!("not JSON: {e}")))?;
        let config = config_from_hf(&json).map_err(|p| err(&config_path, p))?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| err(&index, e.to_string()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(&index, format!("not JSON: {e}")))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| err(&index, "no \"weight_map\" object".into()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut maps = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| err(path, e.to_string()))?;
            // SAFETY: read-only private map of a checkpoint file that is not modified while open
            // (the same contract as the GGUF reader's).
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(path, e.to_string()))?;
            parse_header(&map, fi, &mut tensors).map_err(|p| err(path, p))?;
            maps.push((path.clone(), map));
        }
        Ok(Checkpoint {
            dir,
            config,
            maps,
            tensors,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn error(&self, problem: String) -> SafetensorsError {
        SafetensorsError {
            path: self.dir.clone(),
            problem,
        }
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<(&Entry, &[u8]), SafetensorsError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| self.error(format!("tensor {name:?} is missing")))?;
        if e.shape != shape {
            return Err(self.error(format!(
                "tensor {name:?} has shape {:?}, expected {shape:?}",
                e.shape
            )));
        }
        Ok((e, &self.maps[e.file].1[e.start..e.end]))
    }

    /// A `[rows, cols]` matrix by name.
    pub fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<RawMatrix, SafetensorsError> {
        let (e, bytes) = self.entry(name, &[rows, cols])?;
        Ok(RawMatrix {
            ty: e.ty,
            rows,
            cols,
            bytes: bytes.to_vec(),
        })
    }

    /// A vector as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, SafetensorsError> {
        let (e, bytes) = self.entry(name, &[len])?;
        let mut out = vec![0f32; len];
        crate::gguf::quant::dequantize(e.ty, bytes, &mut out);
        Ok(out)
    }

    /// Whether the checkpoint has a tensor of that name.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// The HF module path of a projection in layer `l`.
pub fn hf_projection_name(layer: usize, proj: Proj) -> String {
    let block = match proj {
        Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
        Proj::Gate | Proj::Up | Proj::Down => "mlp",
    };
    format!("model.layers.{layer}.{block}.{}.weight", proj.hf_name())
}

fn parse_header(
    bytes: &[u8],
    file: usize,
    out: &mut BTreeMap<String, Entry>,
) -> Result<(), String> {
    if bytes.len() < 8 {
        return Err(format!(
            "truncated: {} bytes, no header length",
            bytes.len()
        ));
    }
    let len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "header length")?) as usize;
    let data_start = 8usize
        .checked_add(len)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| {
            format!(
                "header of {len} bytes runs past the end of the file ({} bytes)",
                bytes.len()
            )
        })?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_len = bytes.len() - data_start;
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"]
            .as_str()
            .ok_or_else(|| format!("tensor {name:?}: no dtype"))?;
        let ty = match dtype {
            "F32" => GgmlType::F32,
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            other => {
                return Err(format!(
                    "tensor {name:?}: dtype {other} is not supported (F32, F16 and BF16 are)"
                ));
            }
        };
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| format!("tensor {name:?}: no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| format!("tensor {name:?}: bad shape"))
            })
            .collect::<Result<_, _>>()?;
        let offsets = v["data_offsets"]
            .as_array()
            .ok_or_else(|| format!("tensor {name:?}: no data_offsets"))?;
        let (start, end) = match offsets.as_slice() {
            [a, b] => (
                a.as_u64().unwrap_or(u64::MAX) as usize,
                b.as_u64().unwrap_or(0) as usize,
            ),
            _ => return Err(format!("tensor {name:?}: data_offsets is not [begin, end]")),
        };
        let elems: usize = shape.iter().product();
        if start > end || end > data_len || end - start != elems * ty.block_bytes() {
            return Err(format!(
                "tensor {name:?}: bytes {start}..{end} do not hold {shape:?} {dtype} inside the data ({data_len} bytes)"
            ));
        }
        out.insert(
            name,
            Entry {
                file,
                ty,
                shape,
                start: data_start + start,
                end: data_start + end,
            },
        );
    }
    Ok(())
}

fn config_from_hf(j: &serde_json::Value) -> Result<LlamaConfig, String> {
    let arch_ok = j["model_type"].as_str().is_none_or(|t| t == "llama")
        || j["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "LlamaForCausalLM"));
    if !arch_ok {
        return Err(format!(
            "model_type {} is not supported (Cohort runs \"llama\" models)",
            j["model_type"]
        ));
    }
    let u = |key: &str| {
        j[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("key {key:?} is missing or not an integer"))
    };
    let hidden_size = u("hidden_size")?;
    let num_heads = u("num_attention_heads")?;
    let num_kv_heads = j["num_key_value_heads"]
        .as_u64()
        .map_or(num_heads, |v| v as usize);
    if num_heads == 0
        || num_kv_heads == 0
        || hidden_size % num_heads != 0
        || num_heads % num_kv_heads != 0
    {
        return Err(format!(
            "{num_heads} heads, {num_kv_heads} key/value heads and hidden size {hidden_size} do not fit together"
        ));
    }
    let head_dim = j["head_dim"]
        .as_u64()
        .map_or(hidden_size / num_heads, |v| v as usize);
    if head_dim * num_heads != hidden_size {
        return Err(format!(
            "head_dim {head_dim} x {num_heads} heads is not the hidden size {hidden_size}"
        ));
    }
    if !j["rope_scaling"].is_null() {
        return Err("rope_scaling is not supported yet".into());
    }
    Ok(LlamaConfig {
        vocab_size: u("vocab_size")?,
        hidden_size,
        intermediate_size: u("intermediate_size")?,
        num_layers: u("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: j["rope_theta"].as_f64().unwrap_or(10000.0),
        rms_norm_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        max_seq_len: u("max_position_embeddings").unwrap_or(2048),
        tie_embeddings: j["tie_word_embeddings"].as_bool().unwrap_or(false),
    })
}

/// Every tensor of one safetensors file, as f32 (`name`, `shape`, values), sorted by name.
#[allow(clippy::type_complexity)]
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>, SafetensorsError> {
    let err = |problem: String| SafetensorsError {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut index = BTreeMap::new();
    parse_header(&bytes, 0, &mut index).map_err(err)?;
    Ok(index
        .into_iter()
        .map(|(name, e)| {
            let mut values = vec![0f32; e.shape.iter().product()];
            crate::gguf::quant::dequantize(e.ty, &bytes[e.start..e.end], &mut values);
            (name, e.shape, values)
        })
        .collect())
}

/// Writes f32 tensors as one safetensors file (names sorted, header padded to 8 bytes), to a
/// temporary name first and then renamed into place.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut sorted: Vec<&(String, Vec<usize>, Vec<f32>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for (name, shape, values) in &sorted {
        let end = offset + values.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, _, values) in &sorted {
        for v in values.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, &out)?;
    std::fs::rename(&tmp, path)
}
