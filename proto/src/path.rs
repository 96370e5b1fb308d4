//! Validated relative paths.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest whole path accepted from a peer (Linux `PATH_MAX` less the NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest single component (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Deepest path accepted.
pub const MAX_DEPTH: usize = 2048;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path starts with `/`.
    #[error("absolute path")]
    Absolute,
    /// A component is empty (`a//b`, or a trailing `/`).
    #[error("empty path component")]
    EmptyComponent,
    /// A component is `.` or `..`.
    #[error("`.` or `..` component")]
    DotComponent,
    /// The path holds a NUL byte.
    #[error("NUL byte in path")]
    Nul,
    /// The path or one component is too long, or too deep.
    #[error(
        "path too long ({0} bytes, or a component over {MAX_NAME_LEN}, or deeper than {MAX_DEPTH})"
    )]
    TooLong(usize),
}

/// A path relative to a folder root, as raw bytes (Linux names are bytes).
///
/// The empty path is the root itself. Otherwise every component is non-empty, is
/// neither `.` nor `..`, and holds no `/` or NUL; the whole is at most
/// [`MAX_PATH_LEN`] bytes. A `RelPath` can only be built through validation, and it
/// is validated again when decoded from a peer.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "serde_bytes::ByteBuf", into = "serde_bytes::ByteBuf")]
pub struct RelPath(Vec<u8>);

/// Paths order component by component, so that a directory comes right before its
/// own subtree (pre-order), the root first: `a` < `a/b` < `a.txt`.
impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The same as comparing `components()`, in one pass over the bytes:
        // `/` ranks below every byte a name can hold, the end of a path below
        // `/` (a path's components are never empty: `validate`).
        let (a, b) = (self.0.as_slice(), other.0.as_slice());
        let words = a.chunks_exact(8).zip(b.chunks_exact(8));
        let same = 8 * words.take_while(|(x, y)| x == y).count();
        let tail = a[same..].iter().zip(&b[same..]);
        let same = same + tail.take_while(|(x, y)| x == y).count();
        let rank = |c: Option<&u8>| c.map(|&c| if c == b'/' { 0 } else { u16::from(c) + 1 });
        rank(a.get(same)).cmp(&rank(b.get(same)))
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl RelPath {
    /// The folder root.
    #[must_use]
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(Self(bytes))
    }

    /// Whether this is the root.
    #[must_use]
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// This path with one more component. `name` is validated as a single component.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&b'/') {
            return Err(PathError::EmptyComponent);
        }
        check_component(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(v.len()));
        }
        let out = Self(v);
        if out.depth() > MAX_DEPTH {
            return Err(PathError::TooLong(out.0.len()));
        }
        Ok(out)
    }

    /// The components, root first.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// Number of components (0 for the root).
    #[must_use]
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// The parent and the last component; `None` for the root.
    #[must_use]
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        self.split_last_bytes()
            .map(|(parent, name)| (RelPath(parent.to_vec()), name))
    }

    /// The parent's bytes (empty for the root's children) and the last
    /// component, borrowed; `None` for the root.
    #[must_use]
    pub fn split_last_bytes(&self) -> Option<(&[u8], &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((&self.0[..i], &self.0[i + 1..])),
            None => Some((&[][..], &self.0[..])),
        }
    }

    /// Whether `self` is `other` or lies below it.
    #[must_use]
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }
}

fn check_component(c: &[u8]) -> Result<(), PathError> {
    if c.is_empty() {
        return Err(PathError::EmptyComponent);
    }
    if c == b"." || c == b".." {
        return Err(PathError::DotComponent);
    }
    if c.contains(&0) {
        return Err(PathError::Nul);
    }
    if c.len() > MAX_NAME_LEN {
        return Err(PathError::TooLong(c.len()));
    }
    Ok(())
}

fn validate(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(bytes.len()));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute);
    }
    let mut depth = 0;
    for c in bytes.split(|&b| b == b'/') {
        check_component(c)?;
        depth += 1;
        if depth > MAX_DEPTH {
            return Err(PathError::TooLong(bytes.len()));
        }
    }
    Ok(())
}

