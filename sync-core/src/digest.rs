//! The quick digest of a tree: a Merkle root of what a full round compares
//! when it compares by size and mtime (as rsync does), so that two hosts can
//! tell from 32 bytes that a full round would change nothing.
//!
//! A leaf covers an entry's name, its kind (a regular file's size but not its
//! content hash; a database's page hash; a link's target; a device's number)
//! and its metadata (mode except a symlink's, owner, mtime, the xattrs the
//! replica mirrors). It may say "different" where a round would do nothing
//! (then the round runs as before); it never says "same" where the plan would
//! change something: every field the plan compares is in it, but one. The
//! mtime of a directory that holds a live database is left out: SQLite's
//! side files (`-wal`, `-shm`) come and go in it whenever a process opens
//! the database, the source agent's own cut included, so it moves on every
//! run; a round that carries any change sets it.

use crate::manifest::merkle;
use crate::meta::is_mirrored_xattr;
use proto::{Entry, Kind, Meta, RelPath};
use std::collections::{HashMap, HashSet};

/// The quick digest of `entries` (sorted, as a scan or a manifest has them).
#[must_use]
pub fn quick_root(entries: &[Entry]) -> [u8; 32] {
    quick_root_with(entries, &HashMap::new())
}

/// The manifest's root hash and its quick digest, computed at once.
#[must_use]
pub fn root_and_quick(m: &crate::Manifest) -> ([u8; 32], [u8; 32]) {
    rayon::join(|| m.root_hash(), || quick_root(&m.entries))
}

/// [`quick_root`] with some entries' kinds replaced: the replica's scan sees
/// a database as a file, and says which page hash it holds for it here.
#[must_use]
pub fn quick_root_with(entries: &[Entry], kinds: &HashMap<RelPath, Kind>) -> [u8; 32] {
    fn kind<'a>(kinds: &'a HashMap<RelPath, Kind>, e: &'a Entry) -> &'a Kind {
        kinds.get(&e.path).unwrap_or(&e.kind)
    }
    let db_dirs: HashSet<RelPath> = entries
        .iter()
        .filter(|e| matches!(kind(kinds, e), Kind::Database { .. }))
        .filter_map(|e| e.path.split_last().map(|(dir, _)| dir))
        .collect();
    merkle(entries, |e| {
        quick_leaf(e, kind(kinds, e), !db_dirs.contains(&e.path))
    })
}

fn quick_leaf(e: &Entry, kind: &Kind, with_mtime: bool) -> [u8; 32] {
    let name = e.path.split_last().map(|(_, n)| n).unwrap_or(b"");
    let kind = match kind {
        Kind::File { size, .. } => Kind::File {
            size: *size,
            hash: [0; 32],
        },
        other => other.clone(),
    };
    let meta = Meta {
        mode: if matches!(kind, Kind::Symlink { .. }) {
            0
        } else {
            e.meta.mode
        },
        xattrs: e
            .meta
            .xattrs
            .iter()
            .filter(|x| is_mirrored_xattr(&x.name))
            .cloned()
            .collect(),
        ..e.meta.clone()
    };
    let meta = if with_mtime {
        meta
    } else {
        Meta {
            mtime_sec: 0,
            mtime_nsec: 0,
            ..meta
        }
    };
    crate::manifest::hash_encoded(b"understudy-quick-v1\0", &(name, &kind, &meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{entry, file};

    fn tree() -> Vec<Entry> {
        let mut root = entry("x", Kind::Dir);
        root.path = RelPath::root();
        vec![
            root,
            file("a", 3, 1),
            entry("d", Kind::Dir),
            file("d/b", 5, 2),
        ]
    }

    #[test]
    fn every_field_the_plan_compares_changes_the_digest() {
        let base = quick_root(&tree());
        type Change = Box<dyn Fn(&mut Vec<Entry>)>;
        let changes: Vec<(&str, Change)> = vec![
            (
                "size",
                Box::new(|t| {
                    t[3].kind = Kind::File {
                        size: 6,
                        hash: [0; 32],
                    }
                }),
            ),
            ("mtime", Box::new(|t| t[3].meta.mtime_nsec += 1)),
            ("mtime s", Box::new(|t| t[1].meta.mtime_sec += 1)),
            ("mode", Box::new(|t| t[1].meta.mode ^= 0o100)),
            ("owner", Box::new(|t| t[1].meta.uid += 1)),
            ("group", Box::new(|t| t[1].meta.gid += 1)),
            ("dir mtime", Box::new(|t| t[2].meta.mtime_sec += 1)),
            (
                "xattr",
                Box::new(|t| {
                    t[1].meta.xattrs.push(proto::Xattr {
                        name: b"user.x".to_vec(),
                        value: b"1".to_vec(),
                    })
                }),
            ),
            ("gone", Box::new(|t| drop(t.remove(3)))),
            ("added", Box::new(|t| t.push(file("d/c", 1, 0)))),
            (
                "kind",
                Box::new(|t| {
                    t[1].kind = Kind::Symlink {
                        target: b"x".to_vec(),
                    }
                }),
            ),
            (
                "moved",
                Box::new(|t| t[3].path = RelPath::new(b"d/c".as_slice()).expect("path")),
            ),
        ];
        for (what, change) in changes {
            let mut t = tree();
            change(&mut t);
            assert_ne!(quick_root(&t), base, "{what} left the digest as it was");
        }
    }

    #[test]
    fn content_hashes_and_unmirrored_labels_do_not_count() {
        let base = quick_root(&tree());
        let mut t = tree();
        t[3].kind = Kind::File {
            size: 5,
            hash: [7; 32],
        };
        t[1].meta.xattrs.push(proto::Xattr {
            name: b"security.selinux".to_vec(),
            value: b"system_u:object_r:x".to_vec(),
        });
        assert_eq!(quick_root(&t), base);
    }

    #[test]
    fn the_mtime_of_a_directory_holding_a_database_does_not_count() {
        let db = Kind::Database {
            page_size: 4096,
            pages: 2,
            hash: [3; 32],
        };
        let mut t = tree();
        t[3].kind = db.clone();
        let base = quick_root(&t);
        t[2].meta.mtime_sec += 1;
        assert_eq!(quick_root(&t), base, "d holds a database");
        t[0].meta.mtime_sec += 1;
        assert_ne!(quick_root(&t), base, "the root holds none");
        // the replica's view: a file it holds the page table of
        let as_db: HashMap<RelPath, Kind> = [(t[3].path.clone(), db)].into();
        let mut f = tree();
        f[2].meta.mtime_sec += 5;
        f[0].meta.mtime_sec += 1;
        assert_eq!(quick_root_with(&f, &as_db), quick_root(&t));
    }

    #[test]
    fn a_database_counts_by_the_page_hash_given_for_it() {
        let mut t = tree();
        let db = Kind::Database {
            page_size: 4096,
            pages: 2,
            hash: [3; 32],
        };
        t[1].kind = db.clone();
        let as_file: HashMap<RelPath, Kind> = [(t[1].path.clone(), db.clone())].into();
        assert_eq!(quick_root_with(&tree(), &as_file), quick_root(&t));
        let other: HashMap<RelPath, Kind> = [(
            t[1].path.clone(),
            Kind::Database {
                page_size: 4096,
                pages: 2,
                hash: [4; 32],
            },
        )]
        .into();
        assert_ne!(quick_root_with(&tree(), &other), quick_root(&t));
    }
}
