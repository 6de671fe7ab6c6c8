//! The QMP-shaped operations of the layer: the dirty-bitmap commands (with QEMU's checks and
//! messages) and the `query-block` / `query-named-block-nodes` replies.

use super::*;

impl BlockLayer {
    // ---- QMP bitmap commands ----------------------------------------------------------------

    /// `block_dirty_bitmap_lookup`'s node step: the node named `node` (a node name only, not
    /// a device name), or `Node '<node>' not found`.
    pub fn bitmap_node(&self, node: &str) -> Result<Arc<BlockNode>, BlockError> {
        let g = self.read();
        Self::find(&g, node).ok_or_else(|| BlockError::NodeNotFound(node.to_string()))
    }

    /// `block-dirty-bitmap-add`, with QEMU's checks in QEMU's order (§3.3). A persistent
    /// bitmap on a read-only node is refused here (QEMU accepts it and loses it at shutdown).
    pub fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: Option<bool>,
        disabled: Option<bool>,
    ) -> Result<(), BlockError> {
        if name.is_empty() {
            return Err(BlockError::BitmapNameEmpty);
        }
        let bs = self.lookup_bs(Some(node), Some(node))?;
        let granularity = match granularity {
            Some(g) => {
                granularity_shift(g)?;
                g
            }
            None => bs.default_bitmap_granularity(),
        };
        let persistent = persistent.unwrap_or(false);
        if persistent {
            match bs.driver().bitmap_store() {
                None => {
                    return Err(BlockError::CannotStorePersistent(
                        self.device_or_node_name(&bs),
                    ))
                }
                Some(store) => {
                    let names: Vec<String> = {
                        let l = bs.bitmaps();
                        if l.find(name).is_some() {
                            return Err(BlockError::BitmapExists(name.to_string()));
                        }
                        l.named()
                            .filter(|b| b.get_persistence())
                            .filter_map(|b| b.name().map(str::to_string))
                            .collect()
                    };
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    store.can_store_new(
                        &self.device_or_node_name(&bs),
                        name,
                        granularity,
                        &names,
                    )?;
                    if !bs.writable() {
                        return Err(BlockError::Driver(format!(
                            "Can't make bitmap '{name}' persistent in '{}': No write access",
                            bs.name()
                        )));
                    }
                }
            }
        }
        bs.with_bitmaps(|l| {
            let id = l.create(granularity, Some(name))?;
            if let Some(b) = l.get_mut(id) {
                b.set_disabled(disabled.unwrap_or(false));
                b.set_persistent(persistent);
            }
            Ok(())
        })
    }

    /// `block-dirty-bitmap-remove`: refused for busy or readonly bitmaps (an inconsistent one
    /// may go); a bitmap whose persistence holds is removed from the image first.
    pub fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup(name)?;
            b.check(BitmapCheck::BUSY | BitmapCheck::RO)?;
            let id = b.id();
            if b.get_persistence() {
                if let Some(store) = bs.driver().bitmap_store() {
                    store.remove(bs.name(), name)?;
                }
            }
            l.release(id).map(drop)
        })
    }

    /// `block-dirty-bitmap-clear`: refused for busy, readonly or inconsistent bitmaps.
    pub fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup_mut(name)?;
            b.check(BitmapCheck::DEFAULT)?;
            b.clear()
        })
    }

    /// `block-dirty-bitmap-enable`: refused for busy or inconsistent bitmaps; allowed on
    /// readonly ones, as in QEMU.
    pub fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<(), BlockError> {
        self.set_disabled(node, name, false)
    }

    /// `block-dirty-bitmap-disable`: as enable.
    pub fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<(), BlockError> {
        self.set_disabled(node, name, true)
    }

    fn set_disabled(&self, node: &str, name: &str, disabled: bool) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup_mut(name)?;
            b.check(BitmapCheck::ALLOW_RO)?;
            b.set_disabled(disabled);
            Ok(())
        })
    }

    /// `block-dirty-bitmap-merge`: ORs every source into `target`, in order; on any error the
    /// target is restored to its bits before the first merge, so it is all or nothing.
    ///
    /// An **empty** source list succeeds and changes nothing (QEMU 7.2 crashes on it, §5.4).
    pub fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[MergeSource],
    ) -> Result<(), BlockError> {
        let dst_node = self.bitmap_node(node)?;
        // Resolve source nodes now (graph lock), report their errors in order later.
        let src_nodes: Vec<Result<Arc<BlockNode>, BlockError>> = {
            let g = self.read();
            sources
                .iter()
                .map(|s| match s {
                    MergeSource::Local(_) => Ok(dst_node.clone()),
                    MergeSource::External { node, .. } => {
                        Self::find(&g, node).ok_or_else(|| BlockError::NodeNotFound(node.clone()))
                    }
                })
                .collect()
        };
        let mut locked: Vec<Arc<BlockNode>> = vec![dst_node.clone()];
        for n in src_nodes.iter().flatten() {
            if !locked.iter().any(|l| l.id() == n.id()) {
                locked.push(n.clone());
            }
        }
        locked.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut guards: Vec<_> = locked.iter().map(|n| (n.id(), n.bitmaps())).collect();
        let di = guards
            .iter()
            .position(|(id, _)| *id == dst_node.id())
            .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
        let dst_id = {
            let (_, g) = guards
                .get(di)
                .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
            g.lookup(target)?.id()
        };
        let mut backup = None;
        let mut result = Ok(());
        for (src, src_node) in sources.iter().zip(&src_nodes) {
            let step = (|| {
                let src_node = src_node.clone()?;
                let src_name = match src {
                    MergeSource::Local(n) => n,
                    MergeSource::External { name, .. } => name,
                };
                let si = guards
                    .iter()
                    .position(|(id, _)| *id == src_node.id())
                    .ok_or_else(|| BlockError::NodeNotFound(src_node.name().to_string()))?;
                if si == di {
                    let (_, g) = guards
                        .get_mut(di)
                        .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
                    let sid = g.lookup(src_name)?.id();
                    return g.merge(dst_id, sid, &mut backup);
                }
                let (dg, sg) = if di < si {
                    let (l, r) = guards.split_at_mut(si);
                    (l.get_mut(di), r.first())
                } else {
                    let (l, r) = guards.split_at_mut(di);
                    (r.first_mut(), l.get(si))
                };
                let (Some((_, dg)), Some((_, sg))) = (dg, sg) else {
                    return Err(BlockError::NodeNotFound(node.to_string()));
                };
                let s = sg.lookup(src_name)?;
                let d = dg
                    .get_mut(dst_id)
                    .ok_or_else(|| BlockError::BitmapNotFound(target.to_string()))?;
                merge_into(d, s, &mut backup)
            })();
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            if let (Some(b), Some((_, g))) = (backup, guards.get_mut(di)) {
                if let Some(d) = g.get_mut(dst_id) {
                    d.restore(b);
                }
            }
        }
        result
    }

    /// `x-debug-block-dirty-bitmap-sha256`: the hex SHA-256 of the bits; no state checks.
    pub fn x_debug_block_dirty_bitmap_sha256(
        &self,
        node: &str,
        name: &str,
    ) -> Result<String, BlockError> {
        let bs = self.bitmap_node(node)?;
        let l = bs.bitmaps();
        Ok(l.lookup(name)?.sha256_hex())
    }

    // ---- queries ----------------------------------------------------------------------------

    /// `query-named-block-nodes`: `BlockDeviceInfo` for every node, newest first (as QEMU 7.2
    /// lists them). `flat` changes nothing here, since no node has a backing chain.
    pub fn query_named_block_nodes(&self, _flat: bool) -> Value {
        let nodes = self.nodes();
        Value::Array(nodes.iter().rev().map(|n| block_device_info(n)).collect())
    }

    /// `query-block`: a `BlockInfo` for every attached device, in attach order of the nodes.
    pub fn query_block(&self) -> Value {
        let devices: Vec<(Device, Arc<BlockNode>)> = self
            .read()
            .entries
            .iter()
            .filter_map(|e| e.device.clone().map(|d| (d, e.node.clone())))
            .collect();
        Value::Array(
            devices
                .iter()
                .map(|(d, n)| {
                    json!({
                        "device": d.id,
                        "qdev": d.qdev,
                        "locked": false,
                        "removable": false,
                        "type": "unknown",
                        "io-status": "ok",
                        "inserted": block_device_info(n),
                    })
                })
                .collect(),
        )
    }
}

