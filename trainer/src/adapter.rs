//! LoRA adapters on the Llama model: which projections get one, how they start, and how they
//! travel — in Hugging Face PEFT's format, so PEFT loads a Cohort adapter onto the same base model
//! and a PEFT adapter loads into Cohort.
//!
//! A PEFT adapter directory holds `adapter_config.json` (`peft_type` `LORA`, `r`, `lora_alpha`,
//! `target_modules`, `use_rslora`, ...) and `adapter_model.safetensors` with one pair per adapted
//! projection: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and
//! `...lora_B.weight` `[out, r]` (`mlp.` for gate/up/down). Cohort's weights are in Hugging
//! Face's layout (the GGUF's query/key row permutation is undone at load), so the factors need no
//! conversion either way.
//!
//! Initialisation is PEFT's (`B = 0`, `A` kaiming-uniform) with `A` drawn from SplitMix64 seeded
//! per projection from the job seed ([`projection_seed`]): the same seed gives the same starting
//! adapter on every peer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use cohort_protocol::rng::SplitMix64;

use crate::lora::LoraLinearConfig;
use crate::model::Llama;
use crate::model::safetensors::{SafetensorsError, read_tensors, write_tensors};
use crate::model::weights::Proj;

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    #[serde(default)]
    pub rslora: bool,
    /// LoRA dropout used in training (recorded in the PEFT config; no effect at inference).
    #[serde(default)]
    pub dropout: f32,
    /// PEFT module names: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`.
    pub targets: Vec<String>,
    pub seed: u64,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            rslora: false,
            dropout: 0.0,
            targets: Proj::ALL.iter().map(|p| p.hf_name().to_string()).collect(),
            seed: 0,
        }
    }
}

/// A bad specification or adapter file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    #[error("bad LoRA setting {field}: {reason}")]
    BadSpec { field: &'static str, reason: String },
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LoraSpec {
    /// The projections named by `targets`.
    pub fn projections(&self) -> Result<Vec<Proj>, AdapterError> {
        let mut out = Vec::new();
        for t in &self.targets {
            let p = Proj::ALL
                .into_iter()
                .find(|p| p.hf_name() == t)
                .ok_or_else(|| AdapterError::BadSpec { field: "targets", reason: format!("{t:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj") })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err(AdapterError::BadSpec {
                field: "targets",
                reason: "no projection to adapt".into(),
            });
        }
        Ok(out)
    }

    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<(), AdapterError> {
        if self.rank == 0 {
            return Err(AdapterError::BadSpec {
                field: "rank",
                reason: "must be at least 1".into(),
            });
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(AdapterError::BadSpec {
                field: "alpha",
                reason: format!("{} is not a positive number", self.alpha),
            });
        }
        self.projections().map(|_| ())
    }

    /// `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        let rank = self.rank as f64;
        (f64::from(self.alpha) / if self.rslora { rank.sqrt() } else { rank }) as f32
    }
}

