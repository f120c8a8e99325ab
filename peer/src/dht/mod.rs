//! Internet-scale discovery: a libp2p Swarm running Kademlia, identify and (optionally) mDNS,
//! under the same ed25519 key as the iroh endpoint.
//!
//! Kademlia answers two questions: "which peers provide hash H" (provider records, one per
//! shard this peer holds, re-published before they expire) and "where does peer P listen on
//! iroh" (a signed address record under P's key, see [`record`]). The bytes never travel over
//! libp2p: a fetch finds providers here, resolves their iroh addresses, and downloads over
//! iroh-blobs.
//!
//! The swarm belongs to one actor ([`DhtActor::run`]); everything else talks to it through a
//! cloneable [`DhtHandle`] (a bounded channel, each request with a oneshot reply). The actor
//! ends when its cancellation token fires or every handle is gone. [`DhtRouting`] is the
//! second [`ContentRouting`] implementation, next to the gossip index.
//!
//! Loopback by default: the swarm listens on 127.0.0.1, dials and accepts addresses of the
//! loopback interface only, runs Kademlia in server mode (every loopback peer is reachable) and
//! keeps mDNS off. [`DhtConfig::public`] lifts the address filter, turns mDNS on and lets
//! Kademlia switch to server mode once an external address is confirmed.
//!
//! Bad peers: inbound provider and address records are filtered here (wrong key shape, bad
//! signature, another peer's addresses, over the per-peer insert budget) and counted; the
//! number of lookups in flight is bounded; connections are limited per peer and in total, and
//! libp2p-kad itself caps each connection at 32 inbound streams. Providers that fail to serve
//! a hash are dropped from this peer's answers ([`DhtHandle::drop_provider`]).

pub mod record;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cohort_protocol::{ContentHash, Keypair, PeerId};
use libp2p::core::Transport as _;
use libp2p::futures::StreamExt as _;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore as _};
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, connection_limits, identify, mdns, noise, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::identity::{libp2p_keypair, libp2p_peer_id, peer_id_of_libp2p};
use crate::routing::ContentRouting;
use record::{
    InsertBudget, addr_key, hash_of_provider_key, provider_key, sign_addr_record,
    verify_addr_record,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The Kademlia protocol: Cohort's own DHT, never mixed with other networks' (e.g. IPFS).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/cohort/kad/1.0.0");
/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/cohort/id/1.0.0";
/// Provider record lifetime on real networks (libp2p's and IPFS's default).
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(48 * 3600);
/// A lookup stops once it has this many providers.
pub const ENOUGH_PROVIDERS: usize = 8;
/// Lookups (provider and address) in flight at most; more are refused as busy.
pub const MAX_LOOKUPS: usize = 64;
/// Hashes this peer provides at most.
pub const MAX_PROVIDED: usize = 1 << 16;
/// Record inserts accepted per remote peer and minute (provider and address records).
pub const INSERTS_PER_MINUTE: u32 = 6000;
/// Requests the handle may queue before callers wait.
const COMMAND_QUEUE: usize = 256;
/// How long the actor waits for its listeners at start.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// Resolved addresses remembered at most.
const MAX_CACHED_ADDRS: usize = 4096;

/// Kademlia's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DhtMode {
    /// Server on loopback; on real networks, server once an external address is confirmed.
    #[default]
    Auto,
    /// Always answer queries and store records.
    Server,
    /// Only ask; never store records for others (peers behind NATs).
    Client,
}

impl std::str::FromStr for DhtMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "server" => Ok(Self::Server),
            "client" => Ok(Self::Client),
            _ => Err(format!("`{s}`: the DHT mode is auto, server or client")),
        }
    }
}

/// How to run the DHT.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// Where the swarm listens (TCP multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to join: multiaddrs ending in `/p2p/PEER_ID`.
    pub bootstrap: Vec<Multiaddr>,
    /// Real networks: any address (not only loopback), mDNS allowed, automatic server mode.
    pub public: bool,
    /// mDNS on the local network (only with `public`).
    pub mdns: bool,
    /// Kademlia's mode.
    pub mode: DhtMode,
    /// How long provider and address records live on other peers; this peer re-publishes its
    /// own every quarter of it.
    pub record_ttl: Duration,
    /// How long a lookup may take.
    pub query_timeout: Duration,
    /// This peer's iroh socket addresses, published in its address record.
    pub iroh_addrs: Vec<SocketAddr>,
}

