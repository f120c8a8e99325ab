//! The model commands of `cohort`: `model list`, `chat`, `perplexity`, `train`, `adapter` and
//! `bench model`.
//!
//! They run the base model in this process (the CPU engine by default, or the burn model on a
//! chosen device); they need no running node.

use std::io::{BufRead as _, Write as _};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use cohort_trainer::engine::Engine;
use cohort_trainer::generate::{BurnLm, CausalLm, EngineLm, SamplingParams, generate};
use cohort_trainer::gguf::GgufFile;
use cohort_trainer::model::{BaseWeights, Llama};
use cohort_trainer::models;
use cohort_trainer::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

/// `cohort model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// List the base models in the model cache (name, architecture, parameters, size, BLAKE3).
    List,
    /// Write a tiny random chat model (2 layers, byte-level tokenizer, ChatML) to a file: for
    /// tests and `cohort demo --quick`, which need a model that trains in seconds.
    Tiny {
        /// Where to write the GGUF file.
        path: std::path::PathBuf,
        /// The seed of its random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// Cohort's CPU engine over the GGUF's quantized blocks (fastest on a CPU).
    Cpu,
    /// burn's flex CPU backend with f32 weights (the training model).
    Flex,
    /// burn's CUDA backend (needs the `cuda` feature).
    Cuda,
    /// burn's wgpu backend (needs the `wgpu` feature).
    Wgpu,
}

/// Sampling options shared by `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

/// `cohort chat`
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A GGUF path, a file in the model cache, a model hash, or `smollm2-135m-instruct`.
    #[arg(long, default_value = models::DEFAULT_MODEL_ID)]
    model: String,
    /// Answer this one prompt and exit (otherwise: an interactive chat on the terminal).
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// A system message.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Chat with a federated job's merged adapter through the running node (the latest round's,
    /// or `--round`'s); the node fetches it by hash if it does not hold it. Needs `--prompt`.
    #[arg(long, requires = "prompt", conflicts_with_all = ["adapter", "model"])]
    pub(crate) job: Option<String>,
    /// With `--job`: this round's adapter instead of the latest.
    #[arg(long, requires = "job")]
    pub(crate) round: Option<u32>,
    /// With `--job`: answer with the base model too, for comparison.
    #[arg(long, requires = "job")]
    pub(crate) compare: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print tokens/s and peak memory to stderr after each answer.
    #[arg(long)]
    stats: bool,
    /// A LoRA adapter directory in PEFT's format, applied on top of the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// `cohort perplexity`
#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[arg(long, default_value = models::DEFAULT_MODEL_ID)]
    model: String,
    /// A UTF-8 text file.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window (the second half of each window is scored).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter directory in PEFT's format, applied on top of the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchModelArgs {
    #[arg(long, default_value = models::DEFAULT_MODEL_ID)]
    model: String,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also run llama.cpp's anchor: a Python with `llama_cpp` installed ...
    #[arg(long, requires = "anchor_script", value_name = "PYTHON")]
    anchor_python: Option<PathBuf>,
    /// ... and the anchor script (`llama_cpp_bench.py`).
    #[arg(long, value_name = "SCRIPT")]
    anchor_script: Option<PathBuf>,
}

fn load_adapter(
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Option<cohort_trainer::adapter::AdapterWeights>> {
    Ok(match dir {
        Some(d) => Some(cohort_trainer::adapter::AdapterWeights::load_peft(d)?),
        None => None,
    })
}

/// Runs an anchor script and parses the JSON object it prints last.
fn run_anchor(cmd: &mut std::process::Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "the anchor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the anchor printed {stdout:?}"))
}

/// Loads a model file, naming it in errors.
fn open(spec: &str) -> anyhow::Result<GgufFile> {
    let path = models::resolve(spec)?;
    Ok(GgufFile::open(&path)?)
}

