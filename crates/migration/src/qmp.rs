//! The migration commands, as one [`CommandSet`] over a [`Migration`]: `migrate`,
//! `migrate-incoming`, `migrate_cancel`, `migrate-continue`, `migrate-start-postcopy`,
//! `migrate-pause`, `migrate-recover`, `migrate-set-capabilities`,
//! `query-migrate-capabilities`, `migrate-set-parameters`, `query-migrate-parameters` and
//! `query-migrate`.
//!
//! Arguments are read with [`qmp::Args`] as QEMU's visitor reads them (capabilities as the QAPI
//! enum [`Capability`], parameters with their QAPI types through
//! [`ParameterUpdate::from_args`]); the engine receives typed requests only. A
//! [`MigrationError`] becomes a QMP error in one place, [`From<MigrationError>`]: QEMU reports
//! every refusal of its migration commands as a `GenericError`.

use crate::caps::Capability;
use crate::engine::Migration;
use crate::error::MigrationError;
use crate::params::ParameterUpdate;
use crate::status::MigrationStatus;
use qmp::{Args, CommandSet, QapiEnum, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`MigrationCommands`].
pub const COMMANDS: &[&str] = &[
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "migrate-pause",
    "migrate-recover",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-migrate",
];

/// The commands that only read or set the engine's configuration: no socket is opened, no
/// program runs (what a fuzzing harness may expose).
pub const CONFIG_COMMANDS: &[&str] = &[
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-migrate",
];

/// QEMU reports every refusal of its migration commands as a `GenericError`.
impl From<MigrationError> for QmpError {
    fn from(e: MigrationError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

/// `MigrationCapability`, QAPI's enum of capability names.
impl QapiEnum for Capability {
    const ALL: &'static [Capability] = &Capability::ALL;

    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// `MigrationStatus`, QAPI's enum of migration states.
impl QapiEnum for MigrationStatus {
    const ALL: &'static [MigrationStatus] = &MigrationStatus::ALL;

    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// The migration commands of one VM.
pub struct MigrationCommands {
    mig: Arc<Migration>,
}

impl MigrationCommands {
    /// The commands of `mig`.
    pub fn new(mig: Arc<Migration>) -> MigrationCommands {
        MigrationCommands { mig }
    }
}

impl CommandSet for MigrationCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, mut a: Args) -> Result<Reply, QmpError> {
        let mig = &self.mig;
        match name {
            "migrate" => {
                let uri = a.req_str("uri")?;
                let blk = a.opt_bool("blk")?.unwrap_or(false);
                let inc = a.opt_bool("inc")?.unwrap_or(false);
                // `detach` is a no-op in QEMU too: the command never waits for the migration.
                let _detach = a.opt_bool("detach")?;
                let resume = a.opt_bool("resume")?.unwrap_or(false);
                a.finish()?;
                if blk || inc {
                    return Err(QmpError::generic(
                        "Block migration (blk/inc) is not supported; use blockdev-mirror with an NBD export",
                    ));
                }
                if resume {
                    mig.resume(&uri)?;
                } else {
                    mig.migrate(&uri)?;
                }
            }
            "migrate-incoming" => {
                let uri = a.req_str("uri")?;
                a.finish()?;
                let gate = mig.incoming_gated(&uri)?;
                return Ok(Reply::new(json!({})).after_flush(move || gate.open()));
            }
            "migrate_cancel" => {
                a.finish()?;
                mig.cancel()?;
            }
            "migrate-start-postcopy" => {
                a.finish()?;
                mig.start_postcopy()?;
            }
            "migrate-pause" => {
                a.finish()?;
                mig.pause()?;
            }
            "migrate-recover" => {
                let uri = a.req_str("uri")?;
                a.finish()?;
                mig.recover(&uri)?;
            }
            "migrate-continue" => {
                let state = a.req_qapi_enum::<MigrationStatus>("state")?;
                a.finish()?;
                mig.continue_(state)?;
            }
            "migrate-set-capabilities" => {
                let mut changes = Vec::new();
                for p in a.req_list("capabilities")? {
                    let mut o = p.into_object()?;
                    let cap = o.req_qapi_enum::<Capability>("capability")?;
                    let state = o.req_bool("state")?;
                    o.finish()?;
                    changes.push((cap, state));
                }
                a.finish()?;
                mig.set_capabilities(&changes)?;
            }
            "query-migrate-capabilities" => {
                a.finish()?;
                let caps: Vec<Value> = mig
                    .capabilities()
                    .into_iter()
                    .map(|(c, s)| json!({"capability": c.as_str(), "state": s}))
                    .collect();
                return Ok(Reply::new(Value::Array(caps)));
            }
            "migrate-set-parameters" => {
                let update = ParameterUpdate::from_args(a)?;
                mig.set_parameters(&update)?;
            }
            "query-migrate-parameters" => {
                a.finish()?;
                return Ok(Reply::new(mig.parameters()));
            }
            "query-migrate" => {
                a.finish()?;
                return Ok(Reply::new(mig.query()));
            }
            _ => return Err(QmpError::unknown_command(name)),
        }
        Ok(Reply::empty())
    }
}
