//! `cohort bench`: measurements between real `cohort up` processes on loopback (not tests).
//!
//! - `transfer`: one owner imports and publishes N MiB of shards; a second node fetches them
//!   through `cohort datanet fetch` (connect, access gate, verified download, blob-store sync,
//!   rocksdb record, provider announcement). In the same run, a plain iroh-blobs client (an
//!   fs store and one connection, nothing else) fetches the same bytes from the same owner
//!   before and after; the figure is the ratio of throughputs.
//! - `dht`: N nodes, each given one other as its only DHT bootstrap peer (a chain) and no
//!   gossip peer; K shards provided by different nodes; every other node looks each one up
//!   through the DHT alone (`/api/dht/providers`) and resolves the provider's iroh address.
//!   Reports latency and Kademlia requests per lookup, against log2(N).
//! - `publish`: N nodes joined through one owner; time from `publish` until every other node
//!   holds the new manifest (gossip announcement, then a pull over cohort/1).
//! - `round`: an owner and N volunteers run one federated round on a real model: wall time of
//!   the round, bytes each peer's endpoint sent and received, validation loss, and the merge
//!   error of the exact merge against naive averaging of A and B on the round's own updates.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cohort_peer::client::Client;
use serde_json::{Value, json};

use crate::procs::Proc;

fn wait_version(c: &Client, id: &str, version: u64, deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(v) = c.get(&format!("/api/datanets/{id}"))
            && v["version"].as_u64() >= Some(version)
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "timed out waiting for version {version}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn write_records(path: &Path, mib: u64) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let target = mib << 20;
    let mut written = 0u64;
    let mut i = 0u64;
    let filler = "lorem ipsum dolor sit amet ".repeat(36);
    while written < target {
        let line = format!(
            r#"{{"messages":[{{"role":"user","content":"record {i}: {filler}"}},{{"role":"assistant","content":"answer {i}"}}]}}"#
        );
        writeln!(f, "{line}")?;
        written += line.len() as u64 + 1;
        i += 1;
    }
    f.flush()?;
    Ok(i)
}

