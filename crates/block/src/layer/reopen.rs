//! `blockdev-reopen`: new options checked against the node's own, applied to the node and its
//! implicit children as one transaction rolled back on error.

use super::*;

impl BlockLayer {
    // ---- blockdev-reopen ----------------------------------------------------------------------

    /// `blockdev-reopen`: reopens each node of `list` (QEMU's `BlockdevOptions`, `node-name`
    /// selecting the node) with its options, in one transaction: on any error nothing
    /// changes. As in QEMU 7.2, an option left out goes back to its default (`read-only` to
    /// false, or to the parent's value for an implicitly created child), a child given as a
    /// set of options is reopened with them, one given by its current name keeps its options
    /// (inheriting the parent's `read-only` if it was created with the parent), and
    /// `backing` must be given when the node has a backing file. What livemig reopens is
    /// `read-only`, both ways (bitmaps stored and made readonly, or writable again); any
    /// other option must keep its value ("Cannot change the option ..."), and changing
    /// `discard`, `cache.*`, `detect-zeroes` or a child node, which QEMU allows, is refused
    /// with a message saying so.
    pub fn blockdev_reopen(&self, list: &[Value]) -> Result<(), BlockError> {
        let g = self.write();
        let mut plan: Vec<(Arc<BlockNode>, bool)> = Vec::new();
        for v in list {
            let opts = BlockdevOptions::from_json(v)?;
            let name = opts
                .node_name
                .clone()
                .ok_or(BlockError::NodeNameNotSpecified)?;
            let node = g
                .entry(&name)
                .map(|e| e.node.clone())
                .ok_or(BlockError::DelNodeNotFound(name))?;
            Self::plan_reopen(&g, &node, &opts, Inherit::default(), &mut plan)?;
        }
        // Each node once (the last request wins, as QEMU's queue merges them).
        let mut seen = std::collections::HashSet::new();
        let mut steps: Vec<(Arc<BlockNode>, bool)> = plan
            .into_iter()
            .rev()
            .filter(|(n, _)| seen.insert(n.id()))
            .filter(|(n, ro)| n.read_only() != *ro)
            .collect();
        // Read-write: children before parents; read-only: parents before children.
        steps.sort_by_key(|(n, ro)| (*ro, if *ro { u64::MAX - n.id() } else { n.id() }));
        let mut done: Vec<(Arc<BlockNode>, bool)> = Vec::new();
        for (node, ro) in steps {
            if let Err(e) = node.reopen(ro) {
                for (n, r) in done.iter().rev() {
                    let _ = n.reopen(!r);
                }
                return Err(e);
            }
            done.push((node, ro));
        }
        Ok(())
    }

