//! The local model cache: where base models live on this machine and what they are.
//!
//! Models are GGUF files in one directory: `$COHORT_MODEL_DIR`, or
//! `${XDG_CACHE_HOME:-~/.cache}/cohort/models` (what `scripts/fetch-model.sh` fills). Across the
//! network a model is named by the BLAKE3 hash of its file, so every peer trains and serves the
//! same bytes.

use std::path::{Path, PathBuf};

use cohort_protocol::hash::ContentHash;

use crate::gguf::{GgufError, GgufFile};
use crate::model::LlamaConfig;

/// The default base model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default base model's short id (used in model ids such as `smollm2-135m-instruct:ADAPTER`).
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";

/// The model cache directory.
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COHORT_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("cohort").join("models")
}

/// Where the default model's file is (whether or not it is there).
pub fn default_model_path() -> PathBuf {
    model_dir().join(DEFAULT_MODEL_FILE)
}

/// Resolves a `--model` argument: a path to a GGUF file, a file name or stem in the model
/// directory, the default model's id, or a model's BLAKE3 hash (hex) among the cached models.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let as_path = Path::new(spec);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let dir = model_dir();
    if spec == DEFAULT_MODEL_ID || spec == "default" {
        let p = default_model_path();
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::NotFound {
                spec: spec.into(),
                dir,
            })
        };
    }
    for candidate in [dir.join(spec), dir.join(format!("{spec}.gguf"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    if spec.len() == 64 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (path, info) in list()? {
            if info.is_ok_and(|m| m.hash.to_string() == spec.to_ascii_lowercase()) {
                return Ok(path);
            }
        }
    }
    Err(ModelError::NotFound {
        spec: spec.into(),
        dir,
    })
}

/// A model present in the cache.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub name: String,
    pub architecture: String,
    pub size_bytes: u64,
    pub hash: ContentHash,
    /// `None` when the file is not a model Cohort can run (the error says why).
    pub config: Result<LlamaConfig, String>,
}

/// What can go wrong finding models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("no model {spec:?}: not a file, and not in {} (run scripts/fetch-model.sh for the default model)", dir.display())]
    NotFound { spec: String, dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// Describes one GGUF file.
pub fn inspect(path: &Path) -> Result<ModelInfo, ModelError> {
    let file = GgufFile::open(path)?;
    let name = file
        .get_str("general.name")
        .map(str::to_string)
        .unwrap_or_else(|_| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let architecture = file
        .get_str("general.architecture")
        .unwrap_or("unknown")
        .to_string();
    let hash = ContentHash::of(file.bytes());
    Ok(ModelInfo {
        path: path.to_path_buf(),
        name,
        architecture,
        size_bytes: file.bytes().len() as u64,
        hash,
        config: LlamaConfig::from_gguf(&file).map_err(|e| e.kind.to_string()),
    })
}

/// Every GGUF file in the model directory, sorted by file name, each described or with the error
/// that stopped it (an unreadable file is listed, not hidden).
#[allow(clippy::type_complexity)]
pub fn list() -> Result<Vec<(PathBuf, Result<ModelInfo, ModelError>)>, ModelError> {
    let dir = model_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ModelError::Io { path: dir, source }),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| {
            let info = inspect(&p);
            (p, info)
        })
        .collect())
}
