//! Excludes: gitignore-style patterns relative to the folder root
//! (`cache/` matches a directory anywhere, `/log` only at the root, `*.tmp` any
//! file). An excluded path is neither scanned, nor written, nor deleted.

use crate::{Error, RelPath};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A compiled set of exclude patterns.
#[derive(Debug, Clone)]
pub struct Filter {
    ig: Gitignore,
    patterns: Vec<String>,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            ig: Gitignore::empty(),
            patterns: Vec::new(),
        }
    }
}

impl Filter {
    /// Compiles `patterns`; a bad pattern is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Self, Error> {
        let mut b = GitignoreBuilder::new("/");
        for p in patterns {
            b.add_line(None, p)
                .map_err(|e| Error::invalid(format!("exclude pattern {p:?}"), e.to_string()))?;
        }
        let ig = b
            .build()
            .map_err(|e| Error::invalid("exclude patterns", e.to_string()))?;
        Ok(Self {
            ig,
            patterns: patterns.to_vec(),
        })
    }

    /// The patterns as given.
    #[must_use]
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether `path` (a directory when `is_dir`) or one of its parents is excluded.
    #[must_use]
    pub fn excludes(&self, path: &RelPath, is_dir: bool) -> bool {
        if path.is_root() || self.patterns.is_empty() {
            return false;
        }
        let p = Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
        self.ig.matched_path_or_any_parents(p, is_dir).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn gitignore_semantics() {
        let f = Filter::new(&["cache/".into(), "/log".into(), "*.tmp".into()]).unwrap();
        assert!(f.excludes(&p("cache"), true));
        assert!(f.excludes(&p("cache/images/x.webp"), false));
        assert!(f.excludes(&p("data/cache"), true));
        assert!(
            !f.excludes(&p("cache"), false),
            "cache/ names directories only"
        );
        assert!(f.excludes(&p("log"), true));
        assert!(!f.excludes(&p("data/log"), true), "/log is anchored");
        assert!(f.excludes(&p("a/b.tmp"), false));
        assert!(!f.excludes(&p("config/system.xml"), false));
        assert!(!f.excludes(&RelPath::root(), true));
    }
}
