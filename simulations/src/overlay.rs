//! Random overlays: who is connected to whom.
//!
//! [`Overlay::random`] builds a connected, symmetric, nearly regular random graph:
//!
//! 1. a ring through all nodes in a random order, so the graph is connected whatever follows;
//! 2. then each node in turn, while it has fewer than `degree` neighbours, connects to a random
//!    node that is not yet a neighbour, preferring nodes that also have fewer than `degree`
//!    (up to 64 tries before it accepts any node).
//!
//! Every node ends with at least `degree` neighbours and most with exactly `degree`; a few end
//! with one or two more. This approximates the active views of a HyParView overlay (what
//! iroh-gossip keeps) without simulating its membership protocol.

use std::collections::{BTreeSet, VecDeque};

use rand::Rng;
use rand::seq::SliceRandom as _;

use crate::sim::NodeId;

/// How many random picks a node tries before it accepts a partner that is already full.
const PREFERRED_TRIES: usize = 64;

/// A symmetric graph over nodes `0..len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlay {
    neighbours: Vec<Vec<NodeId>>,
}

/// An overlay that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// Fewer than two nodes.
    #[error("an overlay needs at least 2 nodes, got {nodes}")]
    TooFewNodes {
        /// The requested node count.
        nodes: usize,
    },
    /// The degree is below 2 or not below the node count.
    #[error("degree must be between 2 and nodes - 1 = {max}, got {degree}", max = nodes.saturating_sub(1))]
    BadDegree {
        /// The requested degree.
        degree: usize,
        /// The requested node count.
        nodes: usize,
    },
    /// More nodes than node ids.
    #[error("at most {} nodes, got {nodes}", u32::MAX)]
    TooManyNodes {
        /// The requested node count.
        nodes: usize,
    },
}