impl DhtConfig {
    /// Loopback defaults: listen on 127.0.0.1, no bootstrap peers, 48 h records.
    pub fn loopback() -> Self {
        Self {
            listen: vec![Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(Protocol::Tcp(0))],
            bootstrap: Vec::new(),
            public: false,
            mdns: false,
            mode: DhtMode::Auto,
            record_ttl: DEFAULT_RECORD_TTL,
            query_timeout: Duration::from_secs(30),
            iroh_addrs: Vec::new(),
        }
    }

    /// How often this peer re-publishes its records: a quarter of their lifetime (12 h for
    /// 48 h records, as libp2p's defaults), at least every 250 ms.
    pub fn republish_interval(&self) -> Duration {
        (self.record_ttl / 4).max(Duration::from_millis(250))
    }
}

/// Why the DHT failed or refused a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    /// The transport or behaviour could not be built.
    #[error("libp2p setup: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("DHT listen address {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What failed.
        reason: String,
    },
    /// A bootstrap address is unusable.
    #[error("DHT bootstrap address {addr}: {reason}")]
    Bootstrap {
        /// The address.
        addr: Multiaddr,
        /// What is wrong with it.
        reason: String,
    },
    /// Too many lookups in flight.
    #[error("the DHT has {MAX_LOOKUPS} lookups in flight; try again")]
    Busy,
    /// No valid address record was found for a peer.
    #[error("no address record for peer {0}")]
    NoAddress(String),
    /// The actor has stopped.
    #[error("the DHT has stopped")]
    Gone,
}

/// The answer to a provider lookup.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderLookup {
    /// Providers found (this peer and dropped providers excluded).
    #[serde(serialize_with = "peer_ids_hex")]
    pub providers: Vec<PeerId>,
    /// Milliseconds until the first provider was known (None: none found).
    pub first_ms: Option<f64>,
    /// Kademlia requests sent until the first provider was known.
    pub first_messages: Option<u32>,
    /// Milliseconds until the lookup ended.
    pub total_ms: f64,
    /// Kademlia requests sent in the whole lookup.
    pub messages: u32,
}

fn peer_ids_hex<S: serde::Serializer>(ids: &[PeerId], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ids.iter().map(|p| p.to_string()))
}

/// The answer to an address lookup.
#[derive(Debug, Clone, Serialize)]
pub struct AddrLookup {
    /// The peer's iroh socket addresses.
    pub addrs: Vec<SocketAddr>,
    /// Whether it came from the cache (no messages sent).
    pub cached: bool,
    /// Milliseconds the lookup took.
    pub ms: f64,
    /// Kademlia requests sent.
    pub messages: u32,
}

/// Counters and state of the DHT, for `cohort status` and tests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DhtStats {
    /// The libp2p peer id (derived from the same key as the iroh endpoint id).
    pub libp2p_peer_id: String,
    /// `server` or `client`.
    pub mode: String,
    /// Listen multiaddrs, with `/p2p/PEER_ID` (give one to others as `--dht-bootstrap`).
    pub listen: Vec<String>,
    /// Peers in the routing table.
    pub routing_peers: usize,
    /// Hashes this peer provides.
    pub provided: usize,
    /// Provider lookups started.
    pub lookups: u64,
    /// Provider lookups that found at least one provider.
    pub lookups_found: u64,
    /// Address lookups started (cache misses).
    pub resolves: u64,
    /// Inbound Kademlia requests.
    pub inbound_requests: u64,
    /// Records from other peers stored here.
    pub records_stored: u64,
    /// Records from other peers refused as invalid (bad key, bad signature, stale).
    pub bad_records: u64,
    /// Records from other peers refused over their insert budget.
    pub rate_limited: u64,
    /// Records not stored because the store was full.
    pub store_full: u64,
    /// Providers dropped after failing to serve a hash.
    pub dropped_providers: u64,
    /// Lookups refused because too many were in flight.
    pub busy: u64,
    /// Failed or erroneous connections.
    pub connection_errors: u64,
}

