//! Database page hashes sixteen pages at a time.
//!
//! A page's hash is blake3 of the page ([`super::page_hash`]). One call of
//! `blake3::hash` on a 4 KiB page compresses its four chunks side by side:
//! four of the sixteen lanes AVX-512 has (a 1 GB database: 0.39 s of one
//! core on this project's machine, against 0.14 s for the same bytes as one
//! input). Here the same tree (BLAKE3 paper, §2.1: chunks, then parents,
//! the last one the root) is computed for sixteen pages at once: chunk `j`
//! of each page in one `hash_many` call (every lane at chunk counter `j`),
//! then each level of parents, sixteen or more a call. The outputs are
//! bit-identical to `blake3::hash` of each page (the tests check every page
//! size SQLite allows against it).
//!
//! `hash_many` is the crate's multi-lane compression, public but marked
//! unstable (the crate has no stable call for many inputs yet: BLAKE3 issue
//! #478); the workspace pins blake3 to the exact version this was checked
//! against, and the tests fail should a new one change what it computes.

use blake3::IncrementCounter;
use blake3::platform::Platform;

/// Pages hashed at once (AVX-512's lanes).
const LANES: usize = 16;

/// The most 1 KiB chunks in a page (SQLite's largest page is 64 KiB).
const MAX_CHUNKS: usize = 64;

const CHUNK_LEN: usize = blake3::CHUNK_LEN;

/// BLAKE3's initial chaining value (the paper's IV: SHA-256's).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

// Domain flags (BLAKE3 paper, table 3).
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;

/// Whether pages of `size` bytes are hashed here: a whole power of two of
/// chunks (SQLite's pages of 1 KiB to 64 KiB; 512-byte pages are hashed one
/// by one).
fn batched(size: usize) -> bool {
    (CHUNK_LEN..=MAX_CHUNKS * CHUNK_LEN).contains(&size) && size.is_power_of_two()
}

/// The hashes of `pages` (each `(pgno, data)`, all of one size) into `out`
/// (as long as `pages`): [`super::page_hash`] of each.
pub(crate) fn page_hashes(pages: &[(u32, &[u8])], out: &mut [[u8; 32]]) {
    // (callers give one out a page; should they not, no more than fit)
    let pages = &pages[..pages.len().min(out.len())];
    let size = pages.first().map_or(0, |p| p.1.len());
    if !batched(size) || pages.iter().any(|p| p.1.len() != size) {
        for (o, (pgno, data)) in out.iter_mut().zip(pages) {
            *o = super::page_hash(*pgno, data);
        }
        return;
    }
    let platform = Platform::detect();
    let mut tree = Tree::new(size / CHUNK_LEN);
    let mut rest = (0..pages.len()).peekable();
    while rest.peek().is_some() {
        // page 1 is hashed with its change counters left out: on its own
        let mut group: [(usize, &[u8]); LANES] = [(0, &[]); LANES];
        let mut n = 0;
        while n < LANES
            && let Some(i) = rest.next()
        {
            if pages[i].0 == 1 {
                out[i] = super::page_hash(1, pages[i].1);
            } else {
                group[n] = (i, pages[i].1);
                n += 1;
            }
        }
        tree.hash(platform, &group[..n], size);
        for (k, &(i, _)) in group[..n].iter().enumerate() {
            out[i] = tree.cv(k);
        }
    }
}

/// The chaining values of one group's tree, a level at a time.
struct Tree {
    cvs: Vec<[u8; 32]>,
    next: Vec<[u8; 32]>,
}

impl Tree {
    /// For pages of `chunks` chunks.
    fn new(chunks: usize) -> Self {
        Self {
            cvs: vec![[0; 32]; LANES * chunks],
            next: vec![[0; 32]; LANES * chunks.div_ceil(2)],
        }
    }

