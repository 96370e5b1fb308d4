//! Tests of a round's transaction on the replica.

use super::*;
use std::os::unix::fs::MetadataExt as _;

/// Renames into place go by directory, on every core: each file lands
/// in its own directory, and a path staged twice in a round ends with
/// its later content.
#[test]
fn staged_files_of_many_directories_land_and_a_later_stage_wins() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let rel = |p: &str| RelPath::new(p.as_bytes()).unwrap();
    let put = |p: &str, body: &[u8]| {
        let mut s = r.stage(&rel(p)).unwrap();
        s.write(body).unwrap();
        s.commit(blake3::hash(body).as_bytes(), &Meta::default())
            .unwrap();
    };
    for i in 0..20 {
        r.mkdir(&rel(&format!("d{i}"))).unwrap();
    }
    for n in 0..200 {
        put(&format!("d{}/f{n}", n % 20), format!("{n}").as_bytes());
    }
    put("d3/twice", b"first");
    put("d4/f4", b"again");
    put("d3/twice", b"second");
    // top-level files (no parent but the root) and a deeper directory
    // whose path begins like a sibling's
    r.mkdir(&rel("d1/d1")).unwrap();
    put("top", b"top");
    put("d1/d1/f1", b"deeper");
    put("top", b"top again");
    r.finish().unwrap();
    assert_eq!(std::fs::read(d.path().join("top")).unwrap(), b"top again");
    assert_eq!(std::fs::read(d.path().join("d1/d1/f1")).unwrap(), b"deeper");
    assert_eq!(std::fs::read(d.path().join("d1/f1")).unwrap(), b"1");
    for n in (0..200).filter(|&n| n != 4) {
        let got = std::fs::read(d.path().join(format!("d{}/f{n}", n % 20))).unwrap();
        assert_eq!(got, format!("{n}").as_bytes());
    }
    assert_eq!(std::fs::read(d.path().join("d4/f4")).unwrap(), b"again");
    assert_eq!(std::fs::read(d.path().join("d3/twice")).unwrap(), b"second");
    // nothing left staged
    for i in 0..20 {
        let names: Vec<_> = std::fs::read_dir(d.path().join(format!("d{i}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('f') && n != "twice" && n != "d1")
            .collect();
        assert!(names.is_empty(), "d{i}: {names:?}");
    }
}

/// Content ending in zero blocks, with them in the middle, and with none:
/// each lands whole, its zero blocks as holes, its length exact.
#[test]
fn staged_content_keeps_its_length_whatever_it_ends_with() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let block = |b: u8| vec![b; HOLE_BLOCK];
    let zeros = vec![0u8; 64 * HOLE_BLOCK];
    let cases: [(&str, Vec<u8>); 4] = [
        ("tail", [block(1), zeros.clone()].concat()),
        ("middle", [block(1), zeros.clone(), block(2)].concat()),
        ("short", [block(1), vec![3u8; 100]].concat()),
        ("empty-tail", [vec![5u8; 10], zeros.clone()].concat()),
    ];
    for (name, data) in &cases {
        let mut s = r.stage(&RelPath::new(name.as_bytes()).unwrap()).unwrap();
        s.write(data).unwrap();
        s.commit(blake3::hash(data).as_bytes(), &Meta::default())
            .unwrap();
    }
    r.finish().unwrap();
    for (name, data) in &cases {
        let path = d.path().join(name);
        assert_eq!(&std::fs::read(&path).unwrap(), data, "{name}");
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        if *name != "short" {
            assert!(
                allocated < data.len() as u64 / 2,
                "{name}: {allocated} bytes allocated"
            );
        }
    }
}

/// Content arriving in pieces of any size lands whole, its aligned zero
/// blocks as holes, with one write a run of blocks between holes (not one
/// a block).
#[test]
fn staged_content_is_written_a_run_at_a_time() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let run = |b: u8, blocks: usize| vec![b; blocks * HOLE_BLOCK];
    let data = [run(1, 64), run(0, 3), run(2, 5), vec![0u8; 100]].concat();
    // (pieces, writes): one piece makes a write a run (the trailing
    // unaligned zeros included); odd pieces add one at each cut
    for (pieces, writes) in [(vec![data.len()], 2), (vec![1000, 5000, 300_000], 4)] {
        let mut s = r.stage(&RelPath::new(b"f".to_vec()).unwrap()).unwrap();
        WRITES.with(|n| n.set(0));
        let mut rest = &data[..];
        for &p in pieces.iter().chain(std::iter::once(&usize::MAX)) {
            let (piece, tail) = rest.split_at(p.min(rest.len()));
            s.write(piece).unwrap();
            rest = tail;
        }
        assert_eq!(WRITES.with(std::cell::Cell::get), writes, "{pieces:?}");
        s.commit(blake3::hash(&data).as_bytes(), &Meta::default())
            .unwrap();
        r.finish().unwrap();
        assert_eq!(
            std::fs::read(d.path().join("f")).unwrap(),
            data,
            "{pieces:?}"
        );
    }
}