/// The libp2p behaviours, composed.
#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

enum Command {
    Provide {
        hashes: Vec<ContentHash>,
        reply: oneshot::Sender<usize>,
    },
    FindProviders {
        hash: ContentHash,
        reply: oneshot::Sender<Result<ProviderLookup, DhtError>>,
    },
    Resolve {
        peer: PeerId,
        reply: oneshot::Sender<Result<AddrLookup, DhtError>>,
    },
    DropProvider {
        hash: ContentHash,
        peer: PeerId,
    },
    Stats {
        reply: oneshot::Sender<DhtStats>,
    },
}

/// A handle to the DHT actor.
#[derive(Debug, Clone)]
pub struct DhtHandle {
    tx: mpsc::Sender<Command>,
    listen: Vec<Multiaddr>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Provide { .. } => "Provide",
            Command::FindProviders { .. } => "FindProviders",
            Command::Resolve { .. } => "Resolve",
            Command::DropProvider { .. } => "DropProvider",
            Command::Stats { .. } => "Stats",
        })
    }
}

impl DhtHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DhtError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| DhtError::Gone)?;
        rx.await.map_err(|_| DhtError::Gone)
    }

    /// The swarm's listen multiaddrs, each ending in `/p2p/PEER_ID`.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen
    }

    /// Announces that this peer provides `hashes` (those already provided are skipped); the
    /// records are re-published before they expire. Returns how many were new.
    pub async fn provide(&self, hashes: Vec<ContentHash>) -> Result<usize, DhtError> {
        self.call(|reply| Command::Provide { hashes, reply }).await
    }

    /// Looks up providers of `hash`.
    pub async fn find_providers(&self, hash: ContentHash) -> Result<ProviderLookup, DhtError> {
        self.call(|reply| Command::FindProviders { hash, reply })
            .await?
    }

    /// Looks up a peer's iroh socket addresses (its signed address record).
    pub async fn resolve(&self, peer: PeerId) -> Result<AddrLookup, DhtError> {
        self.call(|reply| Command::Resolve { peer, reply }).await?
    }

    /// Drops `peer` as a provider of `hash` from this peer's answers (it failed to serve it).
    pub async fn drop_provider(&self, hash: ContentHash, peer: PeerId) -> Result<(), DhtError> {
        self.tx
            .send(Command::DropProvider { hash, peer })
            .await
            .map_err(|_| DhtError::Gone)
    }

    /// Counters and state.
    pub async fn stats(&self) -> Result<DhtStats, DhtError> {
        self.call(|reply| Command::Stats { reply }).await
    }
}

/// Content routing over the DHT: the second [`ContentRouting`] implementation.
#[derive(Debug, Clone)]
pub struct DhtRouting {
    handle: DhtHandle,
    me: PeerId,
}

impl DhtRouting {
    /// Routing through `handle` for the peer `me`.
    pub fn new(handle: DhtHandle, me: PeerId) -> Self {
        Self { handle, me }
    }

    /// The handle.
    pub fn handle(&self) -> &DhtHandle {
        &self.handle
    }
}

impl ContentRouting for DhtRouting {
    async fn providers(&self, hash: ContentHash) -> Vec<PeerId> {
        match self.handle.find_providers(hash).await {
            Ok(l) => l.providers,
            Err(e) => {
                tracing::debug!(%hash, "DHT lookup: {e}");
                Vec::new()
            }
        }
    }

    /// Only this peer's own records can be published: a provider record is signed by the
    /// connection it arrives on, so others' are ignored here.
    async fn add_providers(&self, peer: PeerId, hashes: &[ContentHash]) {
        if peer == self.me
            && let Err(e) = self.handle.provide(hashes.to_vec()).await
        {
            tracing::warn!("DHT provide: {e}");
        }
    }
}

enum Pending {
    Providers {
        hash: ContentHash,
        started: Instant,
        first: Option<(Duration, u32)>,
        found: BTreeSet<PeerId>,
        reply: oneshot::Sender<Result<ProviderLookup, DhtError>>,
    },
    Resolve {
        peer: PeerId,
        started: Instant,
        reply: oneshot::Sender<Result<AddrLookup, DhtError>>,
    },
}