    /// Hashes up to [`LANES`] pages of `size` bytes (a [`batched`] size);
    /// page `k`'s hash is then [`Tree::cv`]`(k)`.
    fn hash(&mut self, platform: Platform, pages: &[(usize, &[u8])], size: usize) {
        let n = pages.len();
        let chunks = size / CHUNK_LEN;
        static NONE: [u8; CHUNK_LEN] = [0; CHUNK_LEN];
        let mut inputs: [&[u8; CHUNK_LEN]; LANES] = [&NONE; LANES];
        let mut out = [0u8; LANES * 32];
        // chunk j of every page: lanes side by side at chunk counter j
        for j in 0..chunks {
            for (input, (_, page)) in inputs.iter_mut().zip(pages) {
                if let Some(c) = page
                    .get(j * CHUNK_LEN..(j + 1) * CHUNK_LEN)
                    .and_then(|c| c.try_into().ok())
                {
                    *input = c;
                }
            }
            let end = if chunks == 1 {
                CHUNK_END | ROOT
            } else {
                CHUNK_END
            };
            let o = &mut out[..n * 32];
            platform.hash_many(
                &inputs[..n],
                &IV,
                j as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                end,
                o,
            );
            for (k, cv) in o.chunks_exact(32).enumerate() {
                self.cvs[k * chunks + j].copy_from_slice(cv);
            }
        }
        // each level's parents: page k's nodes stay side by side
        let mut width = chunks;
        while width > 1 {
            let parents = n * width / 2;
            let flags = if width == 2 { PARENT | ROOT } else { PARENT };
            static NO_NODE: [u8; 64] = [0; 64];
            let mut blocks: [&[u8; 64]; LANES * MAX_CHUNKS / 2] =
                [&NO_NODE; LANES * MAX_CHUNKS / 2];
            let nodes = self.cvs[..2 * parents].as_flattened().chunks_exact(64);
            for (b, node) in blocks.iter_mut().zip(nodes) {
                if let Ok(node) = node.try_into() {
                    *b = node;
                }
            }
            let o = self.next[..parents].as_flattened_mut();
            platform.hash_many(
                &blocks[..parents],
                &IV,
                0,
                IncrementCounter::No,
                flags,
                0,
                0,
                o,
            );
            self.cvs[..parents].copy_from_slice(&self.next[..parents]);
            width /= 2;
        }
    }

    /// Page `k`'s hash after [`Tree::hash`].
    fn cv(&self, k: usize) -> [u8; 32] {
        self.cvs[k]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `size` bytes no two alike.
    fn pages(size: usize, n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..size * n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Every page size SQLite allows, groups full and not, page 1 among
    /// them or not: each hash is `page_hash`'s, one page at a time.
    #[test]
    fn sixteen_at_a_time_is_one_at_a_time() {
        for size in [512usize, 1024, 2048, 4096, 8192, 16384, 32768, 65536] {
            for (n, first) in [(0, 1), (1, 1), (1, 5), (15, 2), (16, 1), (17, 1), (40, 3)] {
                let data = pages(size, n, (size + n) as u64);
                let mut out = vec![[0; 32]; n];
                super::super::page_hashes_into(&data, size, first, &mut out);
                assert_eq!(out.len(), n, "size {size}, {n} pages");
                for (k, page) in data.chunks(size).enumerate() {
                    let pgno = first + k as u32;
                    assert_eq!(
                        out[k],
                        super::super::page_hash(pgno, page),
                        "size {size}, page {pgno} of {n} from {first}"
                    );
                }
            }
        }
    }

    /// The reference itself is blake3 of the page (but page 1).
    #[test]
    fn a_page_hash_is_blake3_of_the_page() {
        let data = pages(4096, 20, 7);
        let mut out = vec![[0; 32]; 20];
        super::super::page_hashes_into(&data, 4096, 2, &mut out);
        for (k, page) in data.chunks(4096).enumerate() {
            assert_eq!(&out[k], blake3::hash(page).as_bytes());
        }
    }

    /// Pages not in a run (as a cut hashes only those that changed), of
    /// mixed numbers, page 1 among them.
    #[test]
    fn scattered_pages_hash_as_they_would_alone() {
        let data = pages(4096, 50, 11);
        let picked: Vec<(u32, &[u8])> = data
            .chunks(4096)
            .enumerate()
            .filter(|(i, _)| i % 3 != 1)
            .map(|(i, p)| (i as u32 + 1, p))
            .collect();
        let mut out = vec![[0; 32]; picked.len()];
        page_hashes(&picked, &mut out);
        for ((pgno, page), h) in picked.iter().zip(&out) {
            assert_eq!(*h, super::super::page_hash(*pgno, page), "page {pgno}");
        }
    }

    /// Fewer outputs than pages (never given, but not a panic): as many
    /// pages as there are outputs.
    #[test]
    fn no_more_pages_are_hashed_than_there_are_outputs() {
        let data = pages(4096, 20, 9);
        let all: Vec<(u32, &[u8])> = (2..).zip(data.chunks(4096)).collect();
        let mut out = [[0; 32]; 17];
        page_hashes(&all, &mut out);
        assert_eq!(out[16], super::super::page_hash(18, all[16].1));
    }

    /// Pages of unequal length (never given, but not a panic): one by one.
    #[test]
    fn pages_of_unequal_length_are_hashed_one_by_one() {
        let data = pages(4096, 3, 5);
        let picked = [(2u32, &data[..4096]), (3, &data[4096..6000])];
        let mut out = [[0; 32]; 2];
        page_hashes(&picked, &mut out);
        assert_eq!(out[1], super::super::page_hash(3, &data[4096..6000]));
    }
}
