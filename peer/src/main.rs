//! `cohort`: the command-line interface of a Cohort peer.
#![allow(clippy::print_stdout)]

mod bench;
mod demo;
mod model_cli;
mod procs;

/// burn's CPU backend allocates a fresh buffer for every tensor; glibc's malloc hands large
/// freed buffers back to the kernel at once and page-faults them in again on the next step
/// (measured 1.3-1.9x slower training steps). mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cohort_peer::client::Client;
use cohort_peer::config::FileConfig;
use cohort_peer::data_dir::DataDir;
use cohort_peer::dht::DhtConfig;
use cohort_peer::node::{NodeConfig, PeerAddr};
use cohort_protocol::hash::ContentHasher;
use serde_json::{Value, json};

/// Cohort: fine-tune language models together, peer to peer, with credit for data and compute.
#[derive(Debug, Parser)]
#[command(name = "cohort", version, about, long_about = None)]
struct Cli {
    /// The peer's data directory.
    #[arg(long, global = true, env = "COHORT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Print the node's JSON answer instead of a summary.
    #[arg(long, global = true)]
    json: bool,

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
    /// A whole Cohort network on 127.0.0.1 (data owner, contributor, job owner, volunteers as
    /// separate processes): publishes datanets, runs a federated job, shows each round's
    /// validation loss and the credits, then serves the dashboard, chat and the OpenAI API until
    /// Ctrl-C, which stops every process it started.
    Demo {
        /// A tiny generated model instead of the default one: the whole run takes about a
        /// minute.
        #[arg(long)]
        quick: bool,
        /// Where the peers' data directories go (new or empty; kept afterwards). Default: a
        /// temporary directory, removed at the end.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The job owner's HTTP address: the dashboard and the OpenAI-compatible API (port 0
        /// picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        http: SocketAddr,
        /// Volunteers.
        #[arg(long, default_value_t = 2)]
        volunteers: usize,
        /// Rounds of the job (default 3 with --quick, 2 on the default model).
        #[arg(long)]
        rounds: Option<u32>,
    },
    /// Run the node: iroh endpoint (gossip, blobs, cohort/1), metadata store and the HTTP API,
    /// until SIGINT or SIGTERM. Writes node.json into the data directory once ready.
    Up {
        /// The HTTP API's address (127.0.0.1 by default; port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        http: SocketAddr,
        /// The iroh endpoint's UDP address.
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
        /// A peer to join: `PEER_ID@IP:PORT` (see another node's node.json `bootstrap`).
        #[arg(long, value_name = "PEER_ID@ADDR")]
        bootstrap: Vec<PeerAddr>,
        /// Real networks: iroh relays, DNS/pkarr address lookup and port mapping; the DHT dials
        /// any address, runs mDNS and serves once an external address is confirmed. Off by
        /// default: everything stays on 127.0.0.1.
        #[arg(long)]
        public: bool,
        /// Milliseconds between anti-entropy rounds with known peers.
        #[arg(long, default_value_t = 5000, value_name = "MS")]
        sync_interval_ms: u64,
        /// A DHT peer to join: a multiaddr ending in `/p2p/PEER_ID` (another node's node.json
        /// `dht_addrs`); added to `dht.bootstrap` of DATA_DIR/config.json.
        #[arg(long, value_name = "MULTIADDR")]
        dht_bootstrap: Vec<libp2p::Multiaddr>,
        /// Where the DHT listens (replaces config.json's `dht.listen`; default
        /// /ip4/127.0.0.1/tcp/0).
        #[arg(long, value_name = "MULTIADDR")]
        dht_listen: Vec<libp2p::Multiaddr>,
        /// Kademlia mode: auto (server on loopback; with --public, server once an external
        /// address is confirmed), server or client.
        #[arg(long, value_name = "MODE")]
        dht_mode: Option<cohort_peer::dht::DhtMode>,
        /// Lifetime of provider and address records in seconds (default 172800 = 48 h); this
        /// node re-publishes its own every quarter of it.
        #[arg(long, value_name = "SECS")]
        dht_record_ttl_secs: Option<u64>,
        /// Keep mDNS off even with --public.
        #[arg(long)]
        no_mdns: bool,
        /// Volunteer for announced jobs from the start (any owner, any datanet; change it
        /// with `cohort volunteer on|off`).
        #[arg(long)]
        volunteer: bool,
        /// For tests of the coordinator's defences only: misbehave as a volunteer
        /// (`nan`, `oversized`, `made-up`).
        #[arg(long, hide = true, requires = "volunteer")]
        volunteer_fault: Option<String>,
        /// For tests of `cohort ledger verify` only: misbehave as a coordinator (`misfilter`).
        #[arg(long, hide = true, value_parser = ["misfilter"])]
        coordinator_fault: Option<String>,
    },
    /// Serve base models and LoRA adapters through an OpenAI-compatible API
    /// (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and `/metrics`, without a node.
    Serve(ServeArgs),
    /// Show the running node's status: peers, datanets, DHT, rejected messages per peer.
    Status,
    /// Blobs by hash: fetch one from whichever peer provides it.
    Blob {
        #[command(subcommand)]
        command: BlobCommand,
    },
    /// The libp2p Kademlia DHT: who provides a hash, where a peer listens.
    Dht {
        #[command(subcommand)]
        command: DhtCommand,
    },
    /// Run anti-entropy with every known peer now.
    Sync,
    /// Datanets: create, import, publish, fetch, contribute, review.
    Datanet {
        #[command(subcommand)]
        command: DatanetCommand,
    },
    /// Benchmarks: the model's inference speed, and transfers between real `cohort up`
    /// processes on loopback.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Federated jobs: create one (this peer coordinates it), follow it, cancel it.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Lend this machine to jobs: on (with a policy), off, or show the state.
    Volunteer {
        #[command(subcommand)]
        command: VolunteerCommand,
    },
    /// The contribution ledger: every coordinator's signed chain, credits and totals.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Tools for tests: send raw bytes to a peer.
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Base models to load now (repeatable; an id, a file name in the model cache, a path or a
    /// BLAKE3 hash). Others load when a request names them.
    #[arg(long, default_value = cohort_trainer::models::DEFAULT_MODEL_ID)]
    model: Vec<String>,
    /// Adapters to load now (repeatable): `BASE:DIR`, or a PEFT directory for the first model.
    #[arg(long)]
    adapter: Vec<String>,
    /// The HTTP address (127.0.0.1 by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Generations running at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a slot; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Memory budget of the adapter cache (MB).
    #[arg(long, default_value_t = 1024)]
    adapter_cache_mb: usize,
    /// Accept only requests with `Authorization: Bearer KEY` (repeatable).
    #[arg(long, env = "COHORT_API_KEY", value_name = "KEY")]
    api_key: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Schema {
    Chat,
    Alpaca,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Access {
    Public,
    Allowlist,
}

#[derive(Debug, Subcommand)]
enum DatanetCommand {
    /// Create a datanet owned by this peer.
    Create {
        /// Its name (unique among your datanets).
        name: String,
        /// What the data is.
        #[arg(long, default_value = "")]
        description: String,
        /// The license (an SPDX identifier where one applies).
        #[arg(long, default_value = "")]
        license: String,
        /// The record format.
        #[arg(long, value_enum)]
        schema: Schema,
        /// Who may read it.
        #[arg(long, value_enum, default_value = "public")]
        access: Access,
    },
    /// Import JSONL files into shards for the next version (validated, deduplicated).
    Add {
        /// Datanet name or id.
        datanet: String,
        /// JSONL files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest shard in bytes.
        #[arg(long, hide = true)]
        shard_bytes: Option<usize>,
    },
    /// Sign the next version and announce it.
    Publish {
        /// Datanet name or id.
        datanet: String,
    },
    /// List the datanets this peer knows.
    List,
    /// Show one datanet: its latest version, shards and pending shards.
    Show {
        /// Datanet name or id.
        datanet: String,
    },
    /// Download the latest version's shards from any provider, verify them, serve them on.
    Fetch {
        /// Datanet name or id.
        datanet: String,
    },
    /// Offer a JSONL file to another peer's datanet.
    Contribute {
        /// Datanet name or id.
        datanet: String,
        /// JSONL files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A note for the owner.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Print the records of the latest version held here (decrypted for a grantee).
    Cat {
        /// Datanet name or id.
        datanet: String,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Give a peer read access to a private datanet (from the next version on).
    Grant {
        /// Datanet name or id.
        datanet: String,
        /// The grantee's peer id.
        peer: String,
    },
    /// Take read access away; shards added from now on use a new key the peer never gets.
    Revoke {
        /// Datanet name or id.
        datanet: String,
        /// The revoked peer's id.
        peer: String,
    },
    /// List submissions, or approve or reject one.
    Review {
        /// Approve this submission (id or unique prefix).
        #[arg(long, conflicts_with = "reject")]
        approve: Option<String>,
        /// Reject this submission (id or unique prefix).
        #[arg(long, requires = "reason")]
        reject: Option<String>,
        /// Why it is rejected.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Create a job on local datanets and coordinate it from this peer. Unset options take
    /// the node's defaults (LoRA rank 8 on q_proj and v_proj, 2 rounds, quorum 2).
    Create(Box<JobCreateArgs>),
    /// Jobs this peer coordinates or works on.
    List,
    /// One job: round, phase, validation loss per round, workers, refusals.
    Status {
        /// The job id (or a unique prefix).
        job: String,
    },
    /// Cancel a job this peer coordinates: the current round closes without a merge.
    Cancel {
        /// The job id (or a unique prefix).
        job: String,
    },
}

#[derive(Debug, clap::Args)]
struct JobCreateArgs {
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// Datanets (name or id, repeatable); their latest versions are used.
    #[arg(long = "datanet", required = true)]
    datanets: Vec<String>,
    /// The base model: a path or a file name in the model cache (default: the default model).
    #[arg(long)]
    model: Option<String>,
    /// Train against the GGUF's quantized blocks.
    #[arg(long)]
    qlora: bool,
    /// LoRA rank.
    #[arg(long)]
    rank: Option<u32>,
    /// LoRA alpha.
    #[arg(long)]
    alpha: Option<f32>,
    /// Target modules, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Local epochs per round.
    #[arg(long)]
    epochs: Option<u32>,
    /// Sequences per batch.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Longest sequence in tokens.
    #[arg(long)]
    seq_len: Option<u32>,
    /// The job's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Fewest verified updates that make a round.
    #[arg(long)]
    min_updates: Option<u32>,
    /// Most workers per round.
    #[arg(long)]
    max_workers: Option<u32>,
    /// Seconds each round enrols volunteers.
    #[arg(long)]
    enroll_secs: Option<f64>,
    /// Seconds workers have to train and commit.
    #[arg(long)]
    train_secs: Option<f64>,
    /// Seconds for checking updates.
    #[arg(long)]
    validate_secs: Option<f64>,
    /// Merge method: exact, full-rank or ffa.
    #[arg(long)]
    merge: Option<String>,
    /// Stop after this many rounds without validation gain.
    #[arg(long)]
    patience: Option<u32>,
    /// Share of records held out for validation.
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// Optimizer steps per committed segment.
    #[arg(long)]
    segment_steps: Option<u32>,
    /// Share of segments the coordinator re-executes.
    #[arg(long)]
    audit_rate: Option<f64>,
    /// Refuse updates whose delta exceeds this multiple of the round's median.
    #[arg(long)]
    norm_bound: Option<f64>,
    /// Byzantine updates tolerated per round: Multi-Krum refuses that many outlying updates
    /// (needs --max-workers >= 2f+3 and >= --min-updates + f); 0 turns the filter off.
    #[arg(long)]
    byzantine: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum VolunteerCommand {
    /// Volunteer for jobs the policy accepts.
    On {
        /// Only jobs by this owner (repeatable).
        #[arg(long = "owner")]
        owners: Vec<String>,
        /// Only jobs on these datanets (ids, repeatable).
        #[arg(long = "datanet")]
        datanets: Vec<String>,
        /// Refuse jobs with a larger LoRA rank.
        #[arg(long)]
        max_rank: Option<u32>,
        /// Refuse jobs with more rounds.
        #[arg(long)]
        max_rounds: Option<u32>,
    },
    /// Stop volunteering for new jobs (work in progress finishes).
    Off,
    /// Whether this peer volunteers, and its policy.
    Status,
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Every stored chain's entries, and the credit totals per contributor and volunteer.
    Show,
    /// Verify every stored chain: signatures, links, forks, credit arithmetic, agreement with
    /// each round's signed close. Exits non-zero on any problem.
    Verify,
}

#[derive(Debug, Subcommand)]
enum BlobCommand {
    /// Fetch a blob by hash: providers from the gossip index first, the DHT on a miss;
    /// verified against the hash as it arrives. Prints which router answered.
    Fetch {
        /// The blob's hash.
        hash: String,
        /// Also write the blob to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DhtCommand {
    /// Providers of a hash according to the DHT alone, with the lookup's latency and requests.
    Providers {
        /// The hash.
        hash: String,
    },
    /// A peer's iroh addresses from its signed DHT address record.
    Resolve {
        /// The peer id.
        peer: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and greedy-decode tokens/s of a model on this machine, optionally side by side
    /// with llama.cpp (the anchor script `llama_cpp_bench.py`) in the same run.
    Model(model_cli::BenchModelArgs),
    /// LoRA training tokens/s on a random model of a given shape, optionally side by side with
    /// Hugging Face transformers + PEFT (the anchor script `peft_cpu_lora.py`) in the same run.
    Train(model_cli::BenchTrainArgs),
    /// Shard transfer throughput between two nodes, side by side with plain iroh-blobs.
    Transfer {
        /// MiB of records to import and transfer.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Largest shard, in MiB.
        #[arg(long, default_value_t = 64)]
        shard_mib: u64,
        /// Plain/cohort fetch pairs to run.
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Scratch directory (removed afterwards).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// DHT lookup latency and requests per lookup among N processes on loopback, each
    /// bootstrapped from one other.
    Dht {
        /// Nodes.
        #[arg(long, default_value_t = 12)]
        nodes: usize,
        /// Hashes provided (one lookup each from every other node).
        #[arg(long, default_value_t = 10)]
        keys: usize,
        /// Scratch directory (removed afterwards).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Streaming latency and throughput of `cohort serve` at several concurrencies, with and
    /// without an adapter, optionally beside llama.cpp's OpenAI-compatible server.
    Serve {
        #[arg(long, default_value = cohort_trainer::models::DEFAULT_MODEL_ID)]
        model: String,
        /// Concurrent streams, one measurement each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        streams: Vec<usize>,
        /// Tokens per answer.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Also measure with this PEFT adapter applied.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A Python with llama-cpp-python[server] installed: measure its server too.
        #[arg(long, value_name = "PYTHON")]
        llama_python: Option<PathBuf>,
        /// Scratch directory (logs).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// One federated job between an owner and N volunteers on a real model: wall time, bytes
    /// per peer, validation loss, merge error exact vs naive.
    Round {
        /// Volunteers.
        #[arg(long, default_value_t = 3)]
        volunteers: usize,
        /// Base model (path or cache name; default: the default model).
        #[arg(long, default_value = "")]
        model: String,
        /// JSONL chat files (default: the repository's Velmora training set).
        #[arg(long)]
        data: Vec<PathBuf>,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: u32,
        /// Target modules, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
        targets: Vec<String>,
        /// Longest sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: u32,
        /// Share of segments re-executed by the coordinator.
        #[arg(long, default_value_t = 0.05)]
        audit_rate: f64,
        /// Rounds.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Scratch directory (removed afterwards).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Time from publish until every node of a network holds the new manifest.
    Publish {
        /// Nodes, the owner included.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Versions to publish (one sample each).
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Scratch directory (removed afterwards).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// Send the bytes of FILE as one cohort/1 request frame to a peer, with this data
    /// directory's key; print the answer.
    Send {
        /// `PEER_ID@IP:PORT`.
        #[arg(long)]
        to: PeerAddr,
        /// The request bytes.
        file: PathBuf,
    },
    /// Ask a peer for one blob over iroh-blobs with this data directory's key; print its size.
    GetBlob {
        /// `PEER_ID@IP:PORT`.
        #[arg(long)]
        from: PeerAddr,
        /// The blob's hash.
        hash: String,
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

fn client(cli: &Cli) -> anyhow::Result<Client> {
    Ok(Client::for_data_dir(&data_dir(cli)?)?)
}

fn print(cli: &Cli, value: &Value, summary: impl FnOnce(&Value) -> String) {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", summary(value));
    }
}

fn st(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn enc(s: &str) -> String {
    // Path segments: names may hold spaces and other characters.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn abs(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    files
        .iter()
        .map(|f| {
            std::path::absolute(f)
                .map(|p| p.display().to_string())
                .with_context(|| format!("{}", f.display()))
        })
        .collect()
}

fn datanet(cli: &Cli, command: &DatanetCommand) -> anyhow::Result<()> {
    let c = client(cli)?;
    match command {
        DatanetCommand::Create {
            name,
            description,
            license,
            schema,
            access,
        } => {
            let v = c.post(
                "/api/datanets",
                &json!({
                    "name": name,
                    "description": description,
                    "license": license,
                    "schema": match schema { Schema::Chat => "chat", Schema::Alpaca => "alpaca" },
                    "access": match access { Access::Public => "public", Access::Allowlist => "allowlist" },
                }),
            )?;
            print(cli, &v, |v| {
                format!("created datanet {} ({})", st(&v["name"]), st(&v["id"]))
            });
        }
        DatanetCommand::Add {
            datanet,
            files,
            shard_bytes,
        } => {
            let v = c.post(
                &format!("/api/datanets/{}/add", enc(datanet)),
                &json!({ "files": abs(files)?, "shard_bytes": shard_bytes }),
            )?;
            print(cli, &v, |v| {
                format!(
                    "read {} records ({} duplicates skipped) into {} new shards; publish to make \
                     them a version",
                    v["records_read"],
                    v["duplicates"],
                    v["shards"].as_array().map_or(0, Vec::len)
                )
            });
        }
        DatanetCommand::Publish { datanet } => {
            let v = c.post(
                &format!("/api/datanets/{}/publish", enc(datanet)),
                &json!({}),
            )?;
            print(cli, &v, |v| {
                format!(
                    "published version {} of {}: {} shards, {} records, manifest {}",
                    v["version"],
                    st(&v["datanet"]),
                    v["shards"],
                    v["records"],
                    st(&v["manifest"])
                )
            });
        }
        DatanetCommand::List => {
            let v = c.get("/api/datanets")?;
            print(cli, &v, |v| {
                let mut out = String::new();
                for d in v["datanets"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{}  v{}  {}  {}{}\n",
                        d["id"].as_str().unwrap_or_default(),
                        d["version"],
                        d["schema"].as_str().unwrap_or_default(),
                        d["name"].as_str().unwrap_or_default(),
                        if d["mine"].as_bool() == Some(true) {
                            "  (mine)"
                        } else {
                            ""
                        },
                    ));
                }
                out.trim_end().to_owned()
            });
        }
        DatanetCommand::Show { datanet } => {
            let v = c.get(&format!("/api/datanets/{}", enc(datanet)))?;
            print(cli, &v, pretty);
        }
        DatanetCommand::Fetch { datanet } => {
            let v = c.post(&format!("/api/datanets/{}/fetch", enc(datanet)), &json!({}))?;
            print(cli, &v, |v| {
                format!(
                    "version {}: fetched {} shards ({} bytes), {} already held",
                    v["version"],
                    v["report"]["fetched"],
                    v["report"]["bytes"],
                    v["report"]["already_held"]
                )
            });
        }
        DatanetCommand::Contribute {
            datanet,
            files,
            note,
        } => {
            let v = c.post(
                &format!("/api/datanets/{}/contribute", enc(datanet)),
                &json!({ "files": abs(files)?, "note": note }),
            )?;
            print(cli, &v, |v| {
                let ids: Vec<_> = v["submissions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                format!("submitted {} shard(s): {}", ids.len(), ids.join(" "))
            });
        }
        DatanetCommand::Cat { datanet, limit } => {
            let v = c.get(&format!(
                "/api/datanets/{}/records?limit={limit}",
                enc(datanet)
            ))?;
            print(cli, &v, |v| {
                v["records"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DatanetCommand::Grant { datanet, peer } => {
            let v = c.post(
                &format!("/api/datanets/{}/grant", enc(datanet)),
                &json!({ "peer": peer }),
            )?;
            print(cli, &v, |v| {
                format!(
                    "granted {} (key epochs {}); publish to put it in the allowlist",
                    st(&v["grantee"]),
                    v["key_epochs"]
                )
            });
        }
        DatanetCommand::Revoke { datanet, peer } => {
            let v = c.post(
                &format!("/api/datanets/{}/revoke", enc(datanet)),
                &json!({ "peer": peer }),
            )?;
            print(cli, &v, |v| {
                format!(
                    "revoked {}: new key epoch {} from version {}",
                    st(&v["revoked"]),
                    v["new_key_epoch"],
                    v["from_version"]
                )
            });
        }
        DatanetCommand::Review {
            approve,
            reject,
            reason,
        } => {
            let v = match (approve, reject) {
                (Some(id), _) => {
                    c.post(&format!("/api/submissions/{}/approve", enc(id)), &json!({}))?
                }
                (None, Some(id)) => c.post(
                    &format!("/api/submissions/{}/reject", enc(id)),
                    &json!({ "reason": reason.clone().unwrap_or_default() }),
                )?,
                (None, None) => c.get("/api/submissions")?,
            };
            print(cli, &v, pretty);
        }
    }
    Ok(())
}

/// `cohort chat --job J`: the job's merged adapter (and with `--compare` the base) answering
/// one prompt through the running node's OpenAI-compatible API.
fn chat_job(cli: &Cli, args: &model_cli::ChatArgs) -> anyhow::Result<()> {
    let c = client(cli)?;
    let job = args.job.as_deref().unwrap_or_default();
    let info = c.get(&format!("/api/jobs/{}", enc(job)))?;
    let base = st(&info["base_model"]).to_owned();
    let job_id = st(&info["job"]).to_owned();
    let adapter = match args.round {
        None => job_id.clone(),
        Some(r) => {
            let ledger = c.get("/api/ledger")?;
            ledger["chains"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|ch| ch["entries"].as_array().into_iter().flatten())
                .find(|e| e["job"] == job_id.as_str() && e["round"] == r)
                .and_then(|e| e["merged_adapter"].as_str().map(str::to_owned))
                .with_context(|| {
                    format!("no merged adapter for round {r} of job {job_id} in the ledger")
                })?
        }
    };
    let mut messages = Vec::new();
    if let Some(sys) = &args.system {
        messages.push(json!({ "role": "system", "content": sys }));
    }
    messages.push(json!({ "role": "user", "content": args.prompt.clone().unwrap_or_default() }));
    let ask = |model: &str| -> anyhow::Result<String> {
        let v = c.post(
            "/v1/chat/completions",
            &json!({ "model": model, "messages": messages, "temperature": 0, "max_tokens": 128 }),
        )?;
        Ok(st(&v["choices"][0]["message"]["content"]).to_owned())
    };
    let tuned = ask(&format!("{base}:{adapter}"))?;
    if args.compare {
        let plain = ask(&base)?;
        if cli.json {
            println!(
                "{}",
                json!({ "base": plain, "adapter": tuned, "model": format!("{base}:{adapter}") })
            );
        } else {
            println!("base:    {plain}\nadapter: {tuned}");
        }
    } else if cli.json {
        println!(
            "{}",
            json!({ "adapter": tuned, "model": format!("{base}:{adapter}") })
        );
    } else {
        println!("{tuned}");
    }
    Ok(())
}

fn job(cli: &Cli, command: &JobCommand) -> anyhow::Result<()> {
    let c = client(cli)?;
    match command {
        JobCommand::Create(a) => {
            let mut body = serde_json::Map::new();
            let mut set = |k: &str, v: Value| {
                if !v.is_null() {
                    body.insert(k.to_owned(), v);
                }
            };
            set("name", json!(a.name));
            set("model", json!(a.model));
            set("datanets", json!(a.datanets));
            set("qlora", json!(a.qlora));
            set("rank", json!(a.rank));
            set("alpha", json!(a.alpha));
            if !a.targets.is_empty() {
                set("targets", json!(a.targets));
            }
            set("learning_rate", json!(a.learning_rate));
            set("epochs", json!(a.epochs));
            set("batch_size", json!(a.batch_size));
            set("seq_len", json!(a.seq_len));
            set("seed", json!(a.seed));
            set("rounds", json!(a.rounds));
            set("min_updates", json!(a.min_updates));
            set("max_workers", json!(a.max_workers));
            set("enroll_secs", json!(a.enroll_secs));
            set("train_secs", json!(a.train_secs));
            set("validate_secs", json!(a.validate_secs));
            set("merge", json!(a.merge));
            set("patience", json!(a.patience));
            set("validation_fraction", json!(a.validation_fraction));
            set("segment_steps", json!(a.segment_steps));
            set("audit_rate", json!(a.audit_rate));
            set("norm_bound", json!(a.norm_bound));
            set("byzantine", json!(a.byzantine));
            let v = c.post("/api/jobs", &Value::Object(body))?;
            print(cli, &v, |v| st(&v["job"]).to_owned());
        }
        JobCommand::List => {
            let v = c.get("/api/jobs")?;
            print(cli, &v, |v| {
                v["jobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|j| {
                        format!(
                            "{}  {:<9} round {} {}{}",
                            st(&j["job"]),
                            st(&j["status"]["role"]),
                            j["status"]["round"],
                            st(&j["status"]["phase"]),
                            if j["status"]["finished"] == json!(true) {
                                " (finished)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        JobCommand::Status { job } => {
            let v = c.get(&format!("/api/jobs/{}", enc(job)))?;
            print(cli, &v, pretty);
        }
        JobCommand::Cancel { job } => {
            let v = c.post(&format!("/api/jobs/{}/cancel", enc(job)), &json!({}))?;
            print(cli, &v, |_| "cancelled".into());
        }
    }
    Ok(())
}

fn volunteer(cli: &Cli, command: &VolunteerCommand) -> anyhow::Result<()> {
    let c = client(cli)?;
    let v = match command {
        VolunteerCommand::On {
            owners,
            datanets,
            max_rank,
            max_rounds,
        } => c.post(
            "/api/volunteer",
            &json!({ "enabled": true, "policy": {
                "owners": owners, "datanets": datanets,
                "max_rank": max_rank, "max_rounds": max_rounds } }),
        )?,
        VolunteerCommand::Off => c.post("/api/volunteer", &json!({ "enabled": false }))?,
        VolunteerCommand::Status => c.get("/api/volunteer")?,
    };
    print(cli, &v, pretty);
    Ok(())
}

fn ledger(cli: &Cli, command: &LedgerCommand) -> anyhow::Result<()> {
    let c = client(cli)?;
    match command {
        LedgerCommand::Show => {
            let v = c.get("/api/ledger")?;
            print(cli, &v, pretty);
        }
        LedgerCommand::Verify => {
            let v = c.post("/api/ledger/verify", &json!({}))?;
            let ok = v["ok"] == json!(true);
            print(cli, &v, |v| {
                let mut lines = Vec::new();
                for ch in v["chains"].as_array().into_iter().flatten() {
                    let problems: Vec<_> = ch["problems"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p.as_str())
                        .collect();
                    for u in ch["unchecked"].as_array().into_iter().flatten() {
                        lines.push(format!("not recomputed: {}", st(u)));
                    }
                    lines.push(format!(
                        "{} {}: {} entries, {} recomputed from the published blobs{}",
                        if problems.is_empty() { "ok  " } else { "FAIL" },
                        st(&ch["coordinator"]),
                        ch["entries"],
                        ch["recomputed"],
                        if problems.is_empty() {
                            String::new()
                        } else {
                            format!("\n  {}", problems.join("\n  "))
                        }
                    ));
                }
                if lines.is_empty() {
                    lines.push("no ledger chains stored".into());
                }
                lines.join("\n")
            });
            anyhow::ensure!(ok, "the ledger does not verify");
        }
    }
    Ok(())
}

async fn debug_send(dir: DataDir, to: PeerAddr, file: PathBuf) -> anyhow::Result<()> {
    use cohort_protocol::types::rpc::Response;
    let endpoint = debug_endpoint(&dir).await?;
    let addr = endpoint_addr(&to);
    let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
    let result = cohort_peer::rpc::call_raw(&endpoint, addr, &bytes).await;
    endpoint.close().await;
    let answer = result?;
    let response: Response = cohort_peer::rpc::decode_frame(&answer)?;
    println!("{response:?}");
    Ok(())
}

async fn debug_endpoint(dir: &DataDir) -> anyhow::Result<iroh::Endpoint> {
    let keypair = dir.keypair()?;
    Ok(iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .clear_ip_transports()
        .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
        .net_report_config(iroh::NetReportConfig::minimal())
        .secret_key(cohort_peer::identity::iroh_secret_key(&keypair))
        .bind_addr("127.0.0.1:0")?
        .bind()
        .await?)
}

fn endpoint_addr(to: &PeerAddr) -> iroh::EndpointAddr {
    let mut addr = iroh::EndpointAddr::new(cohort_peer::identity::endpoint_id(&to.id));
    for a in &to.addrs {
        addr = addr.with_ip_addr(*a);
    }
    addr
}

async fn debug_get_blob(dir: DataDir, from: PeerAddr, hash: String) -> anyhow::Result<()> {
    let hash: cohort_protocol::ContentHash = hash.parse()?;
    let endpoint = debug_endpoint(&dir).await?;
    let result = async {
        let conn = endpoint
            .connect(endpoint_addr(&from), iroh_blobs::ALPN)
            .await?;
        let bytes = iroh_blobs::get::request::get_blob(
            conn,
            iroh_blobs::Hash::from_bytes(*hash.as_bytes()),
        )
        .bytes()
        .await?;
        anyhow::Ok(bytes.len())
    }
    .await;
    endpoint.close().await;
    println!("received {} bytes", result?);
    Ok(())
}

async fn up(config: NodeConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let node = cohort_peer::node::run(config, cancel.clone());
    tokio::pin!(node);
    tokio::select! {
        r = &mut node => return Ok(r?),
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
    // A second signal, or a shutdown that hangs, ends the process anyway.
    tokio::select! {
        r = &mut node => Ok(r?),
        _ = term.recv() => anyhow::bail!("second SIGTERM: exiting without a clean shutdown"),
        _ = tokio::time::sleep(Duration::from_secs(30)) => anyhow::bail!("shutdown took longer than 30 s"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Model { command } => model_cli::model(command)?,
        Command::Chat(args) if args.job.is_some() => chat_job(&cli, args)?,
        Command::Chat(args) => model_cli::chat(args)?,
        Command::Perplexity(args) => model_cli::perplexity(args)?,
        Command::Train(args) => model_cli::train(args)?,
        Command::Adapter { command } => model_cli::adapter(command)?,
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
        Command::Demo {
            quick,
            dir,
            http,
            volunteers,
            rounds,
        } => demo::run(&demo::DemoOptions {
            quick: *quick,
            dir: dir.clone(),
            http: *http,
            volunteers: *volunteers,
            rounds: *rounds,
        })?,
        Command::Up {
            http,
            bind,
            bootstrap,
            public,
            sync_interval_ms,
            dht_bootstrap,
            dht_listen,
            dht_mode,
            dht_record_ttl_secs,
            no_mdns,
            volunteer,
            volunteer_fault,
            coordinator_fault,
        } => {
            let dir = data_dir(&cli)?;
            dir.keypair()?;
            let file = FileConfig::load(dir.root())?;
            let mut dht = DhtConfig::loopback();
            dht.public = *public;
            dht.bootstrap = file.dht.bootstrap;
            dht.bootstrap.extend(dht_bootstrap.iter().cloned());
            if !dht_listen.is_empty() {
                dht.listen = dht_listen.clone();
            } else if !file.dht.listen.is_empty() {
                dht.listen = file.dht.listen;
            }
            dht.mode = dht_mode.or(file.dht.mode).unwrap_or_default();
            if let Some(secs) = dht_record_ttl_secs.or(file.dht.record_ttl_secs) {
                anyhow::ensure!(secs >= 1, "the DHT record TTL must be at least 1 s");
                dht.record_ttl = Duration::from_secs(secs);
            }
            dht.mdns = *public && !*no_mdns && file.dht.mdns.unwrap_or(true);
            let config = NodeConfig {
                data_dir: dir,
                http: *http,
                bind: *bind,
                bootstrap: bootstrap.clone(),
                public: *public,
                sync_interval: Duration::from_millis((*sync_interval_ms).max(100)),
                dht,
                volunteer: volunteer.then(|| cohort_peer::rounds::volunteer::Policy {
                    fault: volunteer_fault.clone(),
                    ..Default::default()
                }),
                coordinator_fault: coordinator_fault.clone(),
            };
            runtime()?.block_on(up(config))?;
        }
        Command::Serve(args) => runtime()?.block_on(serve(&cli, args))?,
        Command::Status => {
            let v = client(&cli)?.get("/api/status")?;
            print(&cli, &v, pretty);
        }
        Command::Sync => {
            let v = client(&cli)?.post("/api/sync", &json!({}))?;
            print(&cli, &v, |v| format!("pulled {} manifests", v["pulled"]));
        }
        Command::Datanet { command } => datanet(&cli, command)?,
        Command::Job { command } => job(&cli, command)?,
        Command::Volunteer { command } => volunteer(&cli, command)?,
        Command::Ledger { command } => ledger(&cli, command)?,
        Command::Blob {
            command: BlobCommand::Fetch { hash, out },
        } => {
            let out = match out {
                Some(o) => Some(std::path::absolute(o).with_context(|| o.display().to_string())?),
                None => None,
            };
            let v = client(&cli)?.post(
                &format!("/api/blobs/{}/fetch", enc(hash)),
                &json!({ "out": out }),
            )?;
            print(&cli, &v, |v| {
                format!(
                    "fetched {} ({} bytes) from {} via {}",
                    st(&v["hash"]),
                    v["bytes"],
                    v["provider"].as_str().unwrap_or("this peer"),
                    st(&v["answered_by"])
                )
            });
        }
        Command::Dht {
            command: DhtCommand::Providers { hash },
        } => {
            let v = client(&cli)?.get(&format!("/api/dht/providers/{}", enc(hash)))?;
            print(&cli, &v, |v| {
                let ps: Vec<_> = v["providers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str())
                    .collect();
                format!(
                    "{} providers ({:.1} ms, {} requests){}{}",
                    ps.len(),
                    v["total_ms"].as_f64().unwrap_or_default(),
                    v["messages"],
                    if ps.is_empty() { "" } else { ":\n" },
                    ps.join("\n")
                )
            });
        }
        Command::Dht {
            command: DhtCommand::Resolve { peer },
        } => {
            let v = client(&cli)?.get(&format!("/api/dht/peers/{}", enc(peer)))?;
            print(&cli, &v, pretty);
        }
        Command::Bench { command } => {
            let scratch = |w: &Option<PathBuf>| {
                w.clone().unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("cohort-bench-{}", std::process::id()))
                })
            };
            match command {
                BenchCommand::Model(args) => model_cli::bench_model(args)?,
                BenchCommand::Train(args) => model_cli::bench_train(args)?,
                BenchCommand::Transfer {
                    mib,
                    shard_mib,
                    rounds,
                    work_dir,
                } => bench::transfer(&scratch(work_dir), *mib, *shard_mib, *rounds)?,
                BenchCommand::Serve {
                    model,
                    streams,
                    max_tokens,
                    adapter,
                    llama_python,
                    work_dir,
                } => bench::serve(
                    model,
                    streams,
                    *max_tokens,
                    adapter.as_deref(),
                    llama_python.as_deref(),
                    &scratch(work_dir),
                )?,
                BenchCommand::Publish {
                    nodes,
                    rounds,
                    work_dir,
                } => bench::publish(&scratch(work_dir), *nodes, *rounds)?,
                BenchCommand::Round {
                    volunteers,
                    model,
                    data,
                    rank,
                    targets,
                    seq_len,
                    audit_rate,
                    rounds,
                    work_dir,
                } => {
                    let data = if data.is_empty() {
                        vec![PathBuf::from("data/finetune/velmora-train.jsonl")]
                    } else {
                        data.clone()
                    };
                    bench::round(
                        &scratch(work_dir),
                        &bench::RoundBench {
                            volunteers: *volunteers,
                            model: model.clone(),
                            data,
                            rank: *rank,
                            targets: targets.clone(),
                            seq_len: *seq_len,
                            audit_rate: *audit_rate,
                            rounds: *rounds,
                        },
                    )?
                }
                BenchCommand::Dht {
                    nodes,
                    keys,
                    work_dir,
                } => bench::dht(&scratch(work_dir), *nodes, *keys)?,
            }
        }
        Command::Debug {
            command: DebugCommand::Send { to, file },
        } => {
            let dir = data_dir(&cli)?;
            runtime()?.block_on(debug_send(dir, to.clone(), file.clone()))?;
        }
        Command::Debug {
            command: DebugCommand::GetBlob { from, hash },
        } => {
            let dir = data_dir(&cli)?;
            runtime()?.block_on(debug_get_blob(dir, from.clone(), hash.clone()))?;
        }
    }
    Ok(())
}

/// `cohort serve`: the OpenAI-compatible API alone, until SIGINT or SIGTERM.
async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<()> {
    use cohort_peer::openai::{OpenAi, ServeOptions};
    let options = ServeOptions {
        models: args.model.clone(),
        adapters: args.adapter.clone(),
        parallel: args.parallel.max(1),
        queue: args.queue,
        adapter_cache_bytes: args.adapter_cache_mb << 20,
        api_keys: args.api_key.clone(),
    };
    let state = tokio::task::spawn_blocking(move || OpenAi::new(options)).await??;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {}", args.http))?;
    let addr = listener.local_addr()?;
    if let Some(dir) = &cli.data_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = cohort_peer::openai::serve_file(dir);
        std::fs::write(&file, json!({ "http": addr.to_string() }).to_string())
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    println!("cohort serve: OpenAI-compatible API at http://{addr}/v1");
    std::io::Write::flush(&mut std::io::stdout())?;
    axum::serve(listener, cohort_peer::openai::router(state))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        })
        .await?;
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
