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
use quinn::AsyncUdpSocket;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The receive and send buffer asked for (the kernel reports twice this,
/// its bookkeeping included).
pub const SOCKET_BUFFER: usize = 7 << 20;

/// The largest UDP payload an endpoint takes, and the most a connection's
/// datagrams grow to: loopback's 64 KiB MTU less the IP and UDP headers,
/// rounded down. Each datagram has a fixed cost besides its bytes (sealing,
/// sending, receiving and acknowledging it): a 512 MiB file over loopback
/// took 2.2-2.4 s of CPU (both ends) at 6,000 bytes against 3.0-3.4 s at
/// 1,452, and a first mirror of the `large` corpus 0.6 s less at 65,000
/// than at 6,000 (benches/README.md).
pub const MAX_DATAGRAM: u16 = 65_000;

/// How far a connection's datagrams may grow where the route to the peer is
/// not known (a server's connections: QUIC's MTU discovery starts at 1,200
/// bytes and probes up to this; a path that drops the probes keeps what it
/// carries, 1,452 on Ethernet). The probes cost about 75 KB once per
/// connection over loopback.
pub const UNKNOWN_ROUTE: u16 = 6000;

/// The bytes one segmentation-offload write carries at most: quinn hands the
/// kernel up to 10 datagrams in one write, which must fit in one 64 KiB IP
/// packet (at 10 x 7,000 bytes such writes fail and the connection crawls
/// on resends); larger datagrams go fewer to a write.
const GSO_BYTES: usize = 65_000;

/// How large a connection's datagrams may grow, from what this host knows
/// of the route to its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagrams {
    /// The largest payload: MTU discovery's upper bound.
    pub most: u16,
    /// Whether `most` is the path's own (the route never leaves this host:
    /// loopback): one probe of `most` bytes instead of a search.
    pub known: bool,
}

impl Datagrams {
    /// Where the route is not known: probed up to [`UNKNOWN_ROUTE`].
    pub const UNKNOWN: Self = Self {
        most: UNKNOWN_ROUTE,
        known: false,
    };

    /// The route to `peer`: the MTU of the interface it leaves by (or a path
    /// MTU the kernel learned: `IP_MTU` on a UDP socket connected to it,
    /// which sends nothing) less the IP and UDP headers, at most
    /// [`MAX_DATAGRAM`]. Over loopback the connection grows there with one
    /// probe; over any other route MTU discovery searches up to it (an
    /// Ethernet route's 1,472 bytes: no probe past what its first hop
    /// carries). A route the kernel does not tell is [`Self::UNKNOWN`].
    #[must_use]
    pub fn to(peer: SocketAddr) -> Self {
        let Some(mtu) = route_mtu(peer) else {
            return Self::UNKNOWN;
        };
        let headers = if peer.is_ipv4() { 28 } else { 48 };
        let most = mtu
            .saturating_sub(headers)
            .clamp(1200, u32::from(MAX_DATAGRAM));
        Self {
            most: u16::try_from(most).unwrap_or(MAX_DATAGRAM),
            known: peer.ip().is_loopback(),
        }
    }

    /// Datagrams of `most` bytes that one segmentation-offload write carries.
    fn segments(self) -> usize {
        (GSO_BYTES / usize::from(self.most.max(1))).max(1)
    }
}

/// The MTU of the route to `peer`, as the kernel knows it.
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    use rustix::net::sockopt;
    let any: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(peer).ok()?;
    if peer.is_ipv4() {
        sockopt::ip_mtu(&s).ok()
    } else {
        sockopt::ipv6_mtu(&s).ok()
    }
}

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
/// Its connections' datagrams grow as `datagrams` says (the transport
/// configuration must say the same: `crate::tls::transport`): as many go to
/// one segmentation-offload write as fit in it.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    datagrams: Datagrams,
) -> Result<quinn::Endpoint> {
    let socket = bind(addr)?;
    let runtime = quinn::default_runtime().context("no async runtime for the QUIC endpoint")?;
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(MAX_DATAGRAM)
        .context("the largest UDP payload")?;
    let inner = runtime
        .wrap_udp_socket(socket)
        .with_context(|| format!("opening a QUIC endpoint on {addr}"))?;
    let socket = Arc::new(Segments {
        inner,
        most: datagrams.segments(),
    });
    quinn::Endpoint::new_with_abstract_socket(cfg, server, socket, runtime)
        .with_context(|| format!("opening a QUIC endpoint on {addr}"))
}

