//! Issue 2, "Delta": only changed bytes cross the wire.

use crate::util::*;

fn wire(s: &serde_json::Value) -> u64 {
    s["bytes_sent_wire"].as_u64().unwrap() + s["bytes_received_wire"].as_u64().unwrap()
}

#[test]
fn one_percent_change_costs_under_five_percent() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    let size = 64 << 20;
    let mut data = random_bytes(size, 1);
    std::fs::write(src.join("big.db"), &data).unwrap();
    let first = mirror_ok(&src, &dst);
    assert!(
        wire(&first) >= size as u64,
        "first run must send the file: {first}"
    );

    // 1% of the 4 KiB blocks, scattered, changed in place.
    let blocks = size / 4096;
    for k in 0..blocks / 100 {
        let b = (k * 7919 + 13) % blocks;
        data[b * 4096..b * 4096 + 4096].copy_from_slice(&random_bytes(4096, 1000 + k as u64));
    }
    std::fs::write(src.join("big.db"), &data).unwrap();
    let second = mirror_ok(&src, &dst);
    assert_eq!(second["files_transferred"], 1);
    assert!(
        wire(&second) <= (size as u64) * 5 / 100,
        "{} bytes on the wire for a 1% change of {size}",
        wire(&second)
    );
    assert_identical(&src, &dst);

    let third = mirror_ok(&src, &dst);
    assert_eq!(third["files_transferred"], 0);
    assert!(
        wire(&third) <= third["bytes_total"].as_u64().unwrap() / 100,
        "no-change run sent {} bytes",
        wire(&third)
    );
}

#[test]
fn checksum_catches_content_with_the_same_size_and_mtime() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"version one").unwrap();
    mirror_ok(&src, &dst);
    // same length, mtime put back: only a content comparison sees it
    sh(&format!(
        "cd {} && touch -r f stamp && printf 'version two' > f && touch -r stamp f && rm stamp",
        src.display()
    ));
    mirror_ok(&src, &dst);
    assert_eq!(
        std::fs::read(dst.join("f")).unwrap(),
        b"version one",
        "the quick check trusts size and mtime, as rsync does"
    );
    let out = cli(&[
        "mirror".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
        "--checksum".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dst.join("f")).unwrap(), b"version two");
    assert_identical(&src, &dst);
}
