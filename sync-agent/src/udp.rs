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

/// The largest UDP payload a connection may grow into, where the path
/// carries it (QUIC's MTU discovery starts at 1,200 bytes and probes up to
/// this; a path that drops the probes keeps what it carries, 1,452 on
/// Ethernet). Loopback and jumbo-frame links carry more, and each datagram
/// has a fixed cost besides its bytes (sealing, sending, receiving and
/// acknowledging it): a 512 MiB file over loopback took 2.2-2.4 s of CPU (both ends) at 6,000
/// bytes against 3.0-3.4 s at 1,452. The ceiling is set by segmentation
/// offload: quinn hands the kernel up to 10 datagrams in one write, which
/// must fit in one 64 KiB IP packet; at 7,000 bytes such writes fail and
/// the connection crawls on resends. The probes cost about 75 KB once per
/// connection (a no-change push: 16 KB on the wire before, 91 KB after).
pub const MAX_DATAGRAM: u16 = 6000;

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
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(MAX_DATAGRAM)
        .context("the largest UDP payload")?;
    quinn::Endpoint::new(cfg, server, socket, runtime)
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

    /// Over loopback (MTU 64 KiB) a connection's datagrams grow past
    /// Ethernet's 1,452 bytes, up to the ceiling, and a bulk transfer at that
    /// size loses nothing (segmentation offload's writes still fit).
    #[tokio::test]
    async fn loopback_connections_grow_their_datagrams_to_the_ceiling() {
        use crate::identity::Identity;
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let server = crate::tls::server("127.0.0.1:0".parse().unwrap(), &b, vec![a.id()]).unwrap();
        let addr = server.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let got = recv.read_to_end(64 << 20).await.unwrap().len();
            send.write_all(&(got as u64).to_be_bytes()).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
        });
        let mut client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        client.set_default_client_config(crate::tls::client_config(&a, b.id()).unwrap());
        let conn = client
            .connect(addr, crate::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let block = vec![7u8; 1 << 20];
        for _ in 0..32 {
            send.write_all(&block).await.unwrap();
        }
        send.finish().unwrap();
        let echoed = recv.read_to_end(8).await.unwrap();
        assert_eq!(echoed, (32u64 << 20).to_be_bytes());
        let stats = conn.stats();
        let mtu = stats.path.current_mtu;
        assert!(
            mtu > 1452 && mtu <= MAX_DATAGRAM,
            "datagrams of {mtu} bytes"
        );
        // a probe may be lost on its way up; data is not
        assert!(stats.path.lost_packets < 16, "{:?}", stats.path);
        assert!(
            stats.udp_tx.datagrams < (32 << 20) / 2000,
            "{:?}",
            stats.udp_tx
        );
        conn.close(0u32.into(), b"done");
        sink.await.unwrap();
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
