//! The CLI's client of a running node's JSON API: a small blocking HTTP/1.1 client over a
//! loopback TCP connection (one request per connection), so the CLI needs no HTTP stack of its
//! own.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::data_dir::DataDir;
use crate::node::{NODE_FILE, NodeFile, TOKEN_FILE};

/// Why a call to the node's API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No node is running on this data directory.
    #[error(
        "no node is running on {0}: start one with `cohort up --data-dir {0}` (datanet commands \
         are served by the running node)"
    )]
    NoNode(String),
    /// The connection failed.
    #[error("node API at {addr}: {source}")]
    Io {
        /// The API's address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The node answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The node's message.
        message: String,
    },
    /// The answer was not HTTP/JSON.
    #[error("node API at {addr}: unreadable answer: {reason}")]
    Garbled {
        /// The API's address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// A client of one node's API.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    token: Option<String>,
    /// The node's `node.json`.
    pub node: NodeFile,
}

impl Client {
    /// The client of the node running on `dir`, if one is (its `node.json` exists and its API
    /// answers).
    pub fn for_data_dir(dir: &DataDir) -> Result<Self, ClientError> {
        let no_node = || ClientError::NoNode(dir.root().display().to_string());
        let text = std::fs::read_to_string(dir.root().join(NODE_FILE)).map_err(|_| no_node())?;
        let node: NodeFile = serde_json::from_str(&text).map_err(|_| no_node())?;
        // A node killed with SIGKILL leaves its node.json behind: check that it answers.
        TcpStream::connect_timeout(&node.http, Duration::from_secs(2)).map_err(|_| no_node())?;
        let token = std::fs::read_to_string(dir.root().join(TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_owned());
        Ok(Self {
            addr: node.http,
            token,
            node,
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body and the bearer token.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request("POST", path, Some(body))
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let io = |source| ClientError::Io {
            addr: self.addr,
            source,
        };
        let garbled = |reason: String| ClientError::Garbled {
            addr: self.addr,
            reason,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.addr
        );
        if method == "POST" {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            if let Some(t) = &self.token {
                head.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
        }
        head.push_str("\r\n");
        let mut stream = TcpStream::connect(self.addr).map_err(io)?;
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body.as_bytes()).map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| garbled("no header end".into()))?;
        let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut payload = raw[split + 4..].to_vec();
        let status: u16 = headers
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| garbled(format!("bad status line in {headers:?}")))?;
        if headers.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        }) {
            payload = dechunk(&payload).ok_or_else(|| garbled("bad chunked body".into()))?;
        }
        let value: Value = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&payload).map_err(|e| {
                garbled(format!(
                    "status {status}, body {:?}: {e}",
                    String::from_utf8_lossy(&payload)
                ))
            })?
        };
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            // The node's API says `{"error": "..."}`; the OpenAI routes `{"error": {"message"}}`.
            let message = value
                .get("error")
                .and_then(|e| e.as_str().or_else(|| e["message"].as_str()))
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}: {value}"));
            Err(ClientError::Api { status, message })
        }
    }
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde".to_vec()
        );
        assert!(dechunk(b"5\r\nab").is_none());
    }
}
