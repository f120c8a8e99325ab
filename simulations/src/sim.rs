//! The simulation core: nodes, events, the run loop.
//!
//! Modelled on iroh-gossip's `proto/sim.rs`. A [`Simulation`] owns
//!
//! - the nodes, in a `BTreeMap` keyed by [`NodeId`] so every iteration is in id order;
//! - one [`EventQueue`] of message deliveries and timers, ordered by `(time, sequence)`;
//! - the [`Network`], which turns "send these bytes" into an arrival time;
//! - the virtual clock, which jumps to each event's time as it is handled.
//!
//! Nodes are sans-IO state machines ([`Node`]): the simulator hands one an [`Input`] (bytes
//! from a peer, or a timer it asked for) and the current virtual time; the node answers by
//! pushing [`Action`]s (send bytes to a peer, schedule a timer) into an [`Outbox`]. A node
//! never sees the queue, the network or the clock except through these. Messages are byte
//! strings (`Arc<[u8]>`, so forwarding one message to many peers shares one buffer): nodes
//! speak the real wire format, and a message's size on the network is its real size.
//!
//! Nothing here reads the wall clock, the OS random source or a hash map's iteration order, so
//! a run is a function of its inputs: the same nodes, network seed and initial events give the
//! same sequence of events.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::network::Network;
use crate::queue::EventQueue;
use crate::time::{SimDuration, SimTime};

/// A node's index in a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the simulator hands a node.
#[derive(Debug)]
pub enum Input<T> {
    /// A message from a peer has fully arrived.
    Message {
        /// The sender.
        from: NodeId,
        /// The bytes as they were sent (or as a faulty sender mangled them).
        bytes: Arc<[u8]>,
    },
    /// A timer the node scheduled has expired.
    Timer(T),
}

/// What a node asks the simulator to do.
#[derive(Debug)]
pub enum Action<T> {
    /// Send bytes to a peer.
    Send {
        /// The receiver.
        to: NodeId,
        /// The bytes.
        bytes: Arc<[u8]>,
    },
    /// Hand `timer` back to the node after `after`.
    Schedule {
        /// How long from now.
        after: SimDuration,
        /// What to hand back.
        timer: T,
    },
}

/// Where a node puts its actions while handling one input. They are carried out in the order
/// they were pushed.
#[derive(Debug)]
pub struct Outbox<T> {
    actions: Vec<Action<T>>,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Self {
            actions: Vec::new(),
        }
    }
}

impl<T> Outbox<T> {
    /// Sends `bytes` to `to`.
    pub fn send(&mut self, to: NodeId, bytes: Arc<[u8]>) {
        self.actions.push(Action::Send { to, bytes });
    }

    /// Schedules `timer` to come back after `after`.
    pub fn schedule(&mut self, after: SimDuration, timer: T) {
        self.actions.push(Action::Schedule { after, timer });
    }

    /// The actions pushed so far.
    pub fn actions(&self) -> &[Action<T>] {
        &self.actions
    }
}

/// A simulated node: a state machine driven by inputs and virtual time.
pub trait Node {
    /// The node's timers.
    type Timer;

    /// Handles one input at virtual time `now`, pushing what it wants done into `out`.
    fn handle(&mut self, now: SimTime, input: Input<Self::Timer>, out: &mut Outbox<Self::Timer>);
}

/// What is in the event queue.
#[derive(Debug)]
enum Event<T> {
    Deliver {
        from: NodeId,
        to: NodeId,
        bytes: Arc<[u8]>,
    },
    Timer {
        node: NodeId,
        timer: T,
    },
}

/// Counters kept by the simulator (traffic per node is on the [`Network`]'s uplinks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Events taken from the queue and handled.
    pub events: u64,
    /// Messages handed to the network.
    pub messages_sent: u64,
    /// Bytes handed to the network.
    pub bytes_sent: u64,
    /// Messages handed to their receiver.
    pub messages_delivered: u64,
    /// Timers handed back to their node.
    pub timers_fired: u64,
    /// Messages or timers addressed to a node that does not exist (dropped).
    pub undeliverable: u64,
}

/// Why [`Simulation::run_until`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// No event is left.
    Drained,
    /// The next event is due after the limit; it is still queued.
    TimeLimit,
}

