//! A transport wrapper that refuses to dial anything but the loopback interface.
//!
//! Kademlia learns addresses from other peers' answers and dials them; on a loopback-only node
//! (no `--public`) this wrapper makes sure none of them is ever another host, whatever a peer
//! claims.

use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::Multiaddr;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};

use super::is_loopback;

/// `inner`, dialling loopback addresses only when `loopback_only` is set.
#[derive(Debug)]
pub struct LoopbackOnly<T> {
    inner: T,
    loopback_only: bool,
}

impl<T> LoopbackOnly<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, loopback_only: bool) -> Self {
        Self {
            inner,
            loopback_only,
        }
    }
}

impl<T: Transport + Unpin> Transport for LoopbackOnly<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        if self.loopback_only && !is_loopback(&addr) {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if self.loopback_only && !is_loopback(&addr) {
            tracing::debug!(%addr, "refused to dial a non-loopback address");
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}