/// `n` bytes of a pattern with no zero byte (so no zero block either).
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect()
}

/// Whether the file system under `dir` takes direct I/O.
fn takes_direct(dir: &std::path::Path) -> bool {
    let fd: std::os::fd::OwnedFd = File::create(dir.join("probe")).unwrap().into();
    let takes = super::super::direct::dio_align(&fd).is_some();
    std::fs::remove_file(dir.join("probe")).unwrap();
    if !takes {
        eprintln!("no direct I/O on {}: the page cache only", dir.display());
    }
    takes
}

/// Stages `data` for `name` sized as `size`, in `pieces` (the rest in one),
/// and commits it; the stage is handed to `check` before its commit.
fn stage_in_pieces(
    r: &Replica,
    name: &str,
    (data, size): (&[u8], u64),
    pieces: &[usize],
    check: impl FnOnce(&mut Staged<'_>),
) {
    let mut s = r
        .stage(&RelPath::new(name.as_bytes()).unwrap())
        .unwrap()
        .sized(size);
    let mut rest = data;
    for &p in pieces.iter().chain(std::iter::once(&usize::MAX)) {
        let (piece, tail) = rest.split_at(p.min(rest.len()));
        s.write(piece).unwrap();
        rest = tail;
    }
    check(&mut s);
    s.commit(blake3::hash(data).as_bytes(), &Meta::default())
        .unwrap();
    r.finish().unwrap();
}

/// A large new file goes past the page cache where the file system takes
/// direct I/O: whatever pieces it arrives in, it lands whole, its zero
/// blocks as holes, only its unaligned tail cached. A file under
/// `DIRECT_MIN` takes the page cache.
#[test]
fn a_large_new_file_is_written_past_the_page_cache() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let takes = takes_direct(d.path());
    let holes = 40 * HOLE_BLOCK;
    let data = [
        pattern(3 << 20, 1),
        vec![0; holes],
        pattern(2 << 20, 7),
        pattern(1234, 9),
    ]
    .concat();
    let cuts: [&[usize]; 3] = [&[], &[1000, 70_000, 1 << 20, 3_000_001], &[4096; 300]];
    for (i, pieces) in cuts.into_iter().enumerate() {
        let name = format!("big{i}");
        stage_in_pieces(&r, &name, (&data, data.len() as u64), pieces, |s| {
            assert_eq!(s.direct.is_some(), takes, "{pieces:?}");
        });
        let path = d.path().join(&name);
        let cached = super::super::direct::resident(&File::open(&path).unwrap());
        if takes {
            // the tail's page, and the one before when the tail began in it
            assert!(cached <= 2, "{pieces:?}: {cached} pages cached");
        }
        assert!(std::fs::read(&path).unwrap() == data, "{pieces:?}");
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated <= (data.len() - holes) as u64 + 64 * 1024,
            "{pieces:?}: {allocated} bytes allocated"
        );
    }
    // under the threshold: the page cache, as before
    let small = pattern(DIRECT_MIN as usize - 1, 3);
    stage_in_pieces(&r, "small", (&small, small.len() as u64), &[], |s| {
        assert!(s.direct.is_none());
    });
    assert_eq!(std::fs::read(d.path().join("small")).unwrap(), small);
}