/// A deterministic discrete-event simulation of nodes of type `N`.
#[derive(Debug)]
pub struct Simulation<N: Node> {
    now: SimTime,
    nodes: BTreeMap<NodeId, N>,
    queue: EventQueue<Event<N::Timer>>,
    network: Network,
    stats: SimStats,
    outbox: Outbox<N::Timer>,
}

impl<N: Node> Simulation<N> {
    /// An empty simulation at time zero on `network`.
    pub fn new(network: Network) -> Self {
        Self {
            now: SimTime::ZERO,
            nodes: BTreeMap::new(),
            queue: EventQueue::new(),
            network,
            stats: SimStats::default(),
            outbox: Outbox::default(),
        }
    }

    /// Adds a node (replacing any node with the same id) and puts it on the network.
    pub fn add_node(&mut self, id: NodeId, node: N) {
        self.network.add_node(id);
        self.nodes.insert(id, node);
    }

    /// The current virtual time: the time of the last event handled.
    pub fn now(&self) -> SimTime {
        self.now
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> Option<&N> {
        self.nodes.get(&id)
    }

    /// A node, to change it between events.
    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut N> {
        self.nodes.get_mut(&id)
    }

    /// Every node, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &N)> {
        self.nodes.iter().map(|(id, n)| (*id, n))
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The network, e.g. to set a node's bandwidth.
    pub fn network_mut(&mut self) -> &mut Network {
        &mut self.network
    }

    /// The simulator's counters.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// How many events are waiting.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Schedules `timer` for `node` at `at` (not before the current time).
    pub fn schedule(&mut self, at: SimTime, node: NodeId, timer: N::Timer) {
        self.queue
            .push(at.max(self.now), Event::Timer { node, timer });
    }

    /// Handles the next event, if any; returns its time.
    pub fn step(&mut self) -> Option<SimTime> {
        let (at, event) = self.queue.pop()?;
        self.handle(at, event);
        Some(at)
    }

    /// Handles events until none is left or the next one is due after `limit`.
    pub fn run_until(&mut self, limit: SimTime) -> RunOutcome {
        loop {
            match self.queue.peek_time() {
                None => return RunOutcome::Drained,
                Some(at) if at > limit => return RunOutcome::TimeLimit,
                Some(_) => {
                    self.step();
                }
            }
        }
    }

    fn handle(&mut self, at: SimTime, event: Event<N::Timer>) {
        debug_assert!(
            at >= self.now,
            "time went backwards: {at} after {}",
            self.now
        );
        self.now = at;
        self.stats.events += 1;
        let (node_id, input) = match event {
            Event::Deliver { from, to, bytes } => (to, Input::Message { from, bytes }),
            Event::Timer { node, timer } => (node, Input::Timer(timer)),
        };
        let Some(node) = self.nodes.get_mut(&node_id) else {
            self.stats.undeliverable += 1;
            return;
        };
        match &input {
            Input::Message { .. } => self.stats.messages_delivered += 1,
            Input::Timer(_) => self.stats.timers_fired += 1,
        }
        let mut out = std::mem::take(&mut self.outbox);
        node.handle(at, input, &mut out);
        for action in out.actions.drain(..) {
            match action {
                Action::Send { to, bytes } => self.send(node_id, to, bytes),
                Action::Schedule { after, timer } => {
                    self.queue.push(
                        at + after,
                        Event::Timer {
                            node: node_id,
                            timer,
                        },
                    );
                }
            }
        }
        // Keep the buffer's allocation for the next event.
        self.outbox = out;
    }

    fn send(&mut self, from: NodeId, to: NodeId, bytes: Arc<[u8]>) {
        if !self.nodes.contains_key(&to) {
            self.stats.undeliverable += 1;
            return;
        }
        match self.network.transmit(self.now, from, to, bytes.len()) {
            Ok(t) => {
                self.stats.messages_sent += 1;
                self.stats.bytes_sent += bytes.len() as u64;
                self.queue
                    .push(t.arrival, Event::Deliver { from, to, bytes });
            }
            // Every node added through `add_node` is on the network; count rather than panic
            // if a caller replaced the network's view of it.
            Err(_) => self.stats.undeliverable += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{LatencyModel, NetworkConfig};

    /// Echoes every message back once, records what it saw.
    #[derive(Debug, Default)]
    struct Recorder {
        seen: Vec<(SimTime, String)>,
    }

    impl Node for Recorder {
        type Timer = &'static str;

        fn handle(
            &mut self,
            now: SimTime,
            input: Input<&'static str>,
            out: &mut Outbox<&'static str>,
        ) {
            match input {
                Input::Timer(name) => {
                    self.seen.push((now, format!("timer {name}")));
                    if name == "ping" {
                        out.send(NodeId(1), Arc::from(&b"ping"[..]));
                        out.send(NodeId(2), Arc::from(&b"ping"[..]));
                        out.send(NodeId(99), Arc::from(&b"lost"[..]));
                        out.schedule(SimDuration::from_millis(1), "later");
                    }
                }
                Input::Message { from, bytes } => {
                    self.seen.push((
                        now,
                        format!("{} from {from}", String::from_utf8_lossy(&bytes)),
                    ));
                    if &bytes[..] == b"ping" {
                        out.send(from, Arc::from(&b"pong"[..]));
                    }
                }
            }
        }
    }

    fn sim() -> Simulation<Recorder> {
        let config = NetworkConfig {
            latency: LatencyModel::Constant(SimDuration::from_millis(10)),
            upload_bytes_per_sec: 4_000, // 4 bytes take 1 ms
        };
        let mut sim = Simulation::new(Network::new(config, 1).unwrap());
        for i in 0..3 {
            sim.add_node(NodeId(i), Recorder::default());
        }
        sim
    }

    #[test]
    fn messages_and_timers_flow_through_the_network_in_virtual_time() {
        let mut sim = sim();
        sim.schedule(SimTime::ZERO, NodeId(0), "ping");
        assert_eq!(sim.run_until(SimTime::MAX), RunOutcome::Drained);
        let n0 = &sim.node(NodeId(0)).unwrap().seen;
        // Ping to 1 leaves at 1 ms, arrives at 11 ms; its pong leaves 1 at 12 ms, arrives 22 ms.
        // Ping to 2 queues behind the first: leaves at 2 ms, arrives 12 ms, pong arrives 23 ms.
        assert_eq!(
            n0,
            &[
                (SimTime::ZERO, "timer ping".to_owned()),
                (SimTime::from_millis(1), "timer later".to_owned()),
                (SimTime::from_millis(22), "pong from 1".to_owned()),
                (SimTime::from_millis(23), "pong from 2".to_owned()),
            ]
        );
        assert_eq!(
            sim.node(NodeId(2)).unwrap().seen,
            [(SimTime::from_millis(12), "ping from 0".to_owned())]
        );
        let s = sim.stats();
        assert_eq!(
            (
                s.events,
                s.messages_sent,
                s.messages_delivered,
                s.timers_fired,
                s.undeliverable
            ),
            (6, 4, 4, 2, 1)
        );
        assert_eq!(s.bytes_sent, 16);
        assert_eq!(sim.now(), SimTime::from_millis(23));
    }

    #[test]
    fn the_time_limit_stops_before_later_events() {
        let mut sim = sim();
        sim.schedule(SimTime::ZERO, NodeId(0), "ping");
        assert_eq!(
            sim.run_until(SimTime::from_millis(15)),
            RunOutcome::TimeLimit
        );
        assert_eq!(sim.now(), SimTime::from_millis(12));
        assert_eq!(sim.pending(), 2);
        assert_eq!(sim.run_until(SimTime::MAX), RunOutcome::Drained);
        assert_eq!(sim.now(), SimTime::from_millis(23));
    }

    #[test]
    fn simultaneous_events_are_handled_in_scheduling_order() {
        let mut sim = sim();
        for name in ["b", "a", "c"] {
            sim.schedule(SimTime::from_millis(5), NodeId(1), name);
        }
        sim.schedule(SimTime::from_millis(4), NodeId(1), "z");
        sim.run_until(SimTime::MAX);
        let names: Vec<_> = sim
            .node(NodeId(1))
            .unwrap()
            .seen
            .iter()
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(names, ["timer z", "timer b", "timer a", "timer c"]);
    }
}
