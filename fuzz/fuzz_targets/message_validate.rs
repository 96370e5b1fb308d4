//! A decoded body is a message within every bound: its paths are valid
//! `RelPath`s, and what the replica does first with a manifest (structure check,
//! root hash, display) cannot panic on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{Kind, Message, RelPath, frame};

fn path_ok(p: &RelPath) {
    assert_eq!(RelPath::new(p.as_bytes().to_vec()).as_ref(), Ok(p));
    assert!(p.as_bytes().len() <= 4095);
    let _ = p.to_string();
    let _ = p.split_last();
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = frame::decode_body(data) else {
        return;
    };
    msg.validate().expect("the decoder validated it");
    let _ = format!("{msg:?}");
    match msg {
        Message::Manifest(entries) => {
            assert!(entries.len() <= proto::MAX_ENTRIES_PER_BATCH);
            for e in &entries {
                path_ok(&e.path);
                assert!(e.meta.mode <= 0o7777);
                if let Kind::HardLink { target } = &e.kind {
                    path_ok(target);
                }
            }
            let m = sync_core::Manifest { entries };
            let _ = m.check_structure();
            let _ = m.root_hash();
            let _ = m.bytes_total();
        }
        Message::Deleted(paths) => {
            paths.iter().for_each(path_ok);
            assert!(paths.iter().all(|p| !p.is_root()));
        }
        Message::Renamed(pairs) => {
            for (a, b) in &pairs {
                path_ok(a);
                path_ok(b);
                assert!(!b.starts_with(a));
            }
        }
        Message::Inline { data, .. } => assert!(data.len() <= proto::MAX_INLINE),
        _ => {}
    }
});
