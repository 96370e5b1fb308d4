//! The certificate-date policy (docs/SECURITY.md, "Transport"): a pinned
//! certificate is accepted whatever its validity dates say, expired or not yet
//! valid, in either role; an unpinned one is refused whatever they say.

use super::{client_config, server};
use crate::identity::{Identity, NodeId};
use rustls_pki_types::PrivateKeyDer;
use std::net::SocketAddr;

/// A self-signed identity valid only from `from` to `until` (years, Jan 1st).
fn dated(from: i32, until: i32) -> Identity {
    let mut params = rcgen::CertificateParams::new(vec![super::SERVER_NAME.to_string()])
        .expect("certificate params");
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Identity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    }
}

/// Whether `client` (pinning `pin_server`) and `srv` (pinning `pin_client`)
/// complete a handshake, both sides seeing it.
async fn handshake(
    client: &Identity,
    srv: &Identity,
    pin_client: NodeId,
    pin_server: NodeId,
) -> bool {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ep = server(any, srv, vec![pin_client]).expect("server");
    let addr = ep.local_addr().expect("local addr");
    let accept = tokio::spawn({
        let ep = ep.clone();
        async move {
            let inc = ep.accept().await?;
            inc.await.ok()
        }
    });
    let mut cep = quinn::Endpoint::client(any).expect("client endpoint");
    cep.set_default_client_config(client_config(client, pin_server).expect("client config"));
    let ok = match cep
        .connect(addr, super::SERVER_NAME)
        .expect("connect")
        .await
    {
        Ok(_conn) => true,
        Err(_) => false,
    };
    let served = tokio::time::timeout(std::time::Duration::from_secs(5), accept)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .is_some();
    ep.close(0u32.into(), b"");
    cep.close(0u32.into(), b"");
    ok && served
}

#[tokio::test]
async fn expired_and_not_yet_valid_pinned_certificates_are_accepted() {
    let fresh = Identity::generate().expect("identity");
    let expired = dated(2000, 2001);
    let future = dated(2100, 2101);
    for odd in [&expired, &future] {
        // The odd certificate on the server side, then on the client side.
        assert!(handshake(&fresh, odd, fresh.id(), odd.id()).await);
        assert!(handshake(odd, &fresh, odd.id(), fresh.id()).await);
    }
}

#[tokio::test]
async fn unpinned_certificates_are_refused_whatever_their_dates() {
    let fresh = Identity::generate().expect("identity");
    let other = Identity::generate().expect("identity");
    for odd in [dated(2000, 2001), dated(2100, 2101), dated(1975, 4096)] {
        // The server pins `other`, not `odd`; the client pins `other`, not `odd`.
        assert!(!handshake(&odd, &fresh, other.id(), fresh.id()).await);
        assert!(!handshake(&fresh, &odd, fresh.id(), other.id()).await);
    }
}

#[test]
fn keygen_certificates_are_valid_from_1975_to_4096() {
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().expect("tempdir");
    Identity::create(dir.path()).expect("create");
    let pem = std::fs::read_to_string(dir.path().join("cert.pem")).expect("cert");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
    // UTCTime 1975-01-01 and GeneralizedTime 4096-01-01 in the DER.
    let hay = der.as_ref();
    let has = |s: &[u8]| hay.windows(s.len()).any(|w| w == s);
    assert!(has(b"750101000000Z"), "not_before 1975-01-01");
    assert!(has(b"40960101000000Z"), "not_after 4096-01-01");
}
