//! The order in which a metadata change is carried out (DESIGN invariant 12:
//! nothing grants more in between). `chown` then `chmod` would leave, for a
//! moment, the new owner with the old mode (`root:root 0640` → `root:4242
//! 0600` passes through `root:4242 0640`, readable by group 4242). Instead:
//!
//! 1. `chmod` to the intersection of the old and new modes (with the group
//!    class cleared when an access ACL is present and the ACL or the owner
//!    changes: the group bits are the ACL's mask, and the old ACL's entries
//!    must not meet the new owner);
//! 2. `chown` (which clears setuid/setgid and file capabilities);
//! 3. xattrs, POSIX ACLs included (their mode bits are the new ones);
//! 4. `chmod` to the new mode (after `chown` and the ACL, which change it).
//!
//! Each state is then no more permissive than the old one (before the
//! `chown`) or the new one (after it).

/// What decides who may do what with a file: mode, owner and whether it has
/// a POSIX access ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Whether an access ACL is present.
    pub acl: bool,
}

/// One step of a metadata change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `chmod` to this mode.
    Chmod(u32),
    /// `chown` to the new owner and group.
    Chown,
    /// Set and remove xattrs (ACLs included).
    Xattrs,
}

/// The steps from `old` to `new`; `acl_changes` says whether the access ACL
/// differs. Always ends with the new mode.
#[must_use]
pub fn steps(old: &Perms, new: &Perms, acl_changes: bool) -> Vec<Step> {
    let owner_changes = (old.uid, old.gid) != (new.uid, new.gid);
    let mut interim = old.mode & new.mode & 0o7777;
    if old.acl && (acl_changes || owner_changes) {
        interim &= !0o070;
    }
    let mut out = Vec::with_capacity(4);
    if interim != old.mode & 0o7777 {
        out.push(Step::Chmod(interim));
    }
    if owner_changes {
        out.push(Step::Chown);
    }
    out.push(Step::Xattrs);
    out.push(Step::Chmod(new.mode & 0o7777));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rwx bits a principal (uid, groups) gets from a state without ACLs.
    fn rwx(s: State, who: (u32, &[u32])) -> u32 {
        if who.0 == s.1 {
            (s.0 >> 6) & 7
        } else if who.1.contains(&s.2) {
            (s.0 >> 3) & 7
        } else {
            s.0 & 7
        }
    }

    type State = (u32, u32, u32);

    /// Every state the steps pass through, as the kernel would make them
    /// (`clears`: chown clears setuid/setgid, as Linux does for files).
    fn states(old: State, new: State, clears: bool) -> Vec<State> {
        let o = Perms {
            mode: old.0,
            uid: old.1,
            gid: old.2,
            acl: false,
        };
        let n = Perms {
            mode: new.0,
            uid: new.1,
            gid: new.2,
            acl: false,
        };
        let mut cur = old;
        let mut out = vec![cur];
        for s in steps(&o, &n, false) {
            match s {
                Step::Chmod(m) => cur.0 = m,
                Step::Chown => {
                    cur.1 = new.1;
                    cur.2 = new.2;
                    if clears {
                        cur.0 &= !0o6000;
                    }
                }
                Step::Xattrs => {}
            }
            out.push(cur);
        }
        out
    }

    /// Whether `s` grants no principal more than `than` does: rwx bits, and
    /// running as the owner (setuid) or group (setgid).
    fn no_more_than(s: State, than: State, principals: &[(u32, &[u32])]) -> bool {
        let suid = |x: State| (x.0 & 0o4000 != 0).then_some(x.1);
        let sgid = |x: State| (x.0 & 0o2000 != 0).then_some(x.2);
        (suid(s).is_none() || suid(s) == suid(than))
            && (sgid(s).is_none() || sgid(s) == sgid(than))
            && (s.0 & 0o1000 == 0 || than.0 & 0o1000 != 0)
            && principals.iter().all(|&p| rwx(s, p) & !rwx(than, p) == 0)
    }

    fn check(old: State, new: State, principals: &[(u32, &[u32])]) {
        for clears in [true, false] {
            let seen = states(old, new, clears);
            assert_eq!(seen.last().map(|s| s.0), Some(new.0), "{old:?} -> {new:?}");
            assert_eq!(seen.last().map(|s| (s.1, s.2)), Some((new.1, new.2)));
            for s in &seen {
                assert!(
                    no_more_than(*s, old, principals) || no_more_than(*s, new, principals),
                    "{old:?} -> {new:?} passes through {s:?}"
                );
            }
        }
    }

    #[test]
    fn no_intermediate_state_grants_more_exhaustive_on_permission_bits() {
        let principals: &[(u32, &[u32])] = &[
            (1, &[]),
            (2, &[]),
            (1, &[20]),
            (2, &[10]),
            (9, &[]),
            (9, &[10]),
            (9, &[20]),
            (9, &[10, 20]),
        ];
        let owners = [
            ((1, 10), (1, 10)),
            ((1, 10), (2, 10)),
            ((1, 10), (1, 20)),
            ((1, 10), (2, 20)),
        ];
        for (o, n) in owners {
            for old in 0..=0o777 {
                for new in 0..=0o777 {
                    check((old, o.0, o.1), (new, n.0, n.1), principals);
                }
            }
            // special bits, with a few permission patterns
            for old in (0..8).map(|s| s << 9) {
                for new in (0..8).map(|s| s << 9) {
                    for (po, pn) in [(0o755, 0o755), (0o750, 0o700), (0o711, 0o770)] {
                        check((old | po, o.0, o.1), (new | pn, n.0, n.1), principals);
                    }
                }
            }
        }
    }

    #[test]
    fn the_reported_window_is_closed() {
        let old = Perms {
            mode: 0o640,
            uid: 0,
            gid: 0,
            acl: false,
        };
        let new = Perms {
            mode: 0o600,
            uid: 0,
            gid: 4242,
            acl: false,
        };
        assert_eq!(
            steps(&old, &new, false),
            vec![
                Step::Chmod(0o600),
                Step::Chown,
                Step::Xattrs,
                Step::Chmod(0o600)
            ]
        );
    }

    #[test]
    fn an_acl_meets_the_new_owner_or_new_entries_with_its_group_class_cleared() {
        let old = Perms {
            mode: 0o770,
            uid: 0,
            gid: 0,
            acl: true,
        };
        let same_owner = Perms { acl: true, ..old };
        assert_eq!(steps(&old, &same_owner, true)[0], Step::Chmod(0o700));
        let other_group = Perms { gid: 5, ..old };
        assert_eq!(steps(&old, &other_group, false)[0], Step::Chmod(0o700));
        // unchanged ACL and owner: the mask is the intersection
        let narrower = Perms { mode: 0o750, ..old };
        assert_eq!(steps(&old, &narrower, false)[0], Step::Chmod(0o750));
        // no ACL before: the group bits are the owning group's
        let plain = Perms { acl: false, ..old };
        assert_eq!(
            steps(&plain, &Perms { gid: 5, ..plain }, false),
            vec![Step::Chown, Step::Xattrs, Step::Chmod(0o770)]
        );
    }
}
