//! The VM run states QEMU reports (`query-status`) and migrates (`globalstate`).

use std::fmt;

/// A VM's run state, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Stopped after an internal error.
    InternalError,
    /// Stopped after a disk I/O error.
    IoError,
    /// Stopped by `stop` (or started with `-S` after a migration).
    Paused,
    /// Stopped after a completed outgoing migration.
    PostMigrate,
    /// Created with `-S`, never started.
    Prelaunch,
    /// Stopped for the switchover of an outgoing migration.
    FinishMigrate,
    /// Loading a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Shut down.
    Shutdown,
    /// Suspended (ACPI S3).
    Suspended,
    /// Stopped by a watchdog.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO.
    Colo,
}

impl RunState {
    const ALL: [RunState; 16] = [
        RunState::Debug,
        RunState::InMigrate,
        RunState::InternalError,
        RunState::IoError,
        RunState::Paused,
        RunState::PostMigrate,
        RunState::Prelaunch,
        RunState::FinishMigrate,
        RunState::RestoreVm,
        RunState::Running,
        RunState::SaveVm,
        RunState::Shutdown,
        RunState::Suspended,
        RunState::Watchdog,
        RunState::GuestPanicked,
        RunState::Colo,
    ];

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::InMigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::PostMigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
        }
    }

    /// Parses QEMU's name.
    pub fn parse(s: &str) -> Option<RunState> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// Whether vCPUs run in this state.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in RunState::ALL {
            assert_eq!(RunState::parse(r.as_str()), Some(r));
        }
        assert_eq!(RunState::parse("flying"), None);
    }
}
