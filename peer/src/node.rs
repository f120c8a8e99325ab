//! `cohort up`: the long-running node.
//!
//! One iroh [`Endpoint`] and [`Router`] accept three ALPNs: iroh-gossip (signed announcements on
//! one well-known topic), iroh-blobs (shards, from an fs store in the data directory) and
//! `cohort/1` (request/response: manifest heads and manifests for anti-entropy, pushed
//! announcements, shard submissions). The metadata store belongs to the state actor
//! ([`crate::state`]); the HTTP API ([`crate::api`]) and the background loops reach it through a
//! [`StateHandle`].
//!
//! Tasks: the gossip loop, the sync loop and the HTTP server all live in one `JoinSet` owned by
//! [`run`] and stop on its [`CancellationToken`]; nothing is detached. Shutdown order: cancel,
//! join the tasks, shut the router down (gossip, blobs and the blob store with it), stop the
//! state actor (closing rocksdb), remove `node.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_protocol::types::announce::{
    MAX_ANNOUNCEMENT_BYTES, MAX_PROVIDED, decode_announcement, encode_announcement,
};
use cohort_protocol::types::rpc::{
    ALPN as COHORT_ALPN, RPC_VERSION, Request, RequestBody, Response,
};
use cohort_protocol::types::{Announcement, AnnouncementBody, Manifest, ShardInfo};
use cohort_protocol::{Canonical, ContentHash, DecodeError, Keypair, PeerId, Signed};
use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{Connection, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr};
use iroh_blobs::BlobsProtocol;
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
};
use iroh_blobs::store::fs::FsStore;
use iroh_gossip::api::{Event, GossipSender};
use iroh_gossip::{Gossip, TopicId};
use n0_future::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::data_dir::{DataDir, DataDirError};
use crate::dht::{DhtActor, DhtConfig, DhtError, DhtRouting, ProviderLookup};
use crate::identity::{endpoint_id, iroh_secret_key, peer_id_of_endpoint};
use crate::routing::{ContentRouting, GossipIndex};
use crate::rpc::{self, decode_frame, read_frame, write_frame};
use crate::state::{Ingested, Rejection, State, StateGone, StateHandle};

/// The name of the file a running node writes into its data directory.
pub const NODE_FILE: &str = "node.json";
/// The name of the HTTP API's bearer token file (mode 0600).
pub const TOKEN_FILE: &str = "api.token";
/// Most peers remembered for anti-entropy.
pub const MAX_KNOWN_PEERS: usize = 256;
/// How long [`Node::locate`] waits before asking the DHT again about a peer.
const LOCATE_RETRY: Duration = Duration::from_secs(30);
/// How long connecting to a blob provider may take before the next one is tried.
const BLOB_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Gossip's message limit; announcements are checked against a smaller one before sending.
const GOSSIP_MAX_MESSAGE: usize = 4096;

/// The gossip topic every Cohort peer joins for announcements.
pub fn announcement_topic() -> TopicId {
    TopicId::from_bytes(*blake3::hash(b"cohort/announcements/v1").as_bytes())
}

/// A peer to connect to at start: its id and socket addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer.
    pub id: PeerId,
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
}

impl std::str::FromStr for PeerAddr {
    type Err = String;

    /// `PEER_ID@IP:PORT[,IP:PORT...]`, or a bare `PEER_ID` (then gossip must know its address).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, addrs) = s.split_once('@').unwrap_or((s, ""));
        let id: PeerId = id.parse().map_err(|e| format!("`{s}`: bad peer id: {e}"))?;
        let addrs = addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse()
                    .map_err(|e| format!("`{s}`: bad address `{a}`: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { id, addrs })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.id)?;
        for (i, a) in self.addrs.iter().enumerate() {
            write!(f, "{}{a}", if i == 0 { '@' } else { ',' })?;
        }
        Ok(())
    }
}

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The data directory (initialised).
    pub data_dir: DataDir,
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// The iroh endpoint's UDP address.
    pub bind: SocketAddr,
    /// Peers to join at start.
    pub bootstrap: Vec<PeerAddr>,
    /// Relays, DNS/pkarr address lookup and port mapping on (real networks); off on loopback.
    pub public: bool,
    /// How often anti-entropy runs against known peers.
    pub sync_interval: Duration,
    /// The libp2p DHT (its `iroh_addrs` are filled in once the endpoint is bound).
    pub dht: DhtConfig,
    /// Volunteer for jobs this policy accepts from the start (`None`: not until turned on).
    pub volunteer: Option<crate::rounds::volunteer::Policy>,
    /// For tests of `cohort ledger verify` only: misbehave as a coordinator (`misfilter`: the
    /// robust filter refuses the most central update instead of the farthest).
    pub coordinator_fault: Option<String>,
}

/// What a running node writes to `node.json` once it is ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeFile {
    /// The peer id (= iroh endpoint id).
    pub peer_id: String,
    /// The endpoint's bound socket addresses.
    pub addrs: Vec<SocketAddr>,
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// The node's process id.
    pub pid: u32,
    /// `PEER_ID@ADDR` for other nodes' `--bootstrap`.
    pub bootstrap: String,
    /// The DHT's listen multiaddrs (with `/p2p/PEER_ID`) for other nodes' `--dht-bootstrap`.
    #[serde(default)]
    pub dht_addrs: Vec<String>,
}

