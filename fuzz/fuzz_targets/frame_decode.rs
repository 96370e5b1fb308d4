//! Arbitrary bytes from a peer through the two-step frame decoder: never a panic,
//! never an allocation past the announced (bounded) length, and whatever decodes
//! encodes to a frame that decodes to the same message. (Not to the same bytes:
//! bincode accepts non-canonical varints, e.g. `fb 05 00` for 5, which the first
//! run of this target found; nothing hashes or compares frames, so that is
//! harmless.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame;

fuzz_target!(|data: &[u8]| {
    // The agent's path: header first, then exactly that many body bytes.
    if let Some(header) = data.first_chunk::<{ frame::HEADER_LEN }>() {
        match frame::frame_len(*header) {
            Ok(len) => assert!(len <= frame::MAX_FRAME_LEN),
            Err(_) => assert!(u32::from_be_bytes(*header) as usize > frame::MAX_FRAME_LEN),
        }
    }
    if let Ok(Some((msg, used))) = frame::decode(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        frame::encode(&msg, &mut again).expect("a decoded message encodes");
        assert!(again.len() <= used, "re-encoding grew the frame");
        let (back, n) = frame::decode(&again)
            .expect("a re-encoded message decodes")
            .expect("whole");
        assert_eq!(n, again.len());
        assert_eq!(back, msg);
    }
    // The body decoder alone, as a fuzzer-friendly entry without a header.
    if let Ok(msg) = frame::decode_body(data) {
        assert!(msg.validate().is_ok());
    }
});
