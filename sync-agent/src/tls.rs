//! QUIC endpoints with mutual TLS 1.3, peers pinned by certificate fingerprint.
//!
//! Certificates are self-signed; trust comes only from the pin list. The verifiers
//! still check the handshake signature with the certificate's key, so presenting a
//! pinned certificate without its key fails. Client authentication is mandatory,
//! 0-RTT is off and session resumption is disabled (every connection does a full
//! handshake, so every connection is checked against the pins).
//!
//! Validity dates are not checked: the pin (the fingerprint of the whole
//! certificate, dates included) is the trust anchor, and removing it is how a
//! peer is revoked. `sync-cli keygen` certificates are valid from 1975 to 4096;
//! a wrong clock (a standby whose RTC reset) must not stop replication or a
//! failover. See docs/SECURITY.md, "Transport".

use crate::identity::{Identity, NodeId};
use anyhow::{Context, Result};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The name every node's certificate carries and every client asks for.
pub const SERVER_NAME: &str = "understudy";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct Pinned {
    allowed: Vec<NodeId>,
    provider: Arc<CryptoProvider>,
    /// The last refused id, for an error in words ([`client_config_noting`]).
    refused: Presented,
}

/// The id a peer presented and the pin refused, if one did.
pub type Presented = Arc<std::sync::Mutex<Option<NodeId>>>;

#[derive(Debug)]
struct NotPinned(NodeId);
impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer certificate {} is not pinned", self.0)
    }
}
impl std::error::Error for NotPinned {}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = NodeId::of(cert);
        if self.allowed.contains(&id) {
            Ok(())
        } else {
            tracing::warn!(peer = %id, "refused a peer whose certificate is not pinned");
            if let Ok(mut r) = self.refused.lock() {
                *r = Some(id);
            }
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned(id))),
            )))
        }
    }
    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _i: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The transport of a connection whose datagrams grow as `datagrams` says
/// (its endpoint's socket must say the same: `crate::udp::endpoint`).
pub fn transport(datagrams: crate::udp::Datagrams) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        // A peer that vanished (host down, agent killed) is noticed within this,
        // so a source reconnects, and a standby is repaired, soon after it returns.
        Duration::from_secs(12)
            .try_into()
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(12_000))),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    t.stream_receive_window((4u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    // Datagrams grow past Ethernet's where the path allows (crate::udp).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(datagrams.most);
    if datagrams.known {
        // The route's MTU is the path's: one probe, of `most` bytes, straight
        // after the handshake (the search's first step would be halfway).
        mtu.minimum_change(datagrams.most.saturating_sub(1200) / 2 + 1);
    }
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// A QUIC server endpoint on `addr` that accepts only the pinned peers.
pub fn server(addr: SocketAddr, me: &Identity, allowed: Vec<NodeId>) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        allowed,
        provider: provider.clone(),
        refused: Presented::default(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 configuration")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert.clone()], me.key.clone_key())
        .context("loading the node certificate")?;
    cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg).context("QUIC TLS configuration")?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(transport(crate::udp::Datagrams::UNKNOWN));
    sc.max_incoming(64);
    crate::udp::endpoint(addr, Some(sc), crate::udp::Datagrams::UNKNOWN)
        .with_context(|| format!("listening on {addr}"))
}

/// A client configuration that presents `me` and accepts only `peer`.
pub fn client_config(me: &Identity, peer: NodeId) -> Result<quinn::ClientConfig> {
    client_config_noting(me, peer, crate::udp::Datagrams::UNKNOWN).map(|(c, _)| c)
}

/// [`client_config`] for a connection whose datagrams grow as `datagrams`
/// says, and where the id a server presented is noted when it is not
/// `peer` (so that the error can say both).
pub fn client_config_noting(
    me: &Identity,
    peer: NodeId,
    datagrams: crate::udp::Datagrams,
) -> Result<(quinn::ClientConfig, Presented)> {
    let provider = provider();
    let refused = Presented::default();
    let verifier = Arc::new(Pinned {
        allowed: vec![peer],
        provider: provider.clone(),
        refused: refused.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 configuration")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![me.cert.clone()], me.key.clone_key())
        .context("loading the node certificate")?;
    cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    cfg.enable_early_data = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).context("QUIC TLS configuration")?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(transport(datagrams));
    Ok((cc, refused))
}

/// The node id of the peer on a connection.
#[must_use]
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(NodeId::of)
}

#[cfg(test)]
mod dates_tests;