pub fn model(cmd: &ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Tiny { path, seed } => {
            cohort_trainer::bench::tiny_chat_model(*seed, path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            println!("{}", path.display());
            Ok(())
        }
        ModelCommand::List => {
            let list = models::list()?;
            if list.is_empty() {
                eprintln!(
                    "No models in {} (run scripts/fetch-model.sh for the default model)",
                    models::model_dir().display()
                );
            }
            for (path, info) in list {
                match info {
                    Ok(m) => {
                        let shape = match &m.config {
                            Ok(c) => format!(
                                "{:.0}M params, {} layers",
                                c.num_params() as f64 / 1e6,
                                c.num_layers
                            ),
                            Err(e) => format!("not runnable: {e}"),
                        };
                        println!(
                            "{}\t{}\t{}\t{:.1} MB\t{}\t{}",
                            m.name,
                            m.architecture,
                            shape,
                            m.size_bytes as f64 / 1e6,
                            m.hash,
                            path.display()
                        );
                    }
                    Err(e) => println!("?\t?\tunreadable: {e}\t\t\t{}", path.display()),
                }
            }
            Ok(())
        }
    }
}

fn sampling(args: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop_strings: args.stop.clone(),
        ..SamplingParams::default()
    }
}

fn burn_device(d: DeviceArg) -> anyhow::Result<burn::tensor::Device> {
    match d {
        DeviceArg::Flex | DeviceArg::Cpu => Ok(burn::tensor::Device::flex()),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Ok(burn::tensor::Device::cuda(0)),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => Ok(burn::tensor::Device::wgpu(
            burn::tensor::DeviceKind::default(),
        )),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "this cohort was built without the {other:?} backend (build with --features {})",
            format!("{other:?}").to_lowercase()
        ),
    }
}

/// Peak resident memory of this process (Linux), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn chat(args: &ChatArgs) -> anyhow::Result<()> {
    let file = open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = ChatTemplate::from_gguf(&file)?;
    let params = sampling(&args.sampling);
    params.validate()?;
    let engine;
    let burn_model;
    let mut lm: Box<dyn CausalLm> = match args.device {
        DeviceArg::Cpu => {
            let mut e = Engine::from_gguf(&file)?;
            e.set_adapter(load_adapter(args.adapter.as_deref())?)?;
            engine = e;
            Box::new(EngineLm::new(&engine))
        }
        other => {
            let device = burn_device(other)?;
            let mut m = Llama::from_gguf(&file, &device)?;
            if let Some(a) = load_adapter(args.adapter.as_deref())? {
                a.apply(&mut m)?;
            }
            burn_model = m;
            Box::new(BurnLm::new(&burn_model, device, tokenizer.vocab_size()))
        }
    };
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage::new("system", system.clone()));
    }
    let mut turn = |history: &mut Vec<ChatMessage>, user: String| -> anyhow::Result<()> {
        history.push(ChatMessage::new("user", user));
        let prompt = template.render(history, true)?;
        let ids = tokenizer.encode(&prompt, true);
        let started = Instant::now();
        let mut stdout = std::io::stdout().lock();
        let out = generate(lm.as_mut(), &tokenizer, &ids, &params, |piece| {
            // A closed stdout (a pipe that went away) ends generation.
            match stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        })?;
        writeln!(stdout)?;
        stdout.flush()?;
        if args.stats {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "[{} prompt tokens, {} generated in {:.2} s ({:.1} tokens/s), finish: {:?}, peak RSS {:.0} MB]",
                out.prompt_tokens,
                out.tokens.len(),
                secs,
                out.tokens.len() as f64 / secs,
                out.finish,
                peak_rss().unwrap_or(0) as f64 / 1e6
            );
        }
        history.push(ChatMessage::new("assistant", out.text));
        Ok(())
    };
    if let Some(prompt) = &args.prompt {
        return turn(&mut history, prompt.clone());
    }
    eprintln!(
        "Chatting with {} ({}). /reset forgets the conversation; /exit or Ctrl-D ends.",
        args.model,
        file.path().display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.retain(|m| m.role == "system");
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => turn(&mut history, line.to_string())?,
        }
    }
}

