//! What a mirror job's end changes in the graph: the target's backing chain opened late
//! (`drive-mirror`'s `MIRROR_OPEN_BACKING_CHAIN`), and the pivot of `block-job-complete`
//! (QEMU's `bdrv_replace_node(source, target)`: the source's users move to the target).

use super::*;

impl BlockLayer {
    /// QEMU's `bdrv_open_backing_file` for `node`, an image opened without its backing chain
    /// (`drive-mirror` opens its target so): opens the backing file the image names now —
    /// relative to the image, in the recorded format or probed, read-only — and attaches it.
    /// Nothing to do for an image that names none or already has its backing node. The new
    /// nodes belong to `node`: in the graph if it is, outside it (held by `node`) if not.
    pub fn open_backing_chain(&self, node: &Arc<BlockNode>) -> Result<(), BlockError> {
        let driver = node.driver();
        if driver.children().iter().any(|(role, _)| *role == "backing") {
            return Ok(());
        }
        let Some((file, format)) = driver.backing_file_name() else {
            return Ok(());
        };
        let image = driver
            .children()
            .into_iter()
            .find(|(role, _)| *role == "file")
            .map(|(_, c)| c)
            .ok_or_else(|| BlockError::Driver("the image has no file child".into()))?;
        let mut g = self.write();
        let mut pending = Vec::new();
        let inherit = Inherit {
            read_only: Some(true),
            ..Inherit::default()
        };
        let backing = self.open_backing_file(
            &mut g,
            &mut pending,
            &image,
            (&file, format.as_deref()),
            inherit,
            None,
        )?;
        driver.attach_backing(backing, node.perm())?;
        if g.entry(node.name()).is_some() {
            g.entries.extend(pending);
        }
        Ok(())
    }

    /// Whether [`BlockLayer::replace_node`] can move `from`'s users to `to` (checked by
    /// `block-job-complete` before it is accepted, and again when the job ends). `holder` is
    /// the job, whose own claims on the nodes do not count. livemig refuses, saying so, what
    /// it cannot move yet: a guest device, a parent node, an export or another job on `from`.
    pub fn check_replace(
        &self,
        from: &BlockNode,
        to: &BlockNode,
        holder: &str,
    ) -> Result<(), BlockError> {
        let g = self.read();
        Self::replace_refusal(&g, from, to, holder)
    }

    fn replace_refusal(
        g: &Graph,
        from: &BlockNode,
        to: &BlockNode,
        holder: &str,
    ) -> Result<(), BlockError> {
        let cannot = |what: String| {
            Err(BlockError::Unsupported(format!(
                "livemig cannot yet move {what} of '{}' onto the mirror's target",
                from.name()
            )))
        };
        if let Some(d) = g.entry(from.name()).and_then(|e| e.device.as_ref()) {
            if !d.qdev.is_empty() {
                return cannot(format!("the guest device {}", d.qdev));
            }
        }
        if g.parents_of(from) > 0 {
            return cannot("the parent node".into());
        }
        if let Some((other, _)) = crate::extension::claim_holders(from)
            .into_iter()
            .find(|(h, _)| h != holder)
        {
            return cannot(format!("the user ({other})"));
        }
        if g.entry(to.name()).is_some_and(|e| e.device.is_some()) {
            return Err(BlockError::Unsupported(format!(
                "the mirror's target '{}' is attached to a device already",
                to.name()
            )));
        }
        if from.read_only() != to.read_only() {
            return Err(BlockError::Unsupported(format!(
                "livemig cannot reopen the mirror's target '{}' {}",
                to.name(),
                if from.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        Ok(())
    }

    /// `block-job-complete`'s pivot (QEMU's `bdrv_replace_node(from, to)`): the BlockBackend
    /// of `from` (a `-drive` or a snapshot overlay's) moves to `to`, which takes the
    /// permissions it asks for. A `to` outside the graph (`drive-mirror`'s target) enters it
    /// with the nodes below it, owned by that BlockBackend. A `from` nobody uses any more, and
    /// which the monitor does not own, is closed with its implicit children, as QEMU drops
    /// its last reference. Refusals are [`BlockLayer::check_replace`]'s, made before anything
    /// changes.
    pub fn replace_node(
        &self,
        from: &Arc<BlockNode>,
        to: &Arc<BlockNode>,
        holder: &str,
    ) -> Result<(), BlockError> {
        let closed = {
            let mut g = self.write();
            Self::replace_refusal(&g, from, to, holder)?;
            // The target and what it holds enter the graph, parents before children as they
            // were opened the other way round: children first.
            let mut below = vec![to.clone()];
            let mut i = 0;
            while let Some(n) = below.get(i).cloned() {
                i += 1;
                for (_, c) in n.driver().children() {
                    if !below.iter().any(|b| b.id() == c.id()) {
                        below.push(c);
                    }
                }
            }
            below.sort_by_key(|n| n.id());
            for n in below {
                if g.entry(n.name()).is_none() {
                    g.entries.push(Entry {
                        node: n,
                        opts: None,
                        monitor_owned: false,
                        device: None,
                        device_key: new_user_key(),
                    });
                }
            }
            let moved = g.entry(from.name()).and_then(|e| e.device.clone());
            if let Some(dev) = moved {
                let (old_key, new_key) = (
                    g.entry(from.name()).map(|e| e.device_key),
                    g.entry(to.name()).map(|e| e.device_key),
                );
                if let (Some(old_key), Some(new_key)) = (old_key, new_key) {
                    to.set_user_perm(new_key, Some(Perm::device(to.writable())))?;
                    let _ = from.set_user_perm(old_key, None);
                }
                for e in g.entries.iter_mut() {
                    if e.node.id() == from.id() {
                        e.device = None;
                    } else if e.node.id() == to.id() {
                        e.device = Some(dev.clone());
                    }
                }
            }
            Self::drop_unused(&mut g, from.name())
        };
        for n in closed {
            // Closing cannot be refused; QEMU only warns when storing bitmaps fails here.
            let _ = n.inactivate();
        }
        Ok(())
    }

    /// Takes `name` out of the graph if nobody uses it (no device, no parent) and the monitor
    /// does not own it, with the implicit children that leaves unused; returns the removed
    /// nodes, to be closed once the graph lock is released.
    fn drop_unused(g: &mut Graph, name: &str) -> Vec<Arc<BlockNode>> {
        let mut removed = Vec::new();
        let mut victims = vec![name.to_string()];
        while let Some(name) = victims.pop() {
            let unused = g.entry(&name).is_some_and(|e| {
                !e.monitor_owned && e.device.is_none() && g.parents_of(&e.node) == 0
            });
            if !unused {
                continue;
            }
            let Some(i) = g.entries.iter().position(|e| e.node.name() == name) else {
                continue;
            };
            let e = g.entries.remove(i);
            for (_, child) in e.node.driver().children() {
                victims.push(child.name().to_string());
            }
            removed.push(e.node);
        }
        removed
    }
}
