//! Node identities: a self-signed certificate and key per node, named by a
//! fingerprint of the certificate (like Syncthing device ids).

use anyhow::{Context, Result, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

/// The fingerprint of a node's certificate: blake3 of its DER encoding.
///
/// Shown as 52 base32 characters in 13 groups of 4 (`ABCD-EFGH-…`); parsing
/// ignores case, dashes and spaces.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The id of a certificate.
    #[must_use]
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(*blake3::hash(cert.as_ref()).as_bytes())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = data_encoding::BASE32_NOPAD.encode(&self.0);
        let groups: Vec<&str> = s
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let clean: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(clean.as_bytes())
            .map_err(|e| anyhow::anyhow!("node id {s:?} is not valid base32: {e}"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow::anyhow!("node id {s:?} has {} bytes, expected 32", b.len())
        })?;
        Ok(Self(arr))
    }
}

/// A node's certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The private key (DER).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A fresh identity, in memory.
    pub fn generate() -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["understudy".to_string()])
            .context("generating a node certificate")?;
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .map_err(|e| anyhow::anyhow!("encoding the node key: {e}"))?;
        Ok(Self {
            cert: ck.cert.der().clone(),
            key,
        })
    }

    /// This node's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        NodeId::of(&self.cert)
    }

    /// Writes a new identity into `dir` (`cert.pem`, and `key.pem` with mode 0600).
    /// Refuses to overwrite an existing key.
    pub fn create(dir: &Path) -> Result<Self> {
        let key_path = dir.join("key.pem");
        if key_path.exists() {
            bail!(
                "{} already exists: refusing to replace a node key",
                key_path.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ck = rcgen::generate_simple_self_signed(vec!["understudy".to_string()])
            .context("generating a node certificate")?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("creating {}", key_path.display()))?;
        std::io::Write::write_all(&mut f, ck.signing_key.serialize_pem().as_bytes())
            .with_context(|| format!("writing {}", key_path.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", key_path.display()))?;
        let cert_path = dir.join("cert.pem");
        std::fs::write(&cert_path, ck.cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        Self::load(dir)
    }

    /// Reads `dir/cert.pem` and `dir/key.pem`. Refuses them, and the directory,
    /// unless owned by root (or the euid) and not writable by others, all the
    /// way up, and a key that others can read ([`crate::trust`]).
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        if !dir.is_dir() {
            bail!(
                "identity directory {} does not exist (create one with `sync-cli keygen --dir {}`)",
                dir.display(),
                dir.display()
            );
        }
        // Whoever can write these can be us; whoever can read the key too.
        crate::trust::check(dir, crate::trust::Kind::IdentityDir)?;
        crate::trust::check(&key_path, crate::trust::Kind::Key)?;
        crate::trust::check(&cert_path, crate::trust::Kind::Cert)?;
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| anyhow::anyhow!("reading certificate {}: {e}", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("reading key {}: {e}", key_path.display()))?;
        Ok(Self { cert, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn id_round_trips_and_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::create(dir.path()).unwrap();
        let b = Identity::load(dir.path()).unwrap();
        assert_eq!(a.id(), b.id());
        let shown = a.id().to_string();
        assert_eq!(shown.len(), 52 + 12);
        assert_eq!(shown.parse::<NodeId>().unwrap(), a.id());
        assert_eq!(
            shown
                .to_lowercase()
                .replace('-', "")
                .parse::<NodeId>()
                .unwrap(),
            a.id()
        );
        assert!(
            Identity::create(dir.path()).is_err(),
            "must not overwrite a key"
        );
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!("ABCD".parse::<NodeId>().is_err());
    }

    #[test]
    fn refuses_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        Identity::create(dir.path()).unwrap();
        std::fs::set_permissions(
            dir.path().join("key.pem"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("readable by group or others"), "{err}");
    }
}
