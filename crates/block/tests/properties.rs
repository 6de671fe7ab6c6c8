//! Property tests against simple models:
//!
//! * the data path: writes, write-zeroes and discards mark exactly the groups they touch
//!   (rounded outward) in enabled bitmaps, never in disabled ones, and failed requests mark
//!   nothing;
//! * `block-dirty-bitmap-merge`: the target ends as the union of all sources, or — when any
//!   source fails — unchanged, with the first failure's error;
//! * successors: create / enable / reclaim / abdicate against a model of parent and successor.

use block::{BlockError, BlockLayer, BlockNode, MergeSource};
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;

const GRANS: [u32; 4] = [512, 4096, 65536, 1 << 20];

/// The groups `[off, off+len)` touches at granularity `2^g`.
fn groups(off: u64, len: u64, g: u32) -> std::ops::RangeInclusive<u64> {
    (off >> g)..=((off + len - 1) >> g)
}

/// Asserts `set` holds exactly the dirty groups of the bitmap called `name`.
fn assert_bits(node: &BlockNode, name: &str, set: &BTreeSet<u64>) -> Result<(), TestCaseError> {
    let l = node.bitmaps();
    let b = l.find(name).expect("bitmap exists");
    let g = b.granularity().trailing_zeros();
    prop_assert_eq!(b.count(), (set.len() as u64) << g, "count of {}", name);
    let nbits = b.size().div_ceil(1 << g);
    for k in 0..nbits {
        prop_assert_eq!(
            b.get(k << g).unwrap(),
            set.contains(&k),
            "{} group {}",
            name,
            k
        );
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
    Toggle(usize),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    // Offsets and lengths over the node and a little past it, so some requests fail.
    let range = (0..size + 1024, 0..size / 2 + 1);
    prop_oneof![
        range.clone().prop_map(|(o, l)| Op::Write(o, l)),
        range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
        range.prop_map(|(o, l)| Op::Discard(o, l)),
        (0usize..3).prop_map(Op::Toggle),
    ]
}

fn case() -> impl Strategy<Value = (u64, bool, Vec<(u32, bool)>, Vec<Op>)> {
    (512u64..(4 << 20), any::<bool>()).prop_flat_map(|(size, on_file)| {
        (
            Just(size),
            Just(on_file),
            prop::collection::vec((prop::sample::select(&GRANS[..]), any::<bool>()), 3),
            prop::collection::vec(op(size), 1..24),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn marking_follows_the_model((size, on_file, bitmaps, ops) in case()) {
        let dir = tempfile::tempdir().unwrap();
        let l = BlockLayer::new();
        // A file node with discard=unmap passes discards to its driver (so they mark); null-co
        // has no discard (so they do not).
        let node = if on_file {
            let p = dir.path().join("img");
            std::fs::File::create(&p).unwrap().set_len(size).unwrap();
            l.blockdev_add(&json!({"driver": "file", "node-name": "n", "filename": p, "discard": "unmap"})).unwrap()
        } else {
            l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": size})).unwrap()
        };
        let node_size = node.size().unwrap();
        let mut model: Vec<(String, u32, bool, BTreeSet<u64>)> = Vec::new();
        for (i, (g, disabled)) in bitmaps.iter().enumerate() {
            let name = format!("b{i}");
            l.block_dirty_bitmap_add("n", &name, Some(*g), None, Some(*disabled)).unwrap();
            model.push((name, g.trailing_zeros(), !disabled, BTreeSet::new()));
        }
        for op in ops {
            let (off, len, r, marks) = match op {
                Op::Toggle(i) => {
                    let m = &mut model[i];
                    m.2 = !m.2;
                    if m.2 {
                        l.block_dirty_bitmap_enable("n", &m.0).unwrap();
                    } else {
                        l.block_dirty_bitmap_disable("n", &m.0).unwrap();
                    }
                    continue;
                }
                Op::Write(o, n) => (o, n, node.write_at(o, &vec![0x5a; n as usize]), true),
                Op::Zero(o, n) => (o, n, node.write_zeroes(o, n, false), true),
                Op::Discard(o, n) => (o, n, node.discard(o, n), on_file),
            };
            let in_range = off <= node_size && len <= node_size - off;
            prop_assert_eq!(r.is_ok(), in_range, "{:?}", r);
            if in_range && marks && len > 0 {
                for m in model.iter_mut().filter(|m| m.2) {
                    m.3.extend(groups(off, len, m.1));
                }
            }
        }
        for m in &model {
            assert_bits(&node, &m.0, &m.3)?;
        }
    }
}

// ---- merge ------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Src {
    Local(usize),
    Missing,
    External,
    OtherSize,
    NoNode,
}

#[derive(Debug, Clone)]
struct MergeCase {
    size: u64,
    /// Granularity index and dirty ranges of the target and four local sources.
    maps: Vec<(u32, Vec<(u64, u64)>)>,
    /// 0 none, 1 busy, 2 readonly, 3 inconsistent; index 0 is the target.
    states: Vec<u8>,
    sources: Vec<Src>,
}

fn merge_case() -> impl Strategy<Value = MergeCase> {
    (4096u64..(2 << 20)).prop_flat_map(|size| {
        let ranges = prop::collection::vec((0..size, 1..size / 4 + 2), 0..4);
        (
            Just(size),
            prop::collection::vec((prop::sample::select(&GRANS[..]), ranges), 5),
            prop::collection::vec(prop_oneof![6 => Just(0u8), 1 => 1u8..4], 5),
            prop::collection::vec(
                prop_oneof![
                    8 => (1usize..5).prop_map(Src::Local),
                    1 => Just(Src::Missing),
                    2 => Just(Src::External),
                    1 => Just(Src::OtherSize),
                    1 => Just(Src::NoNode),
                ],
                0..5,
            ),
        )
            .prop_map(|(size, maps, states, sources)| MergeCase {
                size,
                maps,
                states,
                sources,
            })
    })
}

/// The dirty item ranges of a bitmap: each set group, clamped to the size.
fn item_ranges(set: &BTreeSet<u64>, g: u32, size: u64) -> Vec<(u64, u64)> {
    set.iter()
        .map(|k| (k << g, ((k + 1) << g).min(size)))
        .collect()
}

fn dirty_groups(ranges: &[(u64, u64)], g: u32, size: u64) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for &(o, n) in ranges {
        let n = n.min(size - o);
        if n > 0 {
            s.extend(groups(o, n, g));
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merge_is_union_or_nothing(c in merge_case()) {
        let l = BlockLayer::new();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "a", "size": c.size})).unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "b", "size": c.size})).unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "c", "size": c.size + 512})).unwrap();
        let a = l.node("a").unwrap();
        let size = a.size().unwrap();
        let names = ["t", "s1", "s2", "s3", "s4"];
        let mut sets = Vec::new();
        for (i, (g, ranges)) in c.maps.iter().enumerate() {
            l.block_dirty_bitmap_add("a", names[i], Some(*g), None, None).unwrap();
            let mut bm = a.bitmaps();
            let b = bm.find_mut(names[i]).unwrap();
            let set = dirty_groups(ranges, g.trailing_zeros(), size);
            for &(o, n) in ranges {
                let n = n.min(size - o);
                if n > 0 {
                    b.set_dirty(o, n).unwrap();
                }
            }
            match c.states[i] {
                1 => b.set_busy(true),
                2 => b.set_readonly(true),
                3 => {
                    b.set_persistent(true);
                    b.set_inconsistent().unwrap();
                }
                _ => {}
            }
            sets.push((g.trailing_zeros(), set));
        }
        l.block_dirty_bitmap_add("b", "e", Some(4096), None, None).unwrap();
        l.node("b").unwrap().write_at(size / 2, &[1]).unwrap();
        l.block_dirty_bitmap_add("c", "o", Some(4096), None, None).unwrap();
        let ext_set = dirty_groups(&[(size / 2, 1)], 12, size);

        // The model: walk the sources in order, checking as QEMU does.
        let target_state = c.states[0];
        let target_err = match target_state {
            1 => Some(BlockError::BitmapBusy("t".into())),
            2 => Some(BlockError::BitmapReadOnly("t".into())),
            3 => Some(BlockError::BitmapInconsistent("t".into())),
            _ => None,
        };
        let (tg, tset) = sets[0].clone();
        let mut expected = tset.clone();
        let mut expected_err = None;
        let mut sources = Vec::new();
        for s in &c.sources {
            let (src, step): (MergeSource, Result<Vec<(u64, u64)>, BlockError>) = match s {
                Src::Local(i) => {
                    let r = match (target_err.clone(), c.states[*i]) {
                        (Some(e), _) => Err(e),
                        (None, 1) => Err(BlockError::BitmapBusy(names[*i].into())),
                        (None, 3) => Err(BlockError::BitmapInconsistent(names[*i].into())),
                        _ => Ok(item_ranges(&sets[*i].1, sets[*i].0, size)),
                    };
                    (MergeSource::Local(names[*i].into()), r)
                }
                Src::Missing => (MergeSource::Local("nope".into()), Err(BlockError::BitmapNotFound("nope".into()))),
                Src::External => (
                    MergeSource::External { node: "b".into(), name: "e".into() },
                    match target_err.clone() {
                        Some(e) => Err(e),
                        None => Ok(item_ranges(&ext_set, 12, size)),
                    },
                ),
                Src::OtherSize => (
                    MergeSource::External { node: "c".into(), name: "o".into() },
                    Err(target_err.clone().unwrap_or(BlockError::SizeMismatch { dest: size, src: size + 512 })),
                ),
                Src::NoNode => (
                    MergeSource::External { node: "zz".into(), name: "e".into() },
                    Err(BlockError::NodeNotFound("zz".into())),
                ),
            };
            sources.push(src);
            if expected_err.is_none() {
                match step {
                    Ok(ranges) => {
                        for (o, e) in ranges {
                            expected.extend(groups(o, e - o, tg));
                        }
                    }
                    Err(e) => expected_err = Some(e),
                }
            }
        }
        let r = l.block_dirty_bitmap_merge("a", "t", &sources);
        match expected_err {
            Some(e) => {
                prop_assert_eq!(r, Err(e));
                assert_bits(&a, "t", &tset)?;
            }
            None => {
                prop_assert_eq!(r, Ok(()));
                assert_bits(&a, "t", &expected)?;
            }
        }
    }
}

