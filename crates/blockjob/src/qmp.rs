//! The block job QMP commands — `blockdev-mirror`, `query-block-jobs`, `query-jobs`,
//! `block-job-cancel`, `block-job-complete`, `block-job-set-speed` — as one [`CommandSet`],
//! with arguments checked by [`qmp::Args`] in QEMU 7.2's order. [`JobError`]s meet QMP's
//! classes here, in one `From` impl.

use crate::mirror::{
    JobError, JobManager, MirrorConfig, SyncMode, DEFAULT_BUF_SIZE, DEFAULT_GRANULARITY,
};
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`JobCommands`].
pub const COMMANDS: &[&str] = &[
    "blockdev-mirror",
    "query-block-jobs",
    "query-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-set-speed",
];

/// QEMU's classes: a job that does not exist is `DeviceNotActive` (`No active block job` in
/// older QEMU), every other refusal a `GenericError`.
impl From<JobError> for QmpError {
    fn from(e: JobError) -> QmpError {
        match e {
            JobError::NotFound(_) => QmpError::device_not_active(e.to_string()),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

/// QAPI's `BlockdevOnError`.
const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];

fn other(s: impl Into<String>) -> QmpError {
    QmpError::generic(s)
}

/// The block job commands over one [`JobManager`].
pub struct JobCommands {
    jobs: Arc<JobManager>,
}

impl JobCommands {
    /// The commands of `jobs`.
    pub fn new(jobs: Arc<JobManager>) -> JobCommands {
        JobCommands { jobs }
    }
}

impl CommandSet for JobCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, mut a: Args) -> Result<Reply, QmpError> {
        let mgr = &self.jobs;
        match name {
            "blockdev-mirror" => blockdev_mirror(mgr, a)?,
            "query-block-jobs" => {
                a.finish()?;
                let jobs = mgr.jobs().iter().map(|j| j.info()).collect();
                return Ok(Reply::new(Value::Array(jobs)));
            }
            "query-jobs" => {
                a.finish()?;
                let jobs = mgr.jobs().iter().map(|j| j.job_info()).collect();
                return Ok(Reply::new(Value::Array(jobs)));
            }
            "block-job-cancel" => {
                let device = a.req_str("device")?;
                let force = a.opt_bool("force")?.unwrap_or(false);
                a.finish()?;
                mgr.cancel(&device, force)?;
            }
            "block-job-complete" => {
                let device = a.req_str("device")?;
                a.finish()?;
                mgr.complete(&device)?;
            }
            "block-job-set-speed" => {
                let device = a.req_str("device")?;
                let speed = a.req_int::<i64>("speed")?;
                a.finish()?;
                let job = mgr.find(&device)?;
                let speed = u64::try_from(speed)
                    .map_err(|_| other("Parameter 'speed' expects a non-negative value"))?;
                mgr.set_speed(job.id(), speed)?;
            }
            _ => return Err(QmpError::unknown_command(name)),
        }
        Ok(Reply::new(json!({})))
    }
}

