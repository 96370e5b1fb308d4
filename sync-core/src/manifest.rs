//! The manifest: every entry of a tree, sorted, with a Merkle root hash.

use crate::{Entry, Error, Kind, Meta, RelPath};
use std::cmp::Ordering;
use std::collections::HashMap;

/// Orders paths component by component, so that a directory comes right before
/// its own subtree (pre-order), the root first.
#[must_use]
pub fn path_cmp(a: &RelPath, b: &RelPath) -> Ordering {
    a.cmp(b)
}

/// The entries of a tree, sorted by [`path_cmp`], the root (a directory) first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Sorted entries.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Sorts `entries` into a manifest.
    #[must_use]
    pub fn from_entries(mut entries: Vec<Entry>) -> Self {
        entries.sort_by(|a, b| path_cmp(&a.path, &b.path));
        Self { entries }
    }

    /// The entry at `path` and its index.
    #[must_use]
    pub fn get(&self, path: &RelPath) -> Option<(usize, &Entry)> {
        self.entries
            .binary_search_by(|e| path_cmp(&e.path, path))
            .ok()
            .map(|i| (i, &self.entries[i]))
    }

    /// Sum of the sizes of regular files.
    #[must_use]
    pub fn bytes_total(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Number of regular files (hard links not counted).
    #[must_use]
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .count()
    }

    /// Checks what a manifest from a peer must satisfy before anything is applied:
    /// sorted and unique paths, the root first and a directory, every parent a
    /// directory of the manifest, hard links naming an earlier regular file or
    /// database, no reserved temp names.
    pub fn check_structure(&self) -> Result<(), Error> {
        let Some(first) = self.entries.first() else {
            return Err(Error::invalid(".", "empty manifest"));
        };
        if !first.path.is_root() || first.kind != Kind::Dir {
            return Err(Error::invalid(
                &first.path,
                "manifest must start with the root directory",
            ));
        }
        let mut kinds: HashMap<&RelPath, &Kind> = HashMap::with_capacity(self.entries.len());
        kinds.insert(&first.path, &first.kind);
        for w in self.entries.windows(2) {
            if path_cmp(&w[0].path, &w[1].path) != Ordering::Less {
                return Err(Error::invalid(
                    &w[1].path,
                    "manifest not sorted or path repeated",
                ));
            }
        }
        for e in &self.entries[1..] {
            let Some((parent, name)) = e.path.split_last() else {
                return Err(Error::invalid(&e.path, "second root entry"));
            };
            if crate::is_temp_name(name) {
                return Err(Error::invalid(
                    &e.path,
                    "name uses the reserved temp-file prefix",
                ));
            }
            if kinds.get(&parent) != Some(&&Kind::Dir) {
                return Err(Error::invalid(
                    &e.path,
                    "parent is not a directory of the manifest",
                ));
            }
            if let Kind::HardLink { target } = &e.kind
                && !matches!(
                    kinds.get(target),
                    Some(Kind::File { .. } | Kind::Database { .. })
                )
            {
                return Err(bad_link(&e.path, target));
            }
            kinds.insert(&e.path, &e.kind);
        }
        Ok(())
    }

    /// The blake3 Merkle root: a directory's hash covers its own entry and its
    /// children's hashes in order; any other entry's hash covers its name, kind
    /// (with content hash) and metadata. Equal roots mean equal trees.
    #[must_use]
    pub fn root_hash(&self) -> [u8; 32] {
        merkle(&self.entries, leaf_hash)
    }
}

