//! Migration capabilities: the on/off switches of `migrate-set-capabilities`.
//!
//! livemig lists every capability QEMU 7.2 lists, in QEMU's order, so that tools which query
//! them all keep working. Enabling one whose feature livemig does not implement is refused with
//! a clear error rather than accepted and ignored: an operator who asks for `xbzrle` must learn
//! that it is not there.

use crate::error::MigrationError;
use std::fmt;

/// One migration capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// XBZRLE delta compression (not implemented).
    Xbzrle,
    /// RDMA pinning (not implemented).
    RdmaPinAll,
    /// Throttle the vCPUs when the guest dirties memory faster than it is sent
    /// (`policy::AutoConverge`, through `Machine::throttle_vcpus`).
    AutoConverge,
    /// Removed block-migration zero detection (not implemented).
    ZeroBlocks,
    /// Removed multi-thread compression (not implemented).
    Compress,
    /// Emit `MIGRATION` and `MIGRATION_PASS` events.
    Events,
    /// Postcopy of RAM: `migrate-start-postcopy` switches to pulling pages on demand.
    PostcopyRam,
    /// COLO (not implemented).
    XColo,
    /// Release RAM during postcopy (not implemented).
    ReleaseRam,
    /// Removed block migration (not implemented).
    Block,
    /// Open the destination-to-source return path in precopy.
    ReturnPath,
    /// Pause in `pre-switchover` until `migrate-continue`.
    PauseBeforeSwitchover,
    /// Several channels for RAM (`crate::multifd`).
    Multifd,
    /// Migrate named dirty bitmaps.
    DirtyBitmaps,
    /// Postcopy blocktime statistics on the destination (`postcopy-blocktime` in query-migrate).
    PostcopyBlocktime,
    /// Destination: activate the disks at the end of the load only if the guest then runs;
    /// otherwise (`-S`) leave them inactive, unlocked, until `cont`.
    LateBlockActivate,
    /// Skip shared memory (not implemented).
    XIgnoreShared,
    /// Send and check the VM UUID (not implemented).
    ValidateUuid,
    /// Snapshot via write protection (not implemented).
    BackgroundSnapshot,
    /// `MSG_ZEROCOPY` for the multifd channels' pages (`crate::multifd::zerocopy`).
    ZeroCopySend,
    /// Postcopy preempt channel: requested pages on a connection of their own.
    PostcopyPreempt,
    /// livemig's own: an end-to-end digest per batch of RAM records and per dirty-bitmap
    /// chunk, checked by the destination (`wire::digest`). Validated in the configuration
    /// section as QEMU validates `x-ignore-shared`, so both ends must have it on, and a QEMU
    /// destination refuses it ("Received unknown capability").
    XLivemigIntegrity,
}

impl Capability {
    /// Every capability, in the order QEMU 7.2's `query-migrate-capabilities` lists them.
    /// livemig's own capabilities come after QEMU's.
    pub const ALL: [Capability; 22] = [
        Capability::Xbzrle,
        Capability::RdmaPinAll,
        Capability::AutoConverge,
        Capability::ZeroBlocks,
        Capability::Compress,
        Capability::Events,
        Capability::PostcopyRam,
        Capability::XColo,
        Capability::ReleaseRam,
        Capability::Block,
        Capability::ReturnPath,
        Capability::PauseBeforeSwitchover,
        Capability::Multifd,
        Capability::DirtyBitmaps,
        Capability::PostcopyBlocktime,
        Capability::LateBlockActivate,
        Capability::XIgnoreShared,
        Capability::ValidateUuid,
        Capability::BackgroundSnapshot,
        Capability::ZeroCopySend,
        Capability::PostcopyPreempt,
        Capability::XLivemigIntegrity,
    ];

    /// QEMU's name of the capability.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Xbzrle => "xbzrle",
            Capability::RdmaPinAll => "rdma-pin-all",
            Capability::AutoConverge => "auto-converge",
            Capability::ZeroBlocks => "zero-blocks",
            Capability::Compress => "compress",
            Capability::Events => "events",
            Capability::PostcopyRam => "postcopy-ram",
            Capability::XColo => "x-colo",
            Capability::ReleaseRam => "release-ram",
            Capability::Block => "block",
            Capability::ReturnPath => "return-path",
            Capability::PauseBeforeSwitchover => "pause-before-switchover",
            Capability::Multifd => "multifd",
            Capability::DirtyBitmaps => "dirty-bitmaps",
            Capability::PostcopyBlocktime => "postcopy-blocktime",
            Capability::LateBlockActivate => "late-block-activate",
            Capability::XIgnoreShared => "x-ignore-shared",
            Capability::ValidateUuid => "validate-uuid",
            Capability::BackgroundSnapshot => "background-snapshot",
            Capability::ZeroCopySend => "zero-copy-send",
            Capability::PostcopyPreempt => "postcopy-preempt",
            Capability::XLivemigIntegrity => "x-livemig-integrity",
        }
    }

    /// Whether livemig implements what the capability asks for.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Capability::Events
                | Capability::AutoConverge
                | Capability::PostcopyRam
                | Capability::PostcopyBlocktime
                | Capability::PostcopyPreempt
                | Capability::Multifd
                | Capability::ZeroCopySend
                | Capability::ReturnPath
                | Capability::PauseBeforeSwitchover
                | Capability::DirtyBitmaps
                | Capability::LateBlockActivate
                | Capability::XLivemigIntegrity
        )
    }

    /// Whether both ends must agree on the capability: the source lists it in the
    /// configuration section (`configuration/capabilities`) and the destination fails a
    /// stream whose list differs from its own setting, as QEMU does for `x-ignore-shared`.
    pub fn is_validated(self) -> bool {
        matches!(self, Capability::XLivemigIntegrity)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The set of enabled capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    on: Vec<Capability>,
}