impl Overlay {
    /// A random connected overlay of `nodes` nodes, each with at least `degree` neighbours.
    pub fn random(nodes: usize, degree: usize, rng: &mut impl Rng) -> Result<Self, OverlayError> {
        if nodes < 2 {
            return Err(OverlayError::TooFewNodes { nodes });
        }
        if u32::try_from(nodes).is_err() {
            return Err(OverlayError::TooManyNodes { nodes });
        }
        if degree < 2 || degree >= nodes {
            return Err(OverlayError::BadDegree { degree, nodes });
        }
        let mut adj: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); nodes];
        fn connect(adj: &mut [BTreeSet<usize>], a: usize, b: usize) {
            adj[a].insert(b);
            adj[b].insert(a);
        }

        let mut order: Vec<usize> = (0..nodes).collect();
        order.shuffle(rng);
        for (i, &a) in order.iter().enumerate() {
            let b = order[(i + 1) % nodes];
            connect(&mut adj, a, b);
        }

        for a in 0..nodes {
            while adj[a].len() < degree {
                let usable = |adj: &[BTreeSet<usize>], b: usize| b != a && !adj[a].contains(&b);
                let preferred = (0..PREFERRED_TRIES)
                    .map(|_| rng.random_range(0..nodes))
                    .find(|&b| usable(&adj, b) && adj[b].len() < degree);
                let partner = preferred.or_else(|| {
                    // Any node that is not yet a neighbour, scanning from a random start.
                    let start = rng.random_range(0..nodes);
                    (0..nodes)
                        .map(|k| (start + k) % nodes)
                        .find(|&b| usable(&adj, b))
                });
                match partner {
                    Some(b) => connect(&mut adj, a, b),
                    // Connected to everyone already (cannot happen with degree < nodes).
                    None => break,
                }
            }
        }

        let neighbours = adj
            .into_iter()
            .map(|set| set.into_iter().map(|b| NodeId(b as u32)).collect())
            .collect();
        Ok(Self { neighbours })
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }

    /// A node's neighbours in increasing id order (empty for an unknown node).
    pub fn neighbours(&self, node: NodeId) -> &[NodeId] {
        self.neighbours
            .get(node.0 as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// The number of (undirected) edges.
    pub fn edges(&self) -> usize {
        self.neighbours.iter().map(Vec::len).sum::<usize>() / 2
    }

    /// The mean number of neighbours.
    pub fn mean_degree(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        (2 * self.edges()) as f64 / self.len() as f64
    }

    /// The fewest and most neighbours of any node.
    pub fn degree_range(&self) -> (usize, usize) {
        let degrees = self.neighbours.iter().map(Vec::len);
        (
            degrees.clone().min().unwrap_or(0),
            degrees.max().unwrap_or(0),
        )
    }

    /// Hop distances from `start` over nodes for which `allowed` holds (breadth-first);
    /// `None` for nodes that cannot be reached that way, and for every node if `start` is not
    /// allowed.
    pub fn distances_from(
        &self,
        start: NodeId,
        allowed: impl Fn(NodeId) -> bool,
    ) -> Vec<Option<u32>> {
        let mut dist = vec![None; self.len()];
        if (start.0 as usize) >= self.len() || !allowed(start) {
            return dist;
        }
        dist[start.0 as usize] = Some(0);
        let mut queue = VecDeque::from([(start, 0u32)]);
        while let Some((n, d)) = queue.pop_front() {
            for &m in self.neighbours(n) {
                if allowed(m) && dist[m.0 as usize].is_none() {
                    dist[m.0 as usize] = Some(d + 1);
                    queue.push_back((m, d + 1));
                }
            }
        }
        dist
    }

    /// Whether every node can reach every other, using only nodes for which `allowed` holds
    /// (pass `|_| true` for the whole graph). Nodes not allowed are neither start nor target.
    pub fn is_connected_among(&self, allowed: impl Fn(NodeId) -> bool) -> bool {
        let Some(start) = (0..self.len())
            .map(|i| NodeId(i as u32))
            .find(|&n| allowed(n))
        else {
            return true;
        };
        let dist = self.distances_from(start, &allowed);
        (0..self.len()).all(|i| dist[i].is_some() || !allowed(NodeId(i as u32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::rng_for;

    #[test]
    fn random_overlays_are_symmetric_connected_and_nearly_regular() {
        for (nodes, degree) in [(3, 2), (50, 4), (500, 8), (64, 63)] {
            let o = Overlay::random(nodes, degree, &mut rng_for(3, 0, 0)).unwrap();
            assert_eq!(o.len(), nodes);
            for a in 0..nodes {
                let a = NodeId(a as u32);
                for &b in o.neighbours(a) {
                    assert_ne!(a, b);
                    assert!(o.neighbours(b).contains(&a), "{a} -> {b} not symmetric");
                }
                assert!(o.neighbours(a).windows(2).all(|w| w[0] < w[1]));
            }
            let (min, max) = o.degree_range();
            assert!(min >= degree, "{nodes}/{degree}: min degree {min}");
            assert!(max <= degree + 3, "{nodes}/{degree}: max degree {max}");
            assert!(o.mean_degree() < degree as f64 + 0.2, "{}", o.mean_degree());
            assert!(o.is_connected_among(|_| true));
        }
    }

    #[test]
    fn the_same_rng_gives_the_same_overlay() {
        let a = Overlay::random(300, 6, &mut rng_for(9, 1, 0)).unwrap();
        let b = Overlay::random(300, 6, &mut rng_for(9, 1, 0)).unwrap();
        let c = Overlay::random(300, 6, &mut rng_for(10, 1, 0)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn connectivity_among_a_subset() {
        // A 2-regular overlay on 10 nodes is exactly the ring: removing two nodes that are not
        // neighbours cuts it in two.
        let o = Overlay::random(10, 2, &mut rng_for(1, 0, 0)).unwrap();
        assert_eq!(o.edges(), 10);
        let a = NodeId(0);
        let far = (0..10)
            .map(NodeId)
            .find(|&b| b != a && !o.neighbours(a).contains(&b))
            .unwrap();
        assert!(!o.is_connected_among(|n| n != a && n != far));
        assert!(o.is_connected_among(|n| n != a));
        // Around the ring from `a`: two nodes at each distance 1..=4, one at 5.
        let mut dist: Vec<u32> = o
            .distances_from(a, |_| true)
            .into_iter()
            .map(Option::unwrap)
            .collect();
        dist.sort();
        assert_eq!(dist, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]);
        let cut = o.distances_from(a, |n| n != far);
        assert_eq!(cut.iter().filter(|d| d.is_none()).count(), 1);
        assert!(o.distances_from(a, |n| n != a).iter().all(Option::is_none));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut rng = rng_for(0, 0, 0);
        assert_eq!(
            Overlay::random(1, 2, &mut rng),
            Err(OverlayError::TooFewNodes { nodes: 1 })
        );
        assert_eq!(
            Overlay::random(10, 1, &mut rng),
            Err(OverlayError::BadDegree {
                degree: 1,
                nodes: 10
            })
        );
        let err = Overlay::random(10, 10, &mut rng).unwrap_err();
        assert_eq!(
            err.to_string(),
            "degree must be between 2 and nodes - 1 = 9, got 10"
        );
    }
}