/// A Merkle root of `entries` (sorted, parents before children) with `leaf`
/// hashing each entry: a directory's node covers its leaf and its children's
/// nodes in order.
pub(crate) fn merkle(entries: &[Entry], leaf: impl Fn(&Entry) -> [u8; 32]) -> [u8; 32] {
    let mut stack: Vec<(&RelPath, blake3::Hasher)> = Vec::new();
    fn pop(stack: &mut Vec<(&RelPath, blake3::Hasher)>) -> Option<[u8; 32]> {
        let (_, h) = stack.pop()?;
        let out = *h.finalize().as_bytes();
        match stack.last_mut() {
            Some((_, parent)) => {
                parent.update(&out);
                None
            }
            None => Some(out),
        }
    }
    let mut root = None;
    for e in entries {
        while let Some((top, _)) = stack.last() {
            if e.path.starts_with(top) && &e.path != *top {
                break;
            }
            if let Some(r) = pop(&mut stack) {
                root = Some(r);
            }
        }
        let leaf = leaf(e);
        if e.kind == Kind::Dir {
            let mut h = blake3::Hasher::new();
            h.update(b"dir");
            h.update(&leaf);
            stack.push((&e.path, h));
        } else if let Some((_, parent)) = stack.last_mut() {
            parent.update(&leaf);
        }
    }
    while !stack.is_empty() {
        if let Some(r) = pop(&mut stack) {
            root = Some(r);
        }
    }
    root.unwrap_or([0; 32])
}

/// A hard link whose target is not one a manifest may name.
fn bad_link(path: &RelPath, target: &RelPath) -> Error {
    Error::invalid(
        path,
        format!("hard link to {target}, which is not an earlier regular file or database"),
    )
}

fn leaf_hash(e: &Entry) -> [u8; 32] {
    let name = e.path.split_last().map(|(_, n)| n).unwrap_or(b"");
    hash_encoded(b"understudy-entry-v1\0", &(name, &e.kind, &e.meta))
}

/// blake3 of `domain` then `value`'s bincode (standard config), encoded in
/// a buffer each thread reuses (a tree's digest hashes every entry).
pub(crate) fn hash_encoded(domain: &[u8], value: &impl serde::Serialize) -> [u8; 32] {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        // Encoding cannot fail for these plain types; an empty buffer would
        // still be deterministic.
        if bincode::serde::encode_into_std_write(value, buf, bincode::config::standard()).is_err() {
            buf.clear();
        }
        let mut h = blake3::Hasher::new();
        h.update(domain);
        h.update(buf);
        *h.finalize().as_bytes()
    })
}

/// One difference between two manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Only the left side has it.
    OnlyLeft(RelPath),
    /// Only the right side has it.
    OnlyRight(RelPath),
    /// Both have it, with these fields differing.
    Changed(RelPath, Vec<String>),
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::OnlyLeft(p) => write!(f, "only in source: {p}"),
            Difference::OnlyRight(p) => write!(f, "only in destination: {p}"),
            Difference::Changed(p, what) => write!(f, "differs: {p} ({})", what.join(", ")),
        }
    }
}

