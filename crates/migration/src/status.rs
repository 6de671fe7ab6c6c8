//! `MigrationStatus`: the states a migration passes through, with QEMU's names.
//!
//! The legal transitions live in the outgoing and incoming drivers; this file only names the
//! states and answers the questions every caller asks of them (is a migration running? can it
//! be cancelled?).

use std::fmt;

/// The state of an outgoing or incoming migration, as `query-migrate` reports it.
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
    /// Finished successfully.
    Completed,
    /// Ended with an error.
    Failed,
    /// Paused before switchover, waiting for `migrate-continue` (capability
    /// `pause-before-switchover`).
    PreSwitchover,
    /// Switchover: device state is being sent with the guest stopped.
    Device,
}

impl MigrationStatus {
    /// Every state, in QEMU's enum order.
    pub const ALL: [MigrationStatus; 10] = [
        MigrationStatus::None,
        MigrationStatus::Setup,
        MigrationStatus::Cancelling,
        MigrationStatus::Cancelled,
        MigrationStatus::Active,
        MigrationStatus::PostcopyActive,
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::PreSwitchover,
        MigrationStatus::Device,
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
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
        }
    }

    /// Parses QEMU's name of a state (as `migrate-continue` receives it). QEMU's other states
    /// (the postcopy recovery ones, `colo`, `wait-unplug`) are accepted as names too, since a
    /// client may name them, but livemig never enters them.
    pub fn parse(s: &str) -> Option<ParsedStatus> {
        if let Some(st) = Self::ALL.iter().find(|st| st.as_str() == s) {
            return Some(ParsedStatus::Known(*st));
        }
        const OTHER: [&str; 7] = [
            "postcopy-device",
            "postcopy-paused",
            "postcopy-recover-setup",
            "postcopy-recover",
            "colo",
            "wait-unplug",
            "postcopy-active",
        ];
        OTHER.contains(&s).then_some(ParsedStatus::Other)
    }

    /// A migration in this state is still running: a new one may not start, capabilities may
    /// not change, and `migrate_cancel` has something to cancel.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
                | MigrationStatus::PostcopyActive
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

/// The result of parsing a status name a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedStatus {
    /// A state livemig can be in.
    Known(MigrationStatus),
    /// A valid QEMU state name that livemig never enters.
    Other,
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
            assert_eq!(
                MigrationStatus::parse(st.as_str()),
                Some(ParsedStatus::Known(st))
            );
        }
        assert_eq!(MigrationStatus::parse("colo"), Some(ParsedStatus::Other));
        assert_eq!(MigrationStatus::parse("bogus"), None);
    }

    #[test]
    fn running_and_finished_are_disjoint() {
        for st in MigrationStatus::ALL {
            assert!(!(st.is_running() && st.is_finished()), "{st}");
        }
        assert!(!MigrationStatus::None.is_running());
        assert!(!MigrationStatus::None.is_finished());
    }
}
