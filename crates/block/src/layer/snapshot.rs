//! External snapshots: `blockdev-snapshot` (an overlay node put over a node) and
//! `blockdev-snapshot-sync` (the overlay image created first).

use super::*;

impl BlockLayer {
    // ---- snapshots ----------------------------------------------------------------------------

    /// `blockdev-snapshot`: `node` (a device or node name) becomes the backing node of
    /// `overlay`, an existing node without one (QEMU's `bdrv_append`), and a BlockBackend
    /// (`-drive if=none`) of `node` moves to `overlay`. QEMU's refusals and messages; livemig
    /// also refuses, saying so, when `node` has a guest device or a parent node, which it
    /// cannot yet move onto the overlay.
    pub fn blockdev_snapshot(&self, node: &str, overlay: &str) -> Result<(), BlockError> {
        let mut g = self.write();
        Self::append(&mut g, node, overlay)
    }

    fn append(g: &mut Graph, node: &str, overlay: &str) -> Result<(), BlockError> {
        let not_found = |n: &str| BlockError::CannotFind {
            device: n.to_string(),
            node: n.to_string(),
        };
        let base = Self::find(g, node).ok_or_else(|| not_found(node))?;
        let top = Self::find(g, overlay).ok_or_else(|| not_found(overlay))?;
        if g.entry(top.name()).is_some_and(|e| e.device.is_some()) {
            return Err(BlockError::Driver("The overlay is already in use".into()));
        }
        if top.id() == base.id() || top.driver().children().iter().any(|(r, _)| *r == "backing") {
            return Err(BlockError::Driver(
                "The overlay already has a backing image".into(),
            ));
        }
        let moved = g.entry(base.name()).and_then(|e| e.device.clone());
        if moved.as_ref().is_some_and(|d| !d.qdev.is_empty()) || g.parents_of(&base) > 0 {
            return Err(BlockError::Unsupported(format!(
                "livemig cannot yet move the guest device or parent node of '{}' onto an overlay",
                base.name()
            )));
        }
        if !base.read_only() && !base.is_inactive() {
            base.flush()?;
        }
        top.driver().attach_backing(base.clone(), top.perm())?;
        if let Some(dev) = moved {
            // The BlockBackend moves: the overlay takes the permissions it asks for.
            let (old_key, new_key) = (
                g.entry(base.name()).map(|e| e.device_key),
                g.entry(top.name()).map(|e| e.device_key),
            );
            if let (Some(old_key), Some(new_key)) = (old_key, new_key) {
                top.set_user_perm(new_key, Some(Perm::device(top.writable())))?;
                let _ = base.set_user_perm(old_key, None);
            }
            for e in g.entries.iter_mut() {
                if e.node.id() == base.id() {
                    e.device = None;
                } else if e.node.id() == top.id() {
                    e.device = Some(dev.clone());
                }
            }
        }
        Ok(())
    }

    /// `blockdev-snapshot-sync`: creates the overlay image `snapshot_file` (qcow2, backed by
    /// the node's image under its filename and format, `mode=absolute-paths`) or opens an
    /// existing one (`mode=existing`), opens it as `snapshot_node_name` without a backing
    /// file, read-only if the node is, and appends it as [`BlockLayer::blockdev_snapshot`]
    /// does. Formats other than qcow2 are refused.
    pub fn blockdev_snapshot_sync(&self, req: &SnapshotSync) -> Result<(), BlockError> {
        let mut g = self.write();
        let base = match (&req.device, &req.node_name) {
            (Some(d), _) if g.device(d).is_some() => Self::find(&g, d),
            (_, Some(n)) => g.entry(n).map(|e| e.node.clone()),
            _ => None,
        }
        .ok_or_else(|| BlockError::CannotFind {
            device: req.device.clone().unwrap_or_default(),
            node: req.node_name.clone().unwrap_or_default(),
        })?;
        if let Some(n) = &req.snapshot_node_name {
            if Self::find(&g, n).is_some() {
                return Err(BlockError::Driver(
                    "New overlay node-name already in use".into(),
                ));
            }
        }
        let format = req.format.as_deref().unwrap_or("qcow2");
        if format != "qcow2" {
            return Err(BlockError::Unsupported(format!(
                "livemig creates qcow2 overlays only, not '{format}'"
            )));
        }
        match req.mode.as_deref().unwrap_or("absolute-paths") {
            "absolute-paths" => {
                let backing = crate::driver::display_filename(&base.driver().filename());
                crate::driver::qcow2::create_image(
                    &req.snapshot_file,
                    base.size()?,
                    Some((&backing, base.driver_name())),
                )?;
            }
            "existing" => {}
            other => {
                return Err(BlockError::InvalidParameterValue {
                    name: "mode".into(),
                    expected: format!("'existing' or 'absolute-paths', not '{other}'"),
                })
            }
        }
        let mut opts = BlockdevOptions::from_json(&json!({"driver": "qcow2",
            "read-only": base.read_only(), "backing": null,
            "file": {"driver": "file", "filename": req.snapshot_file}}))?;
        opts.node_name.clone_from(&req.snapshot_node_name);
        let mut pending = Vec::new();
        let top = self.open_node(&mut g, &mut pending, &opts, Inherit::default(), false)?;
        let ids: Vec<u64> = pending.iter().map(|e| e.node.id()).collect();
        g.entries.extend(pending);
        if let Err(e) = Self::append(&mut g, base.name(), top.name()) {
            g.entries.retain(|e| !ids.contains(&e.node.id()));
            return Err(e);
        }
        Ok(())
    }

    /// `blockdev-del`: removes a node the monitor created, with QEMU's refusals (attached to a
    /// device, created implicitly, used by another node). A node with a busy bitmap (a
    /// migration holds it) counts as used. Implicitly created children go with it. Each removed
    /// node is closed like an inactivation: flushed, persistent bitmaps stored.
    pub fn blockdev_del(&self, node_name: &str) -> Result<(), BlockError> {
        let removed = {
            let mut g = self.write();
            let e = g
                .entry(node_name)
                .ok_or_else(|| BlockError::DelNodeNotFound(node_name.to_string()))?;
            if e.device.is_some() {
                return Err(BlockError::NodeInUse(node_name.to_string()));
            }
            if !e.monitor_owned {
                return Err(BlockError::NotMonitorOwned(node_name.to_string()));
            }
            // A job or export using the node answers first, with its own message (QEMU's
            // permission check comes before the bitmap check).
            crate::extension::check_del(&e.node)?;
            if g.parents_of(&e.node) > 0 || e.node.bitmaps().iter().any(|b| b.busy()) {
                return Err(BlockError::BlockDeviceInUse(node_name.to_string()));
            }
            let mut removed = Vec::new();
            let mut victims = vec![node_name.to_string()];
            while let Some(name) = victims.pop() {
                let Some(i) = g.entries.iter().position(|e| e.node.name() == name) else {
                    continue;
                };
                let e = g.entries.remove(i);
                for (_, child) in e.node.driver().children() {
                    let orphan = g.entry(child.name()).is_some_and(|c| !c.monitor_owned)
                        && g.parents_of(&child) == 0;
                    if orphan {
                        victims.push(child.name().to_string());
                    }
                }
                removed.push(e.node);
            }
            removed
        };
        for n in removed {
            // Closing cannot be refused; QEMU only warns when storing bitmaps fails here.
            let _ = n.inactivate();
        }
        Ok(())
    }
}
