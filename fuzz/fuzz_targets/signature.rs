//! The source's side: a signature from a hostile replica is validated, and a
//! signature that passes is safe to diff against (no panic, no endless loop:
//! libFuzzer's -timeout catches a hang), and the delta rebuilds the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::delta::{self, Chunk, Encoder};

fuzz_target!(|data: &[u8]| {
    // [signature length: u16][signature][new data]
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let sig_len = usize::from(u16::from_le_bytes(*head)).min(rest.len());
    let (sig, new) = rest.split_at(sig_len);
    let Ok(sig) = delta::parse_signature(sig.to_vec()) else {
        return;
    };
    let mut enc = Encoder::new(Some(&sig));
    match enc.encode(new) {
        Chunk::Literal(l) => assert_eq!(l, new),
        Chunk::Delta(d) => {
            // The basis is unknown (the fuzzer made the signature up): applying
            // against an empty basis must fail or rebuild the data, never panic.
            let mut out = Vec::new();
            if delta::apply_delta(&[], &d, &mut out, delta::WINDOW).is_ok() {
                assert_eq!(out, new);
            }
        }
    }
});
