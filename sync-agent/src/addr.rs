//! A peer's address as configured: `192.0.2.10:7878`, `[2001:db8::1]:7878`, or a
//! host name with a port (`jellyfin-b.lan:7878`, a Kubernetes service name).
//!
//! Host names are resolved at each connect, not once at start: a standby that
//! moves (DHCP, a rescheduled pod) is found again on the next reconnect. An
//! address that is already an IP and port takes a fast path with no lookup.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;

/// `host:port`, checked for shape when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PeerAddr(String);

impl PeerAddr {
    /// The address as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Resolves the address now. An IP address needs no lookup; for a name,
    /// an IPv4 result is preferred (agents usually listen on `0.0.0.0`).
    ///
    /// # Errors
    /// The name does not resolve (the error names it).
    pub async fn resolve(&self) -> Result<SocketAddr> {
        if let Ok(a) = self.0.parse::<SocketAddr>() {
            return Ok(a);
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host(self.0.as_str())
            .await
            .with_context(|| format!("resolving peer address {}", self.0))?
            .collect();
        found
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| found.first())
            .copied()
            .with_context(|| format!("peer address {} resolves to nothing", self.0))
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> Self {
        Self(a.to_string())
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.parse::<SocketAddr>().is_ok() {
            return Ok(Self(s.to_string()));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            bail!("address {s:?} has no port (expected host:port, e.g. jellyfin-b.lan:7878)");
        };
        if port.parse::<u16>().is_err() {
            bail!("address {s:?}: port {port:?} is not a number from 0 to 65535");
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            bail!("address {s:?}: {host:?} is neither an IP address nor a host name");
        }
        Ok(Self(s.to_string()))
    }
}

impl TryFrom<String> for PeerAddr {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        for good in [
            "192.0.2.10:7878",
            "[2001:db8::1]:7878",
            "jellyfin-b.lan:7878",
            "understudy.media.svc.cluster.local:7878",
            "localhost:1",
        ] {
            assert_eq!(good.parse::<PeerAddr>().unwrap().as_str(), good);
        }
        for bad in [
            "jellyfin-b.lan",
            "host:port",
            "host:70000",
            ":7878",
            "a..b:1",
            "a b:1",
            "2001:db8::1",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn ips_take_the_fast_path_and_names_resolve() {
        let ip: PeerAddr = "127.0.0.1:7878".parse().unwrap();
        assert_eq!(
            ip.resolve().await.unwrap(),
            "127.0.0.1:7878".parse().unwrap()
        );
        let name: PeerAddr = "localhost:7878".parse().unwrap();
        let a = name.resolve().await.unwrap();
        assert!(a.ip().is_loopback() && a.port() == 7878, "{a}");
        let none: PeerAddr = "no-such-host.invalid:7878".parse().unwrap();
        let e = format!("{:#}", none.resolve().await.unwrap_err());
        assert!(e.contains("no-such-host.invalid:7878"), "{e}");
    }
}