/// The runtime's UDP socket, with as many datagrams to a segmentation-offload
/// write as fit in one ([`GSO_BYTES`]).
#[derive(Debug)]
struct Segments {
    inner: Arc<dyn AsyncUdpSocket>,
    most: usize,
}

impl AsyncUdpSocket for Segments {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.most)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
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

    /// 32 MiB sent to a server on loopback, the client made for `datagrams`
    /// (as `crate::connect` makes it; `None`: an unknown route); the
    /// connection's statistics.
    async fn send_32_mib(datagrams: Option<Datagrams>) -> quinn::ConnectionStats {
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
        let d = datagrams.unwrap_or(Datagrams::UNKNOWN);
        let mut client = endpoint("127.0.0.1:0".parse().unwrap(), None, d).unwrap();
        let (config, _) = crate::tls::client_config_noting(&a, b.id(), d).unwrap();
        client.set_default_client_config(config);
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
        conn.close(0u32.into(), b"done");
        sink.await.unwrap();
        stats
    }

    /// The route to a loopback peer is known: its datagrams grow to the
    /// ceiling with one probe and a bulk transfer at that size loses nothing
    /// (one datagram to a segmentation-offload write).
    #[tokio::test]
    async fn loopback_connections_start_at_the_routes_ceiling() {
        let d = Datagrams::to("127.0.0.1:9".parse().unwrap());
        assert_eq!(
            d,
            Datagrams {
                most: MAX_DATAGRAM,
                known: true
            },
            "lo's MTU is 64 KiB"
        );
        assert_eq!(d.segments(), 1);
        let stats = send_32_mib(Some(d)).await;
        assert_eq!(stats.path.current_mtu, MAX_DATAGRAM);
        assert_eq!(stats.path.lost_packets, 0, "{:?}", stats.path);
        assert_eq!(stats.path.sent_plpmtud_probes, 1, "{:?}", stats.path);
        assert!(
            stats.udp_tx.datagrams < (32 << 20) / 60_000,
            "{:?}",
            stats.udp_tx
        );
    }

    /// Where the route is not known (a server's connections), datagrams
    /// grow by MTU discovery past Ethernet's 1,452 bytes up to
    /// [`UNKNOWN_ROUTE`], ten to a segmentation-offload write, and a bulk
    /// transfer at that size loses nothing.
    #[tokio::test]
    async fn unknown_routes_probe_up_to_their_bound() {
        assert_eq!(Datagrams::UNKNOWN.segments(), 10);
        let stats = send_32_mib(None).await;
        let mtu = stats.path.current_mtu;
        assert!(
            mtu > 1452 && mtu <= UNKNOWN_ROUTE,
            "datagrams of {mtu} bytes"
        );
        // a probe may be lost on its way up; data is not
        assert!(stats.path.lost_packets < 16, "{:?}", stats.path);
        assert!(
            stats.udp_tx.datagrams < (32 << 20) / 2000,
            "{:?}",
            stats.udp_tx
        );
    }

    /// A route that leaves the host is never taken as known (its path may
    /// carry less than its first hop); what it allows stays within bounds.
    #[test]
    fn other_routes_are_probed_within_their_first_hops_mtu() {
        for peer in ["192.0.2.1:9", "[2001:db8::1]:9"] {
            let d = Datagrams::to(peer.parse().unwrap());
            assert!(!d.known, "{peer}: {d:?}");
            assert!((1200..=MAX_DATAGRAM).contains(&d.most), "{peer}: {d:?}");
            assert_eq!(d.segments(), 65_000 / usize::from(d.most), "{peer}: {d:?}");
        }
    }

    #[tokio::test]
    async fn endpoints_are_built_on_such_sockets() {
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), None, Datagrams::UNKNOWN).unwrap();
        assert!(ep.local_addr().unwrap().ip().is_loopback());
        // a port taken: the error names the address
        let taken = ep.local_addr().unwrap();
        let err = endpoint(taken, None, Datagrams::UNKNOWN).unwrap_err();
        assert!(format!("{err:#}").contains(&taken.to_string()), "{err:#}");
    }
}