/// A direct write the file system refuses (`EINVAL`: here a buffer out of
/// alignment) is written through the page cache, and so is the rest of the
/// file: it lands whole, its tail and hole-ended length included.
#[test]
fn a_refused_direct_write_takes_the_page_cache() {
    let d = tempfile::tempdir().unwrap();
    if !takes_direct(d.path()) {
        return;
    }
    let r = Replica::open(d.path()).unwrap();
    let data = [pattern(3 << 20, 2), pattern(77, 5), vec![0; 8 * HOLE_BLOCK]].concat();
    let mut refused = false;
    let mut s = r.stage(&RelPath::new(b"f".to_vec()).unwrap()).unwrap();
    s = s.sized(data.len() as u64);
    s.direct.as_mut().unwrap().misalign();
    s.write(&data[..1 << 20]).unwrap();
    refused |= !s.direct.as_ref().unwrap().is_direct();
    s.write(&data[1 << 20..]).unwrap();
    s.commit(blake3::hash(&data).as_bytes(), &Meta::default())
        .unwrap();
    r.finish().unwrap();
    assert!(refused, "the misaligned write was taken");
    assert!(std::fs::read(d.path().join("f")).unwrap() == data);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Whatever runs of data and zero blocks a large file holds, whatever
    /// pieces it arrives in, and whatever unaligned tail it ends with, the
    /// gathered direct writes land it byte for byte.
    #[test]
    fn a_large_file_lands_whole_whatever_its_shape(
        segments in proptest::collection::vec((proptest::bool::ANY, 1usize..300), 1..8),
        tail in 0usize..HOLE_BLOCK,
        cuts in proptest::collection::vec(1usize..700_000, 0..6),
        seed in 0u32..1000,
    ) {
        let mut data = pattern(DIRECT_MIN as usize, seed);
        for (zeros, blocks) in segments {
            let n = blocks * HOLE_BLOCK;
            data.extend(if zeros { vec![0; n] } else { pattern(n, seed + 1) });
        }
        data.extend(pattern(tail, seed + 2));
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path()).unwrap();
        stage_in_pieces(&r, "f", (&data, data.len() as u64), &cuts, |_| {});
        proptest::prop_assert!(std::fs::read(d.path().join("f")).unwrap() == data);
    }
}

/// Direct writes go to the staged file itself: when its temp name leads to
/// another file by then (swapped by someone with access to the directory),
/// nothing is written through that name.
#[test]
fn a_temp_name_leading_to_another_file_gets_no_direct_write() {
    use std::os::unix::ffi::OsStrExt as _;
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let s = r.stage(&RelPath::new(b"f".to_vec()).unwrap()).unwrap();
    let tmp = d.path().join(std::ffi::OsStr::from_bytes(&s.tmp));
    std::fs::rename(&tmp, d.path().join("moved")).unwrap();
    std::fs::write(&tmp, b"other").unwrap();
    let data = pattern(2 << 20, 4);
    let mut s = s.sized(data.len() as u64);
    assert!(s.direct.is_none(), "a direct descriptor of another file");
    s.write(&data).unwrap();
    assert_eq!(std::fs::read(&tmp).unwrap(), b"other");
    assert!(std::fs::read(d.path().join("moved")).unwrap() == data);
}

/// A file's announced size comes from the peer: whatever it claims, the
/// buffer its content gathers in is at most a chunk.
#[test]
fn a_huge_announced_size_gathers_in_a_bounded_buffer() {
    let d = tempfile::tempdir().unwrap();
    if !takes_direct(d.path()) {
        return;
    }
    let r = Replica::open(d.path()).unwrap();
    for size in [u64::MAX, 1 << 40, DIRECT_MIN] {
        let s = r
            .stage(&RelPath::new(b"f".to_vec()).unwrap())
            .unwrap()
            .sized(size);
        let cap = s.direct.as_ref().expect("direct").capacity();
        assert!(cap <= FILE_CHUNK + (64 << 10), "{size}: {cap} bytes");
    }
}
