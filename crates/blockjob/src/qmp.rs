//! The block job QMP commands — `blockdev-mirror`, `query-block-jobs`, `query-jobs`,
//! `block-job-cancel`, `block-job-complete`, `block-job-set-speed` — with arguments checked in
//! QEMU 7.2's order and its messages. The monitor calls [`dispatch`] for [`COMMANDS`].

use crate::mirror::{
    JobError, JobManager, MirrorConfig, SyncMode, DEFAULT_BUF_SIZE, DEFAULT_GRANULARITY,
};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The commands [`dispatch`] handles.
pub const COMMANDS: &[&str] = &[
    "blockdev-mirror",
    "query-block-jobs",
    "query-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-set-speed",
];

fn other(s: impl Into<String>) -> JobError {
    JobError::Other(s.into())
}

struct Args<'a> {
    m: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Args<'a> {
    fn new(v: &'a Value) -> Result<Self, JobError> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let m = match v {
            Value::Object(m) => m,
            Value::Null => EMPTY.get_or_init(Map::new),
            _ => {
                return Err(other(
                    "Invalid parameter type for 'arguments', expected: object",
                ))
            }
        };
        Ok(Args {
            m,
            seen: Vec::new(),
        })
    }
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.seen.push(k);
        self.m.get(k)
    }
    fn opt_str(&mut self, k: &'static str) -> Result<Option<String>, JobError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(other(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
        }
    }
    fn req_str(&mut self, k: &'static str) -> Result<String, JobError> {
        self.opt_str(k)?
            .ok_or_else(|| other(format!("Parameter '{k}' is missing")))
    }
    fn opt_bool(&mut self, k: &'static str) -> Result<Option<bool>, JobError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(other(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            ))),
        }
    }
    fn opt_int(&mut self, k: &'static str) -> Result<Option<i64>, JobError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                other(format!(
                    "Invalid parameter type for '{k}', expected: integer"
                ))
            }),
        }
    }
    fn opt_enum(&mut self, k: &'static str, allowed: &[&str]) -> Result<Option<String>, JobError> {
        let Some(s) = self.opt_str(k)? else {
            return Ok(None);
        };
        if allowed.contains(&s.as_str()) {
            Ok(Some(s))
        } else {
            Err(other(format!(
                "Parameter '{k}' does not accept value '{s}'"
            )))
        }
    }
    fn finish(self) -> Result<(), JobError> {
        for k in self.m.keys() {
            if !self.seen.contains(&k.as_str()) {
                return Err(other(format!("Parameter '{k}' is unexpected")));
            }
        }
        Ok(())
    }
}

/// Runs job command `name`; `None` if it is not one of [`COMMANDS`].
pub fn dispatch(
    mgr: &Arc<JobManager>,
    name: &str,
    args: &Value,
) -> Option<Result<Value, JobError>> {
    let r = match name {
        "blockdev-mirror" => blockdev_mirror(mgr, args).map(|()| json!({})),
        "query-block-jobs" => Args::new(args)
            .and_then(Args::finish)
            .map(|()| Value::Array(mgr.jobs().iter().map(|j| j.info()).collect())),
        "query-jobs" => Args::new(args)
            .and_then(Args::finish)
            .map(|()| Value::Array(mgr.jobs().iter().map(|j| j.job_info()).collect())),
        "block-job-cancel" => (|| {
            let mut a = Args::new(args)?;
            let device = a.req_str("device")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            mgr.cancel(&device, force)?;
            Ok(json!({}))
        })(),
        "block-job-complete" => (|| {
            let mut a = Args::new(args)?;
            let device = a.req_str("device")?;
            a.finish()?;
            mgr.complete(&device)?;
            Ok(json!({}))
        })(),
        "block-job-set-speed" => (|| {
            let mut a = Args::new(args)?;
            let device = a.req_str("device")?;
            let speed = a
                .opt_int("speed")?
                .ok_or_else(|| other("Parameter 'speed' is missing"))?;
            a.finish()?;
            let job = mgr.find(&device)?;
            let speed = u64::try_from(speed)
                .map_err(|_| other("Parameter 'speed' expects a non-negative value"))?;
            mgr.set_speed(job.id(), speed)?;
            Ok(json!({}))
        })(),
        _ => return None,
    };
    Some(r)
}

fn blockdev_mirror(mgr: &Arc<JobManager>, args: &Value) -> Result<(), JobError> {
    let mut a = Args::new(args)?;
    let job_id = a.opt_str("job-id")?;
    let device = a.req_str("device")?;
    let target = a.req_str("target")?;
    let replaces = a.opt_str("replaces")?;
    let sync = a
        .opt_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?
        .ok_or_else(|| other("Parameter 'sync' is missing"))?;
    let speed = a.opt_int("speed")?;
    let granularity = a.opt_int("granularity")?;
    let buf_size = a.opt_int("buf-size")?;
    let _ = a.opt_enum(
        "on-source-error",
        &["report", "ignore", "enospc", "stop", "auto"],
    )?;
    let _ = a.opt_enum(
        "on-target-error",
        &["report", "ignore", "enospc", "stop", "auto"],
    )?;
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
            g as u32
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
