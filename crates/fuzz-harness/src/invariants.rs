//! Invariants on the block layer's dirty bitmaps that the stream and bitmap harnesses share:
//! what a user would see with `query-named-block-nodes` and `x-debug-block-dirty-bitmap-sha256`
//! after an incoming migration succeeded or failed.

use block::BlockLayer;
use std::fmt;

/// One dirty bitmap as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    /// The node it is on.
    pub node: String,
    /// Its name (`None` for an anonymous bitmap, e.g. a successor left behind).
    pub name: Option<String>,
    /// Granularity in bytes.
    pub granularity: u32,
    /// Bytes of disk covered.
    pub size: u64,
    /// Dirty bytes.
    pub count: u64,
    /// SHA-256 of the bitmap's contents.
    pub sha256: String,
    /// Recording writes.
    pub enabled: bool,
    /// In use by an operation (a migration, a backup).
    pub busy: bool,
    /// Stored in the image at shutdown.
    pub persistent: bool,
    /// Marked inconsistent.
    pub inconsistent: bool,
    /// Has a successor (a frozen bitmap).
    pub frozen: bool,
}

impl fmt::Display for BitmapState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' on '{}' (granularity {}, size {}, count {}, enabled {}, busy {}, frozen {})",
            self.name.as_deref().unwrap_or("<anonymous>"),
            self.node,
            self.granularity,
            self.size,
            self.count,
            self.enabled,
            self.busy,
            self.frozen
        )
    }
}

/// Every bitmap of every node of `layer`, in node then creation order.
pub fn snapshot(layer: &BlockLayer) -> Vec<BitmapState> {
    let mut out = Vec::new();
    for node in layer.nodes() {
        let node_name = node.name().to_string();
        node.with_bitmaps(|list| {
            for bm in list.iter() {
                out.push(BitmapState {
                    node: node_name.clone(),
                    name: bm.name().map(str::to_string),
                    granularity: bm.granularity(),
                    size: bm.size(),
                    count: bm.count(),
                    sha256: bm.sha256_hex(),
                    enabled: bm.enabled(),
                    busy: bm.busy(),
                    persistent: bm.persistent(),
                    inconsistent: bm.inconsistent(),
                    frozen: bm.successor().is_some(),
                });
            }
        });
    }
    out
}

/// Nothing is left in use or half-made: every bitmap is named, not busy and not frozen.
pub fn assert_nothing_busy(after: &[BitmapState], context: &str) {
    for b in after {
        assert!(
            b.name.is_some(),
            "{context}: anonymous bitmap left behind: {b}"
        );
        assert!(!b.busy, "{context}: bitmap left busy: {b}");
        assert!(
            !b.frozen,
            "{context}: bitmap left frozen (with a successor): {b}"
        );
    }
}

/// Bitmaps that existed before are all still there, exactly as they were.
pub fn assert_untouched(before: &[BitmapState], after: &[BitmapState], context: &str) {
    for b in before {
        let now = after
            .iter()
            .find(|a| a.node == b.node && a.name == b.name)
            .unwrap_or_else(|| panic!("{context}: pre-existing bitmap disappeared: {b}"));
        assert_eq!(now, b, "{context}: pre-existing bitmap changed");
    }
}

/// The bitmaps of `after` that were not in `before`.
pub fn created(before: &[BitmapState], after: &[BitmapState]) -> Vec<BitmapState> {
    after
        .iter()
        .filter(|a| !before.iter().any(|b| b.node == a.node && b.name == a.name))
        .cloned()
        .collect()
}

/// What a failed load must leave: the bitmaps that were there before, untouched, and nothing
/// else.
pub fn assert_failed_load_clean(before: &[BitmapState], after: &[BitmapState], context: &str) {
    assert_nothing_busy(after, context);
    assert_untouched(before, after, context);
    let new = created(before, after);
    assert!(
        new.is_empty(),
        "{context}: a failed load left incoming bitmaps behind: {}",
        new.iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// What a completed load may leave: the bitmaps that were there before, untouched, plus
/// complete incoming ones (sized like their node, a valid granularity, consistent).
pub fn assert_completed_load_sane(
    layer: &BlockLayer,
    before: &[BitmapState],
    after: &[BitmapState],
    context: &str,
) {
    assert_nothing_busy(after, context);
    assert_untouched(before, after, context);
    for b in created(before, after) {
        let node_size = layer
            .node(&b.node)
            .and_then(|n| n.size().ok())
            .unwrap_or_else(|| panic!("{context}: bitmap {b} on a node that has no size"));
        assert_eq!(
            b.size, node_size,
            "{context}: incoming bitmap {b} not sized like its node"
        );
        assert!(
            b.granularity.is_power_of_two() && (512..=1 << 31).contains(&b.granularity),
            "{context}: incoming bitmap {b} has an invalid granularity"
        );
        assert!(
            !b.inconsistent,
            "{context}: incoming bitmap {b} is inconsistent"
        );
        // `count` is set granules times the granularity, so the last granule counts whole.
        assert!(
            b.count <= b.size.next_multiple_of(u64::from(b.granularity)),
            "{context}: incoming bitmap {b} has more dirty bytes than its node"
        );
    }
}
