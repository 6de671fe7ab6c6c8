//! The `dirty-bitmap` section alone: `migration::bitmaps::BitmapLoader::load` over arbitrary
//! bytes (the bodies of consecutive `dirty-bitmap` sections, as the START and END sections of a
//! real stream carry them, without section headers), then `before_vm_start` — or `cancel`
//! after an error, as the engine's `abandon` does.
//!
//! The destination has two null-co nodes of different sizes: [`NODES`] (`node0` is the size
//! the QEMU captures' source had; `node1` is not a whole number of 64 KiB granules), each with
//! a pre-existing bitmap that must come through unchanged.
//!
//! Each input is loaded twice: with no `block-bitmap-mapping` (wire names are node and bitmap
//! names) and with [`mapping`], which renames and moves bitmaps between the nodes and forces
//! persistence for one of them.
//!
//! Invariants, whatever the bytes were:
//! - after an error and `cancel`: the bitmaps are exactly those that were there before,
//!   untouched, not busy;
//! - after success and `before_vm_start`: every bitmap on a node either existed before
//!   (untouched) or is one whose START and COMPLETE chunks were both in the input — a model
//!   reads the same bytes with `wire::bitmap::read_chunk` and resolves the aliases — with the
//!   granularity, `enabled` and `persistent` of its START chunk (persistence as the mapping's
//!   `transform` overrides it), sized like its node, not busy, not frozen.

use crate::invariants::{self, BitmapState};
use block::BlockLayer;
use migration::bitmaps::BitmapLoader;
use migration::machine::Reader;
use migration::params::BitmapMapping;
use migration::transport::BoxRead;
use serde_json::json;
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use wire::bitmap::{
    read_chunk, ChunkPayload, NameTracker, START_FLAG_ENABLED, START_FLAG_PERSISTENT,
};
use wire::StreamReader;

/// The destination's nodes: (name, size in bytes, pre-existing bitmap).
pub const NODES: [(&str, u64, &str); 2] = [
    ("node0", 64 << 20, "keep0"),
    ("node1", (3 << 20) + 7 * 512, "keep1"),
];

/// At most this many section bodies are read from one input (a real stream has two).
pub const MAX_SECTIONS: usize = 16;

/// The mapping of the second load: the source's `node0`/`bitmap0` (QEMU's and livemig's seed
/// streams) arrives as `node0`/`b0`, its `fine` as `node0`/`renamed` with persistence forced
/// on, and wire `n1`/`x` as `node1`/`b`; any other name is unknown.
pub fn mapping() -> BitmapMapping {
    BitmapMapping::from_json(&json!([
        {"node-name": "node0", "alias": "node0", "bitmaps": [
            {"name": "b0", "alias": "bitmap0"},
            {"name": "renamed", "alias": "fine", "transform": {"persistent": true}}
        ]},
        {"node-name": "node1", "alias": "n1", "bitmaps": [
            {"name": "b", "alias": "x"}
        ]}
    ]))
    .expect("harness setup: a valid mapping")
}

/// What one input did, with and without the mapping.
#[derive(Debug)]
pub struct Outcome {
    /// Loaded with no mapping.
    pub plain: Load,
    /// Loaded with [`mapping`].
    pub mapped: Load,
}

/// What one load did.
#[derive(Debug)]
pub struct Load {
    /// Section bodies loaded completely.
    pub sections: usize,
    /// `Ok`, or the error that failed the load.
    pub result: Result<(), String>,
    /// The loader's warnings (dropped bitmaps and why).
    pub warnings: Vec<String>,
    /// Bitmaps the input created.
    pub created: Vec<BitmapState>,
}

/// The destination's block layer.
pub fn destination() -> Arc<BlockLayer> {
    let layer = Arc::new(BlockLayer::new());
    for (i, (name, size, keep)) in NODES.iter().enumerate() {
        let node = layer
            .blockdev_add(&json!({"driver": "null-co", "node-name": name, "size": size}))
            .expect("harness setup: null-co node");
        node.with_bitmaps(|list| {
            let id = list
                .create(4096 << i, Some(keep))
                .expect("harness setup: bitmap");
            let bm = list.get_mut(id).expect("harness setup: bitmap just made");
            bm.set_dirty(8192, 3 * 4096)
                .expect("harness setup: set bits");
        });
    }
    layer
}

/// What the input asks for, read independently of the loader: for each (node alias, bitmap
/// alias), the first START's granularity and flags, and whether a COMPLETE followed it. Keys
/// are wire aliases.
#[derive(Default)]
struct Model {
    started: HashMap<(String, String), (u32, u8)>,
    completed: HashMap<(String, String), bool>,
}

