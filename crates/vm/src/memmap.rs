//! The guest physical memory map, and how it stays cheap to change during switchover.
//!
//! Devices map regions (RAM, MMIO windows) at guest physical addresses. Lookups go through a
//! *flat view*: the regions resolved into sorted, non-overlapping ranges, rebuilt whenever the
//! map changes. Rebuilding is the expensive part, and while the destination loads device state
//! — inside the downtime window — each device's `post_load` may move a region. Rebuilding once
//! per device is what seed 003 measured at 210 ms.
//!
//! So changes can be batched: between [`MemoryMap::begin`] and [`MemoryMap::commit`] they are
//! recorded and the view is rebuilt once, at the outermost commit. A reader never sees a stale
//! view: [`MemoryMap::flat_view`] called during a batch rebuilds on demand first (QEMU's
//! commit-on-demand, v6 of that series), so a device whose load needs the current map still
//! gets it. Batching only removes rebuilds nobody looks at.
//!
//! **Listeners.** What the flat view says must also be what the accelerator maps: under KVM,
//! every RAM range of the view is a memslot. A [`MapListener`] is told of each new view (with
//! the old one) when it is built — at a change outside a batch, at the outermost commit, or on
//! demand inside a batch — so a batch of region changes becomes one round of
//! `KVM_SET_USER_MEMORY_REGION` calls for the net difference (QEMU's memory listeners). A
//! listener that fails leaves its error in the map ([`MemoryMap::take_error`]); the device
//! load that made the change fails with it.

use std::sync::{Arc, Mutex, MutexGuard};

/// What a region is backed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    /// Guest RAM: a piece of a RAM block.
    Ram {
        /// The RAM block's name (`ram`, `sys`, ...).
        block: String,
        /// Offset of the region's first byte in the block.
        offset: u64,
    },
    /// Device registers.
    Mmio,
}

/// One region of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Unique name (e.g. `ram`, `window0`).
    pub name: String,
    /// Guest physical address; `None` while unmapped.
    pub gpa: Option<u64>,
    /// Size in bytes.
    pub size: u64,
    /// Higher priority wins where regions overlap.
    pub priority: i32,
    /// What backs it.
    pub kind: RegionKind,
}

/// One resolved range of the flat view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatRange {
    /// First guest physical address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The region that owns it.
    pub region: String,
    /// Offset of `start` within the region.
    pub offset_in_region: u64,
    /// For RAM: the block, and the offset of `start` in it.
    pub ram: Option<(String, u64)>,
}

/// An immutable snapshot of the resolved map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatView {
    /// Sorted, non-overlapping ranges.
    pub ranges: Vec<FlatRange>,
}

impl FlatView {
    /// The range covering `gpa`, if any.
    pub fn lookup(&self, gpa: u64) -> Option<&FlatRange> {
        let i = self.ranges.partition_point(|r| r.end <= gpa);
        self.ranges.get(i).filter(|r| r.start <= gpa)
    }

    fn build(regions: &[Region]) -> FlatView {
        // Boundaries of every mapped region; each elementary interval goes to the
        // highest-priority region covering it (later-added wins ties).
        let mapped: Vec<(usize, u64, u64)> = regions
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.gpa.map(|g| (i, g, g.saturating_add(r.size))))
            .collect();
        let mut points: Vec<u64> = mapped.iter().flat_map(|(_, s, e)| [*s, *e]).collect();
        points.sort_unstable();
        points.dedup();
        let mut ranges: Vec<FlatRange> = Vec::new();
        for w in points.windows(2) {
            let (s, e) = (w[0], w[1]);
            let owner = mapped
                .iter()
                .filter(|(_, rs, re)| *rs <= s && e <= *re)
                .max_by_key(|(i, _, _)| (regions[*i].priority, *i));
            if let Some((i, rs, _)) = owner {
                let r = &regions[*i];
                match ranges.last_mut() {
                    Some(last) if last.end == s && last.region == r.name => last.end = e,
                    _ => ranges.push(FlatRange {
                        start: s,
                        end: e,
                        region: r.name.clone(),
                        offset_in_region: s - rs,
                        ram: match &r.kind {
                            RegionKind::Ram { block, offset } => {
                                Some((block.clone(), offset + (s - rs)))
                            }
                            RegionKind::Mmio => None,
                        },
                    }),
                }
            }
        }
        FlatView { ranges }
    }
}

/// Told of every new flat view: how an accelerator (KVM's memslots) follows the map.
pub trait MapListener: Send + Sync {
    /// The view changed from `old` to `new`; make what the listener owns match `new`.
    fn commit(&self, old: &FlatView, new: &FlatView) -> Result<(), String>;
}

struct Inner {
    regions: Vec<Region>,
    view: Arc<FlatView>,
    depth: u32,
    pending: bool,
    rebuilds: u64,
    listener: Option<Arc<dyn MapListener>>,
    listener_commits: u64,
    error: Option<String>,
}

