//! Sorting the handful of items a configuration lists (denied methods, header names to strip),
//! by insertion. `slice::sort` would be as correct, but each element type it sorts links its own
//! copy of the standard library's sort, 5–10 KB of wasm each; these lists are a few items long
//! and are sorted once, at configure time.

/// Sorts `items` in place, stably. Quadratic: for lists of a few dozen items at most.
pub fn sort_few<T: Ord>(items: &mut [T]) {
    for end in 1..items.len() {
        let mut at = end;
        while at > 0 && items.get(at - 1) > items.get(at) {
            items.swap(at - 1, at);
            at -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sort_few;

    #[test]
    fn sorts_like_the_standard_sort() {
        let lists: [&[u32]; 5] = [&[], &[1], &[2, 1], &[3, 1, 2, 3, 0, 1], &[5, 4, 3, 2, 1, 0]];
        for list in lists {
            let mut ours = list.to_vec();
            sort_few(&mut ours);
            let mut standard = list.to_vec();
            standard.sort();
            assert_eq!(ours, standard, "{list:?}");
        }
    }

    #[test]
    fn equal_items_keep_their_order() {
        // Ordered by the first field only: the second shows where each came from.
        #[derive(Debug, PartialEq, Eq)]
        struct ByFirst(u8, u8);
        impl PartialOrd for ByFirst {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for ByFirst {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.0.cmp(&other.0)
            }
        }
        let mut items = vec![ByFirst(2, 0), ByFirst(1, 1), ByFirst(2, 2), ByFirst(1, 3)];
        sort_few(&mut items);
        assert_eq!(
            items,
            [ByFirst(1, 1), ByFirst(1, 3), ByFirst(2, 0), ByFirst(2, 2)]
        );
    }
}