/// The actor that owns the swarm. Run it with [`DhtActor::run`].
pub struct DhtActor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    keypair: Keypair,
    config: DhtConfig,
    pending: HashMap<QueryId, Pending>,
    provided: BTreeSet<ContentHash>,
    dropped: BTreeMap<(ContentHash, PeerId), Instant>,
    addrs: BTreeMap<PeerId, (Vec<SocketAddr>, u64)>,
    budget: InsertBudget<libp2p::PeerId>,
    stats: DhtStats,
    had_peers: bool,
}

impl std::fmt::Debug for DhtActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtActor")
            .field("peer", &self.swarm.local_peer_id())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    crate::state::now().0
}

/// Whether `addr` is on the loopback interface.
pub fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// Splits `/ip4/.../tcp/N/p2p/PEER` into the peer and the address without `/p2p`.
pub fn split_peer(addr: &Multiaddr) -> Option<(libp2p::PeerId, Multiaddr)> {
    let mut a = addr.clone();
    match a.pop() {
        Some(Protocol::P2p(peer)) => Some((peer, a)),
        _ => None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl DhtActor {
    /// Builds the swarm, binds its listeners and queues the bootstrap; returns the handle and
    /// the actor (not yet running: spawn [`DhtActor::run`]).
    pub async fn spawn(
        keypair: &Keypair,
        config: DhtConfig,
    ) -> Result<(DhtHandle, Self), DhtError> {
        for addr in &config.bootstrap {
            let bad = |reason: &str| DhtError::Bootstrap {
                addr: addr.clone(),
                reason: reason.to_owned(),
            };
            let (_, _) = split_peer(addr).ok_or_else(|| bad("it does not end in /p2p/PEER_ID"))?;
            if !config.public && !is_loopback(addr) {
                return Err(bad(
                    "not a loopback address; a node without --public talks to 127.0.0.1 only",
                ));
            }
        }
        let me = keypair.peer_id();
        let local_id = libp2p_peer_id(&me);
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.query_timeout)
            .set_record_ttl(Some(config.record_ttl))
            .set_provider_record_ttl(Some(config.record_ttl))
            .set_provider_publication_interval(Some(config.republish_interval()))
            // The address record is re-signed and re-put by the actor itself (fresh issue time).
            .set_publication_interval(None)
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_max_packet_size(16 * 1024);
        let store = MemoryStore::with_config(
            local_id,
            MemoryStoreConfig {
                max_records: 4096,
                max_value_bytes: record::MAX_RECORD_BYTES,
                max_providers_per_key: kad::K_VALUE.get(),
                max_provided_keys: MAX_PROVIDED,
            },
        );
        let public = config.public;
        let mdns_on = config.public && config.mdns;
        let mode = config.mode;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_keypair(keypair))
            .with_tokio()
            .with_other_transport(|key| {
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                Ok::<_, BoxError>(
                    transport::LoopbackOnly::new(tcp, !public)
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(20)),
                )
            })
            .map_err(|e| DhtError::Setup(e.to_string()))?
            .with_behaviour(|key| {
                let mut kad = kad::Behaviour::with_config(local_id, store, kad_config);
                kad.set_mode(match (mode, public) {
                    (DhtMode::Server, _) | (DhtMode::Auto, false) => Some(kad::Mode::Server),
                    (DhtMode::Client, _) => Some(kad::Mode::Client),
                    (DhtMode::Auto, true) => None,
                });
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(
                        mdns::Config::default(),
                        local_id,
                    )?)
                } else {
                    None
                };
                Ok::<_, BoxError>(Behaviour {
                    limits: connection_limits::Behaviour::new(
                        connection_limits::ConnectionLimits::default()
                            .with_max_pending_incoming(Some(64))
                            .with_max_established_incoming(Some(512))
                            .with_max_established_per_peer(Some(2)),
                    ),
                    kad,
                    identify: identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                            .with_agent_version(format!("cohort/{}", env!("CARGO_PKG_VERSION"))),
                    ),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| DhtError::Setup(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();

        for addr in &config.listen {
            if !config.public && !is_loopback(addr) {
                return Err(DhtError::Listen {
                    addr: addr.clone(),
                    reason: "not a loopback address; pass --public to listen on others".into(),
                });
            }
            swarm
                .listen_on(addr.clone())
                .map_err(|e| DhtError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        // Wait for the listeners' actual addresses (port 0 picks one).
        let mut listen = Vec::new();
        let deadline = tokio::time::sleep(LISTEN_DEADLINE);
        tokio::pin!(deadline);
        while listen.len() < config.listen.len() {
            tokio::select! {
                _ = &mut deadline => {
                    return Err(DhtError::Setup("the DHT listeners did not come up".into()));
                }
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        listen.push(address.with(Protocol::P2p(local_id)));
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(DhtError::Setup(format!("DHT listener: {error}")));
                    }
                    _ => {}
                },
            }
        }

        for addr in &config.bootstrap {
            if let Some((peer, plain)) = split_peer(addr)
                && peer != local_id
            {
                swarm.behaviour_mut().kad.add_address(&peer, plain);
            }
        }
        if !config.bootstrap.is_empty()
            && let Err(e) = swarm.behaviour_mut().kad.bootstrap()
        {
            tracing::debug!("DHT bootstrap: {e}");
        }

        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let stats = DhtStats {
            libp2p_peer_id: local_id.to_string(),
            listen: listen.iter().map(|a| a.to_string()).collect(),
            ..DhtStats::default()
        };
        let actor = DhtActor {
            swarm,
            rx,
            keypair: keypair.clone(),
            config,
            pending: HashMap::new(),
            provided: BTreeSet::new(),
            dropped: BTreeMap::new(),
            addrs: BTreeMap::new(),
            budget: InsertBudget::new(INSERTS_PER_MINUTE, Duration::from_secs(60), 4096),
            stats,
            had_peers: false,
        };
        Ok((DhtHandle { tx, listen }, actor))
    }

    /// Runs until `cancel` fires or every handle is dropped.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut republish = tokio::time::interval(self.config.republish_interval());
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = republish.tick() => {
                    self.put_own_addr();
                    let now = Instant::now();
                    self.dropped.retain(|_, until| *until > now);
                }
            }
        }
        // Unanswered requests see their reply channel close: `DhtError::Gone`.
        self.pending.clear();
    }

    fn allowed(&self, addr: &Multiaddr) -> bool {
        self.config.public || is_loopback(addr)
    }

    fn put_own_addr(&mut self) {
        let value = sign_addr_record(&self.keypair, unix_ms(), &self.config.iroh_addrs);
        let record = kad::Record::new(addr_key(&self.keypair.peer_id()), value);
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, kad::Quorum::One)
        {
            tracing::warn!("DHT address record: {e:?}");
        }
    }

    fn reprovide_all(&mut self) {
        let hashes: Vec<_> = self.provided.iter().copied().collect();
        for h in hashes {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(RecordKey::new(&provider_key(&h)))
            {
                tracing::warn!(%h, "DHT provide: {e:?}");
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Provide { hashes, reply } => {
                let mut new = 0;
                for h in hashes {
                    if self.provided.contains(&h) || self.provided.len() >= MAX_PROVIDED {
                        continue;
                    }
                    match self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .start_providing(RecordKey::new(&provider_key(&h)))
                    {
                        Ok(_) => {
                            self.provided.insert(h);
                            new += 1;
                        }
                        Err(e) => tracing::warn!(%h, "DHT provide: {e:?}"),
                    }
                }
                reply.send(new).ok();
            }
            Command::FindProviders { hash, reply } => {
                if self.pending.len() >= MAX_LOOKUPS {
                    self.stats.busy += 1;
                    reply.send(Err(DhtError::Busy)).ok();
                    return;
                }
                self.stats.lookups += 1;
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(RecordKey::new(&provider_key(&hash)));
                self.pending.insert(
                    id,
                    Pending::Providers {
                        hash,
                        started: Instant::now(),
                        first: None,
                        found: BTreeSet::new(),
                        reply,
                    },
                );
            }
            Command::Resolve { peer, reply } => {
                let fresh_after =
                    unix_ms().saturating_sub(self.config.record_ttl.as_millis() as u64);
                if let Some((addrs, _)) = self.addrs.get(&peer).filter(|(_, at)| *at >= fresh_after)
                {
                    reply
                        .send(Ok(AddrLookup {
                            addrs: addrs.clone(),
                            cached: true,
                            ms: 0.0,
                            messages: 0,
                        }))
                        .ok();
                    return;
                }
                if peer == self.keypair.peer_id() {
                    reply
                        .send(Ok(AddrLookup {
                            addrs: self.config.iroh_addrs.clone(),
                            cached: true,
                            ms: 0.0,
                            messages: 0,
                        }))
                        .ok();
                    return;
                }
                if self.pending.len() >= MAX_LOOKUPS {
                    self.stats.busy += 1;
                    reply.send(Err(DhtError::Busy)).ok();
                    return;
                }
                self.stats.resolves += 1;
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(RecordKey::new(&addr_key(&peer)));
                self.pending.insert(
                    id,
                    Pending::Resolve {
                        peer,
                        started: Instant::now(),
                        reply,
                    },
                );
            }
            Command::DropProvider { hash, peer } => {
                self.stats.dropped_providers += 1;
                let until = Instant::now() + self.config.record_ttl;
                if self.dropped.len() < 1 << 16 {
                    self.dropped.insert((hash, peer), until);
                }
                self.addrs.remove(&peer);
                let key = RecordKey::new(&provider_key(&hash));
                self.swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .remove_provider(&key, &libp2p_peer_id(&peer));
            }
            Command::Stats { reply } => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                let mut s = self.stats.clone();
                s.mode = kad.mode().to_string();
                s.routing_peers = kad.kbuckets().map(|b| b.num_entries()).sum();
                s.provided = self.provided.len();
                reply.send(s).ok();
            }
        }
    }

    fn finish_providers(&mut self, id: QueryId, messages: u32) {
        if let Some(Pending::Providers {
            started,
            first,
            found,
            reply,
            ..
        }) = self.pending.remove(&id)
        {
            if !found.is_empty() {
                self.stats.lookups_found += 1;
            }
            let lookup = ProviderLookup {
                providers: found.into_iter().collect(),
                first_ms: first.map(|(d, _)| ms(d)),
                first_messages: first.map(|(_, m)| m),
                total_ms: ms(started.elapsed()),
                messages,
            };
            reply.send(Ok(lookup)).ok();
        }
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            q.finish();
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, stats: kad::QueryStats, last: bool) {
        let messages = stats.num_requests();
        match result {
            QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { providers, .. })) => {
                let me = self.keypair.peer_id();
                let now = Instant::now();
                let mut enough = false;
                if let Some(Pending::Providers {
                    hash,
                    started,
                    first,
                    found,
                    ..
                }) = self.pending.get_mut(&id)
                {
                    for p in providers.iter().filter_map(peer_id_of_libp2p) {
                        let dropped = self
                            .dropped
                            .get(&(*hash, p))
                            .is_some_and(|until| *until > now);
                        if p != me && !dropped {
                            found.insert(p);
                        }
                    }
                    if first.is_none() && !found.is_empty() {
                        *first = Some((started.elapsed(), messages));
                    }
                    enough = found.len() >= ENOUGH_PROVIDERS;
                }
                if enough || last {
                    self.finish_providers(id, messages);
                }
            }
            QueryResult::GetProviders(_) => self.finish_providers(id, messages),
            QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                let Some(Pending::Resolve { peer, .. }) = self.pending.get(&id) else {
                    return;
                };
                let peer = *peer;
                match verify_addr_record(
                    found.record.key.as_ref(),
                    &found.record.value,
                    unix_ms(),
                    self.config.record_ttl,
                ) {
                    Ok(rec) if rec.peer == peer => {
                        let addrs: Vec<_> = rec
                            .addrs
                            .into_iter()
                            .filter(|a| self.config.public || a.ip().is_loopback())
                            .collect();
                        if self.addrs.len() >= MAX_CACHED_ADDRS {
                            self.addrs.pop_first();
                        }
                        self.addrs.insert(peer, (addrs.clone(), rec.issued_ms));
                        if let Some(Pending::Resolve { started, reply, .. }) =
                            self.pending.remove(&id)
                        {
                            reply
                                .send(Ok(AddrLookup {
                                    addrs,
                                    cached: false,
                                    ms: ms(started.elapsed()),
                                    messages,
                                }))
                                .ok();
                        }
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                    Ok(_) => self.stats.bad_records += 1,
                    Err(e) => {
                        self.stats.bad_records += 1;
                        tracing::debug!(peer = %peer.short(), "bad address record: {e}");
                    }
                }
                if last {
                    self.fail_resolve(id);
                }
            }
            QueryResult::GetRecord(_) => self.fail_resolve(id),
            QueryResult::StartProviding(Err(e)) | QueryResult::RepublishProvider(Err(e)) => {
                tracing::debug!("DHT provide: {e}");
            }
            QueryResult::PutRecord(Err(e)) => tracing::debug!("DHT address record: {e}"),
            QueryResult::Bootstrap(Err(e)) => tracing::debug!("DHT bootstrap: {e}"),
            _ => {}
        }
    }

    fn fail_resolve(&mut self, id: QueryId) {
        if let Some(Pending::Resolve { peer, reply, .. }) = self.pending.remove(&id) {
            reply.send(Err(DhtError::NoAddress(peer.to_string()))).ok();
        }
    }

    fn on_inbound(&mut self, request: kad::InboundRequest) {
        self.stats.inbound_requests += 1;
        let now = Instant::now();
        match request {
            kad::InboundRequest::AddProvider {
                record: Some(record),
            } => {
                // libp2p-kad has checked that the record names the peer that sent it.
                if hash_of_provider_key(record.key.as_ref()).is_none() {
                    self.stats.bad_records += 1;
                    return;
                }
                if !self.budget.allow(record.provider, now) {
                    self.stats.rate_limited += 1;
                    return;
                }
                let mut record = record;
                record
                    .addresses
                    .retain(|a| self.config.public || is_loopback(a));
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(record)
                {
                    Ok(()) => self.stats.records_stored += 1,
                    Err(_) => self.stats.store_full += 1,
                }
            }
            kad::InboundRequest::PutRecord {
                source,
                record: Some(record),
                ..
            } => {
                if !self.budget.allow(source, now) {
                    self.stats.rate_limited += 1;
                    return;
                }
                // Only address records are stored, and only valid ones (any peer may
                // replicate another's record; the signature says whose it is).
                if let Err(e) = verify_addr_record(
                    record.key.as_ref(),
                    &record.value,
                    unix_ms(),
                    self.config.record_ttl,
                ) {
                    self.stats.bad_records += 1;
                    tracing::debug!(%source, "refused a DHT record: {e}");
                    return;
                }
                match self.swarm.behaviour_mut().kad.store_mut().put(record) {
                    Ok(()) => self.stats.records_stored += 1,
                    Err(_) => self.stats.store_full += 1,
                }
            }
            _ => {}
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => match ev {
                kad::Event::OutboundQueryProgressed {
                    id,
                    result,
                    stats,
                    step,
                } => self.on_query(id, result, stats, step.last),
                kad::Event::InboundRequest { request } => self.on_inbound(request),
                // The first peer: publish what was queued while alone.
                kad::Event::RoutingUpdated { .. } if !self.had_peers => {
                    self.had_peers = true;
                    self.put_own_addr();
                    self.reprovide_all();
                }
                _ => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs.into_iter().take(16) {
                    if self.allowed(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if self.allowed(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                let s = full.to_string();
                if !self.stats.listen.contains(&s) {
                    self.stats.listen.push(s);
                }
            }
            SwarmEvent::OutgoingConnectionError { .. }
            | SwarmEvent::IncomingConnectionError { .. } => self.stats.connection_errors += 1,
            SwarmEvent::ConnectionClosed {
                cause: Some(cause), ..
            } => {
                self.stats.connection_errors += 1;
                tracing::trace!("DHT connection closed: {cause}");
            }
            _ => {}
        }
    }
}
