//! rsync-algorithm deltas with fast_rsync, windowed so that memory stays bounded.
//!
//! The replica computes a [`signature`] of its basis (the file it already has) and
//! sends it. The source validates it ([`parse_signature`]: fast_rsync would loop
//! forever on a zero block size), then encodes its file window by window
//! ([`Encoder`]): each window becomes either a fast_rsync delta against the whole
//! basis or, when there is no basis or the data does not match it, literal bytes.
//! The replica rebuilds each window with `apply_limited` (output bounded by the
//! window size) and checks the blake3 of the whole result before it is renamed
//! into place: MD4 signatures are a weak hash by design.

use fast_rsync::{Signature, SignatureOptions};

/// Input bytes covered by one delta frame.
pub const WINDOW: usize = 4 << 20;
/// Literal bytes per frame.
pub const LITERAL_CHUNK: usize = 256 << 10;
/// Smallest block size accepted in a peer's signature.
pub const MIN_BLOCK: u32 = 512;
/// Largest block size accepted in a peer's signature.
pub const MAX_BLOCK: u32 = 1 << 20;
/// Strong-hash bytes per block (MD4 truncated; blake3 checks the result).
pub const STRONG_LEN: u32 = 8;
/// Files smaller than this are sent whole.
pub const MIN_DELTA_SIZE: u64 = 16 << 10;

/// Why a signature or delta was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The signature is malformed or out of bounds.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// The delta does not apply to the basis, or produces too much.
    #[error("bad delta: {0}")]
    BadDelta(String),
}

/// Block size for a basis of `len` bytes: 4 KiB (SQLite's page size, so a changed
/// page costs one block) up to 1 GiB, then doubling to keep at most 2^18 blocks.
#[must_use]
pub fn block_size_for(len: u64) -> u32 {
    let mut bs: u64 = 4096;
    while len / bs > (1 << 18) && bs < u64::from(MAX_BLOCK) {
        bs *= 2;
    }
    bs as u32
}

/// Serialized fast_rsync signature of `basis`.
#[must_use]
pub fn signature(basis: &[u8]) -> Vec<u8> {
    let opts = SignatureOptions {
        block_size: block_size_for(basis.len() as u64),
        crypto_hash_size: STRONG_LEN,
    };
    Signature::calculate(basis, opts).into_serialized()
}

/// Validates a signature received from a peer.
pub fn parse_signature(bytes: Vec<u8>) -> Result<Signature, DeltaError> {
    let header = bytes.get(4..12).ok_or_else(|| {
        DeltaError::BadSignature(format!("{} bytes, shorter than a header", bytes.len()))
    })?;
    let block = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let strong = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
        return Err(DeltaError::BadSignature(format!(
            "block size {block} outside {MIN_BLOCK}..={MAX_BLOCK}"
        )));
    }
    if !(4..=16).contains(&strong) {
        return Err(DeltaError::BadSignature(format!(
            "strong hash size {strong} outside 4..=16"
        )));
    }
    Signature::deserialize(bytes).map_err(|e| DeltaError::BadSignature(e.to_string()))
}

/// One frame's worth of encoded content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes to write as they are.
    Literal(Vec<u8>),
    /// A fast_rsync delta against the basis.
    Delta(Vec<u8>),
}

/// Encodes a file window by window.
#[derive(Debug)]
pub struct Encoder<'a> {
    sig: Option<fast_rsync::IndexedSignature<'a>>,
    poor: u32,
}

impl<'a> Encoder<'a> {
    /// An encoder against `sig`, or literal-only without one.
    #[must_use]
    pub fn new(sig: Option<&'a Signature>) -> Self {
        Self {
            sig: sig.map(Signature::index),
            poor: 0,
        }
    }

    /// How many bytes the next call to [`Encoder::encode`] wants.
    #[must_use]
    pub fn window(&self) -> usize {
        if self.sig.is_some() {
            WINDOW
        } else {
            LITERAL_CHUNK
        }
    }

    /// Encodes one window of data (at most [`Encoder::window`] bytes).
    pub fn encode(&mut self, data: &[u8]) -> Chunk {
        let Some(sig) = &self.sig else {
            return Chunk::Literal(data.to_vec());
        };
        let mut out = Vec::with_capacity(data.len() / 16 + 64);
        if fast_rsync::diff(sig, data, &mut out).is_err() {
            self.sig = None;
            return Chunk::Literal(data.to_vec());
        }
        // Two windows in a row with almost no match: the file was rewritten, and
        // diffing data with no matches is slow; send the rest literally.
        if out.len() * 10 > data.len() * 9 {
            self.poor += 1;
            if self.poor >= 2 {
                self.sig = None;
            }
        } else {
            self.poor = 0;
        }
        Chunk::Delta(out)
    }
}

/// Applies one delta chunk against `basis`, appending at most `limit` bytes to `out`.
pub fn apply_delta(
    basis: &[u8],
    delta: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), DeltaError> {
    fast_rsync::apply_limited(basis, delta, out, limit)
        .map_err(|e| DeltaError::BadDelta(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebuild(basis: &[u8], new: &[u8]) -> (Vec<u8>, usize) {
        let sig = parse_signature(signature(basis)).unwrap();
        let mut enc = Encoder::new(Some(&sig));
        let mut out = Vec::new();
        let mut wire = 0;
        for w in new.chunks(WINDOW) {
            match enc.encode(w) {
                Chunk::Literal(l) => {
                    wire += l.len();
                    out.extend_from_slice(&l);
                }
                Chunk::Delta(d) => {
                    wire += d.len();
                    apply_delta(basis, &d, &mut out, WINDOW).unwrap();
                }
            }
        }
        (out, wire)
    }

    #[test]
    fn scattered_page_changes_cost_their_pages() {
        let mut basis = vec![0u8; 20 << 20];
        let mut x = 1u64;
        for b in basis.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let mut new = basis.clone();
        for page in (0..new.len() / 4096).step_by(100) {
            new[page * 4096 + 7] ^= 0xff;
        }
        let (out, wire) = rebuild(&basis, &new);
        assert_eq!(out, new);
        assert!(
            wire < new.len() / 50,
            "wire {wire} for 1% changed pages of {}",
            new.len()
        );
    }

    #[test]
    fn hostile_signatures_refused() {
        let mut sig = signature(&[1u8; 10000]);
        sig[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_signature(sig.clone()).is_err());
        sig[4..8].copy_from_slice(&4096u32.to_be_bytes());
        sig[8..12].copy_from_slice(&17u32.to_be_bytes());
        assert!(parse_signature(sig).is_err());
        assert!(parse_signature(vec![1, 2, 3]).is_err());
    }

    #[test]
    fn delta_output_bounded() {
        let basis = vec![7u8; 64 << 10];
        let sig = parse_signature(signature(&basis)).unwrap();
        let mut enc = Encoder::new(Some(&sig));
        let Chunk::Delta(d) = enc.encode(&[7u8; 64 << 10]) else {
            panic!("expected delta")
        };
        let mut out = Vec::new();
        assert!(apply_delta(&basis, &d, &mut out, 1000).is_err());
        // a copy beyond the basis
        let mut out = Vec::new();
        assert!(apply_delta(&basis[..100], &d, &mut out, 1 << 20).is_err());
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(0), 4096);
        assert_eq!(block_size_for(1 << 30), 4096);
        assert_eq!(block_size_for(4 << 30), 16384);
        assert!(block_size_for(u64::MAX) <= MAX_BLOCK);
    }
}