    /// Checks one node's reopen options against the ones it was opened with and adds it (and
    /// the implicitly created children it takes along) to `plan` with its new `read-only`.
    fn plan_reopen(
        g: &Graph,
        node: &Arc<BlockNode>,
        new: &BlockdevOptions,
        inherit: Inherit,
        plan: &mut Vec<(Arc<BlockNode>, bool)>,
    ) -> Result<(), BlockError> {
        let name = node.name().to_string();
        let old = g.entry(&name).and_then(|e| e.opts.clone()).ok_or_else(|| {
            BlockError::ReopenNotSupported {
                format: node.driver_name().to_string(),
                node: name.clone(),
            }
        })?;
        if new.node_name.as_deref().is_some_and(|n| n != name) {
            return Err(BlockError::CannotChangeOption("node-name".into()));
        }
        if new.driver != old.driver {
            return Err(BlockError::CannotChangeOption("driver".into()));
        }
        let read_only = new.read_only.or(inherit.read_only).unwrap_or(false);
        let flags = node.flags();
        let not_built = |what: &str| {
            BlockError::Unsupported(format!(
                "livemig's blockdev-reopen changes 'read-only' only; it cannot change '{what}' of node '{name}'"
            ))
        };
        let discard = new.discard_unmap.or(inherit.discard_unmap).unwrap_or(false);
        if discard != flags.discard_unmap {
            return Err(not_built("discard"));
        }
        let no_flush = new.cache_no_flush.or(inherit.no_flush).unwrap_or(false);
        if no_flush != flags.no_flush {
            return Err(not_built("cache.no-flush"));
        }
        if new.cache_direct.unwrap_or(false) != old.cache_direct.unwrap_or(false) {
            return Err(not_built("cache.direct"));
        }
        if new.detect_zeroes != old.detect_zeroes {
            return Err(not_built("detect-zeroes"));
        }
        let force_share = new.force_share.or(inherit.force_share).unwrap_or(false);
        if force_share != node.force_share() {
            return Err(BlockError::CannotChangeOption("force-share".into()));
        }
        if force_share && !read_only {
            return Err(BlockError::ForceShareNeedsReadOnly);
        }
        let child_inherit = Inherit {
            read_only: Some(read_only),
            discard_unmap: Some(discard),
            no_flush: Some(no_flush),
            force_share: Some(force_share),
        };
        let same = |a: bool, what: &str| {
            if a {
                Ok(())
            } else {
                Err(BlockError::CannotChangeOption(what.into()))
            }
        };
        let children = node.driver().children();
        let child = |role: &str| {
            children
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, c)| c.clone())
        };
        let file_ref = match (&new.driver_options, &old.driver_options) {
            (
                DriverOptions::File {
                    filename,
                    locking,
                    aio,
                },
                DriverOptions::File {
                    filename: f0,
                    locking: l0,
                    aio: a0,
                },
            ) => {
                // An option left out is its default, as in QEMU's comparison.
                let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.into());
                same(filename == f0, "filename")?;
                same(or(locking, "auto") == or(l0, "auto"), "locking")?;
                same(or(aio, "threads") == or(a0, "threads"), "aio")?;
                None
            }
            (
                DriverOptions::Null {
                    size,
                    latency_ns,
                    read_zeroes,
                },
                DriverOptions::Null {
                    size: s0,
                    latency_ns: l0,
                    read_zeroes: r0,
                },
            ) => {
                same(size.unwrap_or(1 << 30) == s0.unwrap_or(1 << 30), "size")?;
                same(latency_ns.unwrap_or(0) == l0.unwrap_or(0), "latency-ns")?;
                same(
                    read_zeroes.unwrap_or(false) == r0.unwrap_or(false),
                    "read-zeroes",
                )?;
                None
            }
            (
                DriverOptions::Raw {
                    file, offset, size, ..
                },
                DriverOptions::Raw {
                    offset: o0,
                    size: s0,
                    ..
                },
            ) => {
                same(offset == o0, "offset")?;
                same(size == s0, "size")?;
                Some(file)
            }
            (
                DriverOptions::Qcow2 {
                    file,
                    backing,
                    lazy_refcounts,
                    data_file,
                },
                DriverOptions::Qcow2 {
                    lazy_refcounts: l0,
                    data_file: d0,
                    ..
                },
            ) => {
                same(
                    lazy_refcounts.unwrap_or(false) == l0.unwrap_or(false),
                    "lazy-refcounts",
                )?;
                same(data_file == d0, "data-file")?;
                let current = child("backing");
                match (backing, &current) {
                    (None, Some(_)) => return Err(BlockError::BackingMissing(name)),
                    (None, None) | (Some(BackingRef::Null), None) => {}
                    (Some(BackingRef::Ref(BlockdevRef::Reference(r))), Some(c))
                        if r == c.name() => {}
                    _ => return Err(not_built("backing")),
                }
                Some(file)
            }
            _ => return Err(BlockError::CannotChangeOption("driver".into())),
        };
        if let Some(file_ref) = file_ref {
            let current = child("file").ok_or(BlockError::MissingParameter("file".into()))?;
            let implicit = g.entry(current.name()).is_some_and(|e| !e.monitor_owned);
            match file_ref {
                BlockdevRef::Reference(r) if r == current.name() => {
                    if implicit {
                        // Its own options, the parent's read-only.
                        let mut kept = g
                            .entry(current.name())
                            .and_then(|e| e.opts.clone())
                            .ok_or_else(|| BlockError::ReopenNotSupported {
                                format: current.driver_name().to_string(),
                                node: current.name().to_string(),
                            })?;
                        kept.node_name = None;
                        Self::plan_reopen(g, &current, &kept, child_inherit, plan)?;
                    }
                }
                BlockdevRef::Reference(_) => return Err(not_built("file")),
                BlockdevRef::Definition(c) => {
                    if !implicit {
                        return Err(BlockError::CannotChangeOption("file".into()));
                    }
                    Self::plan_reopen(g, &current, c, child_inherit, plan)?;
                }
            }
        }
        plan.push((node.clone(), read_only));
        Ok(())
    }
}
