//! `MigrationStatus`: the states a migration passes through, with QEMU 7.2's names.
//!
//! This file names the states and answers the questions every caller asks of them (is a
//! migration running? has it ended?). Which state may follow which is the state machine's
//! business: [`crate::state`].

use std::fmt;

/// The state of an outgoing or incoming migration, as `query-migrate` reports it: QEMU 7.2's
/// `MigrationStatus`, every value of it (`postcopy-recover-setup` and `postcopy-device` came
/// later and are not 7.2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationStatus {
    /// No migration has ever been started.
    None,
    /// Started; setup handlers are running.
    Setup,
    /// A cancel is in progress.
    Cancelling,
    /// A cancel has finished.
    Cancelled,
    /// Iterative (precopy) transfer while the guest runs.
    Active,
    /// Postcopy: the destination runs and pulls pages.
    PostcopyActive,
    /// Postcopy interrupted (network error or `migrate-pause`), waiting for a recovery.
    PostcopyPaused,
    /// A paused postcopy is being recovered.
    PostcopyRecover,
    /// Finished successfully.
    Completed,
    /// Ended with an error.
    Failed,
    /// COLO fault tolerance (livemig never enters it: `x-colo` is refused).
    Colo,
    /// Paused before switchover, waiting for `migrate-continue` (capability
    /// `pause-before-switchover`).
    PreSwitchover,
    /// Switchover: device state is being sent with the guest stopped.
    Device,
    /// Waiting for the guest to unplug failover devices (livemig has none, and never enters
    /// it).
    WaitUnplug,
}

impl MigrationStatus {
    /// Every state, in QEMU 7.2's enum order.
    pub const ALL: [MigrationStatus; 14] = [
        MigrationStatus::None,
        MigrationStatus::Setup,
        MigrationStatus::Cancelling,
        MigrationStatus::Cancelled,
        MigrationStatus::Active,
        MigrationStatus::PostcopyActive,
        MigrationStatus::PostcopyPaused,
        MigrationStatus::PostcopyRecover,
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Colo,
        MigrationStatus::PreSwitchover,
        MigrationStatus::Device,
        MigrationStatus::WaitUnplug,
    ];

    /// QEMU's name for the state (`query-migrate`'s `status`, the `MIGRATION` event's data).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
        }
    }

    /// Parses QEMU 7.2's name of a state (as `migrate-continue` receives it).
    pub fn parse(s: &str) -> Option<MigrationStatus> {
        Self::ALL.iter().copied().find(|st| st.as_str() == s)
    }

    /// A migration in this state is still running: a new one may not start, capabilities may
    /// not change, and `migrate_cancel` has something to cancel (or, in postcopy, refuses).
    /// QEMU 7.2's `migration_is_running`, plus `cancelling`: livemig's cleanup after a cancel
    /// still owns the VM's disks and bitmaps until it reports `cancelled`.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::Colo
                | MigrationStatus::WaitUnplug
        )
    }

    /// A postcopy state: the destination may be running the guest, so the migration can no
    /// longer be cancelled.
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
        )
    }

    /// The migration has ended, one way or another.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for st in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(MigrationStatus::parse("colo"), Some(MigrationStatus::Colo));
        // Later QEMUs' names are not 7.2's.
        assert_eq!(MigrationStatus::parse("postcopy-device"), None);
        assert_eq!(MigrationStatus::parse("postcopy-recover-setup"), None);
        assert_eq!(MigrationStatus::parse("bogus"), None);
    }

    #[test]
    fn running_and_finished_are_disjoint() {
        for st in MigrationStatus::ALL {
            assert!(!(st.is_running() && st.is_finished()), "{st}");
            assert!(!st.is_postcopy() || st.is_running(), "{st}");
        }
        assert!(!MigrationStatus::None.is_running());
        assert!(!MigrationStatus::None.is_finished());
    }
}
