//! The engine's error type. Its `Display` is what an operator reads: QMP's `desc` for refused
//! commands, and `query-migrate`'s `error-desc` for a migration that failed. Where QEMU has a
//! message for the same condition, the text is QEMU's.

use crate::status::MigrationStatus;
use thiserror::Error;

/// Why a migration command was refused or a migration failed.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// A capability, parameter or argument was invalid; the message is complete.
    #[error("{0}")]
    InvalidParameter(String),
    /// A migration is already running.
    #[error("There's a migration process in progress")]
    InProgress,
    /// This VM waits for an incoming migration and cannot start an outgoing one.
    #[error("Guest is waiting for an incoming migration")]
    WaitingForIncoming,
    /// The VM was stopped by a completed outgoing migration.
    #[error("Can't migrate the vm that was paused due to previous migration")]
    PausedAfterMigration,
    /// `migrate-continue` named a state other than the current one.
    #[error("Migration not in expected state: {0}")]
    NotInExpectedState(MigrationStatus),
    /// `migrate-incoming` without `-incoming`.
    #[error("'-incoming' was not specified on the command line")]
    NoIncoming,
    /// `migrate-incoming` called a second time.
    #[error("The incoming migration has already been started")]
    IncomingAlreadyStarted,
    /// The migration was cancelled while it waited in `pre-switchover`.
    #[error("Switchover is interrupted")]
    SwitchoverInterrupted,
    /// The migration was cancelled.
    #[error("Migration cancelled")]
    Cancelled,
    /// Connecting or listening failed; the message names the address.
    #[error("{context}: {}", os_error_text(source))]
    Io {
        /// What was being done, e.g. `Failed to connect to '127.0.0.1:1'`.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The stream could not be read or written.
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    /// The block layer refused an operation (its message is QEMU's).
    #[error("{0}")]
    Block(#[from] block::BlockError),
    /// The incoming stream was well-formed but could not be applied to this VM.
    #[error("{0}")]
    Load(String),
    /// The destination reported an error on the return path.
    #[error("RP: Sibling indicated error {0}")]
    SiblingError(u32),
    /// The engine tried a state change its state machine forbids (a bug, reported instead of
    /// acted on).
    #[error("{0}")]
    IllegalTransition(#[from] crate::state::IllegalTransition),
    /// Anything else, with a complete message.
    #[error("{0}")]
    Other(String),
}

/// An I/O error as QEMU prints one: the C library's text for the errno ("Connection refused"),
/// without Rust's "(os error N)" suffix.
pub fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

impl MigrationError {
    /// Whether this is a channel's stall bound running out (`x-livemig-stall-timeout`, set
    /// as the socket's `SO_RCVTIMEO` / `SO_SNDTIMEO`): a read or write that moved no byte
    /// for that long.
    pub fn is_stall(&self) -> bool {
        let io = match self {
            MigrationError::Wire(w) => match &w.kind {
                wire::WireErrorKind::Io(e) => Some(e),
                _ => None,
            },
            MigrationError::Io { source, .. } => Some(source),
            _ => None,
        };
        io.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        })
    }

    /// An I/O error with the context in which it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        MigrationError::Io {
            context: context.into(),
            source,
        }
    }
}