fn blockdev_mirror(mgr: &Arc<JobManager>, mut a: Args) -> Result<(), QmpError> {
    let job_id = a.opt_str("job-id")?;
    let device = a.req_str("device")?;
    let target = a.req_str("target")?;
    let replaces = a.opt_str("replaces")?;
    let sync = a.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let speed = a.opt_int::<i64>("speed")?;
    let granularity = a.opt_int::<u32>("granularity")?;
    let buf_size = a.opt_int::<i64>("buf-size")?;
    let on_source_error = a.opt_enum("on-source-error", ON_ERROR)?;
    let on_target_error = a.opt_enum("on-target-error", ON_ERROR)?;
    let filter = a.opt_str("filter-node-name")?;
    let copy_mode = a.opt_enum("copy-mode", &["background", "write-blocking"])?;
    let auto_finalize = a.opt_bool("auto-finalize")?;
    let auto_dismiss = a.opt_bool("auto-dismiss")?;
    a.finish()?;

    // QEMU's order: the nodes, the parameters, then the job itself.
    let layer = mgr.layer();
    let source = layer.lookup_bs(Some(&device), Some(&device))?;
    let target_node = layer.lookup_bs(Some(&target), Some(&target))?;
    mgr.check_nodes(&source, &target_node)?;
    let granularity = match granularity {
        None | Some(0) => DEFAULT_GRANULARITY,
        Some(g) => {
            if !(512..=64 << 20).contains(&g) {
                return Err(other(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if g & (g - 1) != 0 {
                return Err(other("Parameter 'granularity' expects a power of 2"));
            }
            g
        }
    };
    let buf_size = match buf_size {
        None | Some(0) => DEFAULT_BUF_SIZE,
        Some(b) if b < 0 => return Err(other("Invalid parameter 'buf-size'")),
        Some(b) => b as u64,
    };
    let sync = match sync.as_str() {
        "full" => SyncMode::Full,
        "top" => SyncMode::Top,
        "none" => SyncMode::None,
        other_mode => {
            return Err(other(format!("Sync mode '{other_mode}' not supported")));
        }
    };
    // What this implementation does not do, refused rather than ignored.
    if replaces.is_some() {
        return Err(other(
            "replaces is not supported: mirror completion does not pivot",
        ));
    }
    if filter.is_some() {
        return Err(other("filter-node-name is not supported"));
    }
    if copy_mode.as_deref() == Some("write-blocking") {
        return Err(other("copy-mode=write-blocking is not supported"));
    }
    // The job reports an I/O error and fails with it, which is QEMU's `report`, the default
    // of both; the other policies (stop and pause the job, ignore, stop on ENOSPC) need a
    // job that can be paused and resumed, which this one is not.
    for (name, policy) in [
        ("on-source-error", &on_source_error),
        ("on-target-error", &on_target_error),
    ] {
        if let Some(p) = policy.as_deref().filter(|p| *p != "report") {
            return Err(other(format!(
                "{name}={p} is not supported: only 'report' (the job fails on an I/O error)"
            )));
        }
    }
    if auto_finalize == Some(false) || auto_dismiss == Some(false) {
        return Err(other(
            "auto-finalize=false and auto-dismiss=false are not supported",
        ));
    }
    // Without job-id, QEMU uses the name of the device (BlockBackend) the node is attached
    // to, which is empty for a node without one: an invalid id.
    let id = job_id.unwrap_or_else(|| {
        let name = layer.device_or_node_name(&source);
        if name == source.name() {
            String::new()
        } else {
            name
        }
    });
    mgr.check_id(&id, &source, &target_node)?;
    let speed = match speed {
        None => 0,
        Some(s) if s < 0 => {
            mgr.stillborn(&id);
            return Err(other("Parameter 'speed' expects a non-negative value"));
        }
        Some(s) => s as u64,
    };
    mgr.start_mirror(MirrorConfig {
        id,
        source,
        target: target_node,
        sync,
        speed,
        granularity,
        buf_size,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::BlockLayer;

    fn mirror(cmds: &JobCommands, extra: Value) -> Result<Reply, QmpError> {
        let mut args = json!({"device": "src", "target": "tgt", "sync": "full"});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let Value::Object(map) = args else {
            unreachable!()
        };
        cmds.dispatch("blockdev-mirror", Args::new(map))
    }

    /// Only `report` is what the job does; every other error policy is refused by name, not
    /// accepted and then acted on as `report`.
    #[test]
    fn error_policies_other_than_report_are_refused() {
        let layer = Arc::new(BlockLayer::new());
        for node in ["src", "tgt"] {
            layer
                .blockdev_add(&json!({"driver": "null-co", "node-name": node, "size": 1 << 20}))
                .unwrap();
        }
        let cmds = JobCommands::new(JobManager::new(layer, Arc::new(|_: &str, _: Value| {})));
        for which in ["on-source-error", "on-target-error"] {
            for policy in ["ignore", "enospc", "stop", "auto"] {
                let e = mirror(&cmds, json!({ which: policy })).unwrap_err();
                assert!(
                    e.to_string()
                        .contains(&format!("{which}={policy} is not supported")),
                    "{which}={policy}: {e}"
                );
            }
            let e = mirror(&cmds, json!({ which: "bogus" })).unwrap_err();
            assert!(e.to_string().contains(which), "{e}");
        }
        assert!(
            cmds.jobs.jobs().is_empty(),
            "a refused mirror started a job"
        );
        mirror(
            &cmds,
            json!({"job-id": "m", "on-source-error": "report", "on-target-error": "report"}),
        )
        .unwrap();
        assert_eq!(cmds.jobs.jobs().len(), 1);
    }
}
