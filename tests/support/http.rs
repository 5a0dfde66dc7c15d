//! Plain HTTP/1.0 to the metrics port (`/metrics`, `/healthz`), for the tests that
//! read it: the in-process server's (`support::TestServer`) and the binary's.

#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The `/metrics` page at `addr`; a failed test unless it answers 200.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.unwrap_or_else(|error| panic!("scrape {addr}: {error}"));
    assert_eq!(status, 200, "/metrics at {addr}: {body}");
    body
}
