//! Times warm scans of a tree: `scan ROOT [RUNS] [source|replica]`.
//!
//! `source` (the default) scans as `push` does: hashing, hard links, database
//! detection, with a hash index filled by one scan before the timed runs (so
//! nothing is rehashed). `replica` scans as a replica's full round does: no
//! hashes, no hard links. Prints each run, the median and a digest of the
//! manifest (equal digests: equal manifests), so two builds can be compared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use sync_core::index::HashIndex;
use sync_core::scan::{DbDetect, ScanOptions, now_ns, scan_with};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(
        args.next()
            .ok_or("usage: scan ROOT [RUNS] [source|replica]")?,
    );
    let runs: usize = args.next().map_or(Ok(10), |r| r.parse())?;
    let replica = match args.next().as_deref() {
        None | Some("source") => false,
        Some("replica") => true,
        Some(other) => return Err(format!("unknown mode {other}").into()),
    };
    let opts = ScanOptions {
        hash: !replica,
        hard_links: !replica,
        databases: Some(Arc::new(DbDetect::default())),
        ..Default::default()
    };
    let mut ix = HashIndex::in_memory();
    if !replica {
        let (m, report) = scan_with(&root, &opts, Some(&ix))?;
        ix.remember_scan(&report.hashed, &m, now_ns());
    }
    let mut times = Vec::with_capacity(runs);
    let mut digest = [0u8; 32];
    let mut len = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let (m, report) = scan_with(&root, &opts, Some(&ix))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        times.push(ms);
        let mut h = blake3::Hasher::new();
        h.update(&m.root_hash());
        for list in [&report.temp_files, &report.databases] {
            for p in list {
                h.update(p.as_bytes()).update(b"\0");
            }
        }
        for (p, d) in &report.excluded {
            h.update(p.as_bytes()).update(&[u8::from(*d)]);
        }
        let mut ml: Vec<_> = report.multi_linked.iter().collect();
        ml.sort();
        for p in ml {
            h.update(p.as_bytes()).update(b"\0");
        }
        h.update(&report.hashed.len().to_le_bytes());
        digest = *h.finalize().as_bytes();
        len = m.entries.len();
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let runs: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    println!(
        "{} entries, digest {}, runs ms [{}], median {:.1} ms, min {:.1} ms",
        len,
        sync_core::hex(&digest[..8]),
        runs.join(" "),
        sorted[sorted.len() / 2],
        sorted[0],
    );
    Ok(())
}