/// The seed of projection `proj` of block `layer`'s `A`: SplitMix64's output after mixing the job
/// seed with the projection's position, so every projection starts from its own stream.
pub fn projection_seed(seed: u64, layer: usize, proj: Proj) -> u64 {
    let index = Proj::ALL.iter().position(|p| *p == proj).unwrap_or(0) as u64;
    SplitMix64::new(seed ^ ((layer as u64) << 8 | index).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .next_u64()
}

/// Attaches fresh adapters (PEFT's initialisation) to the targeted projections of every block,
/// on the model's device. The model's base stays frozen; only the adapters train.
pub fn attach(model: &mut Llama, spec: &LoraSpec) -> Result<(), AdapterError> {
    spec.validate()?;
    let targets = spec.projections()?;
    let device = model.device();
    let scaling = spec.scaling();
    for (l, block) in model.layers_mut().iter_mut().enumerate() {
        for &p in &targets {
            let proj = block.projection_mut(p);
            let [d_out, d_in] = proj.weight().dims();
            let cfg =
                LoraLinearConfig::new(d_in, d_out, spec.rank, projection_seed(spec.seed, l, p));
            let a = Tensor::<2>::from_data(
                TensorData::new(cfg.lora_a_init_values(), [spec.rank, d_in]),
                (&device, DType::F32),
            );
            let b = Tensor::<2>::zeros([d_out, spec.rank], (&device, DType::F32));
            proj.set_adapter(a, b, scaling, param_ids(l, p));
        }
    }
    Ok(())
}

/// The parameter ids of the adapter of `proj` in block `layer`: fixed, so that an optimizer's
/// saved state (keyed by parameter id) applies to the same factors after a restart.
pub fn param_ids(layer: usize, proj: Proj) -> (u64, u64) {
    let base = 0xC0_0000_0000 + ((layer * Proj::ALL.len() + proj_index(proj)) as u64) * 2;
    (base, base + 1)
}

/// Cohort's own file in an adapter directory, for what PEFT's config has no key for.
pub const COHORT_SIDECAR: &str = "cohort_adapter.json";

/// An adapter's factors as plain values, independent of any device.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    pub spec: LoraSpec,
    /// `(layer, projection)` -> (`A` `[rank, in]` row-major, `B` `[out, rank]` row-major, in, out).
    pub factors: BTreeMap<(usize, usize), Factors>,
}

/// One projection's factors.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub d_in: usize,
    pub d_out: usize,
}

fn proj_index(p: Proj) -> usize {
    Proj::ALL.iter().position(|q| *q == p).unwrap_or(0)
}

impl AdapterWeights {
    /// Reads the adapters out of a model.
    pub fn from_model(model: &Llama, spec: &LoraSpec) -> AdapterWeights {
        let mut factors = BTreeMap::new();
        for (l, block) in model.layers().iter().enumerate() {
            for p in Proj::ALL {
                if let Some(ad) = block.projection(p).adapter() {
                    let [rank, d_in] = ad.a.val().dims();
                    let d_out = ad.b.val().dims()[0];
                    debug_assert_eq!(rank, spec.rank);
                    let read = |t: Tensor<2>| {
                        t.into_data()
                            .convert::<f32>()
                            .try_into_vec::<f32>()
                            .unwrap_or_default()
                    };
                    factors.insert(
                        (l, proj_index(p)),
                        Factors {
                            a: read(ad.a.val()),
                            b: read(ad.b.val()),
                            d_in,
                            d_out,
                        },
                    );
                }
            }
        }
        AdapterWeights {
            spec: spec.clone(),
            factors,
        }
    }

