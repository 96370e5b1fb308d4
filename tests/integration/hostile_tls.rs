//! TLS: an unknown certificate, a pinned certificate presented without its key,
//! and no client certificate are refused during the handshake, before any
//! stream, and the replica goes on serving its pinned peer.

use crate::hostile_peer::*;
use crate::util::*;
use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use sync_agent::Identity;

/// The attacker's side: accepts any server (it wants in, not to be safe).
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents `cert` but signs with `key`: a stolen certificate without its key.
#[derive(Debug)]
struct Stolen(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Stolen {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn client(auth: Option<Arc<dyn rustls::client::ResolvesClientCert>>) -> quinn::ClientConfig {
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut cfg = match auth {
        Some(r) => b.with_client_cert_resolver(r),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap(),
    ))
}

/// Tries a session with `cfg`: returns whether anything got through (a
/// connection whose control stream answered).
async fn attempt(t: &Target, cfg: quinn::ClientConfig) -> bool {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let got_through = async {
        let conn = ep
            .connect(t.addr(), sync_agent::tls::SERVER_NAME)
            .ok()?
            .await
            .ok()?;
        // TLS 1.3: the client may finish before the server has checked its
        // certificate; the server's refusal then closes the connection.
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&encode(&proto::Message::Hello(proto::Hello::new(
            proto::Role::Source,
            "default",
        ))))
        .await
        .ok()?;
        read_msg(&mut recv).await
    };
    let r = tokio::time::timeout(ANSWER, got_through)
        .await
        .expect("the handshake hung");
    ep.close(0u32.into(), b"");
    r.is_some()
}

#[tokio::test]
async fn unpinned_keyless_and_anonymous_clients_refused() {
    let mut t = Target::start();
    std::fs::write(t.root.join("keep"), b"replica data").unwrap();
    let before = snapshot(&t.outside);
    let provider = rustls::crypto::ring::default_provider();
    let sign = |id: &Identity| {
        provider
            .key_provider
            .load_private_key(id.key.clone_key())
            .unwrap()
    };
    let (stranger, other) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let cases: Vec<(&str, quinn::ClientConfig)> = vec![
        (
            "unknown certificate",
            sync_agent::tls::client_config(&stranger, t.id).unwrap(),
        ),
        (
            "pinned certificate without its key",
            client(Some(Arc::new(Stolen(Arc::new(
                rustls::sign::CertifiedKey::new(vec![t.me.cert.clone()], sign(&other)),
            ))))),
        ),
        ("no client certificate", client(None)),
    ];
    for (k, (case, cfg)) in cases.into_iter().enumerate() {
        assert!(!attempt(&t, cfg).await, "{case}: got through");
        // each attempt is refused by the agent itself, in the handshake
        let deadline = std::time::Instant::now() + ANSWER;
        while t.log().matches("refused a connection").count() <= k {
            assert!(std::time::Instant::now() < deadline, "{case}: {}", t.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!t.log().contains("source connected"), "{case}: {}", t.log());
        t.assert_clean(&before);
        assert_eq!(std::fs::read(t.root.join("keep")).unwrap(), b"replica data");
    }
    // The control: the same helper with the real key gets through.
    let real = Arc::new(rustls::sign::CertifiedKey::new(
        vec![t.me.cert.clone()],
        sign(&t.me),
    ));
    assert!(attempt(&t, client(Some(Arc::new(Stolen(real))))).await);
}