/// Counters that show what batching saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapStats {
    /// Flat-view rebuilds so far.
    pub rebuilds: u64,
    /// Views handed to the listener (rebuilds that changed the view, with a listener set).
    pub listener_commits: u64,
}

/// The memory map. Thread-safe; every method takes the internal lock briefly and never waits
/// for anything while holding it.
pub struct MemoryMap {
    inner: Mutex<Inner>,
}

impl Default for MemoryMap {
    fn default() -> Self {
        MemoryMap {
            inner: Mutex::new(Inner {
                regions: Vec::new(),
                view: Arc::new(FlatView::default()),
                depth: 0,
                pending: false,
                rebuilds: 0,
                listener: None,
                listener_commits: 0,
                error: None,
            }),
        }
    }
}

impl MemoryMap {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(inner: &mut Inner) {
        if inner.depth > 0 {
            inner.pending = true;
        } else {
            Self::rebuild(inner);
        }
    }

    fn rebuild(inner: &mut Inner) {
        let new = Arc::new(FlatView::build(&inner.regions));
        inner.rebuilds += 1;
        inner.pending = false;
        if *new == *inner.view {
            return;
        }
        let old = std::mem::replace(&mut inner.view, new);
        // The listener runs under the map's lock, so views reach it in the order they were
        // built. It never calls back into the map.
        if let Some(l) = inner.listener.clone() {
            inner.listener_commits += 1;
            if let Err(e) = l.commit(&old, &inner.view) {
                log::error!("memory map: {e}");
                inner.error.get_or_insert(e);
            }
        }
    }

