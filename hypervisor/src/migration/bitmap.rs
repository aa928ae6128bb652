//! Page bitmaps (one bit per guest page), as KVM's dirty log returns them.

/// A set of page frame numbers `0..pages` stored as 64-bit words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    pub fn empty(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    pub fn full(pages: u64) -> Self {
        let mut b = Self::empty(pages);
        (0..pages).for_each(|p| b.set(p));
        b
    }

    /// Wrap KVM-style words; bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        PageBitmap { words, pages }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.words[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }

    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.pages && self.words[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn union_with(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Set page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_iter() {
        let mut b = PageBitmap::empty(130);
        for p in [0, 63, 64, 129, 500] {
            b.set(p);
        }
        assert_eq!(b.count(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        let w = PageBitmap::from_words(vec![u64::MAX; 3], 130);
        assert_eq!(w.count(), 130);
    }
}
