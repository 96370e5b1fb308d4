//! Throughput of the delta engine: signature of a basis, delta of a file with 1%
//! of its 4 KiB pages changed, and rebuilding it (fast_rsync through sync-core's
//! windowed API). `cargo bench -p understudy-benches`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngCore, SeedableRng};
use sync_core::delta::{self, Chunk, Encoder, WINDOW};

const SIZE: usize = 64 << 20;

fn data() -> (Vec<u8>, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut basis = vec![0u8; SIZE];
    rng.fill_bytes(&mut basis);
    let mut new = basis.clone();
    let pages = SIZE / 4096;
    for k in 0..pages / 100 {
        let p = (k * 7919 + 13) % pages;
        rng.fill_bytes(&mut new[p * 4096..p * 4096 + 4096]);
    }
    (basis, new)
}

fn encode_all(sig: &fast_rsync::Signature, new: &[u8]) -> Vec<Chunk> {
    let mut enc = Encoder::new(Some(sig));
    new.chunks(WINDOW).map(|w| enc.encode(w)).collect()
}

fn bench(c: &mut Criterion) {
    let (basis, new) = data();
    let mut g = c.benchmark_group("delta_64MiB_1pct");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("signature", |b| b.iter(|| delta::signature(&basis)));
    let sig = delta::parse_signature(delta::signature(&basis)).expect("own signature");
    g.bench_function("delta", |b| b.iter(|| encode_all(&sig, &new)));
    let chunks = encode_all(&sig, &new);
    let wire: usize = chunks
        .iter()
        .map(|c| match c {
            Chunk::Literal(l) => l.len(),
            Chunk::Delta(d) => d.len(),
        })
        .sum();
    eprintln!(
        "delta size: {wire} bytes = {:.2}% of {SIZE}",
        wire as f64 * 100.0 / SIZE as f64
    );
    g.bench_function("apply", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(SIZE);
            for c in &chunks {
                match c {
                    Chunk::Literal(l) => out.extend_from_slice(l),
                    Chunk::Delta(d) => {
                        delta::apply_delta(&basis, d, &mut out, WINDOW).expect("applies")
                    }
                }
            }
            out
        })
    });
    g.bench_function("blake3_verify", |b| b.iter(|| blake3::hash(&new)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
