//! `cohort`: the command-line interface of a Cohort peer.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cohort_peer::data_dir::DataDir;
use cohort_protocol::hash::ContentHasher;

mod model_cli;

/// burn's CPU backend allocates a fresh buffer for every tensor; glibc's malloc hands large
/// freed buffers back to the kernel at once and page-faults them in again on the next step
/// (measured 1.3-1.9x slower training steps). mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cohort: fine-tune language models together, peer to peer, with credit for data and compute.
#[derive(Debug, Parser)]
#[command(name = "cohort", version, about, long_about = None)]
struct Cli {
    /// The peer's data directory.
    #[arg(long, global = true, env = "COHORT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory with a new peer key and metadata store, and print the peer id.
    /// Running it again keeps the existing key.
    Init,
    /// Print this peer's id (its ed25519 public key, also its iroh endpoint id).
    Id,
    /// Print the content hash of files: BLAKE3, the same as their iroh-blobs hash.
    Hash {
        /// Files to hash.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Base models in the local model cache.
    Model {
        #[command(subcommand)]
        command: model_cli::ModelCommand,
    },
    /// Chat with a base model on the terminal (`--prompt` for one answer).
    Chat(model_cli::ChatArgs),
    /// Perplexity of a text file under a model, as llama.cpp's perplexity tool reports it.
    Perplexity(model_cli::PerplexityArgs),
    /// Fine-tune a LoRA adapter on JSONL files on this machine; writes a PEFT adapter.
    Train(model_cli::TrainArgs),
    /// LoRA adapters: merge several, or merge one into the base model.
    Adapter {
        #[command(subcommand)]
        command: model_cli::AdapterCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: model_cli::BenchCommand,
    },
}

fn data_dir(cli: &Cli) -> anyhow::Result<DataDir> {
    if let Some(dir) = &cli.data_dir {
        return Ok(DataDir::new(dir));
    }
    let home = std::env::var_os("HOME")
        .context("no --data-dir given, COHORT_DATA_DIR unset, and HOME unset")?;
    Ok(DataDir::new(PathBuf::from(home).join(".cohort")))
}

fn hash_file(path: &PathBuf) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = ContentHasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_string())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Model { command } => model_cli::model(command)?,
        Command::Chat(args) => model_cli::chat(args)?,
        Command::Perplexity(args) => model_cli::perplexity(args)?,
        Command::Train(args) => model_cli::train(args)?,
        Command::Adapter { command } => model_cli::adapter(command)?,
        Command::Bench { command } => model_cli::bench(command)?,
        Command::Init => {
            let dir = data_dir(&cli)?;
            let outcome = dir.init()?;
            if outcome.created {
                eprintln!("Created data directory {}", dir.root().display());
            } else {
                eprintln!(
                    "Data directory {} is already initialised",
                    dir.root().display()
                );
            }
            println!("{}", outcome.peer_id);
        }
        Command::Id => {
            let dir = data_dir(&cli)?;
            println!("{}", dir.keypair()?.peer_id());
        }
        Command::Hash { files } => {
            for path in files {
                println!("{}  {}", hash_file(path)?, path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