// ---- successors -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum SOp {
    Write(u64, u64),
    Create,
    EnableSuccessor,
    Reclaim,
    Abdicate,
}

fn sop() -> impl Strategy<Value = SOp> {
    prop_oneof![
        4 => (0u64..(1 << 20), 1u64..200_000).prop_map(|(o, n)| SOp::Write(o, n)),
        1 => Just(SOp::Create),
        1 => Just(SOp::EnableSuccessor),
        1 => Just(SOp::Reclaim),
        1 => Just(SOp::Abdicate),
    ]
}

#[derive(Debug, Clone)]
struct Model {
    set: BTreeSet<u64>,
    disabled: bool,
    busy: bool,
    successor: Option<(BTreeSet<u64>, bool)>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn successors_follow_the_model(
        g in prop::sample::select(&GRANS[..3]),
        start_disabled in any::<bool>(),
        ops in prop::collection::vec(sop(), 1..30),
    ) {
        let size = 1u64 << 20;
        let l = Arc::new(BlockLayer::new());
        let node = l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": size})).unwrap();
        l.block_dirty_bitmap_add("n", "b", Some(g), None, Some(start_disabled)).unwrap();
        let gs = g.trailing_zeros();
        let mut m = Model { set: BTreeSet::new(), disabled: start_disabled, busy: false, successor: None };
        for op in ops {
            let id = node.bitmaps().find("b").unwrap().id();
            match op {
                SOp::Write(o, n) => {
                    let n = n.min(size - o);
                    node.write_at(o, &vec![0; n as usize]).unwrap();
                    if !m.disabled {
                        m.set.extend(groups(o, n, gs));
                    }
                    if let Some((s, false)) = &mut m.successor {
                        s.extend(groups(o, n, gs));
                    }
                }
                SOp::Create => {
                    let r = node.bitmaps().create_successor(id);
                    if m.busy {
                        prop_assert_eq!(r.unwrap_err(), BlockError::BitmapBusy("b".into()));
                    } else {
                        prop_assert!(r.is_ok());
                        m.successor = Some((BTreeSet::new(), m.disabled));
                        m.disabled = true;
                        m.busy = true;
                    }
                }
                SOp::EnableSuccessor => {
                    let r = node.bitmaps().enable_successor(id);
                    match &mut m.successor {
                        None => prop_assert_eq!(r, Err(BlockError::NoSuccessorToEnable)),
                        Some(s) => {
                            prop_assert_eq!(r, Ok(()));
                            s.1 = false;
                        }
                    }
                }
                SOp::Reclaim => {
                    let r = node.bitmaps().reclaim(id);
                    match m.successor.take() {
                        None => prop_assert_eq!(r, Err(BlockError::NoSuccessorToReclaim)),
                        Some((s, d)) => {
                            prop_assert_eq!(r, Ok(()));
                            m.set.extend(s);
                            m.disabled = d;
                            m.busy = false;
                        }
                    }
                }
                SOp::Abdicate => {
                    let r = node.bitmaps().abdicate(id);
                    match m.successor.take() {
                        None => prop_assert_eq!(r.unwrap_err(), BlockError::NoSuccessorToAbdicate),
                        Some((s, d)) => {
                            prop_assert!(r.is_ok());
                            m.set = s;
                            m.disabled = d;
                            m.busy = false;
                        }
                    }
                }
            }
            // What a monitor sees after every step.
            let bm = node.bitmaps();
            let b = bm.find("b").unwrap();
            let recording = !m.disabled || m.successor.as_ref().is_some_and(|s| !s.1);
            prop_assert_eq!(bm.recording(b.id()), recording);
            prop_assert_eq!(b.busy(), m.busy);
            prop_assert_eq!(bm.len(), 1 + usize::from(m.successor.is_some()));
            drop(bm);
            assert_bits(&node, "b", &m.set)?;
        }
    }
}
