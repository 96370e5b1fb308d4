//! Writes a seed corpus for every target into `corpus/TARGET/`: valid frames of
//! each message type, valid signatures and deltas, so that the fuzzers start
//! from the structure instead of finding it. Run by `scripts/fuzz.sh`.

use proto::{Entry, Hello, Kind, Message, Meta, RelPath, Role, Xattr, frame};
use sync_core::delta::{self, Chunk, Encoder};

fn messages() -> Vec<Message> {
    let p = |s: &str| RelPath::new(s.as_bytes()).expect("valid path");
    let meta = Meta {
        mode: 0o4755,
        uid: 99,
        gid: 100,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: vec![Xattr {
            name: b"user.x".to_vec(),
            value: b"v".to_vec(),
        }],
    };
    let entry = |path: &str, kind: Kind| Entry {
        path: p(path),
        kind,
        meta: meta.clone(),
    };
    vec![
        Message::Hello(Hello::new(Role::Source, "default").with_epoch(3)),
        Message::Error {
            code: proto::ErrorCode::Apply,
            message: "disk full".into(),
        },
        Message::RoundStart {
            id: 1,
            full: true,
            checksum: false,
            verify: true,
        },
        Message::Manifest(vec![
            entry("", Kind::Dir),
            entry(
                "a",
                Kind::File {
                    size: 3,
                    hash: [1; 32],
                },
            ),
            entry("a2", Kind::HardLink { target: p("a") }),
            entry("d", Kind::Dir),
            entry(
                "d/s",
                Kind::Symlink {
                    target: b"../a".to_vec(),
                },
            ),
            entry("d/f", Kind::Fifo),
            entry("d/c", Kind::CharDev { rdev: 259 }),
            entry(
                "db",
                Kind::Database {
                    page_size: 4096,
                    pages: 2,
                    hash: [2; 32],
                },
            ),
        ]),
        Message::Deleted(vec![p("gone/x")]),
        Message::Renamed(vec![(p("a"), p("b/c"))]),
        Message::RoundEnd {
            id: 1,
            entries: 8,
            root_hash: [3; 32],
        },
        Message::FileRequest {
            index: 1,
            signature: Some(delta::signature(&[7u8; 20000])),
        },
        Message::Literal(b"literal".to_vec()),
        Message::Delta(vec![0x72, 0x73, 2, 0x36, 0x45, 0, 4, 0]),
        Message::FileEnd {
            size: 3,
            hash: [4; 32],
        },
        Message::RoundDone {
            id: 1,
            summary: Default::default(),
        },
        Message::Inline {
            index: 1,
            data: b"abc".to_vec(),
        },
        Message::DbRequest {
            index: 7,
            have: [5; 32],
        },
        Message::DbNeedHashes,
        Message::DbHashes {
            page_size: 4096,
            hashes: vec![[6; 32]],
            last: true,
        },
        Message::DbPages(vec![(1, vec![0; 512])]),
        Message::DbEnd {
            page_size: 512,
            pages: 1,
            hash: [7; 32],
        },
        Message::Promote { epoch: 4 },
        Message::Promoted {
            epoch: 4,
            error: String::new(),
        },
        Message::StageFile {
            path: p("media/big.mkv"),
            size: 1 << 30,
        },
        Message::StageBasis {
            signature: Some(vec![1, 2, 3]),
        },
        Message::Staged {
            size: 1 << 30,
            hash: [8; 32],
        },
    ]
}

fn write(target: &str, n: usize, bytes: &[u8]) {
    let dir = std::path::Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{n:03}")), bytes).expect("seed");
}

fn main() {
    for (n, m) in messages().iter().enumerate() {
        let mut buf = Vec::new();
        frame::encode(m, &mut buf).expect("encodes");
        write("frame_decode", n, &buf);
        write("message_validate", n, &buf[frame::HEADER_LEN..]);
    }
    let basis: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut new = basis.clone();
    new[20_000..20_010].copy_from_slice(b"0123456789");
    let sig_bytes = delta::signature(&basis);
    let sig = delta::parse_signature(sig_bytes.clone()).expect("our signature");
    let Chunk::Delta(d) = Encoder::new(Some(&sig)).encode(&new) else {
        panic!("expected a delta");
    };
    for (n, (b, limit)) in [(&basis[..4096], 8192u16), (&basis[..0], 100)]
        .iter()
        .enumerate()
    {
        let mut seed = (b.len() as u16).to_le_bytes().to_vec();
        seed.extend(limit.to_le_bytes());
        seed.extend_from_slice(b);
        seed.extend_from_slice(&d);
        write("delta_apply", n, &seed);
    }
    // A small signature (the fuzzer's inputs are kept small).
    let small = delta::signature(&basis[..2048]);
    let mut seed = (small.len() as u16).to_le_bytes().to_vec();
    seed.extend_from_slice(&small);
    seed.extend_from_slice(&basis[..3000]);
    write("signature", 0, &seed);
    println!("seeds written under corpus/");
}