/// Field-by-field differences between two metadata records.
#[must_use]
pub fn meta_differences(a: &Meta, b: &Meta, with_mode: bool) -> Vec<String> {
    let mut out = Vec::new();
    if with_mode && a.mode != b.mode {
        out.push(format!("mode {:o} vs {:o}", a.mode, b.mode));
    }
    if a.uid != b.uid || a.gid != b.gid {
        out.push(format!("owner {}:{} vs {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    if (a.mtime_sec, a.mtime_nsec) != (b.mtime_sec, b.mtime_nsec) {
        out.push(format!(
            "mtime {}.{:09} vs {}.{:09}",
            a.mtime_sec, a.mtime_nsec, b.mtime_sec, b.mtime_nsec
        ));
    }
    let mirrored = |m: &Meta| {
        m.xattrs
            .iter()
            .filter(|x| crate::meta::is_mirrored_xattr(&x.name))
            .cloned()
            .collect::<Vec<_>>()
    };
    if mirrored(a) != mirrored(b) {
        fn names(m: &Meta) -> Vec<String> {
            m.xattrs
                .iter()
                .map(|x| String::from_utf8_lossy(&x.name).into_owned())
                .collect()
        }
        let mut diff: Vec<String> = names(a)
            .into_iter()
            .chain(names(b))
            .filter(|n| {
                let get = |m: &Meta| {
                    m.xattrs
                        .iter()
                        .find(|x| x.name == n.as_bytes())
                        .map(|x| x.value.clone())
                };
                get(a) != get(b)
            })
            .collect();
        diff.sort();
        diff.dedup();
        out.push(format!("xattrs/ACLs [{}]", diff.join(" ")));
    }
    out
}

/// Every difference between `left` and `right`, in path order.
#[must_use]
pub fn diff(left: &Manifest, right: &Manifest) -> Vec<Difference> {
    let (mut i, mut j) = (0, 0);
    let (l, r) = (&left.entries, &right.entries);
    let mut out = Vec::new();
    while i < l.len() || j < r.len() {
        let ord = match (l.get(i), r.get(j)) {
            (Some(a), Some(b)) => path_cmp(&a.path, &b.path),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match ord {
            Ordering::Less => {
                out.push(Difference::OnlyLeft(l[i].path.clone()));
                i += 1;
            }
            Ordering::Greater => {
                out.push(Difference::OnlyRight(r[j].path.clone()));
                j += 1;
            }
            Ordering::Equal => {
                let (a, b) = (&l[i], &r[j]);
                let mut what = Vec::new();
                if a.kind != b.kind {
                    what.push(match (&a.kind, &b.kind) {
                        (Kind::File { size: s1, .. }, Kind::File { size: s2, .. }) if s1 != s2 => {
                            format!("size {s1} vs {s2}")
                        }
                        (Kind::File { .. }, Kind::File { .. }) => "content".to_string(),
                        _ => format!("{} vs {}", a.kind.name(), b.kind.name()),
                    });
                }
                let with_mode = !matches!(a.kind, Kind::Symlink { .. });
                what.extend(meta_differences(&a.meta, &b.meta, with_mode));
                if !what.is_empty() {
                    out.push(Difference::Changed(a.path.clone(), what));
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::entry as e;

    fn file(path: &str, b: u8) -> Entry {
        crate::test_util::file(path, 1, b)
    }

    /// Entry hashes are part of the protocol: the reused buffer hashes
    /// exactly the bytes a fresh encoding gives, entry after entry (a long
    /// one before a short one leaves nothing behind).
    #[test]
    fn entry_hashes_are_blake3_of_the_entry_encoding() {
        let long = Entry {
            meta: Meta {
                xattrs: vec![proto::Xattr {
                    name: b"user.k".to_vec(),
                    value: vec![7; 300],
                }],
                ..Default::default()
            },
            ..file("dir/long", 3)
        };
        for x in [long, file("s", 1), e("d", Kind::Dir)] {
            let name = x.path.split_last().map(|(_, n)| n).unwrap_or(b"");
            let bytes = bincode::serde::encode_to_vec(
                (name, &x.kind, &x.meta),
                bincode::config::standard(),
            )
            .unwrap();
            let mut h = blake3::Hasher::new();
            h.update(b"understudy-entry-v1\0");
            h.update(&bytes);
            assert_eq!(leaf_hash(&x), *h.finalize().as_bytes(), "{}", x.path);
        }
    }

    #[test]
    fn order_is_preorder() {
        let m = Manifest::from_entries(vec![
            file("a.txt", 1),
            e("a", Kind::Dir),
            file("a/b", 1),
            e("", Kind::Dir),
        ]);
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, [".", "a", "a/b", "a.txt"]);
        m.check_structure().unwrap();
    }

    #[test]
    fn root_hash_sees_every_change() {
        let base = vec![
            e("", Kind::Dir),
            e("a", Kind::Dir),
            file("a/b", 1),
            file("c", 2),
        ];
        let h0 = Manifest::from_entries(base.clone()).root_hash();
        assert_eq!(h0, Manifest::from_entries(base.clone()).root_hash());
        let mut changed = base.clone();
        changed[2] = file("a/b", 9);
        assert_ne!(h0, Manifest::from_entries(changed).root_hash());
        let mut moved = base.clone();
        moved[2] = file("a/x", 1);
        assert_ne!(h0, Manifest::from_entries(moved).root_hash());
        // same leaf under another directory
        let other = vec![
            e("", Kind::Dir),
            e("a", Kind::Dir),
            file("b", 1),
            file("c", 2),
        ];
        assert_ne!(h0, Manifest::from_entries(other).root_hash());
        let mut meta = base;
        meta[3].meta.mtime_nsec = 1;
        assert_ne!(h0, Manifest::from_entries(meta).root_hash());
    }

    #[test]
    fn structure_refuses_bad_manifests() {
        let no_parent = Manifest::from_entries(vec![e("", Kind::Dir), file("a/b", 1)]);
        assert!(no_parent.check_structure().is_err());
        let file_parent =
            Manifest::from_entries(vec![e("", Kind::Dir), file("a", 1), file("a/b", 1)]);
        assert!(file_parent.check_structure().is_err());
        let dangling = Manifest::from_entries(vec![
            e("", Kind::Dir),
            e(
                "l",
                Kind::HardLink {
                    target: RelPath::new(&b"zz"[..]).unwrap(),
                },
            ),
        ]);
        assert!(dangling.check_structure().is_err());
        let temp = Manifest::from_entries(vec![e("", Kind::Dir), file(".understudy.tmp.x", 1)]);
        assert!(temp.check_structure().is_err());
        let dup = Manifest {
            entries: vec![e("", Kind::Dir), file("a", 1), file("a", 1)],
        };
        assert!(dup.check_structure().is_err());
    }

    /// A link names a regular file or a database before it; never another
    /// link, an entry after it, a directory, or nothing.
    #[test]
    fn links_name_an_earlier_file_or_database() {
        let link = |path: &str, to: &str| {
            let target = RelPath::new(to.as_bytes()).unwrap();
            e(path, Kind::HardLink { target })
        };
        let db = |path: &str| {
            let (page_size, pages, hash) = (4096, 1, [7; 32]);
            e(
                path,
                Kind::Database {
                    page_size,
                    pages,
                    hash,
                },
            )
        };
        let ok = |entries: Vec<Entry>| Manifest::from_entries(entries).check_structure();
        assert!(ok(vec![e("", Kind::Dir), file("a", 1), link("b", "a")]).is_ok());
        assert!(ok(vec![e("", Kind::Dir), db("a"), link("b", "a")]).is_ok());
        let refused = [
            vec![e("", Kind::Dir), link("a", "b"), file("b", 1)],
            vec![e("", Kind::Dir), link("a", "b"), db("b")],
            vec![
                e("", Kind::Dir),
                file("a", 1),
                link("b", "a"),
                link("c", "b"),
            ],
            vec![e("", Kind::Dir), link("a", "z")],
            vec![e("", Kind::Dir), e("a", Kind::Dir), link("b", "a")],
        ];
        for m in refused {
            let err = ok(m.clone()).expect_err("a bad link was taken");
            assert!(err.to_string().contains("hard link"), "{err}: {m:?}");
        }
    }

    #[test]
    fn diff_names_fields() {
        let a = Manifest::from_entries(vec![e("", Kind::Dir), file("x", 1), file("y", 1)]);
        let mut b = a.clone();
        b.entries[1].meta.uid = 5;
        b.entries.pop();
        let d = diff(&a, &b);
        assert_eq!(d.len(), 2);
        assert!(d[0].to_string().contains("owner"), "{}", d[0]);
        assert_eq!(d[1], Difference::OnlyLeft(RelPath::new(&b"y"[..]).unwrap()));
    }
}
