//! uid/gid maps between hosts whose users differ (Unraid's `nobody:users` is
//! 99:100, a Debian host's first user 1000:1000).
//!
//! A receiving folder's `uid_map = ["REMOTE:LOCAL", ...]` and `gid_map` turn
//! the sender's ids into this host's, for owners and for the qualifiers of
//! POSIX ACL entries (access and default ACLs). The ACLs travel as the
//! kernel's xattr value (`system.posix_acl_access`: a version-2 header and
//! `{tag u16, perm u16, id u32}` entries, little-endian); they are rewritten
//! here as a whole and set with one `setxattr`, so no state in between names
//! the sender's ids on this host.
//!
//! **A map is a permutation.** Each REMOTE and each LOCAL appears once, and an
//! id that is a LOCAL of the map but not a REMOTE goes the other way (with
//! `["1000:99"]`, 1000 → 99 and 99 → 1000). So a map has an exact inverse:
//! the replica's tree, read back through it, hashes as the source's does (cut
//! and verify compare root hashes), and the old master, receiving after a
//! failback with the reverse map (`["99:1000"]`), gets its own ids back.

use crate::{Error, Meta, meta};

/// One direction's pairs (remote, local): keys unique, values unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pairs(Vec<(u32, u32)>);

impl Pairs {
    fn parse(field: &str, list: &[String]) -> Result<Self, Error> {
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for item in list {
            let bad =
                |why: &str| Error::invalid(format!("{field} entry {item:?}"), why.to_string());
            let (r, l) = item
                .split_once(':')
                .ok_or_else(|| bad("expected \"REMOTE:LOCAL\""))?;
            let id = |s: &str| {
                s.trim()
                    .parse::<u32>()
                    .map_err(|_| bad("ids are numbers from 0 to 4294967294"))
                    .and_then(|v| {
                        if v == u32::MAX {
                            Err(bad("4294967295 is not an id"))
                        } else {
                            Ok(v)
                        }
                    })
            };
            let (r, l) = (id(r)?, id(l)?);
            if pairs.iter().any(|&(pr, _)| pr == r) {
                return Err(bad("this REMOTE id is mapped twice"));
            }
            if pairs.iter().any(|&(_, pl)| pl == l) {
                return Err(bad("this LOCAL id is a target twice"));
            }
            pairs.push((r, l));
        }
        Ok(Self(pairs.into_iter().filter(|(r, l)| r != l).collect()))
    }

    fn fwd(&self, x: u32) -> Option<u32> {
        self.0.iter().find(|p| p.0 == x).map(|p| p.1)
    }

    fn back(&self, x: u32) -> Option<u32> {
        self.0.iter().find(|p| p.1 == x).map(|p| p.0)
    }

    /// The permutation: mapped ids forward; an id that is only a target goes
    /// to the head of its chain. Each walk is at most the map's length.
    fn to_local(&self, x: u32) -> u32 {
        if let Some(l) = self.fwd(x) {
            return l;
        }
        let mut y = x;
        while let Some(prev) = self.back(y) {
            y = prev;
        }
        y
    }

    /// The inverse permutation.
    fn to_remote(&self, x: u32) -> u32 {
        if let Some(r) = self.back(x) {
            return r;
        }
        let mut y = x;
        while let Some(next) = self.fwd(y) {
            y = next;
        }
        y
    }
}

/// A folder's uid and gid maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    uids: Pairs,
    gids: Pairs,
}

/// Which way ids go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The sender's ids to this host's (applying a round).
    ToLocal,
    /// This host's ids to the sender's (hashing the replica's own tree).
    ToRemote,
}

const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

impl IdMap {
    /// Parses `uid_map` and `gid_map` entries (`"REMOTE:LOCAL"`); a bad one
    /// is an error naming the field and the entry.
    pub fn parse(uid_map: &[String], gid_map: &[String]) -> Result<Self, Error> {
        Ok(Self {
            uids: Pairs::parse("uid_map", uid_map)?,
            gids: Pairs::parse("gid_map", gid_map)?,
        })
    }

