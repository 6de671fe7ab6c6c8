//! The block job QMP commands — `blockdev-mirror`, `drive-mirror`, `query-block-jobs`,
//! `query-jobs`, the `block-job-*` verbs (by device: cancel, complete, set-speed, pause,
//! resume, finalize, dismiss) and the generic `job-*` ones (by id: cancel, complete, pause,
//! resume, finalize, dismiss) — as one [`CommandSet`], with arguments checked by
//! [`qmp::Args`] in QEMU 7.2's order. [`JobError`]s meet QMP's classes here, in one `From`
//! impl.

use crate::mirror::{
    Hold, JobError, JobManager, MirrorConfig, OnError, SyncMode, DEFAULT_BUF_SIZE,
    DEFAULT_GRANULARITY,
};
use qmp::{Args, CommandSet, QapiEnum, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`JobCommands`].
pub const COMMANDS: &[&str] = &[
    "blockdev-mirror",
    "drive-mirror",
    "query-block-jobs",
    "query-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-finalize",
    "block-job-dismiss",
    "job-cancel",
    "job-complete",
    "job-pause",
    "job-resume",
    "job-finalize",
    "job-dismiss",
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

impl QapiEnum for OnError {
    const ALL: &'static [Self] = &[
        OnError::Report,
        OnError::Ignore,
        OnError::Enospc,
        OnError::Stop,
        OnError::Auto,
    ];

    fn name(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
            OnError::Auto => "auto",
        }
    }
}

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
            // The job copies once the reply is out (QEMU's job coroutine runs after the
            // command), so its later events follow the reply.
            "blockdev-mirror" => {
                let hold = blockdev_mirror(mgr, a)?;
                return Ok(Reply::empty().after_flush(move || drop(hold)));
            }
            "drive-mirror" => {
                let hold = drive_mirror(mgr, a)?;
                return Ok(Reply::empty().after_flush(move || drop(hold)));
            }
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
                let job = mgr.find(&device)?;
                if job.user_paused() && !force {
                    return Err(other(format!(
                        "The block job for device '{device}' is currently paused"
                    )));
                }
                mgr.cancel_job(&job, force)?;
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
                mgr.set_speed(&device, speed)?;
            }
            "block-job-pause" | "block-job-resume" => {
                let device = a.req_str("device")?;
                a.finish()?;
                let job = mgr.find(&device)?;
                if name == "block-job-pause" {
                    mgr.pause(&job)?;
                } else {
                    mgr.resume(&job)?;
                }
            }
            "block-job-finalize" | "block-job-dismiss" => {
                let id = a.req_str("id")?;
                a.finish()?;
                let job = mgr.find(&id)?;
                if name == "block-job-finalize" {
                    mgr.finalize(&job)?;
                } else {
                    mgr.dismiss(&job)?;
                }
            }
            "job-cancel" | "job-complete" | "job-pause" | "job-resume" | "job-finalize"
            | "job-dismiss" => {
                let id = a.req_str("id")?;
                a.finish()?;
                let job = mgr.find_job(&id)?;
                match name {
                    // job-cancel always forces: a ready mirror is cancelled, not completed.
                    "job-cancel" => mgr.cancel_job(&job, true)?,
                    "job-complete" => mgr.complete_job(&job)?,
                    "job-pause" => mgr.pause(&job)?,
                    "job-resume" => mgr.resume(&job)?,
                    "job-finalize" => mgr.finalize(&job)?,
                    _ => mgr.dismiss(&job)?,
                }
            }
            _ => return Err(QmpError::unknown_command(name)),
        }
        Ok(Reply::new(json!({})))
    }
}