pub fn perplexity(args: &PerplexityArgs) -> anyhow::Result<()> {
    let file = open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let mut engine = Engine::from_gguf(&file)?;
    engine.set_adapter(load_adapter(args.adapter.as_deref())?)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {} as UTF-8 text", args.file.display()))?;
    let started = Instant::now();
    let report =
        cohort_trainer::perplexity::perplexity(&engine, &tokenizer, &text, args.ctx, |i, ppl| {
            eprint!("[{}]{ppl:.4} ", i + 1);
        })?;
    eprintln!();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.4} nats over {} scored tokens; {} windows of {}; {} tokens in the text; {:.1} s)",
            report.perplexity,
            report.mean_nll,
            report.scored_tokens,
            report.windows,
            report.ctx,
            report.text_tokens,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub fn bench_model(args: &BenchModelArgs) -> anyhow::Result<()> {
    let file = open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let engine = Engine::from_gguf(&file)?;
    // The anchor script's prompt, so both sides see the same tokens.
    let text =
        "The history of the printing press begins in the fifteenth century, when ".repeat(40);
    let prompt = tokenizer.encode(&text, false);
    let ours = cohort_trainer::bench::inference(
        &engine,
        &prompt,
        args.prompt_tokens,
        args.gen_tokens,
        args.runs,
    )?;
    let mut line = serde_json::json!({
        "cohort": ours,
        "model": file.path().file_name().map(|n| n.to_string_lossy().into_owned()),
        "kernels": format!("{:?}", cohort_trainer::engine::kernels::level()),
        "peak_rss_mb": peak_rss().map(|b| b / 1_000_000),
    });
    if let (Some(python), Some(script)) = (&args.anchor_python, &args.anchor_script) {
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script)
            .arg(file.path())
            .args(["--threads", &ours.threads.to_string()])
            .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
            .args(["--gen-tokens", &args.gen_tokens.to_string()])
            .args(["--runs", &args.runs.to_string()]);
        let anchor = run_anchor(&mut cmd)?;
        let ratio = |ours: f64, key: &str| anchor[key].as_f64().map(|a| ours / a);
        line["llama_cpp"] = anchor.clone();
        line["ratio_prefill"] = ratio(ours.prefill_tokens_per_s, "prefill_tokens_per_s").into();
        line["ratio_decode"] = ratio(ours.decode_tokens_per_s, "decode_tokens_per_s").into();
    }
    println!("{line}");
    Ok(())
}

/// `cohort train`
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long, default_value = models::DEFAULT_MODEL_ID)]
    model: String,
    /// JSONL training files (repeatable).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// A held-out JSONL file: its loss is measured before and after training.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Record schema (default: guessed from the first record: `messages` means chat).
    #[arg(long, value_enum)]
    schema: Option<SchemaArg>,
    /// Where the PEFT adapter is written.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    #[arg(long)]
    rslora: bool,
    /// Dropout on the adapters' inputs while training (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Comma-separated projections to adapt.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        value_delimiter = ','
    )]
    targets: Vec<String>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 2e-4)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    schedule: ScheduleArg,
    /// Tokens per record (longer records are cut).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    max_steps: Option<usize>,
    /// QLoRA: keep the frozen base in its quantized GGUF blocks (Q4_1 for the default model),
    /// dequantized one matrix at a time inside each product, instead of an f32 copy.
    #[arg(long)]
    qlora: bool,
    /// Save a checkpoint (adapter, optimizer state, position) in OUT/checkpoint every N steps.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<usize>,
    /// Continue from OUT/checkpoint (same data and settings) to the same result as an
    /// uninterrupted run.
    #[arg(long)]
    resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaArg {
    Chat,
    Alpaca,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

fn read_dataset(
    files: &[PathBuf],
    schema: Option<SchemaArg>,
) -> anyhow::Result<Vec<cohort_trainer::data::Record>> {
    use cohort_trainer::data::{Schema, read_jsonl};
    let mut all = Vec::new();
    for f in files {
        let schema = match schema {
            Some(SchemaArg::Chat) => Schema::Chat,
            Some(SchemaArg::Alpaca) => Schema::Alpaca,
            None => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default();
                if first.contains("\"messages\"") {
                    Schema::Chat
                } else {
                    Schema::Alpaca
                }
            }
        };
        all.extend(read_jsonl(f, schema)?);
    }
    Ok(all)
}