    /// Whether the map changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.uids.0.is_empty() && self.gids.0.is_empty()
    }

    /// A uid, mapped `dir`.
    #[must_use]
    pub fn uid(&self, id: u32, dir: Direction) -> u32 {
        match dir {
            Direction::ToLocal => self.uids.to_local(id),
            Direction::ToRemote => self.uids.to_remote(id),
        }
    }

    /// A gid, mapped `dir`.
    #[must_use]
    pub fn gid(&self, id: u32, dir: Direction) -> u32 {
        match dir {
            Direction::ToLocal => self.gids.to_local(id),
            Direction::ToRemote => self.gids.to_remote(id),
        }
    }

    /// `m` with its owner and its ACL entries' qualifiers mapped `dir`. An
    /// ACL value that is not the kernel's format is left as it came (the
    /// kernel refuses it when set, and the replica reports that).
    #[must_use]
    pub fn meta(&self, m: &Meta, dir: Direction) -> Meta {
        let mut out = m.clone();
        if self.is_empty() {
            return out;
        }
        out.uid = self.uid(m.uid, dir);
        out.gid = self.gid(m.gid, dir);
        for x in &mut out.xattrs {
            if (x.name == meta::ACL_ACCESS || x.name == meta::ACL_DEFAULT)
                && let Some(v) = self.acl(&x.value, dir)
            {
                x.value = v;
            }
        }
        out
    }

    /// An ACL xattr value with its user and group qualifiers mapped, entries
    /// sorted again by (tag, id) as the kernel requires; `None` when the value
    /// is not a version-2 ACL.
    #[must_use]
    pub fn acl(&self, value: &[u8], dir: Direction) -> Option<Vec<u8>> {
        let (head, body) = value.split_at_checked(4)?;
        if u32::from_le_bytes(head.try_into().ok()?) != ACL_VERSION || body.len() % 8 != 0 {
            return None;
        }
        let mut entries: Vec<(u16, u16, u32)> = body
            .chunks_exact(8)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let perm = u16::from_le_bytes([e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                let id = match tag {
                    ACL_USER => self.uid(id, dir),
                    ACL_GROUP => self.gid(id, dir),
                    _ => id,
                };
                (tag, perm, id)
            })
            .collect();
        entries.sort_by_key(|&(tag, _, id)| (tag, id));
        let mut out = head.to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_string()).collect()
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = ACL_VERSION.to_le_bytes().to_vec();
        for &(t, p, i) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn owners_and_acl_qualifiers_map_and_map_back() {
        let m = IdMap::parse(&s(&["1000:99"]), &s(&["1000:100"])).unwrap();
        let none = u32::MAX;
        let src = Meta {
            mode: 0o640,
            uid: 1000,
            gid: 1000,
            mtime_sec: 1,
            mtime_nsec: 2,
            xattrs: vec![crate::Xattr {
                name: meta::ACL_ACCESS.to_vec(),
                value: acl(&[
                    (0x01, 6, none),
                    (ACL_USER, 4, 500),
                    (ACL_USER, 6, 1000),
                    (0x04, 4, none),
                    (ACL_GROUP, 4, 1000),
                    (0x10, 6, none),
                    (0x20, 0, none),
                ]),
            }],
        };
        let local = m.meta(&src, Direction::ToLocal);
        assert_eq!((local.uid, local.gid), (99, 100));
        // user:1000 became user:99 and now sorts before user:500.
        assert_eq!(
            local.xattrs[0].value,
            acl(&[
                (0x01, 6, none),
                (ACL_USER, 6, 99),
                (ACL_USER, 4, 500),
                (0x04, 4, none),
                (ACL_GROUP, 4, 100),
                (0x10, 6, none),
                (0x20, 0, none),
            ])
        );
        assert_eq!(m.meta(&local, Direction::ToRemote), src);
        // A failback: the old master receives with the reverse map.
        let back = IdMap::parse(&s(&["99:1000"]), &s(&["100:1000"])).unwrap();
        assert_eq!(back.meta(&local, Direction::ToLocal), src);
        // Not an ACL: left alone.
        assert_eq!(m.acl(b"junk", Direction::ToLocal), None);
        assert_eq!(m.acl(&acl(&[])[..3], Direction::ToLocal), None);
    }

    #[test]
    fn a_target_that_is_not_mapped_goes_the_other_way() {
        let m = IdMap::parse(&s(&["1000:99"]), &[]).unwrap();
        assert_eq!(m.uid(99, Direction::ToLocal), 1000);
        assert_eq!(m.uid(1000, Direction::ToRemote), 99);
        assert_eq!(m.uid(5, Direction::ToLocal), 5);
        let chain = IdMap::parse(&s(&["1:2", "2:3"]), &[]).unwrap();
        assert_eq!(
            [1, 2, 3].map(|x| chain.uid(x, Direction::ToLocal)),
            [2, 3, 1]
        );
    }

    #[test]
    fn bad_maps_name_the_field_and_entry() {
        for (u, want) in [
            (s(&["1000"]), "REMOTE:LOCAL"),
            (s(&["a:1"]), "numbers"),
            (s(&["1:2", "1:3"]), "mapped twice"),
            (s(&["1:3", "2:3"]), "target twice"),
            (s(&["4294967295:1"]), "not an id"),
        ] {
            let e = IdMap::parse(&u, &[]).unwrap_err().to_string();
            assert!(e.contains("uid_map") && e.contains(want), "{e}");
        }
        assert!(IdMap::parse(&s(&["7:7"]), &[]).unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn every_map_is_a_permutation(
            pairs in proptest::collection::btree_map(0u32..50, 0u32..50, 0..8),
            xs in proptest::collection::vec(0u32..60, 1..40),
        ) {
            let mut seen = std::collections::HashSet::new();
            let list: Vec<String> = pairs
                .iter()
                .filter(|(_, l)| seen.insert(**l))
                .map(|(r, l)| format!("{r}:{l}"))
                .collect();
            let m = IdMap::parse(&list, &[]).unwrap();
            for x in xs {
                let l = m.uid(x, Direction::ToLocal);
                prop_assert_eq!(m.uid(l, Direction::ToRemote), x);
            }
        }
    }
}
