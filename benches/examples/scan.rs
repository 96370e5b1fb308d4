//! Times warm scans of a tree: `scan ROOT [RUNS] [source|replica]`.
//!
//! `source` (the default) scans as `push` does: hashing, hard links, database
//! detection, with a hash index filled by one scan, saved and loaded again (its load
//! timed) before the timed runs (so nothing is rehashed). `replica` scans as a replica's full round does: no
//! hashes, no hard links. Prints each run, the median and a digest of the
//! manifest (equal digests: equal manifests), so two builds can be compared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use sync_core::index::HashIndex;
use sync_core::scan::{DbDetect, ScanOptions, now_ns, scan_with};

/// CPU time of this process, in ms (the machine may be busy: wall time
/// alone is noisy).
fn cpu_ms() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// The median of `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

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
        // The index as `push` keeps it: saved, and loaded before each run.
        let dir = std::env::temp_dir().join(format!("scan-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("index.db");
        let mut saved = HashIndex::open(&file)?;
        let (m, report) = scan_with(&root, &opts, Some(&saved))?;
        saved.remember_scan(report.hashed, &m, now_ns());
        saved.save()?;
        drop(saved);
        let (mut loads, mut cpu) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            let (t0, c0) = (Instant::now(), cpu_ms());
            ix = HashIndex::open(&file)?;
            loads.push(t0.elapsed().as_secs_f64() * 1e3);
            cpu.push(cpu_ms() - c0);
        }
        println!(
            "index of {} files: load median {:.1} ms, CPU {:.1} ms",
            ix.len(),
            median(&mut loads),
            median(&mut cpu)
        );
        std::fs::remove_dir_all(&dir)?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut cpu = Vec::with_capacity(runs);
    let mut digest = [0u8; 32];
    let mut len = 0;
    for _ in 0..runs {
        let (t0, c0) = (Instant::now(), cpu_ms());
        let (m, report) = scan_with(&root, &opts, Some(&ix))?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms() - c0);
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
    // What the index spares (hashes, xattr listings) must not change the
    // manifest: one scan without it gives the same one.
    let (plain, _) = scan_with(&root, &opts, None)?;
    let (indexed, _) = scan_with(&root, &opts, Some(&ix))?;
    if plain != indexed {
        return Err("the indexed scan's manifest differs from a plain scan's".into());
    }
    let runs: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{} entries, digest {}, runs ms [{}], median {:.1} ms, min {:.1} ms, CPU median {:.1} ms",
        len,
        sync_core::hex(&digest[..8]),
        runs.join(" "),
        median(&mut times),
        min,
        median(&mut cpu),
    );
    Ok(())
}
