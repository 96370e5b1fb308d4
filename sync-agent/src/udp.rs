//! The UDP socket under every QUIC endpoint, with buffers sized for bursts.
//!
//! Linux gives a UDP socket 208 KiB of receive buffer by default: about 150
//! full-size datagrams. A replica busy writing a round for a few milliseconds
//! lets the kernel drop what arrives past that, and QUIC sends it again (on
//! loopback, 3-16% of a 1% database change's bytes were such resends). The
//! buffers are raised to [`SOCKET_BUFFER`], past `net.core.rmem_max` /
//! `wmem_max` when the process may (`CAP_NET_ADMIN`: `SO_RCVBUFFORCE`), as
//! far as those limits allow otherwise.

use anyhow::{Context as _, Result};
use std::net::{SocketAddr, UdpSocket};

/// The receive and send buffer asked for (the kernel reports twice this,
/// its bookkeeping included).
pub const SOCKET_BUFFER: usize = 7 << 20;

/// A UDP socket bound to `addr`, its buffers raised.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| format!("binding a UDP socket to {addr}"))?;
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(&s, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&s, SOCKET_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(&s, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&s, SOCKET_BUFFER);
    }
    Ok(s)
}

/// A QUIC endpoint on [`bind`]'s socket; a server when `server` is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let socket = bind(addr)?;
    let runtime = quinn::default_runtime().context("no async runtime for the QUIC endpoint")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
        .with_context(|| format!("opening a QUIC endpoint on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;

    /// Tests run as root: the buffers are what was asked, past the system's
    /// default limits.
    #[test]
    fn sockets_get_room_for_a_burst() {
        let s = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(sockopt::socket_recv_buffer_size(&s).unwrap() >= SOCKET_BUFFER);
        assert!(sockopt::socket_send_buffer_size(&s).unwrap() >= SOCKET_BUFFER);
    }

    #[tokio::test]
    async fn endpoints_are_built_on_such_sockets() {
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert!(ep.local_addr().unwrap().ip().is_loopback());
        // a port taken: the error names the address
        let taken = ep.local_addr().unwrap();
        let err = endpoint(taken, None).unwrap_err();
        assert!(format!("{err:#}").contains(&taken.to_string()), "{err:#}");
    }
}