fn blockdev_mirror(mgr: &Arc<JobManager>, mut a: Args) -> Result<Hold, QmpError> {
    let job_id = a.opt_str("job-id")?;
    let device = a.req_str("device")?;
    let target = a.req_str("target")?;
    let replaces = a.opt_str("replaces")?;
    let sync = a.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let speed = a.opt_int::<i64>("speed")?;
    let granularity = a.opt_int::<u32>("granularity")?;
    let buf_size = a.opt_int::<i64>("buf-size")?;
    let on_source_error = a.opt_qapi_enum::<OnError>("on-source-error")?;
    let on_target_error = a.opt_qapi_enum::<OnError>("on-target-error")?;
    let filter = a.opt_str("filter-node-name")?;
    let copy_mode = a.opt_enum("copy-mode", &["background", "write-blocking"])?;
    let auto_finalize = a.opt_bool("auto-finalize")?;
    let auto_dismiss = a.opt_bool("auto-dismiss")?;
    a.finish()?;

    // QEMU's order: the nodes, the parameters, then the job itself.
    let layer = mgr.layer();
    let source = layer.lookup_bs(Some(&device), Some(&device))?;
    let target_node = layer.lookup_bs(Some(&target), Some(&target))?;
    if filter.is_some() {
        return Err(other("filter-node-name is not supported"));
    }
    start_mirror(
        mgr,
        Common {
            job_id,
            source,
            target: target_node,
            replaces,
            sync,
            speed,
            granularity,
            buf_size,
            on_source_error,
            on_target_error,
            copy_mode,
            auto_finalize,
            auto_dismiss,
            open_backing_chain: false,
        },
    )
}

/// The parameters `blockdev-mirror` and `drive-mirror` share (QEMU's
/// `blockdev_mirror_common`), with the nodes already found or opened.
struct Common {
    job_id: Option<String>,
    source: Arc<block::BlockNode>,
    target: Arc<block::BlockNode>,
    replaces: Option<String>,
    sync: String,
    speed: Option<i64>,
    granularity: Option<u32>,
    buf_size: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    copy_mode: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    /// QEMU's `backing_mode`: `MIRROR_OPEN_BACKING_CHAIN` (`drive-mirror`) or
    /// `MIRROR_LEAVE_BACKING_CHAIN` (`blockdev-mirror`).
    open_backing_chain: bool,
}

fn start_mirror(mgr: &Arc<JobManager>, c: Common) -> Result<Hold, QmpError> {
    let Common {
        job_id,
        source,
        target: target_node,
        replaces,
        sync,
        speed,
        granularity,
        buf_size,
        on_source_error,
        on_target_error,
        copy_mode,
        auto_finalize,
        auto_dismiss,
        open_backing_chain,
    } = c;
    let layer = mgr.layer();
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
            "replaces is not supported: completion replaces the source node itself",
        ));
    }
    if copy_mode.as_deref() == Some("write-blocking") {
        return Err(other("copy-mode=write-blocking is not supported"));
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
    let job = mgr.start_mirror_held(MirrorConfig {
        id,
        source,
        target: target_node,
        sync,
        speed,
        granularity,
        buf_size,
        auto_finalize: auto_finalize.unwrap_or(true),
        auto_dismiss: auto_dismiss.unwrap_or(true),
        open_backing_chain,
        // QEMU's default for both.
        on_source_error: on_source_error.unwrap_or(OnError::Report),
        on_target_error: on_target_error.unwrap_or(OnError::Report),
    })?;
    Ok(job.hold())
}