impl Capabilities {
    /// Whether `cap` is on.
    pub fn has(&self, cap: Capability) -> bool {
        self.on.contains(&cap)
    }

    /// `[(capability, state)]` for every capability, in QEMU's order.
    pub fn list(&self) -> Vec<(Capability, bool)> {
        Capability::ALL.iter().map(|c| (*c, self.has(*c))).collect()
    }

    /// Applies a `migrate-set-capabilities` request: all of it, or none of it when any entry is
    /// refused.
    pub fn apply(&mut self, changes: &[(Capability, bool)]) -> Result<(), MigrationError> {
        let mut next = self.clone();
        for (cap, state) in changes {
            next.on.retain(|c| c != cap);
            if *state {
                next.on.push(*cap);
            }
        }
        next.on.sort();
        next.check()?;
        *self = next;
        Ok(())
    }

    /// QEMU's compatibility checks, limited to what can be enabled here.
    fn check(&self) -> Result<(), MigrationError> {
        if let Some(c) = self.on.iter().find(|c| !c.is_supported()) {
            return Err(MigrationError::InvalidParameter(format!(
                "Capability '{c}' is not supported by livemig"
            )));
        }
        // QEMU probes the host when postcopy-ram is turned on: a destination that cannot
        // register guest RAM with userfaultfd says so now, not at the switch.
        if self.has(Capability::PostcopyPreempt) && !self.has(Capability::PostcopyRam) {
            // QEMU's wording (migrate_caps_check).
            return Err(MigrationError::InvalidParameter(
                "Postcopy preempt requires postcopy-ram".into(),
            ));
        }
        // The parameters' part of this check is `crate::multifd::check_zero_copy`.
        if self.has(Capability::ZeroCopySend) && !self.has(Capability::Multifd) {
            return Err(MigrationError::InvalidParameter(
                crate::multifd::ZERO_COPY_REFUSED.into(),
            ));
        }
        if self.has(Capability::Multifd) && self.has(Capability::PostcopyRam) {
            // QEMU 7.2 sends precopy pages over multifd and postcopy's on the main channel;
            // the destination's postcopy would have to track what the channels placed.
            return Err(MigrationError::InvalidParameter(
                "livemig does not implement multifd together with postcopy-ram yet".into(),
            ));
        }
        if self.has(Capability::XLivemigIntegrity) {
            // The digests live on the main stream; multifd packets and postcopy's placement
            // would need their own (a postcopy page must be checked before UFFDIO_COPY makes
            // it visible to the running guest).
            for other in [Capability::Multifd, Capability::PostcopyRam] {
                if self.has(other) {
                    return Err(MigrationError::InvalidParameter(format!(
                        "Capability 'x-livemig-integrity' is not supported together with '{other}' by livemig"
                    )));
                }
            }
        }
        if self.has(Capability::PostcopyRam) {
            crate::postcopy::uffd::probe()
                .map_err(|e| MigrationError::InvalidParameter(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_has_qemu_72_order() {
        let names: Vec<&str> = Capabilities::default()
            .list()
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        assert_eq!(names.first(), Some(&"xbzrle"));
        assert_eq!(names.get(20), Some(&"postcopy-preempt"));
        assert_eq!(names.last(), Some(&"x-livemig-integrity"));
        assert_eq!(names.len(), 22);
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mut caps = Capabilities::default();
        caps.apply(&[(Capability::Events, true)]).unwrap();
        let e = caps
            .apply(&[(Capability::DirtyBitmaps, true), (Capability::Xbzrle, true)])
            .unwrap_err();
        assert!(e.to_string().contains("xbzrle"), "{e}");
        assert!(caps.has(Capability::Events));
        assert!(!caps.has(Capability::DirtyBitmaps));
        caps.apply(&[(Capability::Events, false)]).unwrap();
        assert!(!caps.has(Capability::Events));
    }

    #[test]
    fn integrity_is_refused_with_multifd() {
        let mut caps = Capabilities::default();
        caps.apply(&[(Capability::XLivemigIntegrity, true)])
            .unwrap();
        let e = caps
            .apply(&[(Capability::Multifd, true)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'x-livemig-integrity' is not supported together with 'multifd'"),
            "{e}"
        );
        assert!(!caps.has(Capability::Multifd));
    }
}