    /// The factors of one projection.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<&Factors> {
        self.factors.get(&(layer, proj_index(proj)))
    }

    /// Attaches these factors to a model (which must have the shapes they were trained on).
    pub fn apply(&self, model: &mut Llama) -> Result<(), AdapterError> {
        let device = model.device();
        let scaling = self.spec.scaling();
        let n_layers = model.layers().len();
        for (&(l, pi), f) in &self.factors {
            let bad = |problem: String| AdapterError::BadSpec {
                field: "factors",
                reason: problem,
            };
            if l >= n_layers {
                return Err(bad(format!(
                    "layer {l} does not exist in a model of {n_layers} layers"
                )));
            }
            let proj = model.layers_mut()[l].projection_mut(Proj::ALL[pi]);
            let [d_out, d_in] = proj.weight().dims();
            if (f.d_in, f.d_out) != (d_in, d_out)
                || f.a.len() != self.spec.rank * d_in
                || f.b.len() != d_out * self.spec.rank
            {
                return Err(bad(format!(
                    "layer {l} {}: factors for [{}, {}] on a [{d_out}, {d_in}] weight",
                    Proj::ALL[pi].hf_name(),
                    f.d_out,
                    f.d_in
                )));
            }
            let a = Tensor::<2>::from_data(
                TensorData::new(f.a.clone(), [self.spec.rank, d_in]),
                (&device, DType::F32),
            );
            let b = Tensor::<2>::from_data(
                TensorData::new(f.b.clone(), [d_out, self.spec.rank]),
                (&device, DType::F32),
            );
            proj.set_adapter(a, b, scaling, param_ids(l, Proj::ALL[pi]));
        }
        Ok(())
    }

    /// Writes the adapter in PEFT's format into `dir` (created if needed).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), AdapterError> {
        let io = |source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tensors = Vec::new();
        for (&(l, pi), f) in &self.factors {
            let name = peft_name(l, Proj::ALL[pi]);
            tensors.push((
                format!("{name}.lora_A.weight"),
                vec![self.spec.rank, f.d_in],
                f.a.clone(),
            ));
            tensors.push((
                format!("{name}.lora_B.weight"),
                vec![f.d_out, self.spec.rank],
                f.b.clone(),
            ));
        }
        write_tensors(
            &dir.join("adapter_model.safetensors"),
            &tensors,
            &[("format", "pt")],
        )
        .map_err(io)?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": self.spec.dropout,
            "target_modules": self.spec.targets,
            "use_rslora": self.spec.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "modules_to_save": null,
            "revision": null,
        });
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| io(std::io::Error::other(e)))?;
        std::fs::write(dir.join("adapter_config.json"), text).map_err(io)?;
        // What PEFT's config has no key for (PEFT warns about unknown keys) goes beside it.
        let ours = serde_json::json!({ "seed": self.spec.seed });
        std::fs::write(dir.join(COHORT_SIDECAR), ours.to_string()).map_err(io)
    }

    /// Reads a PEFT LoRA adapter directory.
    pub fn load_peft(dir: &Path) -> Result<AdapterWeights, AdapterError> {
        let cfg_path = dir.join("adapter_config.json");
        let bad = |path: &Path, problem: String| AdapterError::BadFile {
            path: path.to_path_buf(),
            problem,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| AdapterError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("not JSON: {e}")))?;
        if j["peft_type"].as_str() != Some("LORA") {
            return Err(bad(
                &cfg_path,
                format!("peft_type {} is not LORA", j["peft_type"]),
            ));
        }
        if j["use_dora"].as_bool() == Some(true) {
            return Err(bad(&cfg_path, "DoRA adapters are not supported".into()));
        }
        let rank = j["r"]
            .as_u64()
            .ok_or_else(|| bad(&cfg_path, "\"r\" is missing".into()))? as usize;
        let alpha = j["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad(&cfg_path, "\"lora_alpha\" is missing".into()))?
            as f32;
        let targets: Vec<String> = match &j["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            other => {
                return Err(bad(
                    &cfg_path,
                    format!("target_modules {other} is not a list"),
                ));
            }
        };
        // The seed of A's initialisation, when Cohort wrote the adapter (0 otherwise).
        let seed = std::fs::read_to_string(dir.join(COHORT_SIDECAR))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["seed"].as_u64())
            .unwrap_or(0);
        let spec = LoraSpec {
            rank,
            alpha,
            rslora: j["use_rslora"].as_bool().unwrap_or(false),
            dropout: j["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
            targets,
            seed,
        };
        spec.validate()?;
        let st_path = dir.join("adapter_model.safetensors");
        let mut factors: BTreeMap<(usize, usize), (Option<Tensor2>, Option<Tensor2>)> =
            BTreeMap::new();
        for (name, shape, values) in read_tensors(&st_path)? {
            let (l, p, which) = parse_peft_name(&name).ok_or_else(|| {
                bad(
                    &st_path,
                    format!("tensor {name:?} is not a LoRA factor of a Llama projection"),
                )
            })?;
            let e = factors.entry((l, proj_index(p))).or_default();
            if which == 'A' {
                e.0 = Some((shape, values))
            } else {
                e.1 = Some((shape, values))
            }
        }
        let mut out = BTreeMap::new();
        for ((l, pi), (a, b)) in factors {
            let name = peft_name(l, Proj::ALL[pi]);
            let (Some((sa, a)), Some((sb, b))) = (a, b) else {
                return Err(bad(
                    &st_path,
                    format!("{name}: lora_A and lora_B must both be present"),
                ));
            };
            if sa.len() != 2 || sb.len() != 2 || sa[0] != rank || sb[1] != rank {
                return Err(bad(
                    &st_path,
                    format!("{name}: shapes {sa:?} and {sb:?} do not fit rank {rank}"),
                ));
            }
            out.insert(
                (l, pi),
                Factors {
                    a,
                    b,
                    d_in: sa[1],
                    d_out: sb[0],
                },
            );
        }
        if out.is_empty() {
            return Err(bad(&st_path, "no LoRA factors".into()));
        }
        Ok(AdapterWeights { spec, factors: out })
    }
}

