//! Block jobs over the block layer, starting with QEMU's **mirror** (`blockdev-mirror`), with
//! QEMU 7.2's job states, QMP commands (in [`qmp`]) and events.
//!
//! # The mirror
//!
//! A mirror copies a source node into a target node of the same size while the guest keeps
//! writing to the source. It tracks writes in an anonymous dirty bitmap on the source (the
//! block layer marks it on every write), copies the dirty areas one buffer at a time, and,
//! once nothing is dirty, becomes **ready** (`BLOCK_JOB_READY`) and keeps copying new writes.
//! `block-job-complete` — and `block-job-cancel` on a ready job, as in QEMU — finish the copy
//! (nothing dirty and no write in flight), flush the target and end with
//! `BLOCK_JOB_COMPLETED`: the target then holds the source's contents as of that moment.
//! `block-job-cancel` before ready, or with `force`, ends with `BLOCK_JOB_CANCELLED`.
//! `sync=top` copies only what the source node itself holds (not its backing chain).
//!
//! When it ends well, as QEMU's `mirror_exit_common`: a `drive-mirror` target, opened without
//! its backing chain, gets it opened now (`MIRROR_OPEN_BACKING_CHAIN`: with `mode=existing`
//! the chain may be copied into place while the job runs); and after `block-job-complete`
//! (not a cancel of a ready job) the source's BlockBackend moves onto the target — the pivot,
//! [`block::BlockLayer::replace_node`] — and a source nobody uses any more is closed. What
//! livemig cannot move yet (a guest device, which holds its node; a parent node; an export)
//! makes `block-job-complete` fail with a message saying so, before anything changes.
//!
//! A failed read of the source or write of the target goes to `on-source-error` or
//! `on-target-error` ([`OnError`]), as QEMU 7.2's `block_job_error_action`: `BLOCK_JOB_ERROR`
//! with the action; the failed area stays dirty; `report` fails the job, `stop` pauses it as
//! a user pause with `io-status` saying why until it is resumed, `enospc` stops on ENOSPC
//! only, `ignore` goes on (and, as QEMU's, never converges while the error lasts).
//!
//! # Threads and locks
//!
//! A job is one thread. It takes the source's bitmap lock only to pick and clear the next
//! dirty area (never across I/O), and its own state mutex only for bookkeeping. While it
//! runs it holds a write claim on the target ([`block::extension::NodeClaim`]), so
//! [`block::BlockLayer::inactivate_all`] — a migration's switchover — fails cleanly instead
//! of pulling the image from under a job that is still writing; the source keeps running.
//! If the target stops accepting writes anyway, the job's `on-target-error` policy decides.
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod mirror;
pub mod qmp;

pub use mirror::{
    ErrorAction, Hold, IoStatus, JobError, JobManager, MirrorConfig, OnError, SyncMode,
};