async fn plain_fetch(
    work: &Path,
    owner: &cohort_peer::node::NodeFile,
    hashes: &[String],
) -> anyhow::Result<(u64, Duration)> {
    let store = iroh_blobs::store::fs::FsStore::load(work).await?;
    let kp = cohort_protocol::Keypair::generate();
    let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .clear_ip_transports()
        .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
        .net_report_config(iroh::NetReportConfig::minimal())
        .secret_key(cohort_peer::identity::iroh_secret_key(&kp))
        .bind_addr("127.0.0.1:0")?
        .bind()
        .await?;
    let id: cohort_protocol::PeerId = owner.peer_id.parse()?;
    let mut addr = iroh::EndpointAddr::new(cohort_peer::identity::endpoint_id(&id));
    for a in &owner.addrs {
        addr = addr.with_ip_addr(*a);
    }
    let start = Instant::now();
    let conn = endpoint.connect(addr, iroh_blobs::ALPN).await?;
    let mut bytes = 0;
    for h in hashes {
        let h: cohort_protocol::ContentHash = h.parse()?;
        let stats = store
            .remote()
            .fetch(conn.clone(), iroh_blobs::Hash::from_bytes(*h.as_bytes()))
            .complete()
            .await?;
        bytes += stats.payload_bytes_read;
    }
    store.sync_db().await?;
    let took = start.elapsed();
    conn.close(0u32.into(), b"done");
    endpoint.close().await;
    store.shutdown().await?;
    Ok((bytes, took))
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// `cohort bench transfer`.
pub fn transfer(work: &Path, mib: u64, shard_mib: u64, rounds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(rounds >= 1, "at least one round");
    std::fs::create_dir_all(work)?;
    let jsonl = work.join("records.jsonl");
    let records = write_records(&jsonl, mib)?;
    let file_bytes = std::fs::metadata(&jsonl)?.len();
    println!("generated {records} records, {file_bytes} bytes of JSONL");

    let a = Proc::start(&work.join("owner"), None)?;
    let created = a.client.post(
        "/api/datanets",
        &json!({"name": "bench", "schema": "chat", "license": "CC0-1.0"}),
    )?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let t = Instant::now();
    let added = a.client.post(
        &format!("/api/datanets/{id}/add"),
        &json!({"files": [std::path::absolute(&jsonl)?], "shard_bytes": shard_mib << 20}),
    )?;
    let import = t.elapsed();
    let published = a
        .client
        .post(&format!("/api/datanets/{id}/publish"), &json!({}))?;
    let shards: Vec<String> = added["shards"]
        .as_array()
        .context("shards")?
        .iter()
        .filter_map(|s| s["hash"].as_str().map(str::to_owned))
        .collect();
    let shard_bytes: u64 = added["shards"]
        .as_array()
        .context("shards")?
        .iter()
        .filter_map(|s| s["bytes"].as_u64())
        .sum();
    println!(
        "import: {} shards, {shard_bytes} bytes in {:.2} s ({:.1} MiB/s); published version {}",
        shards.len(),
        import.as_secs_f64(),
        mib_s(file_bytes, import),
        published["version"]
    );

    // Alternate plain and cohort fetches, each into a fresh store (a fresh node for cohort),
    // so that load from other processes on the machine hits both alike.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let plain_dir = work.join(format!("plain{round}"));
        let (p_bytes, p) = rt.block_on(plain_fetch(&plain_dir, &a.client.node, &shards))?;
        std::fs::remove_dir_all(&plain_dir).ok();
        anyhow::ensure!(
            p_bytes == shard_bytes,
            "plain fetched {p_bytes} of {shard_bytes} bytes"
        );
        let fetcher = Proc::start(
            &work.join(format!("fetcher{round}")),
            Some(&a.client.node.bootstrap),
        )?;
        wait_version(&fetcher.client, &id, 1, Duration::from_secs(60))?;
        let t = Instant::now();
        let fetched = fetcher
            .client
            .post(&format!("/api/datanets/{id}/fetch"), &json!({}))?;
        let cohort = t.elapsed();
        let c_bytes = fetched["report"]["bytes"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            c_bytes == shard_bytes,
            "cohort fetched {c_bytes} of {shard_bytes} bytes"
        );
        drop(fetcher);
        std::fs::remove_dir_all(work.join(format!("fetcher{round}"))).ok();
        let ratio = mib_s(c_bytes, cohort) / mib_s(p_bytes, p);
        println!(
            "round {round}: cohort node's own timing: {} ms in blob transfers, {} ms whole fetch",
            fetched["report"]["transfer_ms"], fetched["report"]["total_ms"]
        );
        println!(
            "round {round}: plain iroh-blobs {:.2} s = {:.1} MiB/s; cohort datanet fetch {:.2} s = {:.1} MiB/s; ratio {ratio:.2}",
            p.as_secs_f64(),
            mib_s(p_bytes, p),
            cohort.as_secs_f64(),
            mib_s(c_bytes, cohort),
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio cohort / plain iroh-blobs over {rounds} rounds: median {:.2} (min {:.2}, max {:.2})",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    drop(a);
    std::fs::remove_dir_all(work).ok();
    Ok(())
}

/// `cohort bench publish`.
pub fn publish(work: &Path, nodes: usize, rounds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(nodes >= 2, "at least two nodes");
    std::fs::create_dir_all(work)?;
    let owner = Proc::start(&work.join("n0"), None)?;
    let mut peers = Vec::new();
    for i in 1..nodes {
        peers.push(Proc::start(
            &work.join(format!("n{i}")),
            Some(&owner.client.node.bootstrap),
        )?);
    }
    let start = Instant::now();
    for p in &peers {
        loop {
            let s = p.client.get("/api/status")?;
            if s["neighbours"].as_array().is_some_and(|n| !n.is_empty()) {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "gossip did not join"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!(
        "{nodes} nodes up and joined in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let created = owner.client.post(
        "/api/datanets",
        &json!({"name": "fanout", "schema": "alpaca"}),
    )?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let mut samples = Vec::new();
    for round in 1..=rounds {
        let f = work.join(format!("r{round}.jsonl"));
        std::fs::write(
            &f,
            format!("{{\"instruction\":\"round {round}\",\"input\":\"\",\"output\":\"ok\"}}\n"),
        )?;
        owner.client.post(
            &format!("/api/datanets/{id}/add"),
            &json!({"files": [std::path::absolute(&f)?]}),
        )?;
        let t = Instant::now();
        owner
            .client
            .post(&format!("/api/datanets/{id}/publish"), &json!({}))?;
        let mut pending: Vec<&Proc> = peers.iter().collect();
        while !pending.is_empty() {
            pending.retain(|p| {
                !p.client
                    .get(&format!("/api/datanets/{id}"))
                    .is_ok_and(|v: Value| v["version"].as_u64() >= Some(round))
            });
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "round {round} timed out"
            );
        }
        let took = t.elapsed();
        println!(
            "version {round}: all {} other nodes hold the manifest {:.0} ms after publish",
            peers.len(),
            took.as_secs_f64() * 1000.0
        );
        samples.push(took);
    }
    samples.sort();
    println!(
        "publish -> all {nodes} nodes hold the manifest: median {:.0} ms, max {:.0} ms over {rounds} versions",
        samples[samples.len() / 2].as_secs_f64() * 1000.0,
        samples[samples.len() - 1].as_secs_f64() * 1000.0
    );
    drop(peers);
    drop(owner);
    std::fs::remove_dir_all(work).ok();
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<f64>, unit: &str) {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{name}: median {:.2}{unit}, p90 {:.2}{unit}, max {:.2}{unit}, mean {mean:.2}{unit} (n = {})",
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        percentile(&v, 1.0),
        v.len()
    );
}

/// `cohort bench dht`.
pub fn dht(work: &Path, nodes: usize, keys: usize) -> anyhow::Result<()> {
    anyhow::ensure!(nodes >= 2, "at least two nodes");
    anyhow::ensure!(keys >= 1, "at least one key");
    std::fs::create_dir_all(work)?;
    let t = Instant::now();
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..nodes {
        let dir = work.join(format!("n{i}"));
        let p = match procs.last() {
            None => Proc::start_with(&dir, &[])?,
            Some(prev) => {
                let addr = prev
                    .client
                    .node
                    .dht_addrs
                    .first()
                    .context("dht_addrs")?
                    .clone();
                Proc::start_with(&dir, &["--dht-bootstrap", &addr])?
            }
        };
        procs.push(p);
    }
    println!(
        "{nodes} nodes up in {:.2} s (each bootstrapped from the one before, no gossip peers)",
        t.elapsed().as_secs_f64()
    );
    // Each key: a one-record shard in a datanet of node (k mod N).
    let mut provided = Vec::new();
    for k in 0..keys {
        let owner = &procs[k % nodes];
        let name = format!("bench{k}");
        let created = owner
            .client
            .post("/api/datanets", &json!({"name": name, "schema": "alpaca"}))?;
        let id = created["id"].as_str().context("id")?.to_owned();
        let f = work.join(format!("k{k}.jsonl"));
        std::fs::write(
            &f,
            format!("{{\"instruction\":\"key {k}\",\"input\":\"\",\"output\":\"ok\"}}\n"),
        )?;
        let added = owner.client.post(
            &format!("/api/datanets/{id}/add"),
            &json!({"files": [std::path::absolute(&f)?]}),
        )?;
        let hash = added["shards"][0]["hash"]
            .as_str()
            .context("shard hash")?
            .to_owned();
        provided.push((k % nodes, hash));
    }
    // Wait until the last key is found from the node farthest along the chain.
    let t = Instant::now();
    let (owner, hash) = provided.last().context("a key")?.clone();
    let asker = &procs[(owner + nodes / 2) % nodes];
    loop {
        let v = asker.client.get(&format!("/api/dht/providers/{hash}"))?;
        if v["providers"].as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the DHT did not converge"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut first_ms, mut total_ms, mut first_msgs, mut total_msgs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut resolve_ms, mut resolve_msgs) = (Vec::new(), Vec::new());
    let mut misses = 0;
    for (owner, hash) in &provided {
        let owner_id = procs[*owner].client.node.peer_id.clone();
        for (i, p) in procs.iter().enumerate() {
            if i == *owner {
                continue;
            }
            let v = p.client.get(&format!("/api/dht/providers/{hash}"))?;
            let found = v["providers"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|x| x.as_str() == Some(owner_id.as_str())));
            if !found {
                misses += 1;
                continue;
            }
            first_ms.push(v["first_ms"].as_f64().unwrap_or(f64::NAN));
            first_msgs.push(v["first_messages"].as_f64().unwrap_or(f64::NAN));
            total_ms.push(v["total_ms"].as_f64().unwrap_or(f64::NAN));
            total_msgs.push(v["messages"].as_f64().unwrap_or(f64::NAN));
            let r = p.client.get(&format!("/api/dht/peers/{owner_id}"))?;
            if r["lookup"]["cached"] == false {
                resolve_ms.push(r["lookup"]["ms"].as_f64().unwrap_or(f64::NAN));
                resolve_msgs.push(r["lookup"]["messages"].as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    let lookups = keys * (nodes - 1);
    println!(
        "{lookups} provider lookups ({keys} keys x {} other nodes), {misses} missed; log2({nodes}) = {:.2}",
        nodes - 1,
        (nodes as f64).log2()
    );
    summary("time to the first provider", first_ms, " ms");
    summary("requests until the first provider", first_msgs, "");
    summary("time to the end of the lookup", total_ms, " ms");
    summary("requests in the whole lookup", total_msgs, "");
    summary("address record lookup (uncached)", resolve_ms, " ms");
    summary("requests per address lookup", resolve_msgs, "");
    drop(procs);
    std::fs::remove_dir_all(work).ok();
    Ok(())
}

/// One streamed completion's timings.
#[derive(Debug, Clone, Copy)]
struct StreamTiming {
    first_token_s: f64,
    total_s: f64,
    tokens: usize,
}

/// A streaming `POST /v1/chat/completions` over plain HTTP/1.1 (`Connection: close`), timing the
/// first text chunk and counting text chunks (one per token on both servers measured).
fn stream_once(addr: &str, body: &Value) -> anyhow::Result<StreamTiming> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let started = Instant::now();
    let mut conn = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    let body = body.to_string();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let reader = BufReader::new(conn);
    let (mut first, mut tokens) = (None, 0usize);
    let mut other = String::new();
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            if other.len() < 400 {
                other.push_str(&line);
                other.push('\n');
            }
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)
            .with_context(|| format!("a server-sent event that is not JSON: {data}"))?;
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            tokens += 1;
        }
    }
    Ok(StreamTiming {
        first_token_s: first
            .with_context(|| format!("the stream carried no text; the response began: {other}"))?,
        total_s: started.elapsed().as_secs_f64(),
        tokens,
    })
}

/// `streams` concurrent streamed answers of `max_tokens` each: time to first token (median and
/// worst), tokens/s per stream (median of `tokens / (total - first)`) and the aggregate.
fn serve_round(
    addr: &str,
    model: &str,
    streams: usize,
    max_tokens: usize,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let timings: Vec<anyhow::Result<StreamTiming>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..streams)
            .map(|i| {
                let body = json!({
                    "model": model,
                    "stream": true,
                    "temperature": 0.8,
                    "seed": i,
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": format!("Write a long story about lighthouse keeper number {i}.")}],
                });
                scope.spawn(move || stream_once(addr, &body))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let timings: Vec<StreamTiming> = timings.into_iter().collect::<anyhow::Result<_>>()?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let total: usize = timings.iter().map(|t| t.tokens).sum();
    Ok(json!({
        "streams": streams,
        "ttft_median_s": median(timings.iter().map(|t| t.first_token_s).collect()),
        "ttft_max_s": timings.iter().map(|t| t.first_token_s).fold(0.0, f64::max),
        "tokens_per_s_per_stream": median(timings.iter().map(|t| t.tokens.saturating_sub(1) as f64 / (t.total_s - t.first_token_s).max(1e-9)).collect()),
        "tokens_per_s_total": total as f64 / wall,
        "tokens": total,
    }))
}

/// A server child process, killed when dropped.
struct ServerProc(Child);

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn wait_http(addr: &str, child: &mut Child) -> anyhow::Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the server exited with {status}");
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "{addr} never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `cohort bench serve`: streaming throughput and latency of `cohort serve` at each concurrency,
/// with an adapter and without, and (given `llama_python`) of llama.cpp's OpenAI-compatible
/// server on the same GGUF in the same run.
pub fn serve(
    model: &str,
    streams: &[usize],
    max_tokens: usize,
    adapter: Option<&Path>,
    llama_python: Option<&Path>,
    work_dir: &Path,
) -> anyhow::Result<()> {
    let path = cohort_trainer::models::resolve(model)?;
    std::fs::create_dir_all(work_dir)?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let parallel = streams.iter().copied().max().unwrap_or(1);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--http", &addr, "--model"])
        .arg(&path)
        .args(["--parallel", &parallel.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work_dir.join("serve.log"))?);
    let mut child = ServerProc(cmd.spawn().context("starting cohort serve")?);
    wait_http(&addr, &mut child.0)?;
    let base_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base_id = if path == cohort_trainer::models::default_model_path() {
        cohort_trainer::models::DEFAULT_MODEL_ID.to_string()
    } else {
        base_id
    };
    let mut runs = vec![("cohort", base_id.clone(), addr.clone())];
    if let Some(a) = adapter {
        runs.push((
            "cohort+adapter",
            format!("{base_id}:{}", a.display()),
            addr.clone(),
        ));
    }
    let mut results = Vec::new();
    for (name, model_id, addr) in &runs {
        // One warm-up answer loads the model (and the adapter).
        serve_round(addr, model_id, 1, 4)?;
        for &n in streams {
            let mut r = serve_round(addr, model_id, n, max_tokens)?;
            r["server"] = json!(name);
            println!("{r}");
            results.push(r);
        }
    }
    drop(child);
    if let Some(python) = llama_python {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(python);
        cmd.args(["-m", "llama_cpp.server", "--model"])
            .arg(&path)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--n_threads",
                "2",
                "--n_ctx",
                "4096",
                // Its default (true) ends the running stream whenever another request arrives,
                // which under concurrency left streams without any text; queued is fair.
                "--interrupt_requests",
                "False",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work_dir.join("llama-server.log"))?);
        let mut child = ServerProc(cmd.spawn().context("starting llama_cpp.server")?);
        wait_http(&addr, &mut child.0)?;
        serve_round(&addr, "m", 1, 4)?;
        for &n in streams {
            // Reported, not fatal.
            let r = match serve_round(&addr, "m", n, max_tokens) {
                Ok(mut r) => {
                    r["server"] = json!("llama.cpp");
                    r
                }
                Err(e) => json!({ "server": "llama.cpp", "streams": n, "error": format!("{e:#}") }),
            };
            println!("{r}");
            results.push(r);
        }
    }
    println!("{}", json!({ "results": results }));
    Ok(())
}

fn traffic(c: &Client) -> anyhow::Result<(u64, u64)> {
    let s = c.get("/api/status")?;
    Ok((
        s["traffic"]["sent_bytes"].as_u64().unwrap_or(0),
        s["traffic"]["received_bytes"].as_u64().unwrap_or(0),
    ))
}

/// Options of [`round`].
#[derive(Debug, Clone)]
pub struct RoundBench {
    /// Volunteers.
    pub volunteers: usize,
    /// Base model (path or cache name); empty: the default model.
    pub model: String,
    /// JSONL chat files for the datanet.
    pub data: Vec<PathBuf>,
    /// LoRA rank.
    pub rank: u32,
    /// Target modules.
    pub targets: Vec<String>,
    /// Longest sequence.
    pub seq_len: u32,
    /// Share of segments re-executed.
    pub audit_rate: f64,
    /// Rounds.
    pub rounds: u32,
}

/// One federated job between real processes: see the module docs.
pub fn round(work: &Path, o: &RoundBench) -> anyhow::Result<()> {
    anyhow::ensure!(o.volunteers >= 1, "at least one volunteer");
    std::fs::create_dir_all(work)?;
    let owner = Proc::start(&work.join("owner"), None)?;
    let boot = owner.client.node.bootstrap.clone();
    let mut vols = Vec::new();
    for i in 0..o.volunteers {
        vols.push(Proc::start_with(
            &work.join(format!("v{i}")),
            &["--bootstrap", &boot, "--volunteer"],
        )?);
    }
    let created = owner
        .client
        .post("/api/datanets", &json!({"name": "bench", "schema": "chat"}))?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let bytes: u64 = o
        .data
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    // About two shards per volunteer.
    let shard_bytes = (bytes / (2 * o.volunteers as u64)).max(4096) as usize;
    let files: Vec<PathBuf> = o
        .data
        .iter()
        .map(std::path::absolute)
        .collect::<Result<_, _>>()?;
    owner.client.post(
        &format!("/api/datanets/{id}/add"),
        &json!({"files": files, "shard_bytes": shard_bytes}),
    )?;
    owner
        .client
        .post(&format!("/api/datanets/{id}/publish"), &json!({}))?;
    let before: Vec<(u64, u64)> = std::iter::once(&owner)
        .chain(vols.iter())
        .map(|p| traffic(&p.client))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let job = owner.client.post(
        "/api/jobs",
        &json!({
            "name": "bench-round", "model": o.model, "datanets": [id],
            "rank": o.rank, "alpha": 2.0 * o.rank as f32, "targets": o.targets,
            "learning_rate": 2e-4, "epochs": 1, "batch_size": 4, "seq_len": o.seq_len,
            "rounds": o.rounds, "min_updates": o.volunteers, "max_workers": o.volunteers,
            "enroll_secs": 10.0, "train_secs": 7200.0, "validate_secs": 7200.0,
            "segment_steps": 4, "audit_rate": o.audit_rate, "validation_fraction": 0.1,
        }),
    )?;
    let job = job["job"].as_str().context("job id")?.to_owned();
    println!("job {job} created; {} volunteers", o.volunteers);
    let status = loop {
        let s = owner.client.get(&format!("/api/jobs/{job}"))?;
        if s["finished"] == json!(true) {
            break s;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(4 * 3600),
            "the job did not finish in 4 h"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let wall = started.elapsed();
    let after: Vec<(u64, u64)> = std::iter::once(&owner)
        .chain(vols.iter())
        .map(|p| traffic(&p.client))
        .collect::<Result<_, _>>()?;
    println!("| round | outcome | validation loss before | after | truncation error |");
    println!("|---|---|---|---|---|");
    for r in status["closed_rounds"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.4} |",
            r["round"],
            r["outcome"].as_str().unwrap_or(""),
            r["validation_loss_before"].as_f64().unwrap_or(f64::NAN),
            r["validation_loss_after"].as_f64().unwrap_or(f64::NAN),
            r["truncation_error"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "\nwall time, job created -> finished ({} round(s)): {:.1} s",
        o.rounds,
        wall.as_secs_f64()
    );
    println!("\n| peer | sent MB | received MB |");
    println!("|---|---|---|");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let name = if i == 0 {
            "owner (coordinator)".to_owned()
        } else {
            format!("volunteer {i}")
        };
        println!(
            "| {name} | {:.2} | {:.2} |",
            (a.0 - b.0) as f64 / 1e6,
            (a.1 - b.1) as f64 / 1e6
        );
    }
    merge_errors(&owner, &job)?;
    // Every peer pulls the coordinator's chain and recomputes each round from the blobs.
    println!("\n| peer | ledger verify | rounds recomputed | seconds |");
    println!("|---|---|---|---|");
    for (i, p) in std::iter::once(&owner).chain(vols.iter()).enumerate() {
        let t = Instant::now();
        let v = loop {
            let v = p.client.post("/api/ledger/verify", &json!({}))?;
            let entries: u64 = crate::procs::chains_sum(&v, "entries");
            if entries >= u64::from(o.rounds) || t.elapsed() > Duration::from_secs(120) {
                break v;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let recomputed: u64 = crate::procs::chains_sum(&v, "recomputed");
        println!(
            "| {} | {} | {recomputed} | {:.1} |",
            if i == 0 {
                "owner".to_owned()
            } else {
                format!("volunteer {i}")
            },
            if v["ok"] == json!(true) {
                "ok"
            } else {
                "FAILED"
            },
            t.elapsed().as_secs_f64()
        );
    }
    drop(vols);
    drop(owner);
    std::fs::remove_dir_all(work).ok();
    Ok(())
}

/// Round 0's merge error: the exact merge as published, and naive averaging of A and B, both
/// against the exact weighted sum of the updates' products (weights by tokens, as merged, read
/// from the coordinator's ledger entry).
fn merge_errors(owner: &Proc, job: &str) -> anyhow::Result<()> {
    use cohort_trainer::adapter::AdapterWeights;
    let ledger = owner.client.get("/api/ledger")?;
    let entry = ledger["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["entries"].as_array().into_iter().flatten())
        .find(|e| e["job"] == job && e["round"] == 0)
        .context("round 0's ledger entry")?
        .clone();
    let round = owner.dir.join("jobs").join(job).join("rounds/0");
    let mut updates = Vec::new();
    let mut tokens = Vec::new();
    for c in entry["compute"].as_array().into_iter().flatten() {
        if c["verified"] != json!(true) {
            continue;
        }
        let peer = c["peer"].as_str().context("peer")?;
        let dir = round.join("updates").join(&peer[..10]);
        for d in std::fs::read_dir(&dir)? {
            let d = d?.path();
            if d.join("adapter_config.json").is_file() {
                updates.push(AdapterWeights::load_peft(&d)?);
                tokens.push(c["tokens"].as_u64().unwrap_or(1).max(1) as f64);
            }
        }
    }
    anyhow::ensure!(!updates.is_empty(), "no updates in {}", round.display());
    let total: f64 = tokens.iter().sum();
    let weights: Vec<f64> = tokens.iter().map(|t| t / total).collect();
    let merged = AdapterWeights::load_peft(&round.join("merged"))?;
    let parts: Vec<(f64, &AdapterWeights)> = weights.iter().copied().zip(&updates).collect();
    let mut naive = updates[0].clone();
    for (key, f) in naive.factors.iter_mut() {
        for (i, x) in f.a.iter_mut().enumerate() {
            *x = parts
                .iter()
                .map(|(w, u)| u.factors[key].a[i] as f64 * w)
                .sum::<f64>() as f32;
        }
        for (i, x) in f.b.iter_mut().enumerate() {
            *x = parts
                .iter()
                .map(|(w, u)| u.factors[key].b[i] as f64 * w)
                .sum::<f64>() as f32;
        }
    }
    let exact = cohort_trainer::federated::merge_error(&parts, &merged)?;
    let naive = cohort_trainer::federated::merge_error(&parts, &naive)?;
    println!(
        "\nmerge error of round 0 (relative, product space, {} updates, token weights {:?}): \
         exact (re-factored to the rank) {exact:.4}, naive averaging of A and B {naive:.4}",
        updates.len(),
        weights
            .iter()
            .map(|w| format!("{w:.3}"))
            .collect::<Vec<_>>()
    );
    Ok(())
}