impl TryFrom<Vec<u8>> for RelPath {
    type Error = PathError;
    fn try_from(v: Vec<u8>) -> Result<Self, Self::Error> {
        Self::new(v)
    }
}

impl From<RelPath> for Vec<u8> {
    fn from(p: RelPath) -> Self {
        p.0
    }
}

// On the wire a path is a byte string: bincode reads it in one copy, not a
// byte at a time (the encoding is the same as a sequence of `u8`).
impl TryFrom<serde_bytes::ByteBuf> for RelPath {
    type Error = PathError;
    fn try_from(v: serde_bytes::ByteBuf) -> Result<Self, Self::Error> {
        Self::new(v.into_vec())
    }
}

impl From<RelPath> for serde_bytes::ByteBuf {
    fn from(p: RelPath) -> Self {
        serde_bytes::ByteBuf::from(p.0)
    }
}

impl fmt::Display for RelPath {
    /// Shows the path with non-UTF-8 bytes escaped as `\xNN`, or `.` for the root.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for chunk in self.0.utf8_chunks() {
            for ch in chunk.valid().chars() {
                if ch.is_control() {
                    write!(f, "\\x{:02x}", ch as u32)?;
                } else {
                    write!(f, "{ch}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_hostile_paths() {
        assert_eq!(RelPath::new(&b"../x"[..]), Err(PathError::DotComponent));
        assert_eq!(
            RelPath::new(&b"a/../../x"[..]),
            Err(PathError::DotComponent)
        );
        assert_eq!(RelPath::new(&b"/etc/x"[..]), Err(PathError::Absolute));
        assert_eq!(RelPath::new(&b"a\0b"[..]), Err(PathError::Nul));
        assert_eq!(RelPath::new(&b"a//b"[..]), Err(PathError::EmptyComponent));
        assert_eq!(RelPath::new(&b"a/"[..]), Err(PathError::EmptyComponent));
        assert_eq!(RelPath::new(&b"./a"[..]), Err(PathError::DotComponent));
        assert!(matches!(
            RelPath::new(vec![b'a'; 5000]),
            Err(PathError::TooLong(_))
        ));
        assert!(matches!(
            RelPath::new(vec![b'a'; 256]),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn accepts_bytes_and_splits() {
        let p = RelPath::new(&b"dir with space/new\nline/\xff\xfe"[..]).unwrap();
        assert_eq!(p.depth(), 3);
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.as_bytes(), b"dir with space/new\nline");
        assert_eq!(name, b"\xff\xfe");
        assert_eq!(p.to_string(), "dir with space/new\\x0aline/\\xff\\xfe");
        assert!(p.starts_with(&parent));
        assert!(p.starts_with(&RelPath::root()));
        assert!(!RelPath::new(&b"dir"[..]).unwrap().starts_with(&parent));
        assert_eq!(RelPath::root().join(b"a").unwrap().as_bytes(), b"a");
        assert!(RelPath::root().join(b"a/b").is_err());
        let mut v: Vec<RelPath> = ["a.txt", "a/b", "", "a"]
            .iter()
            .map(|s| RelPath::new(s.as_bytes()).unwrap())
            .collect();
        v.sort();
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(shown, [".", "a", "a/b", "a.txt"]);
    }

    /// The one-pass order is the component-wise one, for names that share
    /// prefixes and hold bytes below and above `/`.
    #[test]
    fn orders_as_components_do() {
        let names: [&[u8]; 7] = [b"a", b"a.b", b"a-", b"a\x01", b"a\xff", b"ab", b"b"];
        let mut paths = vec![RelPath::root()];
        for x in names {
            let top = RelPath::root().join(x).unwrap();
            for y in names {
                paths.push(top.join(y).unwrap());
            }
            paths.push(top);
        }
        for p in &paths {
            for q in &paths {
                assert_eq!(p.cmp(q), p.components().cmp(q.components()), "{p} {q}");
            }
        }
    }

    #[test]
    fn decoding_validates() {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(b"../etc/passwd".to_vec(), cfg).unwrap();
        let r: Result<(RelPath, usize), _> = bincode::serde::decode_from_slice(&bytes, cfg);
        assert!(r.is_err());
    }
}