/// Why the node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The data directory is unusable.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The blob store failed to open.
    #[error("blob store {path}: {reason}")]
    Blobs {
        /// Its directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The endpoint could not bind.
    #[error("iroh endpoint on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The HTTP listener could not bind.
    #[error("HTTP API on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Gossip failed.
    #[error("gossip: {0}")]
    Gossip(String),
    /// A file in the data directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The state actor stopped early.
    #[error(transparent)]
    StateGone(#[from] StateGone),
    /// The DHT could not start.
    #[error(transparent)]
    Dht(#[from] DhtError),
}

/// Work for the sync loop.
#[derive(Debug, Clone)]
pub enum SyncJob {
    /// Compare heads with a peer and pull what is newer.
    Heads(PeerId),
    /// Pull one manifest (and any missing predecessors) from a peer.
    Pull {
        /// Ask this peer.
        peer: PeerId,
        /// The manifest.
        hash: ContentHash,
    },
}

/// The shared parts of a running node.
#[derive(Debug)]
pub struct Node {
    /// The peer's key.
    pub keypair: Keypair,
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Addresses given on the command line or learned from peers.
    pub lookup: MemoryLookup,
    /// The blob store.
    pub blobs: FsStore,
    /// The state actor.
    pub state: StateHandle,
    /// Content routing, first choice: the gossip-fed index.
    pub index: GossipIndex,
    /// Content routing on a miss: the libp2p Kademlia DHT.
    pub dht: DhtRouting,
    /// Relays and address lookup on: iroh may find a peer by its id alone.
    pub public: bool,
    /// The gossip sender for announcements.
    pub gossip: GossipSender,
    /// The sync loop's inbox.
    pub sync: mpsc::Sender<SyncJob>,
    /// The HTTP bearer token.
    pub token: String,
    /// When the node started.
    pub started: Instant,
    /// The data directory.
    pub data_dir: DataDir,
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// Peers to run anti-entropy with: bootstrap peers, gossip neighbours, peers that called.
    pub known: Mutex<BTreeSet<PeerId>>,
    /// Gossip neighbours now.
    pub neighbours: Mutex<BTreeSet<PeerId>>,
    /// When [`Node::locate`] last asked the DHT for each peer it could not dial.
    located: Mutex<std::collections::HashMap<PeerId, Instant>>,
    /// Federated rounds: coordinators, workers, the volunteer switch.
    pub rounds: crate::rounds::Rounds,
    /// [`NodeConfig::coordinator_fault`].
    pub coordinator_fault: Option<String>,
    /// A weak handle to this node, for tasks it starts itself.
    pub this: Mutex<std::sync::Weak<Node>>,
    /// Tasks started after the node is up (coordinators, workers, their work); waited for at
    /// shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// Cancelled when the node shuts down.
    pub cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Node {
    /// This peer's id.
    pub fn me(&self) -> PeerId {
        self.keypair.peer_id()
    }

    /// Remembers a peer for anti-entropy (at most [`MAX_KNOWN_PEERS`]).
    pub fn learn(&self, peer: PeerId) {
        if peer != self.me() {
            let mut known = lock(&self.known);
            if known.len() < MAX_KNOWN_PEERS {
                known.insert(peer);
            }
        }
    }

    /// Calls `peer` over cohort/1, looking its address up first if need be ([`Self::locate`]).
    pub async fn call(&self, peer: PeerId, body: RequestBody) -> Result<Response, rpc::CallError> {
        self.locate(peer).await;
        rpc::call(&self.endpoint, endpoint_id(&peer), body).await
    }

    /// Makes sure the endpoint can dial `peer`: a peer whose address it has not been told
    /// (not a bootstrap peer, never resolved) is looked up in the DHT. On loopback networks
    /// there is no other address lookup; a peer known only by its id (a job's owner, from a
    /// gossip announcement relayed by another peer) is otherwise unreachable.
    pub async fn locate(&self, peer: PeerId) {
        let id = endpoint_id(&peer);
        if peer == self.me()
            || self.lookup.get_endpoint_info(id).is_some()
            || self.endpoint.remote_info(id).await.is_some()
        {
            return;
        }
        // A peer the DHT could not place is not asked about again for a while.
        {
            let mut tried = lock(&self.located);
            let now = Instant::now();
            tried.retain(|_, at| now.duration_since(*at) < LOCATE_RETRY);
            if tried.contains_key(&peer) {
                return;
            }
            tried.insert(peer, now);
        }
        match self.dht.handle().resolve(peer).await {
            Ok(found) if !found.addrs.is_empty() => {
                let mut addr = EndpointAddr::new(endpoint_id(&peer));
                for a in &found.addrs {
                    addr = addr.with_ip_addr(*a);
                }
                self.lookup.add_endpoint_info(addr);
            }
            Ok(_) => tracing::debug!("resolving {}: no addresses", peer.short()),
            Err(e) => tracing::debug!("resolving {}: {e}", peer.short()),
        }
    }

    /// Peers known for anti-entropy.
    pub fn known_peers(&self) -> Vec<PeerId> {
        lock(&self.known).iter().copied().collect()
    }

    /// Gossip neighbours.
    pub fn neighbour_peers(&self) -> Vec<PeerId> {
        lock(&self.neighbours).iter().copied().collect()
    }

    /// Queues sync work without waiting; a full queue drops it (the periodic round catches up).
    pub fn queue_sync(&self, job: SyncJob) {
        if let Err(e) = self.sync.try_send(job) {
            tracing::debug!("sync queue: {e}");
        }
    }

    /// Checks an announcement from `from` (the gossip neighbour that delivered it, or the peer
    /// that pushed it) and acts on it. Every failure is counted against `from`.
    pub async fn on_announcement(&self, from: PeerId, bytes: Vec<u8>) -> Result<(), Rejection> {
        let checked = self
            .state
            .call(move |s| check_announcement(s, from, &bytes))
            .await
            .map_err(|_| Rejection::Malformed)??;
        let (signer, a) = checked;
        match a.body {
            AnnouncementBody::Manifest { manifest, .. } => {
                let known = self
                    .state
                    .call(move |s| s.manifest(&manifest).map(|m| m.is_some()))
                    .await;
                if !matches!(known, Ok(Ok(true))) {
                    self.queue_sync(SyncJob::Pull {
                        peer: signer,
                        hash: manifest,
                    });
                }
            }
            AnnouncementBody::Provides { hashes } => {
                self.index.add_providers(signer, &hashes).await;
            }
            AnnouncementBody::Job { job } => {
                if let Some(node) = self.me_arc() {
                    self.spawn(async move {
                        crate::rounds::volunteer::consider(&node, signer, job).await;
                    });
                }
            }
            AnnouncementBody::RoundOpened { job, .. }
            | AnnouncementBody::RoundClosed { job, .. } => {
                if let Some(tx) = self.rounds.worker(&job) {
                    tx.try_send(crate::rounds::volunteer::WorkerMsg::Poke).ok();
                }
            }
            AnnouncementBody::LedgerHead { .. } => {
                if let Some(node) = self.me_arc() {
                    self.spawn(async move {
                        if let Err(e) = node.sync_ledger(signer).await {
                            tracing::debug!("ledger of {}: {e}", signer.short());
                        }
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Runs `work` as a task of this node: tracked (shutdown waits for it) and dropped at once
    /// when the node shuts down, wherever it is (a network call to a dead peer included).
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        });
    }

    /// This node as an `Arc`, for tasks it starts (`None` while shutting down).
    fn me_arc(&self) -> Option<Arc<Node>> {
        lock(&self.this).upgrade()
    }

    /// Fetches `coordinator`'s ledger entries after the stored head from it, verifies and
    /// stores them; returns how many were new.
    pub async fn sync_ledger(&self, coordinator: PeerId) -> Result<usize, String> {
        use crate::rounds::ledger;
        let mut total = 0;
        loop {
            let c = coordinator;
            let from = self
                .state
                .call(move |s| ledger::head(s.store(), &c))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
                .map_or(0, |h| h.seq + 1);
            let answer = self
                .call(coordinator, RequestBody::GetLedger { coordinator, from })
                .await
                .map_err(|e| e.to_string())?;
            let Response::Ledger { entries } = answer else {
                return Err(format!("unexpected answer: {answer:?}"));
            };
            if entries.is_empty() {
                return Ok(total);
            }
            let n = entries.len();
            let got = self
                .state
                .call(move |s| ledger::ingest(s.store(), &coordinator, &entries))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            total += got.stored;
            if let Some(b) = got.broken {
                let why = if got.equivocation {
                    Rejection::Equivocation
                } else {
                    Rejection::Invalid
                };
                self.state
                    .call(move |s| s.reject(coordinator, why))
                    .await
                    .ok();
                return Err(format!("ledger of {}: {b}", coordinator.short()));
            }
            if got.stored == 0
                || n < cohort_protocol::types::rpc::MAX_LEDGER_ENTRIES_PER_RESPONSE as usize
            {
                return Ok(total);
            }
        }
    }

    /// Signs and broadcasts an announcement on gossip.
    pub async fn announce(&self, body: AnnouncementBody) -> Result<(), String> {
        let kp = self.keypair.clone();
        let signed = self
            .state
            .call(move |s| s.sign_announcement(&kp, body))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let bytes = encode_announcement(&signed).map_err(|e| e.to_string())?;
        self.gossip
            .broadcast(bytes.into())
            .await
            .map_err(|e| format!("gossip broadcast: {e}"))
    }

    /// Announces that this peer provides `hashes`, in announcements of at most
    /// [`MAX_PROVIDED`] sorted hashes.
    pub async fn announce_provides(&self, mut hashes: Vec<ContentHash>) -> Result<(), String> {
        hashes.sort();
        hashes.dedup();
        for chunk in hashes.chunks(MAX_PROVIDED) {
            self.announce(AnnouncementBody::Provides {
                hashes: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Downloads one blob from `provider`, verified against its hash by iroh-blobs, over a
    /// connection kept in `conns` for the provider's next blobs. A stream that does not match
    /// the hash, or a transfer that fails once connected, penalises the provider.
    pub async fn fetch_blob(
        &self,
        conns: &mut BlobConnections,
        provider: PeerId,
        hash: ContentHash,
    ) -> Result<(), FetchError> {
        if conns.unreachable.contains(&provider) {
            return Err(FetchError::Unreachable(
                "unreachable earlier in this fetch".into(),
            ));
        }
        let conn = match conns.open.get(&provider) {
            Some(c) => c.clone(),
            None => {
                let connected = tokio::time::timeout(
                    BLOB_CONNECT_TIMEOUT,
                    self.endpoint
                        .connect(endpoint_id(&provider), iroh_blobs::ALPN),
                )
                .await;
                match connected {
                    Ok(Ok(c)) => {
                        conns.open.insert(provider, c.clone());
                        c
                    }
                    Ok(Err(e)) => {
                        conns.unreachable.insert(provider);
                        return Err(FetchError::Unreachable(e.to_string()));
                    }
                    Err(_) => {
                        conns.unreachable.insert(provider);
                        return Err(FetchError::Unreachable("timed out".into()));
                    }
                }
            }
        };
        let result = self
            .blobs
            .remote()
            .fetch(conn, iroh_blobs::Hash::from_bytes(*hash.as_bytes()))
            .complete()
            .await;
        let why = match result {
            Ok(_) => return Ok(()),
            Err(iroh_blobs::get::GetError::Decode { source, .. }) => {
                (Rejection::BadShard, FetchError::Corrupt(source.to_string()))
            }
            Err(e) => (Rejection::FailedTransfer, FetchError::Failed(e.to_string())),
        };
        if let Some(c) = conns.open.remove(&provider) {
            c.close(1u32.into(), b"failed");
        }
        let (rejection, error) = why;
        self.state
            .call(move |s| s.reject(provider, rejection))
            .await
            .ok();
        Err(error)
    }

    async fn fetch_shards_with(
        &self,
        conns: &mut BlobConnections,
        report: &mut FetchReport,
        fetched: &mut Vec<ShardInfo>,
        shards: &[ShardInfo],
    ) -> Result<(), String> {
        let owner = conns.owner;
        for info in shards {
            let hash = info.hash;
            let held = self
                .state
                .call(move |s| s.has_shard(&hash))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let blob = iroh_blobs::Hash::from_bytes(*hash.as_bytes());
            if held && self.blobs.has(blob).await.unwrap_or(false) {
                report.already_held += 1;
                continue;
            }
            let routed = self
                .fetch_routed(conns, hash, Some(owner))
                .await
                .map_err(|e| format!("shard {hash}: {e}"))?;
            report.transfer_ms += routed.transfer_ms;
            report
                .bad_providers
                .extend(routed.bad_providers.iter().cloned());
            match routed.answered_by {
                AnsweredBy::Gossip => report.by_gossip += 1,
                AnsweredBy::Dht => report.by_dht += 1,
                AnsweredBy::Local => {}
            }
            // The manifest's size must match what arrived.
            match self.blobs.status(blob).await {
                Ok(iroh_blobs::api::proto::BlobStatus::Complete { size }) if size == info.bytes => {
                }
                other => {
                    return Err(format!(
                        "shard {hash}: expected {} bytes, the store has {other:?}",
                        info.bytes
                    ));
                }
            }
            fetched.push(*info);
            report.fetched += 1;
            report.bytes += info.bytes;
        }
        Ok(())
    }

    /// Providers ordered least penalised first.
    async fn by_penalty(&self, providers: Vec<PeerId>) -> Result<Vec<PeerId>, String> {
        let ps = providers.clone();
        let penalties = self
            .state
            .call(move |s| ps.iter().map(|p| s.penalties(p)).collect::<Vec<_>>())
            .await
            .map_err(|e| e.to_string())?;
        let mut order: Vec<_> = providers.into_iter().zip(penalties).collect();
        order.sort_by_key(|(_, pen)| *pen);
        Ok(order.into_iter().map(|(p, _)| p).collect())
    }

    /// Downloads blob `hash` from whichever provider serves it: those the gossip index knows
    /// (and `extra`, e.g. a datanet's owner) first, least penalised first; on a miss, those
    /// the DHT finds. A DHT provider that cannot be reached or fails to serve the hash is
    /// dropped from the DHT's answers and penalised.
    pub async fn fetch_routed(
        &self,
        conns: &mut BlobConnections,
        hash: ContentHash,
        extra: Option<PeerId>,
    ) -> Result<Routed, String> {
        let mut routed = Routed {
            answered_by: AnsweredBy::Local,
            provider: None,
            tried: Vec::new(),
            bad_providers: Vec::new(),
            dht: None,
            resolve_ms: 0.0,
            resolve_messages: 0,
            transfer_ms: 0,
        };
        let me = self.me();
        let mut providers = self.index.providers(hash).await;
        providers.extend(extra);
        providers.sort();
        providers.dedup();
        providers.retain(|p| *p != me);
        let mut tried = BTreeSet::new();
        for p in self.by_penalty(providers).await? {
            tried.insert(p);
            let t = Instant::now();
            let got = self.fetch_blob(conns, p, hash).await;
            routed.transfer_ms += t.elapsed().as_millis() as u64;
            match got {
                Ok(()) => {
                    routed.answered_by = AnsweredBy::Gossip;
                    routed.provider = Some(p);
                    tracing::info!(%hash, provider = %p.short(), router = "gossip", "fetched");
                    return Ok(routed);
                }
                Err(e) => {
                    if matches!(e, FetchError::Corrupt(_) | FetchError::Failed(_)) {
                        routed.bad_providers.push(p.to_string());
                    }
                    routed.tried.push(format!("{} (gossip): {e}", p.short()));
                }
            }
        }

        // A miss in the gossip index: ask the DHT.
        let lookup = self
            .dht
            .handle()
            .find_providers(hash)
            .await
            .map_err(|e| format!("DHT lookup: {e}"))?;
        let candidates: Vec<_> = lookup
            .providers
            .iter()
            .copied()
            .filter(|p| *p != me && !tried.contains(p))
            .collect();
        routed.dht = Some(lookup);
        for p in self.by_penalty(candidates).await? {
            match self.dht.handle().resolve(p).await {
                Ok(found) => {
                    routed.resolve_ms += found.ms;
                    routed.resolve_messages += found.messages;
                    if !found.addrs.is_empty() {
                        let mut addr = EndpointAddr::new(endpoint_id(&p));
                        for a in &found.addrs {
                            addr = addr.with_ip_addr(*a);
                        }
                        self.lookup.add_endpoint_info(addr);
                    }
                }
                // On a real network iroh's own address lookup may still find it by id.
                Err(e) if !self.public => {
                    routed.tried.push(format!("{} (dht): {e}", p.short()));
                    self.drop_dht_provider(hash, p, Rejection::StaleRecord)
                        .await;
                    continue;
                }
                Err(e) => tracing::debug!("resolving {}: {e}", p.short()),
            }
            let t = Instant::now();
            let got = self.fetch_blob(conns, p, hash).await;
            routed.transfer_ms += t.elapsed().as_millis() as u64;
            match got {
                Ok(()) => {
                    routed.answered_by = AnsweredBy::Dht;
                    routed.provider = Some(p);
                    tracing::info!(%hash, provider = %p.short(), router = "dht", "fetched");
                    return Ok(routed);
                }
                Err(e) => {
                    // fetch_blob has penalised a corrupt or failed transfer already.
                    let why = match e {
                        FetchError::Corrupt(_) | FetchError::Failed(_) => {
                            routed.bad_providers.push(p.to_string());
                            None
                        }
                        _ => Some(Rejection::StaleRecord),
                    };
                    routed.tried.push(format!("{} (dht): {e}", p.short()));
                    self.dht
                        .handle()
                        .drop_provider(hash, p)
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(why) = why {
                        self.state.call(move |s| s.reject(p, why)).await.ok();
                    }
                }
            }
        }
        Err(format!(
            "no provider served it (gossip index and DHT tried: {})",
            if routed.tried.is_empty() {
                "none found".to_owned()
            } else {
                routed.tried.join("; ")
            }
        ))
    }

    async fn drop_dht_provider(&self, hash: ContentHash, peer: PeerId, why: Rejection) {
        if let Err(e) = self.dht.handle().drop_provider(hash, peer).await {
            tracing::debug!("DHT drop: {e}");
        }
        self.state.call(move |s| s.reject(peer, why)).await.ok();
    }

    /// Fetches one blob by its hash alone (no manifest needed): found through the gossip
    /// index or, on a miss, the DHT; verified by iroh-blobs as it arrives. It is kept in the
    /// blob store but not served on: only recorded shards are.
    pub async fn fetch_by_hash(&self, hash: ContentHash) -> Result<BlobFetch, String> {
        let started = Instant::now();
        let blob = iroh_blobs::Hash::from_bytes(*hash.as_bytes());
        let held = matches!(
            self.blobs.status(blob).await,
            Ok(iroh_blobs::api::proto::BlobStatus::Complete { .. })
        );
        let routed = if held {
            None
        } else {
            let mut conns = BlobConnections {
                owner: self.me(),
                open: BTreeMap::new(),
                unreachable: BTreeSet::new(),
            };
            let r = self.fetch_routed(&mut conns, hash, None).await;
            for c in conns.open.into_values() {
                c.close(0u32.into(), b"done");
            }
            Some(r?)
        };
        let bytes = match self.blobs.status(blob).await {
            Ok(iroh_blobs::api::proto::BlobStatus::Complete { size }) => size,
            other => {
                return Err(format!(
                    "blob {hash}: the store has {other:?} after the fetch"
                ));
            }
        };
        Ok(BlobFetch {
            hash: hash.to_string(),
            bytes,
            answered_by: routed.as_ref().map_or(AnsweredBy::Local, |r| r.answered_by),
            provider: routed
                .as_ref()
                .and_then(|r| r.provider)
                .map(|p| p.to_string()),
            tried: routed.as_ref().map(|r| r.tried.clone()).unwrap_or_default(),
            dht: routed.as_ref().and_then(|r| r.dht.clone()),
            resolve_ms: routed.as_ref().map_or(0.0, |r| r.resolve_ms),
            transfer_ms: routed.as_ref().map_or(0, |r| r.transfer_ms),
            total_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Provides every shard this peer holds (the DHT skips those already provided).
    pub async fn provide_local(&self) {
        match self.state.call(|s| s.local_shards()).await {
            Ok(Ok(local)) => {
                let hashes: Vec<_> = local.iter().map(|s| s.info.hash).collect();
                self.provide_own(&hashes).await;
            }
            Ok(Err(e)) => tracing::warn!("listing local shards: {e}"),
            Err(e) => tracing::warn!("listing local shards: {e}"),
        }
    }

    /// Records that this peer provides `hashes`: in the local index and in the DHT.
    pub async fn provide_own(&self, hashes: &[ContentHash]) {
        let me = self.me();
        self.index.add_providers(me, hashes).await;
        self.dht.add_providers(me, hashes).await;
    }

    /// Fetches every listed shard not held yet from any provider (the owner and indexed
    /// providers, least penalised first), records them and announces them.
    pub async fn fetch_shards(
        &self,
        datanet: cohort_protocol::types::DatanetId,
        owner: PeerId,
        shards: &[ShardInfo],
    ) -> Result<FetchReport, String> {
        let started = Instant::now();
        let mut report = FetchReport::default();
        let mut fetched = Vec::new();
        let mut conns = BlobConnections {
            owner,
            open: BTreeMap::new(),
            unreachable: BTreeSet::new(),
        };
        let result = self
            .fetch_shards_with(&mut conns, &mut report, &mut fetched, shards)
            .await;
        for c in conns.open.into_values() {
            c.close(0u32.into(), b"done");
        }
        // What arrived before a failure is recorded too.
        if !fetched.is_empty() {
            self.blobs
                .sync_db()
                .await
                .map_err(|e| format!("blob store sync: {e}"))?;
            let infos = fetched.clone();
            self.state
                .call(move |s| s.record_local_shards(&datanet, &infos))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let hashes: Vec<_> = fetched.iter().map(|s| s.hash).collect();
            self.provide_own(&hashes).await;
            if let Err(e) = self.announce_provides(hashes).await {
                tracing::warn!("announcing fetched shards: {e}");
            }
        }
        result?;
        report.total_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Pulls a manifest and any missing predecessors from `peer`, checking each.
    pub async fn pull_manifest(&self, peer: PeerId, hash: ContentHash) -> Result<usize, String> {
        let mut wanted = vec![hash];
        let mut stored = 0;
        // At most this many versions walked back per pull.
        let mut budget = 4096;
        while let Some(h) = wanted.last().copied() {
            budget -= 1;
            if budget == 0 {
                return Err("manifest chain too long".into());
            }
            let response = rpc::call(
                &self.endpoint,
                endpoint_id(&peer),
                RequestBody::GetManifest { hash: h },
            )
            .await
            .map_err(|e| e.to_string())?;
            let signed = match response {
                Response::Manifest { manifest: Some(m) } => m,
                Response::Manifest { manifest: None } => {
                    return Err(format!("{} does not hold manifest {h}", peer.short()));
                }
                _ => {
                    self.state
                        .call(move |s| s.reject(peer, Rejection::Malformed))
                        .await
                        .ok();
                    return Err("unexpected response".into());
                }
            };
            if signed.hash() != h {
                self.state
                    .call(move |s| s.reject(peer, Rejection::Invalid))
                    .await
                    .ok();
                return Err(format!(
                    "{} answered manifest {h} with another one",
                    peer.short()
                ));
            }
            let s2 = signed.clone();
            let outcome = self
                .state
                .call(move |s| s.ingest_manifest(peer, &s2))
                .await
                .map_err(|e| e.to_string())?;
            match outcome {
                Ok(Ingested::New) => {
                    stored += 1;
                    wanted.pop();
                    self.index_manifest(&signed).await;
                }
                Ok(Ingested::Known) => {
                    wanted.pop();
                }
                Ok(Ingested::NeedPrevious(prev)) => wanted.push(prev),
                Err(why) => {
                    return Err(format!(
                        "manifest {h} from {}: rejected ({why:?})",
                        peer.short()
                    ));
                }
            }
        }
        Ok(stored)
    }

    /// The owner of a manifest provides all its shards.
    async fn index_manifest(&self, signed: &Signed<Manifest>) {
        if let Ok(m) = signed.verify() {
            let hashes: Vec<_> = m.shards.iter().map(|s| s.info.hash).collect();
            self.index.add_providers(m.owner, &hashes).await;
        }
    }

    /// Asks the owner of a private datanet for this peer's grants and stores the keys.
    pub async fn fetch_grants(
        &self,
        datanet: cohort_protocol::types::DatanetId,
        owner: PeerId,
    ) -> Result<usize, String> {
        let response = self
            .call(owner, RequestBody::GetGrants { datanet })
            .await
            .map_err(|e| e.to_string())?;
        let grants = match response {
            Response::Grants { grants } => grants,
            Response::Refused { reason } => return Err(format!("the owner refused: {reason}")),
            other => return Err(format!("unexpected answer: {other:?}")),
        };
        let mut stored = 0;
        for g in grants {
            let checked = g.verify().ok().filter(|v| {
                g.signer() == owner
                    && v.datanet == datanet
                    && v.grantee == self.me()
                    && v.validate().is_ok()
            });
            let Some(v) = checked else {
                self.state
                    .call(move |s| s.reject(owner, Rejection::Invalid))
                    .await
                    .ok();
                continue;
            };
            let key =
                crate::crypto::unwrap_key(&self.keypair, &datanet, v.key_epoch, &v.wrapped_key)
                    .map_err(|e| format!("grant for epoch {}: {e}", v.key_epoch))?;
            self.state
                .call(move |s| s.store_key(&datanet, v.key_epoch, &key))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            stored += 1;
        }
        if stored == 0 {
            return Err("the owner has granted this peer no key".into());
        }
        Ok(stored)
    }

    /// Anti-entropy with one peer: compare heads, pull what is newer.
    pub async fn sync_with(&self, peer: PeerId) -> Result<usize, String> {
        let response = rpc::call(&self.endpoint, endpoint_id(&peer), RequestBody::Heads)
            .await
            .map_err(|e| e.to_string())?;
        let Response::Heads { heads } = response else {
            self.state
                .call(move |s| s.reject(peer, Rejection::Malformed))
                .await
                .ok();
            return Err("unexpected response to Heads".into());
        };
        let mine = self
            .state
            .call(|s| s.heads())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut pulled = 0;
        for h in heads {
            let newer = mine
                .iter()
                .find(|m| m.datanet == h.datanet)
                .is_none_or(|m| m.version < h.version);
            if newer {
                match self.pull_manifest(peer, h.manifest).await {
                    Ok(n) => pulled += n,
                    Err(e) => tracing::debug!("sync with {}: {e}", peer.short()),
                }
            }
        }
        Ok(pulled)
    }
}

/// Connections to blob providers during one fetch, and the providers found unreachable.
#[derive(Debug)]
pub struct BlobConnections {
    owner: PeerId,
    open: BTreeMap<PeerId, Connection>,
    unreachable: BTreeSet<PeerId>,
}

impl BlobConnections {
    /// No connections yet; `owner` is the provider of last resort (e.g. a datanet's owner).
    pub fn new(owner: PeerId) -> Self {
        Self {
            owner,
            open: BTreeMap::new(),
            unreachable: BTreeSet::new(),
        }
    }

    /// Closes every connection.
    pub fn close(self) {
        for c in self.open.into_values() {
            c.close(0u32.into(), b"done");
        }
    }
}

/// Why a blob download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The provider could not be reached.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The bytes did not match the hash (the provider was penalised).
    #[error("bytes do not match the hash: {0}")]
    Corrupt(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// What a fetch did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FetchReport {
    /// Shards downloaded.
    pub fetched: u64,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Shards already held.
    pub already_held: u64,
    /// Providers that served bytes not matching the hash, or failed mid-transfer.
    pub bad_providers: Vec<String>,
    /// Milliseconds spent in blob transfers (connections included).
    pub transfer_ms: u64,
    /// Shards whose provider the gossip index (or the owner) gave.
    pub by_gossip: u64,
    /// Shards whose provider only the DHT found.
    pub by_dht: u64,
    /// Milliseconds for the whole fetch (checks, transfers, sync, record, announcement).
    pub total_ms: u64,
}

/// Which content router found the provider that served a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredBy {
    /// It was already here.
    Local,
    /// The gossip-fed index (or the datanet's owner).
    Gossip,
    /// The libp2p Kademlia DHT.
    Dht,
}

/// How one blob was found and fetched.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The router that answered.
    pub answered_by: AnsweredBy,
    /// The provider that served it.
    pub provider: Option<PeerId>,
    /// Providers tried before, with what went wrong.
    pub tried: Vec<String>,
    /// Providers that served bad bytes or failed mid-transfer.
    pub bad_providers: Vec<String>,
    /// The DHT lookup, if the gossip index missed.
    pub dht: Option<ProviderLookup>,
    /// Milliseconds resolving DHT providers' iroh addresses.
    pub resolve_ms: f64,
    /// Kademlia requests resolving addresses.
    pub resolve_messages: u32,
    /// Milliseconds in blob transfers.
    pub transfer_ms: u64,
}

/// What fetching one blob by hash did.
#[derive(Debug, Clone, Serialize)]
pub struct BlobFetch {
    /// The hash.
    pub hash: String,
    /// Its size.
    pub bytes: u64,
    /// The router that found the provider that served it.
    pub answered_by: AnsweredBy,
    /// That provider.
    pub provider: Option<String>,
    /// Providers tried before, with what went wrong.
    pub tried: Vec<String>,
    /// The DHT lookup, if the gossip index missed.
    pub dht: Option<ProviderLookup>,
    /// Milliseconds resolving DHT providers' iroh addresses.
    pub resolve_ms: f64,
    /// Milliseconds in the transfer.
    pub transfer_ms: u64,
    /// Milliseconds in all.
    pub total_ms: u64,
}

/// Checks an announcement on the state actor: size, rate, encoding, signature, rules, replay.
fn check_announcement(
    s: &mut State,
    from: PeerId,
    bytes: &[u8],
) -> Result<(PeerId, Announcement), Rejection> {
    let fail = |s: &mut State, why| {
        s.reject(from, why);
        Err(why)
    };
    if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
        return fail(s, Rejection::Oversized);
    }
    if !s.rate_allow(from) {
        return Err(Rejection::RateLimited);
    }
    let signed = match decode_announcement(bytes) {
        Ok(a) => a,
        Err(DecodeError::TooLarge { .. }) => return fail(s, Rejection::Oversized),
        Err(_) => return fail(s, Rejection::Malformed),
    };
    let Ok(a) = signed.verify() else {
        return fail(s, Rejection::BadSignature);
    };
    if a.validate().is_err() {
        return fail(s, Rejection::Invalid);
    }
    let signer = signed.signer();
    if signer != from && !s.rate_allow(signer) {
        return Err(Rejection::RateLimited);
    }
    if !s.accept_seq(signer, a.seq) {
        return Err(Rejection::Replayed);
    }
    Ok((signer, a))
}

/// The `cohort/1` server.
#[derive(Debug, Clone)]
struct CohortProtocol {
    node: Arc<Node>,
}

impl ProtocolHandler for CohortProtocol {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = peer_id_of_endpoint(&conn.remote_id());
        self.node.learn(remote);
        // A few streams per connection at most; each is one request.
        for _ in 0..64 {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                break;
            };
            let response = match read_frame(&mut recv).await {
                Ok(bytes) => self.handle(remote, &bytes).await,
                Err(rpc::FrameError::Oversized(n)) => {
                    self.count(remote, Rejection::Oversized).await;
                    Response::Refused {
                        reason: format!("frame of {n} bytes is too large"),
                    }
                }
                Err(e) => {
                    tracing::debug!("cohort/1 from {}: {e}", remote.short());
                    break;
                }
            };
            if let Err(e) = write_frame(&mut send, &response.to_bytes()).await {
                tracing::debug!("cohort/1 reply to {}: {e}", remote.short());
                break;
            }
            if send.finish().is_err() {
                break;
            }
        }
        conn.closed().await;
        Ok(())
    }
}

impl CohortProtocol {
    /// Hands a join or commit for `job` (an error when its signature did not verify) to the
    /// job's coordinator; the answer says whether it was taken.
    async fn to_coordinator(
        &self,
        remote: PeerId,
        job: Result<cohort_protocol::types::JobId, cohort_protocol::VerifyError>,
        event: cohort_protocol::rounds::coordinator::CoordinatorEvent,
    ) -> Response {
        match job {
            Ok(job) => match crate::rounds::coordinate::deliver(&self.node, &job, event).await {
                Ok(()) => Response::Accepted,
                Err(reason) => Response::Refused { reason },
            },
            Err(e) => {
                self.count(remote, Rejection::BadSignature).await;
                Response::Refused {
                    reason: e.to_string(),
                }
            }
        }
    }

    async fn count(&self, peer: PeerId, why: Rejection) {
        self.node
            .state
            .call(move |s| s.reject(peer, why))
            .await
            .ok();
    }

    async fn handle(&self, remote: PeerId, bytes: &[u8]) -> Response {
        let request: Request = match decode_frame(bytes) {
            Ok(r) => r,
            Err(e) => {
                let why = if matches!(e, DecodeError::TooLarge { .. }) {
                    Rejection::Oversized
                } else {
                    Rejection::Malformed
                };
                self.count(remote, why).await;
                return Response::Refused {
                    reason: e.to_string(),
                };
            }
        };
        if request.version != RPC_VERSION {
            return Response::Refused {
                reason: format!(
                    "request version {} is not spoken here (this peer speaks {RPC_VERSION})",
                    request.version
                ),
            };
        }
        let state = &self.node.state;
        let internal = |e: StateGone| Response::Refused {
            reason: e.to_string(),
        };
        match request.body {
            RequestBody::Heads => match state
                .call(move |s| {
                    s.heads().map(|hs| {
                        hs.into_iter()
                            .filter(|h| s.may_read(&h.datanet, &remote).unwrap_or(false))
                            .collect::<Vec<_>>()
                    })
                })
                .await
            {
                Ok(Ok(heads)) => Response::Heads { heads },
                Ok(Err(e)) => Response::Refused {
                    reason: e.to_string(),
                },
                Err(e) => internal(e),
            },
            RequestBody::GetManifest { hash } => match state
                .call(move |s| {
                    s.manifest(&hash).map(|m| {
                        m.filter(|m| {
                            m.verify()
                                .is_ok_and(|v| s.may_read(&v.datanet, &remote).unwrap_or(false))
                        })
                    })
                })
                .await
            {
                Ok(Ok(manifest)) => Response::Manifest { manifest },
                Ok(Err(e)) => Response::Refused {
                    reason: e.to_string(),
                },
                Err(e) => internal(e),
            },
            RequestBody::Announce { bytes } => {
                match self.node.on_announcement(remote, bytes).await {
                    Ok(()) => Response::Accepted,
                    Err(why) => Response::Refused {
                        reason: format!("announcement rejected: {why:?}"),
                    },
                }
            }
            RequestBody::Decision { decision } => {
                match state
                    .call(move |s| s.receive_decision(remote, &decision))
                    .await
                {
                    Ok(Ok(())) => Response::Accepted,
                    Ok(Err(reason)) => Response::Refused { reason },
                    Err(e) => internal(e),
                }
            }
            RequestBody::GetGrants { datanet } => {
                match state.call(move |s| s.grants_for(&datanet, &remote)).await {
                    Ok(Ok(grants)) => Response::Grants { grants },
                    Ok(Err(e)) => Response::Refused {
                        reason: e.to_string(),
                    },
                    Err(e) => internal(e),
                }
            }
            RequestBody::GetJob { job } => {
                let spec = crate::rounds::volunteer::job_spec(&self.node, job).await;
                // Only the owner answers for its jobs: volunteers hold specs too, but the
                // owner is the one to ask.
                let spec = spec.filter(|s| s.signer() == self.node.me());
                Response::Job { spec }
            }
            RequestBody::GetRound { job } => match self.node.rounds.view(&job) {
                Some(v) => Response::Round {
                    open: v.open,
                    assignment: v.assignment,
                    last_close: v.last_close,
                },
                None => Response::Refused {
                    reason: format!("this peer does not coordinate job {job}"),
                },
            },
            RequestBody::Join { join } => {
                let job = join.verify().map(|j| j.job);
                let event = cohort_protocol::rounds::coordinator::CoordinatorEvent::Join(join);
                self.to_coordinator(remote, job, event).await
            }
            RequestBody::Commit { commit } => {
                let job = commit.verify().map(|c| c.job);
                let event = cohort_protocol::rounds::coordinator::CoordinatorEvent::Commit(commit);
                self.to_coordinator(remote, job, event).await
            }
            RequestBody::GetLedger { coordinator, from } => {
                let entries = state
                    .call(move |s| crate::rounds::ledger::chain(s.store(), &coordinator))
                    .await;
                match entries {
                    Ok(Ok(chain)) => Response::Ledger {
                        entries: chain
                            .into_iter()
                            .skip(usize::try_from(from).unwrap_or(usize::MAX))
                            .take(
                                cohort_protocol::types::rpc::MAX_LEDGER_ENTRIES_PER_RESPONSE
                                    as usize,
                            )
                            .collect(),
                    },
                    Ok(Err(e)) => Response::Refused {
                        reason: e.to_string(),
                    },
                    Err(e) => internal(e),
                }
            }
            RequestBody::GetSnapshot { state: wanted } => {
                match state
                    .call(move |s| crate::rounds::get_snapshot(s.store(), &wanted))
                    .await
                {
                    Ok(Ok(blob)) => Response::Snapshot { blob },
                    Ok(Err(e)) => Response::Refused {
                        reason: e.to_string(),
                    },
                    Err(e) => internal(e),
                }
            }
            RequestBody::GetRoundRecord { job, round } => {
                match state
                    .call(move |s| crate::rounds::recheck::get_record(s.store(), &job, round))
                    .await
                {
                    Ok(Ok(record)) => Response::RoundRecord {
                        record: record.map(Box::new),
                    },
                    Ok(Err(e)) => Response::Refused {
                        reason: e.to_string(),
                    },
                    Err(e) => internal(e),
                }
            }
            RequestBody::Jobs => {
                let jobs = state.call(|s| crate::rounds::jobs(s.store())).await;
                match jobs {
                    Ok(Ok(all)) => Response::Jobs {
                        jobs: all
                            .into_iter()
                            .filter(|(_, r)| r.role == crate::rounds::Role::Owner && !r.finished)
                            .map(|(j, _)| j)
                            .collect(),
                    },
                    Ok(Err(e)) => Response::Refused {
                        reason: e.to_string(),
                    },
                    Err(e) => internal(e),
                }
            }
            RequestBody::Submit { submission } => {
                let me = self.node.me();
                match state
                    .call(move |s| s.receive_submission(me, remote, &submission))
                    .await
                {
                    Ok(Ok(_)) => Response::Accepted,
                    Ok(Err(reason)) => Response::Refused { reason },
                    Err(e) => internal(e),
                }
            }
        }
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    {
        use std::io::Write as _;
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// The HTTP bearer token of a data directory, created (mode 0600) if missing.
pub fn load_or_create_token(dir: &DataDir) -> Result<String, NodeError> {
    let path = dir.root().join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => {
            let token = hex::encode(rand::random::<[u8; 32]>());
            write_private(&path, &token)?;
            Ok(token)
        }
    }
}

async fn build_endpoint(
    config: &NodeConfig,
    keypair: &Keypair,
    lookup: &MemoryLookup,
) -> Result<Endpoint, NodeError> {
    let bind_err = |reason: String| NodeError::Bind {
        addr: config.bind,
        reason,
    };
    let builder = if config.public {
        Endpoint::builder(presets::N0)
    } else {
        Endpoint::builder(presets::Minimal)
            .clear_ip_transports()
            .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
            .net_report_config(iroh::NetReportConfig::minimal())
    };
    builder
        .secret_key(iroh_secret_key(keypair))
        .bind_addr(config.bind)
        .map_err(|e| bind_err(e.to_string()))?
        .address_lookup(lookup.clone())
        .bind()
        .await
        .map_err(|e| bind_err(e.to_string()))
}

/// Runs a node until `cancel` fires, then shuts it down in order.
pub async fn run(config: NodeConfig, cancel: CancellationToken) -> Result<(), NodeError> {
    let dir = config.data_dir.clone();
    let keypair = dir.keypair()?;
    let store = dir.open_store(&keypair)?;
    let (state, state_join) = StateHandle::spawn(State::new(store));
    let token = load_or_create_token(&dir)?;

    let blobs_path = dir.blobs_path();
    let blobs = FsStore::load(&blobs_path)
        .await
        .map_err(|e| NodeError::Blobs {
            path: blobs_path.clone(),
            reason: e.to_string(),
        })?;

    let lookup = MemoryLookup::new();
    for peer in &config.bootstrap {
        if !peer.addrs.is_empty() {
            let mut addr = EndpointAddr::new(endpoint_id(&peer.id));
            for a in &peer.addrs {
                addr = addr.with_ip_addr(*a);
            }
            lookup.add_endpoint_info(addr);
        }
    }
    let endpoint = build_endpoint(&config, &keypair, &lookup).await?;
    let mut dht_config = config.dht.clone();
    dht_config.iroh_addrs = endpoint.bound_sockets();
    let (dht, dht_actor) = DhtActor::spawn(&keypair, dht_config).await?;
    // Every task lives in this set; dropping it (an early error return) aborts them.
    let mut tasks = JoinSet::new();
    tasks.spawn(dht_actor.run(cancel.child_token()));
    let gossip = Gossip::builder()
        .max_message_size(GOSSIP_MAX_MESSAGE)
        .spawn(endpoint.clone());
    let (events, provider_rx) = EventSender::channel(
        64,
        EventMask {
            connected: ConnectMode::Intercept,
            get: RequestMode::Intercept,
            get_many: RequestMode::Disabled,
            push: RequestMode::Disabled,
            observe: ObserveMode::None,
            ..EventMask::DEFAULT
        },
    );
    let blobs_protocol = BlobsProtocol::new(&blobs, Some(events));

    let bootstrap_ids: Vec<_> = config
        .bootstrap
        .iter()
        .map(|p| endpoint_id(&p.id))
        .filter(|id| *id != endpoint.id())
        .collect();
    let topic = gossip
        .subscribe(announcement_topic(), bootstrap_ids)
        .await
        .map_err(|e| NodeError::Gossip(e.to_string()))?;
    let (gossip_sender, gossip_receiver) = topic.split();

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| NodeError::Http {
            addr: config.http,
            source,
        })?;
    let http = listener.local_addr().map_err(|source| NodeError::Http {
        addr: config.http,
        source,
    })?;

    let (sync_tx, sync_rx) = mpsc::channel(1024);
    let node = Arc::new(Node {
        keypair: keypair.clone(),
        endpoint: endpoint.clone(),
        lookup,
        blobs: blobs.clone(),
        state: state.clone(),
        index: GossipIndex::default(),
        dht: DhtRouting::new(dht.clone(), keypair.peer_id()),
        public: config.public,
        gossip: gossip_sender,
        sync: sync_tx,
        token,
        started: Instant::now(),
        data_dir: dir.clone(),
        http,
        located: Mutex::default(),
        known: Mutex::new(
            config
                .bootstrap
                .iter()
                .map(|p| p.id)
                .filter(|p| *p != keypair.peer_id())
                .collect(),
        ),
        neighbours: Mutex::new(BTreeSet::new()),
        rounds: crate::rounds::Rounds::default(),
        coordinator_fault: config.coordinator_fault.clone(),
        this: Mutex::new(std::sync::Weak::new()),
        tasks: tokio_util::task::TaskTracker::new(),
        cancel: cancel.child_token(),
    });
    *lock(&node.this) = Arc::downgrade(&node);
    node.rounds.set_policy(config.volunteer.clone());

    // Index and provide what this peer already holds.
    node.provide_local().await;

    let router = Router::builder(endpoint.clone())
        .accept(iroh_gossip::ALPN, gossip.clone())
        .accept(iroh_blobs::ALPN, blobs_protocol)
        .accept(COHORT_ALPN, CohortProtocol { node: node.clone() })
        .spawn();

    tasks.spawn(gossip_loop(
        node.clone(),
        gossip_receiver,
        cancel.child_token(),
    ));
    tasks.spawn(provider_gate(
        state.clone(),
        provider_rx,
        cancel.child_token(),
    ));
    tasks.spawn(sync_loop(
        node.clone(),
        sync_rx,
        config.sync_interval,
        cancel.child_token(),
    ));
    let app = crate::api::app(node.clone());
    let http_cancel = cancel.child_token();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_cancel.cancelled().await })
            .await
        {
            tracing::error!("HTTP API: {e}");
        }
    });

    // Unfinished jobs this peer owns carry on; volunteers and ledgers catch up periodically.
    crate::rounds::coordinate::resume_all(&node).await;
    tasks.spawn(rounds_loop(
        node.clone(),
        config.sync_interval,
        cancel.child_token(),
    ));

    let addrs = endpoint.bound_sockets();
    let me = keypair.peer_id();
    let file = NodeFile {
        peer_id: me.to_string(),
        bootstrap: PeerAddr {
            id: me,
            addrs: addrs.clone(),
        }
        .to_string(),
        addrs,
        http,
        pid: std::process::id(),
        dht_addrs: dht.listen_addrs().iter().map(|a| a.to_string()).collect(),
    };
    let node_path = dir.root().join(NODE_FILE);
    let json = serde_json::to_string_pretty(&file).unwrap_or_default();
    write_private(&node_path, &json)?;
    tracing::info!(peer = %me, %http, dht = ?file.dht_addrs, "node ready");
    eprintln!(
        "cohort node {me} ready: API http://{http}, bootstrap {}",
        file.bootstrap
    );

    cancel.cancelled().await;
    eprintln!("shutting down");
    node.tasks.close();
    node.tasks.wait().await;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::warn!("task ended abnormally: {e}");
        }
    }
    if let Err(e) = std::fs::remove_file(&node_path) {
        tracing::warn!("{}: {e}", node_path.display());
    }
    drop(node);
    if let Err(e) = router.shutdown().await {
        tracing::warn!("router shutdown: {e}");
    }
    if let Err(e) = blobs.shutdown().await {
        tracing::debug!("blob store shutdown: {e}");
    }
    state.stop().await.ok();
    drop(state);
    if let Err(e) = state_join.await {
        tracing::warn!("state actor: {e}");
    }
    Ok(())
}

/// Decides every blob request: only recorded shards are served, private ones only to their
/// owner and grantees. Every intercepted message is answered (an unanswered one stalls it).
async fn provider_gate(
    state: StateHandle,
    mut rx: tokio::sync::mpsc::Receiver<ProviderMessage>,
    cancel: CancellationToken,
) {
    let mut peers: std::collections::HashMap<u64, PeerId> = std::collections::HashMap::new();
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        match msg {
            ProviderMessage::ClientConnected(msg) => {
                let answer = match msg.endpoint_id {
                    Some(id) => {
                        peers.insert(msg.connection_id, peer_id_of_endpoint(&id));
                        Ok(())
                    }
                    None => Err(AbortReason::Permission),
                };
                msg.tx.send(answer).await.ok();
            }
            ProviderMessage::ConnectionClosed(msg) => {
                peers.remove(&msg.connection_id);
            }
            ProviderMessage::GetRequestReceived(msg) => {
                let hash = ContentHash::from_bytes(*msg.request.hash.as_bytes());
                let allowed = match peers.get(&msg.connection_id).copied() {
                    Some(peer) if msg.request.ranges.is_blob() => state
                        .call(move |s| {
                            s.may_serve(&hash, &peer).unwrap_or(false)
                                || crate::rounds::is_public(s.store(), &hash).unwrap_or(false)
                        })
                        .await
                        .unwrap_or(false),
                    _ => false,
                };
                if !allowed {
                    tracing::debug!(%hash, "refused a blob request");
                }
                let answer = if allowed {
                    Ok(())
                } else {
                    Err(AbortReason::Permission)
                };
                msg.tx.send(answer).await.ok();
            }
            ProviderMessage::GetManyRequestReceived(msg) => {
                msg.tx.send(Err(AbortReason::Permission)).await.ok();
            }
            ProviderMessage::PushRequestReceived(msg) => {
                msg.tx.send(Err(AbortReason::Permission)).await.ok();
            }
            ProviderMessage::ObserveRequestReceived(msg) => {
                msg.tx.send(Err(AbortReason::Permission)).await.ok();
            }
            ProviderMessage::Throttle(msg) => {
                msg.tx.send(Ok(())).await.ok();
            }
            _ => {}
        }
    }
}

async fn gossip_loop(
    node: Arc<Node>,
    mut receiver: iroh_gossip::api::GossipReceiver,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            e = receiver.next() => e,
        };
        match event {
            Some(Ok(Event::Received(msg))) => {
                let from = peer_id_of_endpoint(&msg.delivered_from);
                if let Err(why) = node.on_announcement(from, msg.content.to_vec()).await {
                    tracing::debug!("gossip from {}: rejected ({why:?})", from.short());
                }
            }
            Some(Ok(Event::NeighborUp(id))) => {
                let peer = peer_id_of_endpoint(&id);
                lock(&node.neighbours).insert(peer);
                node.learn(peer);
                node.queue_sync(SyncJob::Heads(peer));
            }
            Some(Ok(Event::NeighborDown(id))) => {
                lock(&node.neighbours).remove(&peer_id_of_endpoint(&id));
            }
            Some(Ok(Event::Lagged)) => tracing::warn!("gossip receiver lagged"),
            Some(Err(e)) => {
                tracing::warn!("gossip: {e}");
                break;
            }
            None => break,
        }
    }
}

/// Periodic catch-up for rounds: volunteers look for jobs at known peers, and every known
/// peer's ledger chain is pulled.
async fn rounds_loop(node: Arc<Node>, interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A peer that went away costs a network timeout per call: never hold up shutdown.
        let work = async {
            crate::rounds::volunteer::discover(&node).await;
            for peer in node.known_peers() {
                if let Err(e) = node.sync_ledger(peer).await {
                    tracing::debug!("ledger of {}: {e}", peer.short());
                }
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = work => {}
        }
    }
}

/// Sync jobs run at once; the rest wait in order.
const MAX_SYNC_JOBS: usize = 8;
/// Sync jobs waiting at most; more are dropped (the periodic round catches up).
const MAX_QUEUED_SYNC_JOBS: usize = 1024;

async fn sync_loop(
    node: Arc<Node>,
    mut rx: mpsc::Receiver<SyncJob>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: JoinSet<SyncJob> = JoinSet::new();
    let mut queue: std::collections::VecDeque<SyncJob> = std::collections::VecDeque::new();
    // Peers with a heads exchange queued or running: a slow or dead peer is asked once at a
    // time, and never holds up pulls for announcements.
    let mut heads_busy: BTreeSet<PeerId> = BTreeSet::new();
    let push = |job: SyncJob,
                queue: &mut std::collections::VecDeque<SyncJob>,
                heads_busy: &mut BTreeSet<PeerId>| {
        if let SyncJob::Heads(p) = &job
            && !heads_busy.insert(*p)
        {
            return;
        }
        if queue.len() < MAX_QUEUED_SYNC_JOBS {
            queue.push_back(job);
        } else if let SyncJob::Heads(p) = &job {
            heads_busy.remove(p);
        }
    };
    loop {
        while running.len() < MAX_SYNC_JOBS {
            let Some(job) = queue.pop_front() else { break };
            let node = node.clone();
            running.spawn(async move {
                let r = match &job {
                    SyncJob::Heads(peer) => node.sync_with(*peer).await.map(|_| ()),
                    SyncJob::Pull { peer, hash } => {
                        node.pull_manifest(*peer, *hash).await.map(|_| ())
                    }
                };
                if let Err(e) = r {
                    tracing::debug!("sync {job:?}: {e}");
                }
                job
            });
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(SyncJob::Heads(p)) = done {
                    heads_busy.remove(&p);
                }
            }
            j = rx.recv() => match j {
                Some(j) => push(j, &mut queue, &mut heads_busy),
                None => break,
            },
            _ = tick.tick() => {
                for p in node.known_peers() {
                    push(SyncJob::Heads(p), &mut queue, &mut heads_busy);
                }
            }
        }
    }
    running.abort_all();
    while running.join_next().await.is_some() {}
}
