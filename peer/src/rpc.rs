//! The `cohort/1` protocol on the wire: length-prefixed frames over one bidirectional stream
//! per request, and the client side of a call. The server side is [`crate::node`]'s handler.

use std::time::Duration;

use cohort_protocol::types::rpc::{
    ALPN, MAX_FRAME_BYTES, RPC_VERSION, Request, RequestBody, Response,
};
use cohort_protocol::{Canonical, DecodeError, encoding};
use iroh::Endpoint;
use iroh::endpoint::{RecvStream, SendStream};

/// How long one call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME_BYTES}-byte limit")]
    Oversized(u64),
    /// The stream failed.
    #[error("stream: {0}")]
    Io(String),
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No connection to the peer.
    #[error("connecting to {peer}: {reason}")]
    Connect {
        /// The peer.
        peer: String,
        /// What failed.
        reason: String,
    },
    /// The exchange failed.
    #[error("call to {peer}: {source}")]
    Frame {
        /// The peer.
        peer: String,
        /// What failed.
        #[source]
        source: FrameError,
    },
    /// The call took longer than [`CALL_TIMEOUT`].
    #[error("call to {0} timed out")]
    Timeout(String),
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, bytes: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::Oversized(bytes.len() as u64))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized(bytes.len() as u64));
    }
    send.write_all(&len.to_le_bytes())
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    send.write_all(bytes)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))
}

/// Reads one frame's bytes, refusing one over the limit before reading it.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized(len as u64));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(buf)
}

/// Decodes a frame's bytes with the frame limit.
pub fn decode_frame<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, DecodeError> {
    encoding::decode_limited::<T, MAX_FRAME_BYTES>(bytes)
}

/// Sends raw request bytes to `peer` and returns the raw response bytes.
pub async fn call_raw(
    endpoint: &Endpoint,
    peer: impl Into<iroh::EndpointAddr>,
    request: &[u8],
) -> Result<Vec<u8>, CallError> {
    let addr: iroh::EndpointAddr = peer.into();
    let name = addr.id.to_string();
    let exchange = async {
        let conn = endpoint
            .connect(addr, ALPN)
            .await
            .map_err(|e| CallError::Connect {
                peer: name.clone(),
                reason: e.to_string(),
            })?;
        let frame = |source| CallError::Frame {
            peer: name.clone(),
            source,
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| frame(FrameError::Io(e.to_string())))?;
        write_frame(&mut send, request).await.map_err(frame)?;
        send.finish()
            .map_err(|e| frame(FrameError::Io(e.to_string())))?;
        let bytes = read_frame(&mut recv).await.map_err(frame)?;
        conn.close(0u32.into(), b"done");
        Ok(bytes)
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| CallError::Timeout(name.clone()))?
}

/// Sends a request to `peer` and decodes the response.
pub async fn call(
    endpoint: &Endpoint,
    peer: impl Into<iroh::EndpointAddr>,
    body: RequestBody,
) -> Result<Response, CallError> {
    let addr: iroh::EndpointAddr = peer.into();
    let name = addr.id.to_string();
    let request = Request {
        version: RPC_VERSION,
        body,
    }
    .to_bytes();
    let bytes = call_raw(endpoint, addr, &request).await?;
    decode_frame(&bytes).map_err(|e| CallError::Frame {
        peer: name,
        source: e.into(),
    })
}
