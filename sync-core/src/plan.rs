//! What a replica must do to turn its tree (`dst`) into the source's (`src`).

use crate::manifest::{meta_differences, path_cmp};
use crate::{Entry, Kind, Manifest, RelPath};
use std::collections::HashSet;

/// A file whose content must come from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Index in the source manifest.
    pub index: usize,
    /// Whether the replica has a regular file at that path to use as a basis.
    pub basis: bool,
}

/// The steps, in the order they are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Replica paths to remove (whole subtrees), before anything is created.
    pub delete: Vec<RelPath>,
    /// Source directories to create (parents first).
    pub mkdir: Vec<usize>,
    /// Regular files whose content must be fetched.
    pub fetch: Vec<Fetch>,
    /// Live databases: each is compared by its page hash and brought to the
    /// source's snapshot by the agent.
    pub dbs: Vec<usize>,
    /// Symlinks and special files to (re)create.
    pub create: Vec<usize>,
    /// Hard links to make once their targets are in place.
    pub hardlink: Vec<usize>,
    /// Non-directory entries whose metadata alone differs.
    pub meta: Vec<usize>,
    /// Every source directory, deepest first: metadata is set last, when their
    /// content no longer changes their mtime.
    pub dirs: Vec<usize>,
}

impl Plan {
    /// Whether nothing but directory checks remain.
    #[must_use]
    pub fn is_noop(&self) -> bool {
        self.delete.is_empty()
            && self.mkdir.is_empty()
            && self.fetch.is_empty()
            && self.dbs.is_empty()
            && self.create.is_empty()
            && self.hardlink.is_empty()
            && self.meta.is_empty()
    }
}

/// Computes the plan. With `checksum`, regular files are compared by content hash
/// (both manifests must carry hashes); otherwise by size and mtime, as rsync does.
#[must_use]
pub fn plan(src: &Manifest, dst: &Manifest, checksum: bool) -> Plan {
    plan_with_links(src, dst, checksum, &HashSet::new())
}

/// [`plan`], knowing which replica files have several names: such a file is
/// rewritten (a new inode) unless the source links it too, so that a change of
/// one name never leaks into another.
#[must_use]
pub fn plan_with_links(
    src: &Manifest,
    dst: &Manifest,
    checksum: bool,
    dst_linked: &HashSet<RelPath>,
) -> Plan {
    let leaders: HashSet<&RelPath> = src
        .entries
        .iter()
        .filter_map(|e| {
            if let Kind::HardLink { target } = &e.kind {
                Some(target)
            } else {
                None
            }
        })
        .collect();
    let mut p = Plan {
        delete: deletions(src, dst),
        ..Plan::default()
    };
    let deleted: std::collections::HashSet<&RelPath> = p.delete.iter().collect();
    let under_deleted = |path: &RelPath| {
        let mut cur = path.clone();
        loop {
            if deleted.contains(&cur) {
                return true;
            }
            match cur.split_last() {
                Some((parent, _)) => cur = parent,
                None => return false,
            }
        }
    };
    for (i, s) in src.entries.iter().enumerate() {
        let d = dst
            .get(&s.path)
            .map(|(_, d)| d)
            .filter(|d| !under_deleted(&d.path));
        match (&s.kind, d) {
            (Kind::Dir, None) => p.mkdir.push(i),
            (Kind::Dir, Some(_)) => {}
            (Kind::File { .. }, None) => p.fetch.push(Fetch {
                index: i,
                basis: false,
            }),
            (Kind::File { size, hash }, Some(d)) => match &d.kind {
                Kind::File {
                    size: dsize,
                    hash: dhash,
                } => {
                    let unlinked_here = dst_linked.contains(&d.path) && !leaders.contains(&s.path);
                    let same = !unlinked_here
                        && *size == *dsize
                        && if checksum {
                            hash == dhash
                        } else {
                            (s.meta.mtime_sec, s.meta.mtime_nsec)
                                == (d.meta.mtime_sec, d.meta.mtime_nsec)
                        };
                    if !same {
                        p.fetch.push(Fetch {
                            index: i,
                            basis: *dsize > 0,
                        });
                    } else if !meta_differences(&s.meta, &d.meta, true).is_empty() {
                        p.meta.push(i);
                    }
                }
                _ => p.fetch.push(Fetch {
                    index: i,
                    basis: false,
                }),
            },
            (Kind::HardLink { .. }, _) => p.hardlink.push(i),
            (Kind::Database { .. }, _) => p.dbs.push(i),
            (_, None) => p.create.push(i),
            (_, Some(d)) => {
                if d.kind != s.kind {
                    p.create.push(i);
                } else if !same_meta(s, d) {
                    p.meta.push(i);
                }
            }
        }
    }
    for (i, s) in src.entries.iter().enumerate().rev() {
        if s.kind == Kind::Dir {
            p.dirs.push(i);
        }
    }
    debug_assert!(
        p.mkdir
            .windows(2)
            .all(|w| path_cmp(&src.entries[w[0]].path, &src.entries[w[1]].path).is_lt())
    );
    p
}

