//! The pages of a staged database that must still arrive.

/// A set of page numbers `start..end` as a bitmap: one bit a page (2 MiB at
/// [`proto::MAX_DB_PAGES`]), where a `BTreeSet<u32>` took some 8 bytes a page.
#[derive(Debug)]
pub(super) struct PageSet {
    start: u32,
    bits: Vec<u64>,
    count: u32,
}

impl PageSet {
    pub(super) fn range(start: u32, end: u32) -> Self {
        let n = end.saturating_sub(start);
        let mut bits = vec![u64::MAX; n.div_ceil(64) as usize];
        if let Some(last) = bits.last_mut()
            && !n.is_multiple_of(64)
        {
            *last = (1u64 << (n % 64)) - 1;
        }
        Self {
            start,
            bits,
            count: n,
        }
    }

    pub(super) fn remove(&mut self, page: &u32) {
        let Some(i) = page.checked_sub(self.start) else {
            return;
        };
        if let Some(w) = self.bits.get_mut((i / 64) as usize) {
            let bit = 1u64 << (i % 64);
            if *w & bit != 0 {
                *w &= !bit;
                self.count -= 1;
            }
        }
    }

    pub(super) fn first(&self) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        let (i, w) = self.bits.iter().enumerate().find(|(_, w)| **w != 0)?;
        Some(self.start + i as u32 * 64 + w.trailing_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::PageSet;

    #[test]
    fn page_set_tracks_what_is_missing() {
        let mut s = PageSet::range(3, 200);
        assert_eq!(s.first(), Some(3));
        for p in 0..150 {
            s.remove(&p);
        }
        assert_eq!(s.first(), Some(150));
        s.remove(&150);
        s.remove(&150);
        for p in 151..1000 {
            s.remove(&p);
        }
        assert_eq!(s.first(), None);
        assert_eq!(PageSet::range(5, 5).first(), None);
        assert_eq!(PageSet::range(0, 64).first(), Some(0));
        // the largest allowed database: one bit a page
        let big = PageSet::range(0, proto::MAX_DB_PAGES);
        assert_eq!(big.bits.len() * 8, (proto::MAX_DB_PAGES / 8) as usize);
    }
}