fn model(data: &[u8], sections: usize) -> Model {
    let mut m = Model::default();
    let input: BoxRead = Box::new(Cursor::new(data.to_vec()));
    let mut r: Reader = StreamReader::new(input);
    let mut names = NameTracker::new();
    for _ in 0..sections {
        loop {
            let Ok(c) = read_chunk(&mut r) else {
                return m;
            };
            let (node, bitmap) = names.resolve(&c);
            if let (Some(node), Some(bitmap)) = (node, bitmap) {
                let key = (node.to_string(), bitmap.to_string());
                match c.payload {
                    ChunkPayload::Start { granularity, flags } => {
                        m.started.entry(key).or_insert((granularity, flags));
                    }
                    ChunkPayload::Complete if m.started.contains_key(&key) => {
                        m.completed.insert(key, true);
                    }
                    _ => {}
                }
            }
            if c.eos {
                break;
            }
        }
    }
    m
}

/// The wire aliases of (node, bitmap) under `mapping`, or the names themselves without one,
/// and the persistence the mapping forces.
fn wire_key(
    mapping: Option<&BitmapMapping>,
    node: &str,
    bitmap: &str,
) -> Option<((String, String), Option<bool>)> {
    match mapping {
        None => Some(((node.to_string(), bitmap.to_string()), None)),
        Some(m) => {
            let n = m.node_alias(node)?;
            let b = n.bitmaps.iter().find(|b| b.name == bitmap)?;
            Some(((n.alias.clone(), b.alias.clone()), b.persistent))
        }
    }
}

/// Loads `data` as consecutive `dirty-bitmap` section bodies, without and with [`mapping`],
/// and checks the invariants (module doc). Panics when one does not hold.
pub fn run(data: &[u8]) -> Outcome {
    Outcome {
        plain: run_with(data, None),
        mapped: run_with(data, Some(mapping())),
    }
}

/// One load of `data` with `mapping`.
pub fn run_with(data: &[u8], mapping: Option<BitmapMapping>) -> Load {
    let layer = destination();
    let before = invariants::snapshot(&layer);
    let mut loader = BitmapLoader::new(layer.clone(), mapping.clone());
    let input: BoxRead = Box::new(Cursor::new(data.to_vec()));
    let mut r: Reader = StreamReader::new(input);
    let mut sections = 0;
    let mut result = Ok(());
    while sections < MAX_SECTIONS {
        if let Err(e) = loader.load(&mut r) {
            result = Err(e.to_string());
            break;
        }
        sections += 1;
        match r.is_at_eof() {
            Ok(false) => {}
            Ok(true) => break,
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
    }
    let warnings = match &result {
        Ok(()) => loader.before_vm_start(),
        Err(_) => {
            loader.cancel("the incoming migration failed");
            std::mem::take(&mut loader.errors)
        }
    };
    let context = format!("mapping {}, result {result:?}", mapping.is_some());
    if let Err(e) = &result {
        assert!(!e.trim().is_empty(), "{context}: an error without text");
    }
    for w in &warnings {
        assert!(!w.trim().is_empty(), "{context}: a warning without text");
    }
    let after = invariants::snapshot(&layer);
    let created = match &result {
        Err(_) => {
            invariants::assert_failed_load_clean(&before, &after, &context);
            Vec::new()
        }
        Ok(()) => {
            invariants::assert_completed_load_sane(&layer, &before, &after, &context);
            let m = model(data, sections);
            let created = invariants::created(&before, &after);
            for b in &created {
                let name = b.name.clone().unwrap_or_default();
                let Some((key, forced)) = wire_key(mapping.as_ref(), &b.node, &name) else {
                    panic!("{context}: bitmap {b} is not in the mapping");
                };
                let Some(&(granularity, flags)) = m.started.get(&key) else {
                    panic!("{context}: bitmap {b} was never started in the input");
                };
                assert!(
                    m.completed.get(&key).copied().unwrap_or(false),
                    "{context}: bitmap {b} kept though the input never completed it"
                );
                assert_eq!(b.granularity, granularity, "{context}: {b}: granularity");
                assert_eq!(
                    b.enabled,
                    flags & START_FLAG_ENABLED != 0,
                    "{context}: {b}: enabled"
                );
                assert_eq!(
                    b.persistent,
                    forced.unwrap_or(flags & START_FLAG_PERSISTENT != 0),
                    "{context}: {b}: persistent"
                );
            }
            created
        }
    };
    Load {
        sections,
        result,
        warnings,
        created,
    }
}