    /// Sets the listener and hands it the current view (as a change from an empty one).
    pub fn set_listener(&self, listener: Arc<dyn MapListener>) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.pending {
            Self::rebuild(&mut inner);
        }
        inner.listener = Some(listener.clone());
        inner.listener_commits += 1;
        listener.commit(&FlatView::default(), &inner.view)
    }

    /// The first error a listener reported since the last call, if any.
    pub fn take_error(&self) -> Option<String> {
        self.lock().error.take()
    }

    /// Adds a region (replacing one of the same name).
    pub fn add(&self, region: Region) {
        let mut inner = self.lock();
        inner.regions.retain(|r| r.name != region.name);
        inner.regions.push(region);
        Self::changed(&mut inner);
    }

    /// Maps a region at `gpa`, or unmaps it with `None`. Returns false for an unknown region.
    pub fn set_address(&self, name: &str, gpa: Option<u64>) -> bool {
        let mut inner = self.lock();
        let Some(r) = inner.regions.iter_mut().find(|r| r.name == name) else {
            return false;
        };
        if r.gpa == gpa {
            return true;
        }
        r.gpa = gpa;
        Self::changed(&mut inner);
        true
    }

    /// Where a region is mapped now.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.lock()
            .regions
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.gpa)
    }

    /// Starts a batch of changes (batches nest).
    pub fn begin(&self) {
        self.lock().depth += 1;
    }

    /// Ends a batch; the outermost end rebuilds the view once if anything changed.
    pub fn commit(&self) {
        let mut inner = self.lock();
        inner.depth = inner.depth.saturating_sub(1);
        if inner.depth == 0 && inner.pending {
            Self::rebuild(&mut inner);
        }
    }

    /// The current view — rebuilt first if a batch has unapplied changes, so it is never
    /// stale.
    pub fn flat_view(&self) -> Arc<FlatView> {
        let mut inner = self.lock();
        if inner.pending {
            Self::rebuild(&mut inner);
        }
        inner.view.clone()
    }

    /// What batching has done so far.
    pub fn stats(&self) -> MapStats {
        let inner = self.lock();
        MapStats {
            rebuilds: inner.rebuilds,
            listener_commits: inner.listener_commits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(i: u32) -> Region {
        Region {
            name: format!("window{i}"),
            gpa: None,
            size: 0x1000,
            priority: 1,
            kind: RegionKind::Mmio,
        }
    }

    fn map_with_windows(n: u32) -> MemoryMap {
        let m = MemoryMap::default();
        m.add(Region {
            name: "ram".into(),
            gpa: Some(0),
            size: 0x10_0000,
            priority: 0,
            kind: RegionKind::Ram {
                block: "ram".into(),
                offset: 0,
            },
        });
        for i in 0..n {
            m.add(window(i));
        }
        m
    }

    #[test]
    fn overlapping_regions_resolve_by_priority() {
        let m = map_with_windows(1);
        m.set_address("window0", Some(0x2000));
        let v = m.flat_view();
        assert_eq!(v.lookup(0x1fff).unwrap().region, "ram");
        let r = v.lookup(0x2800).unwrap();
        assert_eq!((r.region.as_str(), r.offset_in_region), ("window0", 0));
        let after = v.lookup(0x3000).unwrap();
        assert_eq!(
            (after.region.as_str(), after.offset_in_region),
            ("ram", 0x3000)
        );
        assert!(v.lookup(0x10_0000).is_none());
    }

    #[test]
    fn a_batch_rebuilds_once() {
        let m = map_with_windows(16);
        let before = m.stats().rebuilds;
        m.begin();
        for i in 0..16 {
            m.set_address(
                &format!("window{i}"),
                Some(0x1_0000 + u64::try_from(i).unwrap() * 0x1000),
            );
        }
        m.commit();
        assert_eq!(m.stats().rebuilds, before + 1);
        // Without a batch, every change rebuilds.
        for i in 0..16 {
            m.set_address(&format!("window{i}"), None);
        }
        assert_eq!(m.stats().rebuilds, before + 17);
    }

    #[test]
    fn a_reader_inside_a_batch_never_sees_a_stale_view() {
        let m = map_with_windows(2);
        m.begin();
        m.set_address("window0", Some(0x4000));
        // A device's load looks at the map before the batch ends: it must see window0.
        assert_eq!(m.flat_view().lookup(0x4000).unwrap().region, "window0");
        m.set_address("window1", Some(0x8000));
        m.commit();
        let v = m.flat_view();
        assert_eq!(v.lookup(0x4000).unwrap().region, "window0");
        assert_eq!(v.lookup(0x8000).unwrap().region, "window1");
    }

    /// A RAM range of a view: start, end, block, offset in the block.
    type RamRange = (u64, u64, String, u64);

    /// Records the RAM ranges of every view it is handed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<RamRange>>>);

    impl MapListener for Recorder {
        fn commit(&self, _old: &FlatView, new: &FlatView) -> Result<(), String> {
            let ram = new
                .ranges
                .iter()
                .filter_map(|r| r.ram.clone().map(|(b, o)| (r.start, r.end, b, o)))
                .collect();
            self.0.lock().unwrap().push(ram);
            Ok(())
        }
    }

    #[test]
    fn a_listener_sees_one_view_per_batch_with_ram_split_around_windows() {
        let m = map_with_windows(4);
        let rec = Arc::new(Recorder::default());
        m.set_listener(rec.clone()).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![vec![(0, 0x10_0000, "ram".to_string(), 0)]]
        );
        m.begin();
        for i in 0..4u64 {
            m.set_address(&format!("window{i}"), Some(0x1000 + i * 0x2000));
        }
        // A window moved twice inside the batch: only where it ends counts.
        m.set_address("window3", Some(0x8000));
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        m.commit();
        let views = rec.0.lock().unwrap().clone();
        assert_eq!(views.len(), 2);
        let starts: Vec<(u64, u64, u64)> = views[1].iter().map(|r| (r.0, r.1, r.3)).collect();
        assert_eq!(
            starts,
            vec![
                (0, 0x1000, 0),
                (0x2000, 0x3000, 0x2000),
                (0x4000, 0x5000, 0x4000),
                (0x6000, 0x8000, 0x6000),
                (0x9000, 0x10_0000, 0x9000),
            ]
        );
        // No change, no call.
        m.begin();
        m.set_address("window0", None);
        m.set_address("window0", Some(0x1000));
        m.commit();
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        assert_eq!(m.stats().listener_commits, 2);
    }

    #[test]
    fn a_reader_inside_a_batch_brings_the_listener_up_to_date() {
        let m = map_with_windows(1);
        let rec = Arc::new(Recorder::default());
        m.set_listener(rec.clone()).unwrap();
        m.begin();
        m.set_address("window0", Some(0x4000));
        // The reader's view and what the listener maps agree, before the batch ends.
        assert_eq!(m.flat_view().lookup(0x4000).unwrap().region, "window0");
        assert_eq!(rec.0.lock().unwrap().last().unwrap().len(), 2);
        m.commit();
        assert_eq!(rec.0.lock().unwrap().len(), 2);
    }

    struct Failing;

    impl MapListener for Failing {
        fn commit(&self, old: &FlatView, _new: &FlatView) -> Result<(), String> {
            if old.ranges.is_empty() {
                Ok(())
            } else {
                Err("no slot".into())
            }
        }
    }

    #[test]
    fn a_listener_error_is_kept_for_whoever_commits() {
        let m = map_with_windows(1);
        m.set_listener(Arc::new(Failing)).unwrap();
        m.begin();
        m.set_address("window0", Some(0x4000));
        assert_eq!(m.take_error(), None);
        m.commit();
        assert_eq!(m.take_error().as_deref(), Some("no slot"));
        assert_eq!(m.take_error(), None);
    }

    #[test]
    fn nested_batches_commit_at_the_outermost_end() {
        let m = map_with_windows(1);
        let before = m.stats().rebuilds;
        m.begin();
        m.begin();
        m.set_address("window0", Some(0x4000));
        m.commit();
        assert_eq!(m.stats().rebuilds, before);
        m.commit();
        assert_eq!(m.stats().rebuilds, before + 1);
    }
}
