//! Activation of the whole graph: inactivation at switchover (parents before children, rolled
//! back if a node fails), activation on the destination, and close.

use super::*;

impl BlockLayer {
    // ---- activation -------------------------------------------------------------------------

    /// Inactivates every node, parents before children (QEMU's `bdrv_inactivate_all`). If one
    /// fails, the nodes inactivated so far are activated again and the error is returned.
    pub fn inactivate_all(&self) -> Result<(), BlockError> {
        let mut nodes = self.nodes();
        crate::extension::check_inactivate(&nodes)?;
        nodes.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut done: Vec<Arc<BlockNode>> = Vec::new();
        for n in nodes {
            let was_active = !n.is_inactive();
            if let Err(e) = n.inactivate() {
                for d in done.iter().rev() {
                    let _ = d.activate();
                }
                return Err(e);
            }
            if was_active {
                done.push(n);
            }
        }
        Ok(())
    }

    /// Activates every node, children before parents (QEMU's `bdrv_activate_all`), and stops
    /// opening new nodes inactive.
    ///
    /// Activation takes each image's write lock back; if another process holds it, or any
    /// node fails, the nodes this call activated are inactivated again (their persistent bitmaps
    /// stored again) and QEMU's error is returned: nothing is left half-activated.
    pub fn activate_all(&self) -> Result<(), BlockError> {
        self.set_incoming(false);
        let mut nodes = self.nodes();
        nodes.sort_by_key(|n| n.id());
        let mut done: Vec<Arc<BlockNode>> = Vec::new();
        for n in nodes {
            let was_inactive = n.is_inactive();
            if let Err(e) = n.activate() {
                for d in done.iter().rev() {
                    let _ = d.inactivate();
                }
                return Err(e);
            }
            if was_inactive {
                done.push(n);
            }
        }
        Ok(())
    }

    /// Closes every node, as QEMU does at exit (`bdrv_close_all`): each active node is
    /// inactivated (flushed, its persistent bitmaps stored, its image unlocked), parents first,
    /// and the graph is emptied. Errors do not stop the others; the first is returned.
    pub fn close_all(&self) -> Result<(), BlockError> {
        let mut nodes = {
            let mut g = self.write();
            let nodes: Vec<Arc<BlockNode>> = g.entries.iter().map(|e| e.node.clone()).collect();
            g.entries.clear();
            nodes
        };
        nodes.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut first = Ok(());
        for n in nodes {
            if let Err(e) = n.inactivate() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