/// A shape and its row-major values.
type Tensor2 = (Vec<usize>, Vec<f32>);

/// PEFT's module path of a projection.
pub fn peft_name(layer: usize, proj: Proj) -> String {
    let block = match proj {
        Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
        _ => "mlp",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}",
        proj.hf_name()
    )
}

fn parse_peft_name(name: &str) -> Option<(usize, Proj, char)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest
        .strip_prefix("self_attn.")
        .or_else(|| rest.strip_prefix("mlp."))?;
    let (module, rest) = rest.split_once('.')?;
    let proj = Proj::ALL.into_iter().find(|p| p.hf_name() == module)?;
    let which = match rest {
        "lora_A.weight" => 'A',
        "lora_B.weight" => 'B',
        _ => return None,
    };
    Some((layer, proj, which))
}

/// How [`merge_adapters`] combines adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// The exact weighted sum, re-factored to the adapters' rank (best rank-r approximation).
    ExactTruncated,
    /// The exact weighted sum at rank `k·r`.
    ExactFullRank,
    /// Average of the `B`s over a shared, frozen `A` (exact by construction).
    Ffa,
}

/// Merges adapters trained on the same base with weights `p_i` (normalised here to sum 1) into
/// one adapter with the same scaling. Returns it and, per projection, the merge's relative
/// Frobenius error (zero for the exact methods at full rank and for FFA).
#[allow(clippy::type_complexity)]
pub fn merge_adapters(
    parts: &[(f64, &AdapterWeights)],
    method: MergeMethod,
) -> Result<(AdapterWeights, BTreeMap<(usize, usize), f64>), AdapterError> {
    use crate::merge::{LowRank, exact, ffa};
    let bad = |reason: String| AdapterError::BadSpec {
        field: "merge",
        reason,
    };
    let (_, first) = parts
        .first()
        .ok_or_else(|| bad("nothing to merge".into()))?;
    let total: f64 = parts.iter().map(|(w, _)| *w).sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(bad("weights must be positive".into()));
    }
    let s = first.spec.scaling() as f64;
    for (_, a) in parts {
        if a.factors.keys().ne(first.factors.keys())
            || (a.spec.scaling() as f64 - s).abs() > 1e-12 * s.abs()
        {
            return Err(bad(
                "adapters adapt different projections or use different scalings".into(),
            ));
        }
    }
    let mut factors = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut out_rank = first.spec.rank;
    for key in first.factors.keys() {
        let lows: Vec<LowRank> = parts
            .iter()
            .map(|(_, a)| {
                let f = &a.factors[key];
                LowRank::new(
                    f.d_out,
                    f.d_in,
                    a.spec.rank,
                    f.b.iter().map(|x| *x as f64).collect(),
                    f.a.iter().map(|x| *x as f64).collect(),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let weighted: Vec<(f64, &LowRank)> = parts
            .iter()
            .zip(&lows)
            .map(|((w, _), l)| (w / total, l))
            .collect();
        let (merged, err) = match method {
            MergeMethod::Ffa => (ffa(&weighted).map_err(|e| bad(e.to_string()))?, 0.0),
            MergeMethod::ExactTruncated | MergeMethod::ExactFullRank => {
                let rank = (method == MergeMethod::ExactTruncated).then_some(first.spec.rank);
                let (m, report) = exact(&weighted, rank).map_err(|e| bad(e.to_string()))?;
                (m, report.relative_error)
            }
        };
        // A full-rank merge may find fewer singular values than k·r on a small projection: pad
        // with zero columns so every projection shares the rank.
        out_rank = match method {
            MergeMethod::ExactFullRank => first.spec.rank * parts.len(),
            _ => first.spec.rank,
        };
        let (d, n, r) = (merged.d, merged.n, merged.r);
        let mut b = vec![0f32; d * out_rank];
        let mut a = vec![0f32; out_rank * n];
        for i in 0..d {
            for t in 0..r.min(out_rank) {
                b[i * out_rank + t] = merged.b[i * r + t] as f32;
            }
        }
        for t in 0..r.min(out_rank) {
            for j in 0..n {
                a[t * n + j] = merged.a[t * n + j] as f32;
            }
        }
        factors.insert(
            *key,
            Factors {
                a,
                b,
                d_in: n,
                d_out: d,
            },
        );
        errors.insert(*key, err);
    }
    // Keep the scaling: alpha / rank must stay s (rsLoRA: alpha / sqrt(rank)).
    let mut spec = first.spec.clone();
    spec.rank = out_rank;
    spec.alpha = if spec.rslora {
        (s * (out_rank as f64).sqrt()) as f32
    } else {
        (s * out_rank as f64) as f32
    };
    // B was stored with the scaling outside; the merged product is Σ p B A, so scaling stays s.
    Ok((AdapterWeights { spec, factors }, errors))
}

/// Writes a new GGUF file: the base model with `adapter` merged into its adapted projections
/// (`W + s·B·A`, stored as `dtype`, F32 or F16: the merged weights are not re-quantized to 4 bits),
/// every other tensor and all metadata copied unchanged. The result runs without the adapter.
pub fn merge_into_base(
    base: &crate::gguf::GgufFile,
    adapter: &AdapterWeights,
    dtype: crate::gguf::GgmlType,
    out: &Path,
) -> Result<(), AdapterError> {
    use crate::gguf::{GgmlType, Value, quant};
    use crate::model::weights::permute_rows;
    let bad = |reason: String| AdapterError::BadSpec {
        field: "merge-into-base",
        reason,
    };
    if !matches!(dtype, GgmlType::F32 | GgmlType::F16) {
        return Err(bad(format!(
            "merged weights are written as F32 or F16, not {dtype}"
        )));
    }
    let w = crate::model::Weights::gguf(base).map_err(|e| bad(e.to_string()))?;
    let c = w.config().clone();
    let s = adapter.spec.scaling();
    let mut writer = crate::gguf::write::GgufWriter::new();
    for (k, v) in base.metadata() {
        writer.metadata(k.clone(), v.clone());
    }
    writer.metadata(
        "cohort.merged_adapter.rank",
        Value::U32(adapter.spec.rank as u32),
    );
    for info in base.tensors() {
        let hit = (0..c.num_layers)
            .flat_map(|l| Proj::ALL.map(|p| (l, p)))
            .find(|(l, p)| p.gguf_name(*l) == info.name);
        match hit.and_then(|(l, p)| adapter.get(l, p).map(|f| (l, p, f))) {
            Some((l, p, f)) => {
                let m = w.projection(l, p).map_err(|e| bad(e.to_string()))?;
                let mut values = m.to_f32();
                let r = adapter.spec.rank;
                for i in 0..m.rows {
                    for j in 0..m.cols {
                        let mut acc = 0f32;
                        for t in 0..r {
                            acc += f.b[i * r + t] * f.a[t * m.cols + j];
                        }
                        values[i * m.cols + j] += s * acc;
                    }
                }
                let mut bytes = Vec::new();
                quant::quantize(dtype, &values, &mut bytes);
                if let Some(heads) = p.permuted_heads(&c) {
                    bytes = permute_rows(&bytes, heads, c.head_dim, bytes.len() / m.rows);
                }
                writer.tensor_raw(info.name.clone(), &info.dims, dtype, bytes);
            }
            None => {
                let (_, bytes) = base
                    .tensor_bytes(&info.name)
                    .map_err(|e| bad(e.to_string()))?;
                writer.tensor_raw(info.name.clone(), &info.dims, info.ty, bytes.to_vec());
            }
        }
    }
    writer.write(out).map_err(|source| AdapterError::Io {
        path: out.to_path_buf(),
        source,
    })
}
