//! The replica's side of a delta: arbitrary delta bytes against a basis never
//! panic and never produce more than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::delta;

fuzz_target!(|data: &[u8]| {
    // [basis length: u16][limit: u16][basis][delta]
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let basis_len = usize::from(u16::from_le_bytes([head[0], head[1]])).min(rest.len());
    let limit = usize::from(u16::from_le_bytes([head[2], head[3]]));
    let (basis, d) = rest.split_at(basis_len);
    let mut out = Vec::new();
    let res = delta::apply_delta(basis, d, &mut out, limit);
    assert!(
        out.len() <= limit,
        "{} bytes past a limit of {limit}",
        out.len()
    );
    if res.is_ok() {
        // a delta that applies is deterministic
        let mut again = Vec::new();
        delta::apply_delta(basis, d, &mut again, limit).expect("applied once");
        assert_eq!(out, again);
    }
});