fn mean_loss(
    model: &Llama,
    examples: &[cohort_trainer::data::Example],
    pad: u32,
    device: &burn::tensor::Device,
) -> f64 {
    let (mut nll, mut count) = (0f64, 0f64);
    for chunk in examples.chunks(4) {
        let batch = cohort_trainer::data::Batch::pad(&chunk.iter().collect::<Vec<_>>(), pad);
        let n = batch.target_tokens() as f64;
        if n == 0.0 {
            continue;
        }
        let loss =
            cohort_trainer::train::masked_loss(model, &batch, device).into_scalar::<f32>() as f64;
        nll += loss * n;
        count += n;
    }
    nll / count.max(1.0)
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    use cohort_trainer::adapter::{AdapterWeights, LoraSpec, attach};
    use cohort_trainer::train::{Schedule, TrainConfig};
    let file = open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = ChatTemplate::from_gguf(&file)?;
    let spec = LoraSpec {
        rank: args.rank,
        alpha: args.alpha,
        rslora: args.rslora,
        dropout: args.lora_dropout,
        targets: args.targets.clone(),
        seed: args.seed,
    };
    spec.validate()?;
    let cfg = TrainConfig {
        learning_rate: args.learning_rate,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        warmup_steps: args.warmup_steps,
        schedule: match args.schedule {
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Constant => Schedule::Constant,
        },
        seed: args.seed,
        max_steps: args.max_steps,
        lora_dropout: args.lora_dropout,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let tokenize = |records: &[cohort_trainer::data::Record]| -> anyhow::Result<Vec<cohort_trainer::data::Example>> {
        Ok(records
            .iter()
            .map(|r| cohort_trainer::data::tokenize(r, &tokenizer, &template, args.seq_len))
            .collect::<Result<_, _>>()?)
    };
    let train_set = tokenize(&read_dataset(&args.data, args.schema)?)?;
    let eval_set = match &args.eval {
        Some(f) => Some(tokenize(&read_dataset(
            std::slice::from_ref(f),
            args.schema,
        )?)?),
        None => None,
    };
    let cut = train_set.iter().filter(|e| e.truncated).count();
    eprintln!(
        "{} records, {} target tokens ({} cut to {} tokens); {} optimizer steps",
        train_set.len(),
        train_set.iter().map(|e| e.target_count()).sum::<usize>(),
        cut,
        args.seq_len,
        cfg.total_steps(train_set.len())
    );
    let pad = tokenizer.pad().or(tokenizer.eos()).unwrap_or(0);
    let device = burn::tensor::Device::flex().autodiff();
    let base = if args.qlora {
        BaseWeights::Packed
    } else {
        BaseWeights::F32
    };
    let mut model = Llama::load(&cohort_trainer::model::Weights::gguf(&file)?, &device, base)?;
    eprintln!(
        "frozen base: {:.0} MB ({})",
        model.base_bytes() as f64 / 1e6,
        if args.qlora {
            "QLoRA: the GGUF's quantized blocks"
        } else {
            "f32"
        }
    );
    attach(&mut model, &spec)?;
    let eval_before = eval_set
        .as_ref()
        .map(|e| mean_loss(&model, e, pad, &device));
    if let Some(l) = eval_before {
        eprintln!("held-out loss before: {l:.4}");
    }
    let started = Instant::now();
    // A redrawn progress bar on a terminal; one line per step when stderr is a file or a pipe.
    let progress_bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let checkpointing = (args.checkpoint_every.is_some() || args.resume).then(|| {
        cohort_trainer::train::Checkpointing {
            dir: args.out.clone(),
            every: args.checkpoint_every.unwrap_or(0),
            resume: args.resume,
            spec: spec.clone(),
        }
    });
    let model = cohort_trainer::train::train_with(
        model,
        &train_set,
        &cfg,
        pad,
        checkpointing.as_ref(),
        |e| {
            let line = format!(
                "step {:>4}/{} epoch {} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tokens/s",
                e.step,
                e.total_steps,
                e.epoch + 1,
                e.loss,
                e.learning_rate,
                e.grad_norm,
                e.tokens_per_s
            );
            if progress_bar {
                // One line redrawn in place: a bar, then the step's figures.
                let width = 24;
                let done = e.step * width / e.total_steps.max(1);
                let eta = started.elapsed().as_secs_f64() / e.step as f64
                    * (e.total_steps - e.step) as f64;
                eprint!(
                    "\r[{}{}] {line} eta {:.0}s\x1b[K",
                    "#".repeat(done),
                    ".".repeat(width - done),
                    eta
                );
                if e.step == e.total_steps {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
        },
    )?;
    let weights = AdapterWeights::from_model(&model, &spec);
    weights.save_peft(&args.out, "HuggingFaceTB/SmolLM2-135M-Instruct")?;
    let eval_after = eval_set
        .as_ref()
        .map(|e| mean_loss(&model, e, pad, &device));
    let summary = serde_json::json!({
        "adapter": args.out,
        "seconds": started.elapsed().as_secs_f64(),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "qlora": args.qlora,
        "base_mb": model.base_bytes() as f64 / 1e6,
        "peak_rss_mb": peak_rss().map(|b| b / 1_000_000),
    });
    println!("{summary}");
    Ok(())
}

/// `cohort adapter ...`
#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Merge adapters trained on the same base into one (weights default to equal).
    Merge {
        /// Adapter directories (PEFT format).
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
        /// One weight per adapter (e.g. tokens trained), normalised to sum 1.
        #[arg(long, value_delimiter = ',')]
        weights: Vec<f64>,
        #[arg(long, value_enum, default_value_t = MergeArg::ExactTruncated)]
        method: MergeArg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a new GGUF model with an adapter merged into the base weights.
    MergeIntoBase {
        #[arg(long, default_value = models::DEFAULT_MODEL_ID)]
        model: String,
        #[arg(long)]
        adapter: PathBuf,
        /// The merged projections' type (the others are copied as they are).
        #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
        dtype: DtypeArg,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MergeArg {
    ExactTruncated,
    ExactFullRank,
    Ffa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F16,
    F32,
}

pub fn adapter(cmd: &AdapterCommand) -> anyhow::Result<()> {
    use cohort_trainer::adapter::{AdapterWeights, MergeMethod, merge_adapters, merge_into_base};
    match cmd {
        AdapterCommand::Merge {
            adapters,
            weights,
            method,
            out,
        } => {
            anyhow::ensure!(
                weights.is_empty() || weights.len() == adapters.len(),
                "--weights has {} values for {} adapters",
                weights.len(),
                adapters.len()
            );
            let loaded: Vec<AdapterWeights> = adapters
                .iter()
                .map(|d| AdapterWeights::load_peft(d))
                .collect::<Result<_, _>>()?;
            let parts: Vec<(f64, &AdapterWeights)> = loaded
                .iter()
                .enumerate()
                .map(|(i, a)| (weights.get(i).copied().unwrap_or(1.0), a))
                .collect();
            let method = match method {
                MergeArg::ExactTruncated => MergeMethod::ExactTruncated,
                MergeArg::ExactFullRank => MergeMethod::ExactFullRank,
                MergeArg::Ffa => MergeMethod::Ffa,
            };
            let (merged, errors) = merge_adapters(&parts, method)?;
            merged.save_peft(out, "HuggingFaceTB/SmolLM2-135M-Instruct")?;
            let worst = errors.values().copied().fold(0f64, f64::max);
            println!(
                "{}",
                serde_json::json!({"out": out, "rank": merged.spec.rank, "projections": errors.len(), "max_relative_error": worst})
            );
            Ok(())
        }
        AdapterCommand::MergeIntoBase {
            model,
            adapter,
            dtype,
            out,
        } => {
            let file = open(model)?;
            let weights = AdapterWeights::load_peft(adapter)?;
            let ty = match dtype {
                DtypeArg::F16 => cohort_trainer::gguf::GgmlType::F16,
                DtypeArg::F32 => cohort_trainer::gguf::GgmlType::F32,
            };
            merge_into_base(&file, &weights, ty, out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}

/// `cohort bench train`: LoRA training tokens/s on a random model of the anchor's shape.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = 384)]
    hidden: usize,
    #[arg(long, default_value_t = 1024)]
    inter: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long, default_value_t = 6)]
    kv: usize,
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: String,
    /// Also run the PEFT anchor: a Python with torch, transformers and peft ...
    #[arg(long, requires = "anchor_script", value_name = "PYTHON")]
    anchor_python: Option<PathBuf>,
    /// ... and the anchor script (`peft_cpu_lora.py`).
    #[arg(long, value_name = "SCRIPT")]
    anchor_script: Option<PathBuf>,
    /// Run the anchor under bf16 autocast too.
    #[arg(long)]
    anchor_bf16: bool,
    /// Train QLoRA (the frozen base packed to Q4_1 blocks) instead of LoRA.
    #[arg(long)]
    qlora: bool,
}

pub fn bench_train(args: &BenchTrainArgs) -> anyhow::Result<()> {
    use cohort_trainer::bench::{TrainShape, training};
    let shape = TrainShape {
        hidden: args.hidden,
        inter: args.inter,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv,
        vocab: args.vocab,
        seq: args.seq,
        batch: args.batch,
        rank: args.rank,
        targets: args.targets.split(',').map(str::to_string).collect(),
    };
    let dir = tempfile_dir()?;
    let base = if args.qlora {
        BaseWeights::Packed
    } else {
        BaseWeights::F32
    };
    let ours = training(&shape, args.steps, args.warmup, base, &dir).map_err(anyhow::Error::msg);
    let _ = std::fs::remove_dir_all(&dir);
    let ours = ours?;
    let mut line =
        serde_json::json!({ "cohort": ours, "peak_rss_mb": peak_rss().map(|b| b / 1_000_000) });
    if let (Some(python), Some(script)) = (&args.anchor_python, &args.anchor_script) {
        let mut runs = vec![false];
        if args.anchor_bf16 {
            runs.push(true);
        }
        for bf16 in runs {
            let mut cmd = std::process::Command::new(python);
            cmd.arg(script);
            for (k, v) in [
                ("hidden", args.hidden),
                ("inter", args.inter),
                ("layers", args.layers),
                ("heads", args.heads),
                ("kv", args.kv),
                ("vocab", args.vocab),
                ("seq", args.seq),
                ("batch", args.batch),
                ("steps", args.steps),
                ("warmup", args.warmup),
                ("rank", args.rank),
                ("threads", ours.threads),
            ] {
                cmd.arg(format!("--{k}")).arg(v.to_string());
            }
            cmd.args(["--targets", &args.targets]);
            if bf16 {
                cmd.arg("--bf16");
            }
            let anchor = run_anchor(&mut cmd)?;
            let key = if bf16 { "peft_bf16" } else { "peft" };
            line[format!("ratio_vs_{key}")] = anchor["tokens_per_s"]
                .as_f64()
                .map(|a| ours.tokens_per_s / a)
                .into();
            line[key] = anchor;
        }
    }
    println!("{line}");
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cohort-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
