//! Issue 2, "Atomicity": a destination path only ever holds a whole old or a whole
//! new version, even when the process is killed mid-transfer.

use crate::util::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

#[test]
fn kill_at_random_points_never_tears_a_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let mut versions: HashMap<String, Vec<[u8; 32]>> = HashMap::new();
    for i in 0..12 {
        let name = format!("f{i}");
        let old = random_bytes(3 << 20, 100 + i);
        let mut new = random_bytes(5 << 20, 200 + i);
        // half the files share data with their old version, so deltas are used
        if i % 2 == 0 {
            new[..2 << 20].copy_from_slice(&old[..2 << 20]);
        }
        std::fs::write(dst.join(&name), &old).unwrap();
        std::fs::write(src.join(&name), &new).unwrap();
        versions.insert(
            name,
            vec![
                *blake3::hash(&old).as_bytes(),
                *blake3::hash(&new).as_bytes(),
            ],
        );
    }
    let delays = [5u64, 40, 90, 150, 220, 300, 15, 120, 60, 180];
    let mut killed_mid_transfer = 0;
    for (round, ms) in delays.iter().enumerate() {
        let mut child = Command::new(bin("sync-cli"))
            .arg("mirror")
            .arg(&src)
            .arg(&dst)
            .arg("--json")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if !temp_files(&dst).is_empty() {
            killed_mid_transfer += 1;
        }
        for (name, hashes) in &versions {
            let data = std::fs::read(dst.join(name))
                .unwrap_or_else(|e| panic!("round {round}: {name} missing: {e}"));
            let h = *blake3::hash(&data).as_bytes();
            assert!(
                hashes.contains(&h),
                "round {round} (killed after {ms} ms): {name} is torn ({} bytes)",
                data.len()
            );
        }
    }
    assert!(
        killed_mid_transfer > 0,
        "no kill landed mid-transfer: the test proved nothing"
    );
    mirror_ok(&src, &dst);
    assert_identical(&src, &dst);
    assert!(
        temp_files(&dst).is_empty(),
        "temp files left: {:?}",
        temp_files(&dst)
    );
}