/// Deletions: replica entries the source does not have (top-most only), and
/// entries whose kind change cannot be done by a rename over them.
fn deletions(src: &Manifest, dst: &Manifest) -> Vec<RelPath> {
    let mut out: Vec<RelPath> = Vec::new();
    for d in &dst.entries {
        if d.path.is_root() || out.last().is_some_and(|top| d.path.starts_with(top)) {
            continue;
        }
        let remove = match src.get(&d.path) {
            None => true,
            Some((_, s)) => (d.kind == Kind::Dir) != (s.kind == Kind::Dir),
        };
        if remove {
            out.push(d.path.clone());
        }
    }
    out
}

fn same_meta(s: &Entry, d: &Entry) -> bool {
    let with_mode = !matches!(s.kind, Kind::Symlink { .. });
    meta_differences(&s.meta, &d.meta, with_mode).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::entry as e;

    fn f(path: &str, size: u64) -> Entry {
        crate::test_util::file(path, size, size as u8)
    }
    fn names(m: &Manifest, idx: &[usize]) -> Vec<String> {
        idx.iter().map(|&i| m.entries[i].path.to_string()).collect()
    }

    #[test]
    fn plans_each_kind_of_change() {
        let src = Manifest::from_entries(vec![
            e("", Kind::Dir),
            e("d", Kind::Dir),
            f("d/new", 3),
            f("same", 4),
            f("changed", 5),
            e(
                "was_dir",
                Kind::Symlink {
                    target: b"x".to_vec(),
                },
            ),
            e("was_link", Kind::Dir),
            e(
                "hl",
                Kind::HardLink {
                    target: RelPath::new(&b"same"[..]).unwrap(),
                },
            ),
        ]);
        let mut chmod = f("same", 4);
        chmod.meta.mode = 0o600;
        let dst = Manifest::from_entries(vec![
            e("", Kind::Dir),
            chmod,
            f("changed", 6),
            e("was_dir", Kind::Dir),
            f("was_dir/inner", 1),
            e(
                "was_link",
                Kind::Symlink {
                    target: b"/etc".to_vec(),
                },
            ),
            f("gone", 1),
        ]);
        let p = plan(&src, &dst, false);
        let del: Vec<String> = p.delete.iter().map(|p| p.to_string()).collect();
        assert_eq!(del, ["gone", "was_dir", "was_link"]);
        assert_eq!(names(&src, &p.mkdir), ["d", "was_link"]);
        let fetch: Vec<_> = p
            .fetch
            .iter()
            .map(|f| (src.entries[f.index].path.to_string(), f.basis))
            .collect();
        assert_eq!(
            fetch,
            [("changed".to_string(), true), ("d/new".to_string(), false)]
        );
        assert_eq!(names(&src, &p.create), ["was_dir"]);
        assert_eq!(names(&src, &p.meta), ["same"]);
        assert_eq!(names(&src, &p.hardlink), ["hl"]);
        assert_eq!(names(&src, &p.dirs), ["was_link", "d", "."]);
    }

    #[test]
    fn replica_hard_links_the_source_no_longer_has_are_broken() {
        let m = Manifest::from_entries(vec![e("", Kind::Dir), f("a", 1), f("b", 1)]);
        let linked: HashSet<RelPath> = [
            RelPath::new(&b"a"[..]).unwrap(),
            RelPath::new(&b"b"[..]).unwrap(),
        ]
        .into();
        let p = plan_with_links(&m, &m, false, &linked);
        assert_eq!(p.fetch.len(), 2, "both names get their own inode");
        let mut src = m.clone();
        src.entries[2].kind = Kind::HardLink {
            target: RelPath::new(&b"a"[..]).unwrap(),
        };
        let p = plan_with_links(&src, &m, false, &linked);
        assert!(
            p.fetch.is_empty(),
            "the source links them too: nothing to rewrite"
        );
        assert_eq!(p.hardlink.len(), 1);
    }

    #[test]
    fn identical_trees_plan_nothing() {
        let m = Manifest::from_entries(vec![e("", Kind::Dir), f("a", 1), e("l", Kind::Fifo)]);
        assert!(plan(&m, &m, true).is_noop());
    }
}