/// QEMU 7.2's `BlockDeviceInfo` for a node, with the fields a client looks at.
pub fn block_device_info(n: &BlockNode) -> Value {
    let filename = n.filename();
    let size = n.size().unwrap_or(0);
    let mut image = Map::new();
    image.insert("filename".into(), json!(filename));
    image.insert("format".into(), json!(n.driver_name()));
    image.insert("virtual-size".into(), json!(size));
    image.insert("actual-size".into(), json!(n.driver().allocated_size()));
    if let Some(info) = n.driver().info() {
        if info.cluster_size > 0 && n.driver_name() == "qcow2" {
            image.insert("cluster-size".into(), json!(info.cluster_size));
        }
        image.insert("dirty-flag".into(), json!(info.dirty));
    }
    if let Some(spec) = n.driver().format_specific() {
        image.insert("format-specific".into(), spec);
    }
    let backing = |n: &BlockNode| {
        n.driver()
            .children()
            .into_iter()
            .find(|(role, _)| *role == "backing")
            .map(|(_, b)| b)
    };
    let mut depth = 0u64;
    let mut cur = backing(n);
    let first = cur.clone();
    while let Some(b) = cur {
        depth += 1;
        cur = backing(&b);
    }
    let mut m = Map::new();
    m.insert("file".into(), json!(filename));
    m.insert("node-name".into(), json!(n.name()));
    m.insert("ro".into(), json!(n.read_only()));
    m.insert("drv".into(), json!(n.driver_name()));
    if let Some(b) = &first {
        m.insert("backing_file".into(), json!(b.filename()));
    }
    m.insert("backing_file_depth".into(), json!(depth));
    m.insert("encrypted".into(), json!(false));
    m.insert("detect_zeroes".into(), json!("off"));
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(k.into(), json!(0));
    }
    if let Some(b) = &first {
        image.insert("backing-filename".into(), json!(b.filename()));
        image.insert("backing-filename-format".into(), json!(b.driver_name()));
    }
    m.insert("image".into(), Value::Object(image));
    m.insert(
        "cache".into(),
        json!({"writeback": true, "direct": false, "no-flush": n.flags().no_flush}),
    );
    m.insert("write_threshold".into(), json!(0));
    let bitmaps = n.bitmap_info();
    if !bitmaps.is_empty() {
        m.insert("dirty-bitmaps".into(), Value::Array(bitmaps));
    }
    Value::Object(m)
}