/// `drive-mirror`: the legacy form of `blockdev-mirror`, whose target is a filename or an NBD
/// URI the command opens itself (QEMU's `qmp_drive_mirror`). The target node is outside the
/// graph and belongs to the job: it is closed when the job ends.
fn drive_mirror(mgr: &Arc<JobManager>, mut a: Args) -> Result<Hold, QmpError> {
    let job_id = a.opt_str("job-id")?;
    let device = a.req_str("device")?;
    let target = a.req_str("target")?;
    let format = a.opt_str("format")?;
    let node_name = a.opt_str("node-name")?;
    let replaces = a.opt_str("replaces")?;
    let sync = a.req_enum("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let mode = a.opt_enum("mode", &["existing", "absolute-paths"])?;
    let speed = a.opt_int::<i64>("speed")?;
    let granularity = a.opt_int::<u32>("granularity")?;
    let buf_size = a.opt_int::<i64>("buf-size")?;
    let on_source_error = a.opt_qapi_enum::<OnError>("on-source-error")?;
    let on_target_error = a.opt_qapi_enum::<OnError>("on-target-error")?;
    let unmap = a.opt_bool("unmap")?;
    let copy_mode = a.opt_enum("copy-mode", &["background", "write-blocking"])?;
    let auto_finalize = a.opt_bool("auto-finalize")?;
    let auto_dismiss = a.opt_bool("auto-dismiss")?;
    a.finish()?;

    let layer = mgr.layer();
    let source = layer.lookup_bs(Some(&device), Some(&device))?;
    // What this implementation cannot honour, refused before the target is opened.
    if mode.as_deref() != Some("existing") {
        return Err(other(
            "mode=absolute-paths is not supported: creating the target image is not built; \
             create it (e.g. with qemu-img) and use mode=existing",
        ));
    }
    if node_name.is_some() {
        return Err(other(
            "node-name is not supported: the target node of drive-mirror stays anonymous",
        ));
    }
    if unmap.is_some() {
        return Err(other(
            "unmap is not supported: the mirror copies zeroed ranges as data",
        ));
    }
    let options = target_options(&target, format.as_deref())?;
    // QEMU opens the target without its backing chain (`BDRV_O_NO_BACKING`): with
    // `mode=existing` the chain may not exist yet (it is copied over while the job runs) and is
    // opened when the job ends.
    let target_node = layer.open_detached(&options, true)?;
    start_mirror(
        mgr,
        Common {
            job_id,
            source,
            target: target_node,
            replaces,
            sync,
            speed,
            granularity,
            buf_size,
            on_source_error,
            on_target_error,
            copy_mode,
            auto_finalize,
            auto_dismiss,
            open_backing_chain: true,
        },
    )
}

/// The port of an `nbd://` URI without one (QEMU's `NBD_DEFAULT_PORT`).
const NBD_DEFAULT_PORT: u16 = 10809;

/// The `BlockdevOptions` of `drive-mirror`'s `target` (a filename, or an `nbd`, `nbd+tcp` or
/// `nbd+unix` URI as QEMU's NBD driver parses it) opened as `format`.
fn target_options(target: &str, format: Option<&str>) -> Result<Value, QmpError> {
    let Some((scheme, rest)) = target.split_once("://") else {
        // Without a format the block layer probes the image, as QEMU's `bdrv_open` does.
        return match format {
            None => Ok(json!({"file": {"driver": "file", "filename": target}})),
            Some(f @ ("raw" | "qcow2")) => Ok(json!({
                "driver": f,
                "file": {"driver": "file", "filename": target},
            })),
            Some(f) => Err(other(format!("Unknown driver '{f}'"))),
        };
    };
    let Some(format) = format else {
        return Err(other(
            "drive-mirror to an NBD URI without 'format' is not supported: give format=raw",
        ));
    };
    if !matches!(scheme, "nbd" | "nbd+tcp" | "nbd+unix") {
        return Err(other(format!("Unknown protocol '{scheme}'")));
    }
    // The data behind an NBD export is the server's: only `raw` (the bytes as they are) is
    // opened over it.
    if format != "raw" {
        return Err(other(format!(
            "format '{format}' over an NBD target is not supported: use format=raw"
        )));
    }
    if rest.contains('%') || rest.contains('#') {
        return Err(other(format!(
            "Invalid URI '{target}': escapes and fragments are not supported"
        )));
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let bad = || other(format!("Invalid URI '{target}'"));
    let server = if scheme == "nbd+unix" {
        let socket = query
            .and_then(|q| q.strip_prefix("socket="))
            .filter(|p| !p.is_empty() && !p.contains('&'))
            .ok_or_else(bad)?;
        if !authority.is_empty() {
            return Err(bad());
        }
        json!({"type": "unix", "path": socket})
    } else {
        if query.is_some() || authority.is_empty() {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (authority, NBD_DEFAULT_PORT),
        };
        json!({"type": "inet", "host": host, "port": port.to_string()})
    };
    let mut opts = serde_json::Map::new();
    opts.insert("driver".into(), json!("nbd"));
    opts.insert("server".into(), server);
    if !export.is_empty() {
        opts.insert("export".into(), json!(export));
    }
    Ok(Value::Object(opts))
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

    /// Every `BlockdevOnError` is a policy the job acts on; a name outside the enum is refused
    /// by QAPI's check, naming the parameter.
    #[test]
    fn error_policies_are_taken_and_others_refused() {
        let layer = Arc::new(BlockLayer::new());
        for node in ["src", "tgt"] {
            layer
                .blockdev_add(&json!({"driver": "null-co", "node-name": node, "size": 1 << 20}))
                .unwrap();
        }
        let cmds = JobCommands::new(JobManager::new(layer, Arc::new(|_: &str, _: Value| {})));
        for which in ["on-source-error", "on-target-error"] {
            let e = mirror(&cmds, json!({"job-id": "m", which: "bogus"})).unwrap_err();
            assert!(e.to_string().contains(which), "{e}");
        }
        assert!(
            cmds.jobs.jobs().is_empty(),
            "a refused mirror started a job"
        );
        for (i, policy) in ["report", "ignore", "enospc", "stop", "auto"]
            .iter()
            .enumerate()
        {
            let id = format!("m{i}");
            mirror(
                &cmds,
                json!({"job-id": id, "on-source-error": policy, "on-target-error": policy}),
            )
            .unwrap();
            cmds.jobs.cancel(&id, true).unwrap();
            while cmds.jobs.find(&id).is_ok() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    /// drive-mirror's targets as QEMU's NBD driver reads them: the export is the path, the
    /// socket the one query parameter of `nbd+unix`, the port 10809 unless given.
    #[test]
    fn drive_mirror_targets() {
        let t = |s: &str| target_options(s, Some("raw"));
        assert_eq!(
            t("nbd+unix:///drive0?socket=/tmp/s").unwrap(),
            json!({"driver": "nbd", "export": "drive0",
                   "server": {"type": "unix", "path": "/tmp/s"}})
        );
        assert_eq!(
            t("nbd://h:1234/e").unwrap(),
            json!({"driver": "nbd", "export": "e",
                   "server": {"type": "inet", "host": "h", "port": "1234"}})
        );
        assert_eq!(
            t("nbd+tcp://h").unwrap(),
            json!({"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"}})
        );
        assert_eq!(
            t("/img/a.raw").unwrap(),
            json!({"driver": "raw", "file": {"driver": "file", "filename": "/img/a.raw"}})
        );
        for bad in [
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd+unix:///e?socket=/s&x=1",
            "nbd://h/e?socket=/s",
            "nbd:///e",
            "nbd://h:port/e",
            "nbd://h/%65",
        ] {
            assert!(
                t(bad).unwrap_err().to_string().contains("Invalid URI"),
                "{bad}"
            );
        }
        let e = target_options("nbd://h/e", Some("qcow2")).unwrap_err();
        assert!(e.to_string().contains("use format=raw"), "{e}");
        let e = target_options("ftp://h/e", Some("raw")).unwrap_err();
        assert!(e.to_string().contains("Unknown protocol 'ftp'"), "{e}");
        // A file without a format is probed by the layer; an NBD export is not.
        assert_eq!(
            target_options("/img/a", None).unwrap(),
            json!({"file": {"driver": "file", "filename": "/img/a"}})
        );
        let e = target_options("nbd://h/e", None).unwrap_err();
        assert!(e.to_string().contains("without 'format'"), "{e}");
    }
}
