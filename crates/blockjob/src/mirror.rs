//! The job manager and the mirror job: states, verbs, events and the copy loop.

use block::extension::NodeClaim;
use block::{BitmapId, BlockError, BlockLayer, BlockNode};
use nix::errno::Errno;
use serde_json::{json, Value};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where events go: name and data.
pub type EventFn = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// QEMU's `DEFAULT_MIRROR_BUF_SIZE`.
pub const DEFAULT_BUF_SIZE: u64 = 1 << 20;
/// Default granularity of the mirror's dirty bitmap.
pub const DEFAULT_GRANULARITY: u32 = 64 << 10;
/// How long a ready mirror waits before looking at its bitmap again.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy everything.
    Full,
    /// Copy what the source node itself holds, not what its backing chain does (a source
    /// without a backing node: everything).
    Top,
    /// Copy only what is written from now on.
    None,
}

/// QAPI's `BlockdevOnError`: what a job does when one of its reads (`on-source-error`) or
/// writes (`on-target-error`) fails, as QEMU 7.2's `block_job_error_action` decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The job fails with the error (the default).
    Report,
    /// The job goes on; the failed area stays dirty and is copied again later.
    Ignore,
    /// The job pauses as if the user had paused it; the failed area stays dirty and is
    /// retried once `block-job-resume` resumes it.
    Stop,
    /// `Stop` when the error is ENOSPC, `Report` otherwise.
    Enospc,
    /// For a job, the same as `Enospc` (QEMU's `block_job_error_action` treats them alike).
    Auto,
}

impl OnError {
    /// What to do about a request that failed with `errno`.
    pub fn action(self, errno: Errno) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if errno == Errno::ENOSPC => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        }
    }
}

/// QAPI's `BlockErrorAction`, as `BLOCK_JOB_ERROR` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The job fails.
    Report,
    /// The job goes on.
    Ignore,
    /// The job pauses until resumed.
    Stop,
}

impl ErrorAction {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// QAPI's `BlockDeviceIoStatus` of a job (`io-status` in `query-block-jobs`): set by an error
/// that stopped the job, back to `ok` when the job is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error stopped the job.
    Ok,
    /// An error other than ENOSPC stopped it.
    Failed,
    /// ENOSPC stopped it.
    Nospace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// A mirror's parameters, checked.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Job id.
    pub id: String,
    /// Source node.
    pub source: Arc<BlockNode>,
    /// Target node.
    pub target: Arc<BlockNode>,
    /// What to copy.
    pub sync: SyncMode,
    /// Bytes per second, 0 for unlimited.
    pub speed: u64,
    /// Dirty bitmap granularity.
    pub granularity: u32,
    /// Largest piece copied at once.
    pub buf_size: u64,
    /// `auto-finalize`: false leaves a job that finished its work `pending` until
    /// `job-finalize`.
    pub auto_finalize: bool,
    /// `auto-dismiss`: false leaves a job that ended `concluded`, with its error if any, until
    /// `job-dismiss`.
    pub auto_dismiss: bool,
    /// Open the target's backing chain when the job ends well (QEMU's
    /// `MIRROR_OPEN_BACKING_CHAIN`: `drive-mirror` opens its target without it).
    pub open_backing_chain: bool,
    /// `on-source-error`: what a failed read of the source does.
    pub on_source_error: OnError,
    /// `on-target-error`: what a failed write or flush of the target does.
    pub on_target_error: OnError,
}

/// A refused job command; texts and classes are QEMU 7.2's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No job of that id (class `DeviceNotActive`), as the `block-job-*` commands say it.
    #[error("Block job '{0}' not found")]
    NotFound(String),
    /// No job of that id, as the generic `job-*` commands say it (class `GenericError`).
    #[error("Job not found")]
    JobNotFound,
    /// `block-job-pause` or `job-pause` on a job the user paused already.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `block-job-resume` or `job-resume` on a job the user did not pause.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `block-job-complete` or `job-complete` on a ready job whose cancel was requested.
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// A verb the job's state does not accept.
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    BadVerb {
        /// Job id.
        id: String,
        /// Its state.
        state: &'static str,
        /// The verb.
        verb: &'static str,
    },
    /// A job id already used.
    #[error("Job ID '{0}' already in use")]
    DuplicateId(String),
    /// A malformed job id.
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// The node is the source of a running mirror (QEMU inserts a filter above it, so it is no
    /// longer a root).
    #[error("Need a root block node")]
    NeedRoot,
    /// Source and target are the same node.
    #[error("Can't mirror node into itself")]
    IntoItself,
    /// The target is used by another job.
    #[error("Node '{0}' is busy: block device is in use by block job: mirror")]
    Busy(String),
    /// Any other refusal (argument checks, block layer errors).
    #[error("{0}")]
    Other(String),
}

impl JobError {
    /// The QMP error class.
    pub fn class(&self) -> &'static str {
        match self {
            JobError::NotFound(_) => "DeviceNotActive",
            _ => "GenericError",
        }
    }
}

impl From<BlockError> for JobError {
    fn from(e: BlockError) -> Self {
        JobError::Other(e.to_string())
    }
}

/// QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused by the user while running.
    Paused,
    /// Source and target in sync; waiting for complete or cancel.
    Ready,
    /// Paused by the user while ready.
    Standby,
    /// Finishing successfully.
    Waiting,
    /// Finished successfully, about to conclude.
    Pending,
    /// Finishing after a cancel or error.
    Aborting,
    /// Finished.
    Concluded,
    /// Gone.
    Null,
}

impl Status {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }
}

/// What a user asks of a job (QEMU's `JobVerb`), each allowed in some states only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `block-job-cancel`, `job-cancel`.
    Cancel,
    /// `block-job-pause`, `job-pause`.
    Pause,
    /// `block-job-resume`, `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `block-job-complete`, `job-complete`.
    Complete,
    /// `block-job-finalize`, `job-finalize`.
    Finalize,
    /// `block-job-dismiss`, `job-dismiss`.
    Dismiss,
}

impl Verb {
    /// The QAPI name, as errors quote it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// QEMU 7.2's `JobVerbTable`: whether a job in `status` takes the verb.
    pub fn allowed(self, status: Status) -> bool {
        use Status::*;
        match self {
            Verb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(status, Ready | Standby),
            Verb::Finalize => status == Pending,
            Verb::Dismiss => status == Concluded,
        }
    }
}

#[derive(Debug)]
struct JobState {
    status: Status,
    /// Bytes copied so far (`offset`) and total to copy (`len`, grows with new writes).
    offset: u64,
    len: u64,
    speed: u64,
    busy: bool,
    /// `block-job-cancel` was called; `Some(true)` with `force`.
    cancel: Option<bool>,
    complete: bool,
    /// Paused by `block-job-pause` / `job-pause`, or by an error whose action was `stop`
    /// (the job stops at its next pause point).
    user_paused: bool,
    /// `io-status`: set by an error that stopped the job, reset when it is resumed.
    io_status: IoStatus,
    /// `job-finalize` was called on the pending job.
    finalize: bool,
    /// Why the job failed or that it was cancelled, once it is aborting: queries show it
    /// until the job is dismissed.
    error: Option<String>,
    /// The job's dirty bitmap exists (the command may return).
    initialized: bool,
    /// The job waits before it copies anything: until the command's reply is out (see
    /// [`JobManager::start_mirror_held`]).
    held: bool,
}

impl JobState {
    fn check(&self, id: &str, verb: Verb) -> Result<(), JobError> {
        if verb.allowed(self.status) {
            Ok(())
        } else {
            Err(JobError::BadVerb {
                id: id.to_string(),
                state: self.status.as_str(),
                verb: verb.as_str(),
            })
        }
    }
}

/// One block job.
pub struct Job {
    id: String,
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    auto_finalize: bool,
    auto_dismiss: bool,
    open_backing_chain: bool,
    state: Mutex<JobState>,
    wake: Condvar,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.id).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a job from copying while it exists (see [`JobManager::start_mirror_held`]); the
/// job goes on when it is dropped, whether or not the command's reply could be sent.
#[derive(Debug)]
pub struct Hold(Arc<Job>);

impl Drop for Hold {
    fn drop(&mut self) {
        lock(&self.0.state).held = false;
        self.0.wake.notify_all();
    }
}

impl Job {
    /// The job's [`Hold`]: dropping it lets a job started with
    /// [`JobManager::start_mirror_held`] go on.
    pub fn hold(self: &Arc<Self>) -> Hold {
        Hold(self.clone())
    }

    /// Job id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Current status.
    pub fn status(&self) -> Status {
        lock(&self.state).status
    }
    /// Whether the user paused the job (and did not resume it yet).
    pub fn user_paused(&self) -> bool {
        lock(&self.state).user_paused
    }
    /// `BlockJobInfo` as `query-block-jobs` shows it.
    pub fn info(&self) -> Value {
        let s = lock(&self.state);
        let mut v = json!({
            "auto-finalize": self.auto_finalize,
            "io-status": s.io_status.as_str(),
            "device": self.id,
            "auto-dismiss": self.auto_dismiss,
            "busy": s.busy,
            "len": s.len,
            "offset": s.offset,
            "status": s.status.as_str(),
            "paused": s.user_paused,
            "speed": s.speed,
            "ready": matches!(s.status, Status::Ready | Status::Standby),
            "type": "mirror",
        });
        if let (Some(e), Some(m)) = (&s.error, v.as_object_mut()) {
            m.insert("error".into(), json!(e));
        }
        v
    }
    /// `JobInfo` as `query-jobs` shows it.
    pub fn job_info(&self) -> Value {
        let s = lock(&self.state);
        let mut v = json!({
            "id": self.id,
            "type": "mirror",
            "status": s.status.as_str(),
            "current-progress": s.offset,
            "total-progress": s.len,
        });
        if let (Some(e), Some(m)) = (&s.error, v.as_object_mut()) {
            m.insert("error".into(), json!(e));
        }
        v
    }
}

/// The jobs of one VM process.
pub struct JobManager {
    layer: Arc<BlockLayer>,
    events: EventFn,
    jobs: Mutex<Vec<Arc<Job>>>,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager").finish()
    }
}

impl JobManager {
    /// A manager for `layer`'s nodes, sending events to `events`.
    pub fn new(layer: Arc<BlockLayer>, events: EventFn) -> Arc<Self> {
        Arc::new(JobManager {
            layer,
            events,
            jobs: Mutex::new(Vec::new()),
        })
    }

    /// The block layer.
    pub fn layer(&self) -> &Arc<BlockLayer> {
        &self.layer
    }

    /// The jobs that exist (not yet `null`), oldest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).clone()
    }

    /// The job called `id`, for the `block-job-*` commands.
    pub fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.find_job(id)
            .map_err(|_| JobError::NotFound(id.to_string()))
    }

    /// The job called `id`, for the generic `job-*` commands (which say so differently).
    pub fn find_job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        lock(&self.jobs)
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or(JobError::JobNotFound)
    }

    fn emit(&self, name: &str, data: Value) {
        (self.events)(name, data);
    }

    fn set_status(&self, job: &Job, status: Status) {
        lock(&job.state).status = status;
        self.emit(
            "JOB_STATUS_CHANGE",
            json!({"status": status.as_str(), "id": job.id}),
        );
    }

    fn block_event(&self, name: &str, job: &Job, error: Option<String>) {
        let s = lock(&job.state);
        let mut data = json!({
            "device": job.id,
            "len": s.len,
            "offset": s.offset,
            "speed": s.speed,
            "type": "mirror",
        });
        drop(s);
        if let (Some(e), Some(m)) = (error, data.as_object_mut()) {
            m.insert("error".into(), json!(e));
        }
        self.emit(name, data);
    }

    /// QEMU's `block_job_error_action` for a read of the source (`read`) or a write or flush
    /// of the target that failed with `e`: the action `cfg`'s policy picks, announced by
    /// `BLOCK_JOB_ERROR`; for `stop`, a pause the user sees as theirs (`block-job-resume`
    /// ends it, and the job retries the area) and an `io-status` that says why.
    fn error_action(
        &self,
        job: &Job,
        cfg: &MirrorConfig,
        read: bool,
        e: &BlockError,
    ) -> ErrorAction {
        let errno = match e {
            BlockError::Io(n) => *n,
            _ => Errno::EIO,
        };
        let policy = if read {
            cfg.on_source_error
        } else {
            cfg.on_target_error
        };
        let action = policy.action(errno);
        self.emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": job.id,
                "operation": if read { "read" } else { "write" },
                "action": action.as_str(),
            }),
        );
        if action == ErrorAction::Stop {
            let mut s = lock(&job.state);
            s.user_paused = true;
            if s.io_status == IoStatus::Ok {
                s.io_status = if errno == Errno::ENOSPC {
                    IoStatus::Nospace
                } else {
                    IoStatus::Failed
                };
            }
        }
        action
    }

    /// QEMU's checks of the nodes, made first: the source must not already be mirrored (QEMU
    /// has put a filter node above it), the target must not be another job's.
    pub fn check_nodes(&self, source: &BlockNode, target: &BlockNode) -> Result<(), JobError> {
        let jobs = lock(&self.jobs);
        if jobs.iter().any(|j| j.source.id() == source.id()) {
            return Err(JobError::NeedRoot);
        }
        if jobs
            .iter()
            .any(|j| j.target.id() == target.id() || j.source.id() == target.id())
        {
            return Err(JobError::Busy(target.name().to_string()));
        }
        Ok(())
    }

    /// QEMU's checks when the job is created, made after the parameters': source and target
    /// distinct, a valid and free id.
    pub fn check_id(
        &self,
        id: &str,
        source: &BlockNode,
        target: &BlockNode,
    ) -> Result<(), JobError> {
        if source.id() == target.id() {
            return Err(JobError::IntoItself);
        }
        if !block::options::id_wellformed(id) {
            return Err(JobError::InvalidId(id.to_string()));
        }
        if lock(&self.jobs).iter().any(|j| j.id == id) {
            return Err(JobError::DuplicateId(id.to_string()));
        }
        Ok(())
    }

    /// A job QEMU creates and destroys within the command because a later check failed (a
    /// negative `speed`): its `created` and `null` status changes.
    pub fn stillborn(&self, id: &str) {
        for st in [Status::Created, Status::Null] {
            self.emit(
                "JOB_STATUS_CHANGE",
                json!({"status": st.as_str(), "id": id}),
            );
        }
    }

    /// `blockdev-mirror`: starts a mirror job on its own thread.
    pub fn start_mirror(self: &Arc<Self>, cfg: MirrorConfig) -> Result<Arc<Job>, JobError> {
        let job = self.start_mirror_held(cfg)?;
        drop(job.hold());
        Ok(job)
    }

    /// [`JobManager::start_mirror`] for a QMP command: the job is set up (its dirty bitmap
    /// tracks writes from now on) but copies nothing — and so sends no event beyond
    /// `created` and `running` — until the returned [`Hold`] is dropped, which the command
    /// does once its reply is out, as QEMU's job coroutine runs only after the command has
    /// returned.
    pub fn start_mirror_held(self: &Arc<Self>, cfg: MirrorConfig) -> Result<Arc<Job>, JobError> {
        self.check_nodes(&cfg.source, &cfg.target)?;
        self.check_id(&cfg.id, &cfg.source, &cfg.target)?;
        let job = Arc::new(Job {
            id: cfg.id.clone(),
            source: cfg.source.clone(),
            target: cfg.target.clone(),
            auto_finalize: cfg.auto_finalize,
            auto_dismiss: cfg.auto_dismiss,
            open_backing_chain: cfg.open_backing_chain,
            state: Mutex::new(JobState {
                status: Status::Created,
                offset: 0,
                len: 0,
                speed: cfg.speed,
                busy: false,
                cancel: None,
                complete: false,
                user_paused: false,
                io_status: IoStatus::Ok,
                finalize: false,
                error: None,
                initialized: false,
                held: true,
            }),
            wake: Condvar::new(),
        });
        let holder = holder(&cfg.id);
        let claims = vec![
            NodeClaim::new(
                &cfg.source,
                &holder,
                false,
                BlockError::Driver(format!(
                    "Node '{}' is busy: block device is in use by block job: mirror",
                    cfg.source.name()
                )),
            ),
            NodeClaim::new(
                &cfg.target,
                &holder,
                true,
                BlockError::NodeInUse(cfg.target.name().to_string()),
            ),
        ];
        lock(&self.jobs).push(job.clone());
        // QEMU creates and starts the job before the command returns.
        self.set_status(&job, Status::Created);
        self.set_status(&job, Status::Running);
        let mgr = self.clone();
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mirror-{}", cfg.id))
            .spawn(move || {
                let outcome = run_mirror(&mgr, &j, &cfg);
                mgr.finish(&j, outcome, claims);
            });
        if let Err(e) = spawned {
            lock(&self.jobs).retain(|x| !Arc::ptr_eq(x, &job));
            return Err(JobError::Other(format!("Could not start job thread: {e}")));
        }
        let mut s = lock(&job.state);
        while !s.initialized {
            s = job.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        drop(s);
        Ok(job)
    }

    /// The end of a job whose work is over, as QEMU's `job_completed`: a job that succeeded
    /// waits `pending` for `job-finalize` without `auto-finalize` (a forced cancel aborts it
    /// there), then its event, the release of its nodes (`claims`), `concluded`, and `null`
    /// unless it waits for `job-dismiss` (without `auto-dismiss`).
    fn finish(&self, job: &Job, outcome: Outcome, claims: Vec<NodeClaim>) {
        let outcome = match outcome {
            Outcome::Completed if !job.auto_finalize => {
                {
                    let _jobs = lock(&self.jobs);
                    self.set_status(job, Status::Waiting);
                    self.set_status(job, Status::Pending);
                    self.emit("BLOCK_JOB_PENDING", json!({"type": "mirror", "id": job.id}));
                }
                let mut s = lock(&job.state);
                while !s.finalize && s.cancel != Some(true) {
                    s = job.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                if s.finalize {
                    Outcome::Finalized
                } else {
                    Outcome::Cancelled
                }
            }
            o => o,
        };
        // The whole end — events, status changes, removal from the list — happens under the
        // jobs lock, so a query sees the job either running or gone: a client that has seen
        // BLOCK_JOB_COMPLETED never finds it still listed (QEMU does all of this in one
        // main-loop step). Lock order: jobs, then a job's state.
        let mut jobs = lock(&self.jobs);
        // Whoever has seen the job's end event may use its nodes again.
        drop(claims);
        match outcome {
            Outcome::Completed | Outcome::Finalized => {
                if matches!(outcome, Outcome::Completed) {
                    self.set_status(job, Status::Waiting);
                    self.set_status(job, Status::Pending);
                }
                // QEMU's `mirror_exit_common` (the job's `prepare`, run when it is
                // finalized): the target's backing chain, then the pivot.
                match self.exit_graph_changes(job) {
                    Ok(()) => self.block_event("BLOCK_JOB_COMPLETED", job, None),
                    Err(e) => {
                        let e = e.to_string();
                        lock(&job.state).error = Some(e.clone());
                        self.set_status(job, Status::Aborting);
                        self.block_event("BLOCK_JOB_COMPLETED", job, Some(e));
                    }
                }
            }
            Outcome::Cancelled => {
                lock(&job.state).error = Some(CANCELLED.to_string());
                self.set_status(job, Status::Aborting);
                self.block_event("BLOCK_JOB_CANCELLED", job, None);
            }
            Outcome::Failed(e) => {
                lock(&job.state).error = Some(e.clone());
                self.set_status(job, Status::Aborting);
                self.block_event("BLOCK_JOB_COMPLETED", job, Some(e));
            }
        }
        self.set_status(job, Status::Concluded);
        if job.auto_dismiss {
            jobs.retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
            self.set_status(job, Status::Null);
        }
    }

    /// What a mirror that ends well changes in the graph (QEMU's `mirror_exit_common`): the
    /// target's backing chain is opened if the job was asked to (a failure is reported, as
    /// QEMU's `error_report`, and changes nothing else); after `block-job-complete` — not
    /// after a cancel of a ready job — the source's users move to the target.
    fn exit_graph_changes(&self, job: &Job) -> Result<(), BlockError> {
        if job.open_backing_chain {
            if let Err(e) = self.layer.open_backing_chain(&job.target) {
                log::error!("{e}");
            }
        }
        if lock(&job.state).complete {
            self.layer
                .replace_node(&job.source, &job.target, &holder(&job.id))?;
        }
        Ok(())
    }

    /// `block-job-cancel` (`force` as given) and `job-cancel` (always forced). A running job
    /// stops and is cancelled; a ready mirror cancelled without `force` completes instead,
    /// leaving the target a consistent copy; a pending job takes only a forced cancel.
    pub fn cancel_job(&self, job: &Job, force: bool) -> Result<(), JobError> {
        let mut s = lock(&job.state);
        s.check(&job.id, Verb::Cancel)?;
        if s.status == Status::Pending && !force {
            // QEMU ignores a soft cancel of a job whose work is over.
            return Ok(());
        }
        // A cancel resumes a job the user (or an error) paused, as a resume would.
        s.user_paused = false;
        s.io_status = IoStatus::Ok;
        s.cancel = Some(force || s.cancel == Some(true));
        // As QEMU's mirror_cancel: before ready any cancel is forced, and a forced one stops
        // the target's requests from waiting (an nbd target waiting to reconnect).
        let forced = force || !matches!(s.status, Status::Ready | Status::Standby);
        job.wake.notify_all();
        drop(s);
        if forced {
            job.target.driver().cancel_in_flight();
        }
        Ok(())
    }

    /// `block-job-cancel`.
    pub fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        self.cancel_job(&*self.find(id)?, force)
    }

    /// `block-job-pause`, `job-pause`: the job stops at its next pause point, `paused` (or
    /// `standby` when ready), until resumed.
    pub fn pause(&self, job: &Job) -> Result<(), JobError> {
        let mut s = lock(&job.state);
        s.check(&job.id, Verb::Pause)?;
        if s.user_paused {
            return Err(JobError::AlreadyPaused);
        }
        s.user_paused = true;
        job.wake.notify_all();
        Ok(())
    }

    /// `block-job-resume`, `job-resume`.
    pub fn resume(&self, job: &Job) -> Result<(), JobError> {
        let mut s = lock(&job.state);
        if !s.user_paused {
            return Err(JobError::NotPaused);
        }
        s.check(&job.id, Verb::Resume)?;
        s.user_paused = false;
        s.io_status = IoStatus::Ok;
        job.wake.notify_all();
        Ok(())
    }

    /// `block-job-complete`, `job-complete`: only a ready job (or one paused while ready,
    /// which completes once resumed) accepts it.
    pub fn complete_job(&self, job: &Job) -> Result<(), JobError> {
        let mut s = lock(&job.state);
        s.check(&job.id, Verb::Complete)?;
        if s.cancel.is_some() {
            return Err(JobError::CannotComplete(job.id.clone()));
        }
        // The pivot must be possible before the command is accepted.
        self.layer
            .check_replace(&job.source, &job.target, &holder(&job.id))?;
        s.complete = true;
        job.wake.notify_all();
        Ok(())
    }

    /// `block-job-complete`.
    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        self.complete_job(&*self.find(id)?)
    }

    /// `block-job-finalize`, `job-finalize`: a pending job ends.
    pub fn finalize(&self, job: &Job) -> Result<(), JobError> {
        let mut s = lock(&job.state);
        s.check(&job.id, Verb::Finalize)?;
        s.finalize = true;
        job.wake.notify_all();
        Ok(())
    }

    /// `block-job-dismiss`, `job-dismiss`: a concluded job goes away.
    pub fn dismiss(&self, job: &Job) -> Result<(), JobError> {
        let mut jobs = lock(&self.jobs);
        lock(&job.state).check(&job.id, Verb::Dismiss)?;
        jobs.retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
        self.set_status(job, Status::Null);
        Ok(())
    }

    /// `block-job-set-speed`: the verb is checked before the value, as in QEMU.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = lock(&job.state);
        s.check(&job.id, Verb::SetSpeed)?;
        s.speed = u64::try_from(speed).map_err(|_| {
            JobError::Other("Parameter 'speed' expects a non-negative value".into())
        })?;
        job.wake.notify_all();
        Ok(())
    }
}

/// The error a cancelled job shows until it is dismissed (QEMU's `strerror(ECANCELED)`).
const CANCELLED: &str = "Operation canceled";
/// How a job names itself as the holder of its node claims.
fn holder(id: &str) -> String {
    format!("block job '{id}'")
}

enum Outcome {
    /// The work is done (a mirror: in sync when completed or cancelled while ready).
    Completed,
    /// Done, and finalized by the user after waiting `pending`.
    Finalized,
    Cancelled,
    Failed(String),
}

/// The source's internal dirty bitmap, released when the job ends however it ends.
struct DirtyBitmap<'a> {
    node: &'a BlockNode,
    id: BitmapId,
}

impl DirtyBitmap<'_> {
    /// The next dirty area at or after `cursor` (wrapping to the start), at most `max` bytes,
    /// cleared before it is returned: a write that lands while it is being copied marks it
    /// again.
    fn take(&self, cursor: u64, max: u64) -> Result<Option<(u64, u64)>, BlockError> {
        self.node.with_bitmaps(|l| {
            let Some(bm) = l.get_mut(self.id) else {
                return Ok(None);
            };
            let size = bm.size();
            let hb = bm.hbitmap();
            let area = hb
                .next_dirty_area(cursor, size, max)
                .or_else(|| hb.next_dirty_area(0, size, max));
            let Some((start, len)) = area else {
                return Ok(None);
            };
            // Whole granules: the area starts inside a dirty granule, so align it down, and
            // round its end up (`max` is a multiple of the granularity).
            let g = u64::from(bm.granularity()).max(1);
            let aligned = start - start % g;
            let mut end = start
                .saturating_add(len)
                .div_ceil(g)
                .saturating_mul(g)
                .min(size);
            if end - aligned > max {
                end = aligned + max;
            }
            bm.reset_dirty(aligned, end - aligned)?;
            Ok(Some((aligned, end - aligned)))
        })
    }
    fn mark(&self, offset: u64, len: u64) {
        self.node.with_bitmaps(|l| {
            if let Some(bm) = l.get_mut(self.id) {
                let _ = bm.set_dirty(offset, len);
            }
        });
    }
    fn count(&self) -> u64 {
        self.node
            .with_bitmaps(|l| l.get(self.id).map_or(0, |b| b.count()))
    }
}

impl Drop for DirtyBitmap<'_> {
    fn drop(&mut self) {
        self.node.with_bitmaps(|l| {
            let _ = l.release(self.id);
        });
    }
}

/// QEMU's `job_pause_point`: a job the user paused stops here, `paused` (`standby` when
/// ready), until it is resumed or cancelled, then goes back to the state it was in.
fn pause_point(mgr: &JobManager, job: &Job) {
    let was = {
        let s = lock(&job.state);
        if !s.user_paused || s.cancel == Some(true) {
            return;
        }
        s.status
    };
    let parked = if was == Status::Ready {
        Status::Standby
    } else {
        Status::Paused
    };
    mgr.set_status(job, parked);
    {
        let mut s = lock(&job.state);
        s.busy = false;
        while s.user_paused && s.cancel != Some(true) {
            s = job.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
    mgr.set_status(job, was);
}

fn run_mirror(mgr: &JobManager, job: &Job, cfg: &MirrorConfig) -> Outcome {
    // QEMU's `mirror_start_job`, within the command: the dirty bitmap exists before the
    // command returns, so no write after it is missed. The rest is `mirror_run`, which QEMU
    // starts once the command has returned.
    let created = cfg.source.create_bitmap(cfg.granularity, None);
    {
        let mut s = lock(&job.state);
        s.initialized = true;
        job.wake.notify_all();
        while s.held {
            s = job.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
    let bitmap = match created {
        Ok(id) => DirtyBitmap {
            node: &cfg.source,
            id,
        },
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let (src_len, tgt_len) = match (cfg.source.size(), cfg.target.size()) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => return Outcome::Failed(e.to_string()),
    };
    if src_len != tgt_len {
        return Outcome::Failed("Source and target image have different sizes".into());
    }
    let has_backing = cfg
        .source
        .driver()
        .children()
        .iter()
        .any(|(role, _)| *role == "backing");
    match cfg.sync {
        SyncMode::None => {}
        // QEMU's `mirror_dirty_init` with a base: what the source itself holds.
        SyncMode::Top if has_backing => {
            let mut offset = 0;
            while offset < src_len {
                let (allocated, n) = match cfg
                    .source
                    .driver()
                    .allocated_in_top(offset, src_len - offset)
                {
                    Ok(a) => a,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
                if allocated {
                    bitmap.mark(offset, n);
                }
                offset += n.max(1);
            }
        }
        SyncMode::Top | SyncMode::Full => bitmap.mark(0, src_len),
    }
    lock(&job.state).len = bitmap.count();
    // The buffer holds whole granules: at least one, at most 64 MiB.
    let g = u64::from(cfg.granularity).max(1);
    let buf_len = cfg.buf_size.clamp(g, DEFAULT_BUF_SIZE * 64) / g * g;
    let mut buf = vec![0u8; buf_len as usize];
    let mut cursor = 0u64;
    let started = Instant::now();
    let mut copied_since_speed = 0u64;
    let mut speed_epoch = started;
    loop {
        pause_point(mgr, job);
        // Decide what to do under the job's lock, then act without it.
        let (cancel, complete, ready, speed) = {
            let s = lock(&job.state);
            (s.cancel, s.complete, s.status == Status::Ready, s.speed)
        };
        if cancel == Some(true) || (cancel == Some(false) && !ready) {
            return Outcome::Cancelled;
        }
        let finishing = ready && (complete || cancel == Some(false));
        if speed > 0 {
            let elapsed = speed_epoch.elapsed().as_secs_f64();
            let allowed = speed as f64 * elapsed;
            if copied_since_speed as f64 > allowed {
                let wait = (copied_since_speed as f64 - allowed) / speed as f64;
                let wait = Duration::from_secs_f64(wait.min(0.1));
                let s = lock(&job.state);
                let _ = job.wake.wait_timeout(s, wait);
                continue;
            }
            if elapsed > 1.0 {
                speed_epoch = Instant::now();
                copied_since_speed = 0;
            }
        }
        let area = match bitmap.take(cursor, buf.len() as u64) {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let Some((offset, len)) = area else {
            if !ready {
                // QEMU flushes the target before it calls the job ready; a failed flush is a
                // failed write of the target.
                if let Err(e) = cfg.target.flush() {
                    if mgr.error_action(job, cfg, false, &e) == ErrorAction::Report {
                        return Outcome::Failed(e.to_string());
                    }
                    continue;
                }
                mgr.set_status(job, Status::Ready);
                mgr.block_event("BLOCK_JOB_READY", job, None);
                continue;
            }
            if finishing {
                // Nothing dirty: make sure no guest write is still between its I/O and its
                // marking, then look once more.
                if cfg.source.in_flight() == 0 && bitmap.count() == 0 {
                    if let Err(e) = cfg.target.flush() {
                        if mgr.error_action(job, cfg, false, &e) == ErrorAction::Report {
                            return Outcome::Failed(e.to_string());
                        }
                        continue;
                    }
                    return Outcome::Completed;
                }
                std::thread::yield_now();
                continue;
            }
            let s = lock(&job.state);
            if s.cancel.is_none() && !s.complete {
                let _ = job.wake.wait_timeout(s, IDLE_POLL);
            }
            continue;
        };
        lock(&job.state).busy = true;
        let n = len as usize;
        let piece = match buf.get_mut(..n) {
            Some(p) => p,
            None => return Outcome::Failed("internal: area larger than the buffer".into()),
        };
        let r = match cfg.source.read_at(offset, piece) {
            Err(e) => Err((true, e)),
            Ok(()) => cfg.target.write_at(offset, piece).map_err(|e| (false, e)),
        };
        // A failed area stays dirty, whatever the policy: it is copied again later (ignore),
        // once the job is resumed (stop), or not at all because the job fails (report).
        if r.is_err() {
            bitmap.mark(offset, len);
        }
        let remaining = bitmap.count();
        {
            let mut s = lock(&job.state);
            s.busy = false;
            if r.is_ok() {
                s.offset = s.offset.saturating_add(len);
            }
            s.len = s.offset.saturating_add(remaining);
        }
        cursor = offset.saturating_add(len);
        match r {
            Ok(()) => copied_since_speed = copied_since_speed.saturating_add(len),
            Err((read, e)) => {
                if mgr.error_action(job, cfg, read, &e) == ErrorAction::Report {
                    return Outcome::Failed(e.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn layer_with(size: u64) -> Arc<BlockLayer> {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "src", "size": size, "read-zeroes": true}),
        )
        .unwrap();
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "tgt", "size": size, "read-zeroes": true}),
        )
        .unwrap();
        l
    }

    fn manager(l: &Arc<BlockLayer>) -> (Arc<JobManager>, mpsc::Receiver<(String, Value)>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let m = JobManager::new(
            l.clone(),
            Arc::new(move |n: &str, d: Value| {
                let _ = lock(&tx).send((n.to_string(), d));
            }),
        );
        (m, rx)
    }

    fn wait_for(rx: &mpsc::Receiver<(String, Value)>, name: &str) -> Value {
        loop {
            let (n, d) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            if n == name {
                return d;
            }
        }
    }

    fn cfg(l: &BlockLayer, id: &str, sync: SyncMode) -> MirrorConfig {
        MirrorConfig {
            id: id.into(),
            source: l.node("src").unwrap(),
            target: l.node("tgt").unwrap(),
            sync,
            speed: 0,
            granularity: DEFAULT_GRANULARITY,
            buf_size: DEFAULT_BUF_SIZE,
            auto_finalize: true,
            auto_dismiss: true,
            open_backing_chain: false,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
        }
    }

    #[test]
    fn mirror_reaches_ready_and_cancel_after_ready_completes() {
        let l = layer_with(8 << 20);
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j0", SyncMode::Full)).unwrap();
        let ready = wait_for(&rx, "BLOCK_JOB_READY");
        assert_eq!(
            ready,
            json!({"device": "j0", "len": 8 << 20, "offset": 8 << 20, "speed": 0, "type": "mirror"})
        );
        // While it runs, the target cannot be handed over and cannot be deleted.
        assert!(l
            .inactivate_all()
            .unwrap_err()
            .to_string()
            .contains("block job 'j0'"));
        assert_eq!(
            l.blockdev_del("tgt").unwrap_err().to_string(),
            "Node tgt is in use"
        );
        assert_eq!(
            l.blockdev_del("src").unwrap_err().to_string(),
            "Node 'src' is busy: block device is in use by block job: mirror"
        );
        m.cancel("j0", false).unwrap();
        let done = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert!(done.get("error").is_none());
        // Whoever has seen the event finds the job gone (QEMU's ordering).
        assert!(m.jobs().is_empty());
        loop {
            let d = wait_for(&rx, "JOB_STATUS_CHANGE");
            if d["status"] == "null" {
                break;
            }
        }
        assert!(m.jobs().is_empty());
        // The claims went with the job.
        l.inactivate_all().unwrap();
    }

    #[test]
    fn cancel_before_ready_is_cancelled_and_force_too() {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "src", "size": 64 << 20, "latency-ns": 20_000_000}))
            .unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "tgt", "size": 64 << 20}))
            .unwrap();
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j1", SyncMode::Full)).unwrap();
        assert_eq!(
            m.complete("j1").unwrap_err().to_string(),
            "Job 'j1' in state 'running' cannot accept command verb 'complete'"
        );
        m.cancel("j1", false).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
        assert_eq!(
            m.cancel("nope", false).unwrap_err().to_string(),
            "Block job 'nope' not found"
        );
    }

    #[test]
    fn checks_ids_and_nodes_like_qemu() {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "src", "size": 64 << 20, "latency-ns": 5_000_000}))
            .unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "tgt", "size": 64 << 20}))
            .unwrap();
        let (m, rx) = manager(&l);
        let src = l.node("src").unwrap();
        let tgt = l.node("tgt").unwrap();
        assert_eq!(
            m.check_id("1j", &src, &tgt).unwrap_err().to_string(),
            "Invalid job ID '1j'"
        );
        assert_eq!(
            m.check_id("j", &src, &src).unwrap_err().to_string(),
            "Can't mirror node into itself"
        );
        m.start_mirror(cfg(&l, "j0", SyncMode::Full)).unwrap();
        assert_eq!(
            m.check_nodes(&src, &tgt).unwrap_err().to_string(),
            "Need a root block node"
        );
        m.cancel("j0", true).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    /// `block-job-complete` moves the drive onto the target (QEMU's pivot) and closes the
    /// source node nobody uses any more; `block-job-cancel` of a ready job leaves the drive
    /// where it was. Before, completion never pivoted.
    #[test]
    fn complete_moves_the_drive_to_the_target_and_cancel_after_ready_does_not() {
        let l = Arc::new(BlockLayer::new());
        l.drive_add(&block::DriveSpec {
            id: "d".into(),
            interface: block::DriveInterface::None,
            options: json!({"driver": "null-co", "node-name": "src", "size": 8 << 20,
                            "read-zeroes": true}),
            backing_node_name: None,
        })
        .unwrap();
        for t in ["tgt", "tgt2"] {
            l.blockdev_add(
                &json!({"driver": "null-co", "node-name": t, "size": 8 << 20, "read-zeroes": true}),
            )
            .unwrap();
        }
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j0", SyncMode::Full)).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        m.cancel("j0", false).unwrap();
        wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert_eq!(l.lookup_bs(Some("d"), None).unwrap().name(), "src");

        let mut c = cfg(&l, "j1", SyncMode::Full);
        c.target = l.node("tgt2").unwrap();
        m.start_mirror(c).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        m.complete("j1").unwrap();
        let done = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert!(done.get("error").is_none(), "{done}");
        assert_eq!(l.lookup_bs(Some("d"), None).unwrap().name(), "tgt2");
        assert!(l.node("src").is_none(), "the old source is still open");
        assert!(l.node("tgt").is_some());
    }

    /// A job started for a QMP command copies nothing, and reports nothing beyond `created`
    /// and `running`, until its hold is dropped (after the command's reply), but tracks writes
    /// from the start. Before, a quick job could report `ready` ahead of the reply.
    #[test]
    fn a_held_job_waits_for_its_release_and_misses_no_write() {
        let l = layer_with(8 << 20);
        let (m, rx) = manager(&l);
        let job = m.start_mirror_held(cfg(&l, "j0", SyncMode::None)).unwrap();
        let hold = job.hold();
        l.node("src").unwrap().write_at(4096, b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let seen: Vec<Value> = rx.try_iter().map(|(_, d)| d["status"].clone()).collect();
        assert_eq!(seen, [json!("created"), json!("running")]);
        assert_eq!(job.status(), Status::Running);
        drop(hold);
        let ready = wait_for(&rx, "BLOCK_JOB_READY");
        assert_eq!(
            ready["len"], 65536,
            "the write before the release is copied: {ready}"
        );
        m.cancel("j0", true).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    /// Without `auto-finalize` the pivot is part of `job-finalize` (QEMU's `prepare`): the
    /// drive stays on the source while the job waits `pending`.
    #[test]
    fn without_auto_finalize_the_pivot_waits_for_finalize() {
        let l = Arc::new(BlockLayer::new());
        l.drive_add(&block::DriveSpec {
            id: "d".into(),
            interface: block::DriveInterface::None,
            options: json!({"driver": "null-co", "node-name": "src", "size": 8 << 20,
                            "read-zeroes": true}),
            backing_node_name: None,
        })
        .unwrap();
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "tgt", "size": 8 << 20, "read-zeroes": true}),
        )
        .unwrap();
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.auto_finalize = false;
        m.start_mirror(c).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        m.complete("j0").unwrap();
        wait_for(&rx, "BLOCK_JOB_PENDING");
        assert_eq!(l.lookup_bs(Some("d"), None).unwrap().name(), "src");
        m.finalize(&m.find("j0").unwrap()).unwrap();
        let done = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert!(done.get("error").is_none(), "{done}");
        assert_eq!(l.lookup_bs(Some("d"), None).unwrap().name(), "tgt");
    }

    /// A pivot livemig cannot make (the source has a guest device, which holds the node it
    /// was given) is refused by `block-job-complete` itself, saying so; the job stays ready.
    #[test]
    fn complete_refuses_to_move_a_guest_device() {
        let l = layer_with(8 << 20);
        l.attach_device("src", "", "/machine/peripheral/vd0/virtio-backend")
            .unwrap();
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j0", SyncMode::Full)).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        assert_eq!(
            m.complete("j0").unwrap_err().to_string(),
            "livemig cannot yet move the guest device /machine/peripheral/vd0/virtio-backend of \
             'src' onto the mirror's target"
        );
        assert_eq!(m.find("j0").unwrap().status(), Status::Ready);
        m.cancel("j0", true).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    #[test]
    fn size_mismatch_fails_the_job() {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "src", "size": 64 << 20}))
            .unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "tgt", "size": 32 << 20}))
            .unwrap();
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j1", SyncMode::Full)).unwrap();
        let d = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert_eq!(
            d,
            json!({"device": "j1", "len": 0, "offset": 0, "speed": 0, "type": "mirror",
                   "error": "Source and target image have different sizes"})
        );
    }

    #[test]
    fn mirror_copies_files_and_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        let size = 4u64 << 20;
        let mut data = vec![0u8; size as usize];
        for (i, x) in data.iter_mut().enumerate() {
            *x = (i * 7 % 251) as u8;
        }
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, vec![0u8; size as usize]).unwrap();
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(&json!({"driver": "raw", "node-name": "src",
            "file": {"driver": "file", "filename": a.to_str().unwrap()}}))
            .unwrap();
        l.blockdev_add(&json!({"driver": "raw", "node-name": "tgt",
            "file": {"driver": "file", "filename": b.to_str().unwrap()}}))
            .unwrap();
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.granularity = 4096;
        c.buf_size = 256 << 10;
        m.start_mirror(c).unwrap();
        let src = l.node("src").unwrap();
        // Writes during the copy and after ready both reach the target.
        src.write_at(12345, b"during").unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        src.write_at(3 << 20, b"after ready").unwrap();
        m.complete("j0").unwrap();
        wait_for(&rx, "BLOCK_JOB_COMPLETED");
        data[12345..12351].copy_from_slice(b"during");
        data[3 << 20..(3 << 20) + 11].copy_from_slice(b"after ready");
        let mut got = vec![0u8; size as usize];
        l.node("tgt").unwrap().read_at(0, &mut got).unwrap();
        assert!(got == data, "target differs from source");
    }

    #[test]
    fn a_target_that_stops_taking_writes_ends_the_job_with_the_error() {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(
            &json!({"driver": "null-co", "node-name": "src", "size": 64 << 20,
            "latency-ns": 2_000_000}),
        )
        .unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "tgt", "size": 64 << 20}))
            .unwrap();
        let (m, rx) = manager(&l);
        m.start_mirror(cfg(&l, "j0", SyncMode::Full)).unwrap();
        // Pulled from under the job (not through inactivate_all, which the claim refuses).
        l.node("tgt").unwrap().inactivate().unwrap();
        let e = wait_for(&rx, "BLOCK_JOB_ERROR");
        assert_eq!(
            e,
            json!({"device": "j0", "operation": "write", "action": "report"})
        );
        let d = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert_eq!(d["error"], "Operation not permitted");
        loop {
            if wait_for(&rx, "JOB_STATUS_CHANGE")["status"] == "null" {
                break;
            }
        }
        // The source's internal bitmap went with the job.
        assert!(l.node("src").unwrap().bitmaps().is_empty());
    }

    #[test]
    fn speed_limits_the_copy() {
        let l = layer_with(64 << 20);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.speed = 4 << 20;
        let started = Instant::now();
        m.start_mirror(c).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let off = m.find("j0").unwrap().info()["offset"].as_u64().unwrap();
        // No more than 4 MiB/s over the time it has run, plus the buffer (1 MiB) it may copy
        // each time it finds itself within the rate, once per one-second period. The time is
        // measured, not the 300 ms slept: a loaded machine may run this thread late, and the
        // job copies on meanwhile (about 1.2 MiB + 1 MiB here).
        let t = started.elapsed().as_secs_f64();
        let most = (4 << 20) as f64 * t + (DEFAULT_BUF_SIZE as f64) * (1.0 + t.floor());
        assert!(
            off as f64 <= most,
            "copied {off} bytes in {t:.3} s at 4 MiB/s"
        );
        m.set_speed("j0", 0).unwrap();
        let ready = wait_for(&rx, "BLOCK_JOB_READY");
        assert_eq!(ready["offset"], 64 << 20);
        assert_eq!(ready["speed"], 0);
        m.cancel("j0", true).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    /// The statuses of `id`'s JOB_STATUS_CHANGE events until one is `until`.
    fn statuses_until(rx: &mpsc::Receiver<(String, Value)>, until: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let d = wait_for(rx, "JOB_STATUS_CHANGE");
            let st = d["status"].as_str().unwrap().to_string();
            out.push(st.clone());
            if st == until {
                return out;
            }
        }
    }

    #[test]
    fn a_paused_job_stops_copying_until_resumed_and_pauses_as_standby_when_ready() {
        let l = layer_with(64 << 20);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.speed = 1 << 20;
        c.buf_size = 256 << 10;
        m.start_mirror(c).unwrap();
        let j = m.find("j0").unwrap();
        m.pause(&j).unwrap();
        assert_eq!(
            m.pause(&j).unwrap_err().to_string(),
            "Job is already paused"
        );
        assert_eq!(
            statuses_until(&rx, "paused"),
            ["created", "running", "paused"]
        );
        let info = j.info();
        assert_eq!(
            (info["paused"].clone(), info["busy"].clone()),
            (json!(true), json!(false))
        );
        let off = info["offset"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            j.info()["offset"].as_u64().unwrap(),
            off,
            "a paused job copied"
        );
        // A paused job still takes a new speed.
        m.set_speed("j0", 0).unwrap();
        m.resume(&j).unwrap();
        assert_eq!(
            m.resume(&j).unwrap_err().to_string(),
            "Can't resume a job that was not paused"
        );
        wait_for(&rx, "BLOCK_JOB_READY");
        m.pause(&j).unwrap();
        // (`ready`'s own status change went by before BLOCK_JOB_READY.)
        assert_eq!(statuses_until(&rx, "standby"), ["standby"]);
        assert_eq!(j.info()["ready"], true);
        // A job paused while ready takes complete, and completes once resumed.
        m.complete("j0").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(j.status(), Status::Standby);
        m.resume(&j).unwrap();
        assert_eq!(
            statuses_until(&rx, "null"),
            ["ready", "waiting", "pending", "concluded", "null"]
        );
    }

    #[test]
    fn without_auto_finalize_a_done_job_waits_pending_holding_its_nodes() {
        let l = layer_with(8 << 20);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.auto_finalize = false;
        m.start_mirror(c).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        let j = m.find("j0").unwrap();
        assert_eq!(
            m.finalize(&j).unwrap_err().to_string(),
            "Job 'j0' in state 'ready' cannot accept command verb 'finalize'"
        );
        m.complete("j0").unwrap();
        assert_eq!(
            wait_for(&rx, "BLOCK_JOB_PENDING"),
            json!({"type": "mirror", "id": "j0"})
        );
        assert_eq!(j.status(), Status::Pending);
        assert_eq!(j.info()["auto-finalize"], false);
        assert!(
            l.inactivate_all().is_err(),
            "a pending job let its target go"
        );
        // A soft cancel of a job whose work is over does nothing.
        m.cancel("j0", false).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(j.status(), Status::Pending);
        m.finalize(&j).unwrap();
        let done = wait_for(&rx, "BLOCK_JOB_COMPLETED");
        assert!(done.get("error").is_none());
        assert_eq!(statuses_until(&rx, "null"), ["concluded", "null"]);
        assert!(m.jobs().is_empty());
        l.inactivate_all().unwrap();
    }

    #[test]
    fn a_forced_cancel_aborts_a_pending_job() {
        let l = layer_with(8 << 20);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.auto_finalize = false;
        c.auto_dismiss = false;
        m.start_mirror(c).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        m.complete("j0").unwrap();
        wait_for(&rx, "BLOCK_JOB_PENDING");
        let j = m.find("j0").unwrap();
        m.cancel_job(&j, true).unwrap();
        assert_eq!(statuses_until(&rx, "concluded"), ["aborting", "concluded"]);
        assert_eq!(j.job_info()["error"], "Operation canceled");
    }

    #[test]
    fn without_auto_dismiss_an_ended_job_stays_concluded_with_its_error_until_dismissed() {
        let l = Arc::new(BlockLayer::new());
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "src", "size": 64 << 20}))
            .unwrap();
        l.blockdev_add(&json!({"driver": "null-co", "node-name": "tgt", "size": 32 << 20}))
            .unwrap();
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.auto_dismiss = false;
        m.start_mirror(c).unwrap();
        assert_eq!(
            statuses_until(&rx, "concluded"),
            ["created", "running", "aborting", "concluded"]
        );
        let j = m.find("j0").unwrap();
        let why = "Source and target image have different sizes";
        assert_eq!(j.job_info()["error"], why);
        assert_eq!(j.info()["error"], why);
        assert_eq!(j.info()["auto-dismiss"], false);
        for (verb, r) in [
            ("cancel", m.cancel_job(&j, true)),
            ("pause", m.pause(&j)),
            ("complete", m.complete_job(&j)),
            ("set-speed", m.set_speed("j0", 1)),
        ] {
            assert_eq!(
                r.unwrap_err().to_string(),
                format!("Job 'j0' in state 'concluded' cannot accept command verb '{verb}'")
            );
        }
        // Its nodes are free once it ended; its id is not.
        l.inactivate_all().unwrap();
        assert_eq!(
            m.check_id("j0", &l.node("src").unwrap(), &l.node("tgt").unwrap())
                .unwrap_err()
                .to_string(),
            "Job ID 'j0' already in use"
        );
        m.dismiss(&j).unwrap();
        assert_eq!(statuses_until(&rx, "null"), ["null"]);
        assert!(m.jobs().is_empty());
        assert_eq!(m.find_job("j0").unwrap_err().to_string(), "Job not found");
    }

    #[test]
    fn a_cancel_resumes_a_paused_job() {
        let l = layer_with(64 << 20);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.speed = 1 << 20;
        m.start_mirror(c).unwrap();
        let j = m.find("j0").unwrap();
        m.pause(&j).unwrap();
        statuses_until(&rx, "paused");
        m.cancel_job(&j, false).unwrap();
        assert!(!j.user_paused());
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    /// Reads (`read`) or writes touching `[start, end)` fail with `errno`, `times` more times
    /// (`u32::MAX`: until cleared).
    struct Fault {
        read: bool,
        errno: Errno,
        start: u64,
        end: u64,
        times: u32,
    }

    /// A disk in memory whose reads or writes fail with an errno on request: the way a test
    /// makes a source unreadable or a target full.
    #[derive(Default)]
    struct Faults {
        data: Mutex<Vec<u8>>,
        fail: Mutex<Option<Fault>>,
        /// Flushes fail with this errno until cleared.
        flush_fails: Mutex<Option<Errno>>,
    }

    impl Faults {
        fn set(&self, read: bool, errno: Errno, start: u64, end: u64, times: u32) {
            *lock(&self.fail) = Some(Fault {
                read,
                errno,
                start,
                end,
                times,
            });
        }
        fn clear(&self) {
            *lock(&self.fail) = None;
        }
        fn check(&self, read: bool, offset: u64, len: u64) -> Result<(), BlockError> {
            let mut f = lock(&self.fail);
            if let Some(f) = f.as_mut() {
                if f.read == read && offset < f.end && offset + len > f.start && f.times > 0 {
                    if f.times != u32::MAX {
                        f.times -= 1;
                    }
                    return Err(BlockError::Io(f.errno));
                }
            }
            Ok(())
        }
    }

    struct FaultyDisk(Arc<Faults>);

    impl block::driver::BlockDriver for FaultyDisk {
        fn format_name(&self) -> &'static str {
            "faulty"
        }
        fn length(&self) -> Result<u64, BlockError> {
            Ok(lock(&self.0.data).len() as u64)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.0.check(true, offset, buf.len() as u64)?;
            let o = offset as usize;
            buf.copy_from_slice(&lock(&self.0.data)[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
            self.0.check(false, offset, buf.len() as u64)?;
            let o = offset as usize;
            lock(&self.0.data)[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), BlockError> {
            self.write_at(offset, &vec![0; len as usize])
        }
        fn supports_discard(&self) -> bool {
            false
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            match *lock(&self.0.flush_fails) {
                Some(e) => Err(BlockError::Io(e)),
                None => Ok(()),
            }
        }
        fn truncate(&self, _: u64) -> Result<(), BlockError> {
            Err(BlockError::ResizeUnsupported)
        }
        fn info(&self) -> Option<block::driver::DriverInfo> {
            None
        }
        fn allocated_size(&self) -> u64 {
            0
        }
        fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
            Vec::new()
        }
        fn filename(&self) -> block::driver::FilenameInfo {
            block::driver::FilenameInfo {
                exact: None,
                options: serde_json::Map::new(),
            }
        }
    }

    const FAULTY_SIZE: usize = 4 << 20;

    /// `src` (a pattern) and `tgt` (zeroes), both [`FaultyDisk`]s of 4 MiB, and their faults.
    fn faulty_layer() -> (Arc<BlockLayer>, Arc<Faults>, Arc<Faults>) {
        let l = Arc::new(BlockLayer::new());
        let src = Arc::new(Faults::default());
        *lock(&src.data) = (0..FAULTY_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let tgt = Arc::new(Faults::default());
        *lock(&tgt.data) = vec![0; FAULTY_SIZE];
        for (name, f) in [("src", &src), ("tgt", &tgt)] {
            l.insert_node(name, Box::new(FaultyDisk(f.clone())), Default::default())
                .unwrap();
        }
        (l, src, tgt)
    }

    /// The job's `query-block-jobs` fields a pause by an error changes.
    fn pause_fields(j: &Job) -> Value {
        let i = j.info();
        json!({"io-status": i["io-status"], "status": i["status"], "paused": i["paused"],
               "busy": i["busy"], "ready": i["ready"]})
    }

    /// `stop` (and `enospc` on ENOSPC): the error is announced with `action: "stop"`, the job
    /// pauses as a user pause with `io-status` saying why, copies nothing more, and a resume
    /// resets `io-status` and retries the area, so the target ends equal to the source.
    #[test]
    fn stop_pauses_the_job_until_resumed_and_the_area_is_copied_again() {
        for (policy, errno, io_status) in [
            (OnError::Enospc, Errno::ENOSPC, "nospace"),
            (OnError::Stop, Errno::ENOSPC, "nospace"),
            (OnError::Stop, Errno::EIO, "failed"),
            (OnError::Auto, Errno::ENOSPC, "nospace"),
        ] {
            let (l, src, tgt) = faulty_layer();
            tgt.set(false, errno, 2 << 20, 3 << 20, u32::MAX);
            let (m, rx) = manager(&l);
            let mut c = cfg(&l, "j0", SyncMode::Full);
            c.on_target_error = policy;
            c.buf_size = 256 << 10;
            m.start_mirror(c).unwrap();
            let e = wait_for(&rx, "BLOCK_JOB_ERROR");
            assert_eq!(
                e,
                json!({"device": "j0", "operation": "write", "action": "stop"}),
                "{policy:?} {errno}"
            );
            assert_eq!(statuses_until(&rx, "paused"), ["paused"]);
            let j = m.find("j0").unwrap();
            assert_eq!(
                pause_fields(&j),
                json!({"io-status": io_status, "status": "paused", "paused": true,
                       "busy": false, "ready": false})
            );
            assert!(j.user_paused());
            assert_eq!(m.pause(&j).unwrap_err(), JobError::AlreadyPaused);
            let off = j.info()["offset"].as_u64().unwrap();
            assert_eq!(off, 2 << 20, "{policy:?}: copied past the failed area");
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(
                j.info()["offset"].as_u64().unwrap(),
                off,
                "a stopped job copied"
            );
            // The target has room again; the resume retries the area.
            tgt.clear();
            m.resume(&j).unwrap();
            assert_eq!(j.info()["io-status"], "ok");
            wait_for(&rx, "BLOCK_JOB_READY");
            m.complete("j0").unwrap();
            let done = wait_for(&rx, "BLOCK_JOB_COMPLETED");
            assert!(done.get("error").is_none(), "{done}");
            assert!(
                *lock(&tgt.data) == *lock(&src.data),
                "{policy:?}: target differs"
            );
        }
    }

    /// A read error of the source with `on-source-error=stop`: `operation: "read"`,
    /// `io-status` `failed`; a job paused by an error takes a forced cancel (which clears
    /// the pause and the status, as QEMU's resume does).
    #[test]
    fn a_source_read_error_stops_the_job_and_a_forced_cancel_ends_it() {
        let (l, src, _tgt) = faulty_layer();
        src.set(true, Errno::EIO, 1 << 20, (1 << 20) + 1, u32::MAX);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.on_source_error = OnError::Stop;
        // A target error policy does not apply to reads.
        c.on_target_error = OnError::Ignore;
        m.start_mirror(c).unwrap();
        assert_eq!(
            wait_for(&rx, "BLOCK_JOB_ERROR"),
            json!({"device": "j0", "operation": "read", "action": "stop"})
        );
        assert_eq!(statuses_until(&rx, "paused"), ["paused"]);
        let j = m.find("j0").unwrap();
        assert_eq!(j.info()["io-status"], "failed");
        assert_eq!(
            m.complete("j0").unwrap_err().to_string(),
            "Job 'j0' in state 'paused' cannot accept command verb 'complete'"
        );
        m.cancel_job(&j, true).unwrap();
        assert_eq!(j.info()["io-status"], "ok");
        assert_eq!(
            statuses_until(&rx, "null"),
            ["running", "aborting", "concluded", "null"]
        );
    }

    /// `enospc` stops on ENOSPC only: any other error is reported, and the job fails with
    /// it; `report` fails on ENOSPC too. `io-status` stays `ok` for a reported error.
    #[test]
    fn enospc_reports_other_errors_and_report_fails_on_enospc() {
        for (policy, errno, why) in [
            (OnError::Enospc, Errno::EIO, "Input/output error"),
            (OnError::Auto, Errno::EPERM, "Operation not permitted"),
            (OnError::Report, Errno::ENOSPC, "No space left on device"),
        ] {
            let (l, _src, tgt) = faulty_layer();
            tgt.set(false, errno, 0, 1, u32::MAX);
            let (m, rx) = manager(&l);
            let mut c = cfg(&l, "j0", SyncMode::Full);
            c.on_target_error = policy;
            c.auto_dismiss = false;
            m.start_mirror(c).unwrap();
            assert_eq!(
                wait_for(&rx, "BLOCK_JOB_ERROR"),
                json!({"device": "j0", "operation": "write", "action": "report"})
            );
            assert_eq!(wait_for(&rx, "BLOCK_JOB_COMPLETED")["error"], why);
            let j = m.find("j0").unwrap();
            assert_eq!(
                pause_fields(&j),
                json!({"io-status": "ok", "status": "concluded", "paused": false,
                       "busy": false, "ready": false})
            );
        }
    }

    /// `ignore`: each failure is announced with `action: "ignore"` and the job goes on; the
    /// failed area stays dirty and is copied once it can be, so the job still becomes ready
    /// and the target equals the source.
    #[test]
    fn ignore_goes_on_and_copies_the_failed_area_later() {
        let (l, src, tgt) = faulty_layer();
        tgt.set(false, Errno::EIO, 1 << 20, 2 << 20, 3);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.on_target_error = OnError::Ignore;
        c.buf_size = 256 << 10;
        m.start_mirror(c).unwrap();
        let mut errors = Vec::new();
        loop {
            let (n, d) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            match n.as_str() {
                "BLOCK_JOB_ERROR" => errors.push(d),
                "BLOCK_JOB_READY" => break,
                "JOB_STATUS_CHANGE" => assert_ne!(d["status"], "paused", "{d}"),
                _ => {}
            }
        }
        assert_eq!(
            errors,
            vec![json!({"device": "j0", "operation": "write", "action": "ignore"}); 3]
        );
        let j = m.find("j0").unwrap();
        assert_eq!(j.info()["io-status"], "ok");
        assert_eq!(j.info()["offset"], FAULTY_SIZE);
        m.complete("j0").unwrap();
        assert!(wait_for(&rx, "BLOCK_JOB_COMPLETED").get("error").is_none());
        assert!(*lock(&tgt.data) == *lock(&src.data));
    }

    /// `ignore` with an error that never goes away: like QEMU, the job retries the area for
    /// ever, announcing each failure, never ready; a cancel still ends it.
    #[test]
    fn ignore_with_a_lasting_error_never_converges_and_cancel_ends_it() {
        let (l, src, _tgt) = faulty_layer();
        src.set(true, Errno::EIO, 0, 1, u32::MAX);
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.on_source_error = OnError::Ignore;
        m.start_mirror(c).unwrap();
        for _ in 0..5 {
            assert_eq!(
                wait_for(&rx, "BLOCK_JOB_ERROR"),
                json!({"device": "j0", "operation": "read", "action": "ignore"})
            );
        }
        let j = m.find("j0").unwrap();
        assert_eq!(j.status(), Status::Running);
        // The failed area (one buffer) stays dirty.
        let i = j.info();
        assert_eq!(
            i["len"].as_u64().unwrap() - i["offset"].as_u64().unwrap(),
            DEFAULT_BUF_SIZE
        );
        m.cancel("j0", false).unwrap();
        wait_for(&rx, "BLOCK_JOB_CANCELLED");
    }

    /// An error while ready with `stop`: the job parks `standby`, still ready; complete is
    /// accepted there and takes effect once the job is resumed and the area copied.
    #[test]
    fn a_stop_while_ready_parks_standby_and_completes_after_resume() {
        let (l, src, tgt) = faulty_layer();
        let (m, rx) = manager(&l);
        let mut c = cfg(&l, "j0", SyncMode::Full);
        c.on_target_error = OnError::Stop;
        m.start_mirror(c).unwrap();
        wait_for(&rx, "BLOCK_JOB_READY");
        tgt.set(false, Errno::ENOSPC, 0, FAULTY_SIZE as u64, u32::MAX);
        l.node("src").unwrap().write_at(4096, b"new").unwrap();
        assert_eq!(
            wait_for(&rx, "BLOCK_JOB_ERROR"),
            json!({"device": "j0", "operation": "write", "action": "stop"})
        );
        assert_eq!(statuses_until(&rx, "standby"), ["standby"]);
        let j = m.find("j0").unwrap();
        assert_eq!(
            pause_fields(&j),
            json!({"io-status": "nospace", "status": "standby", "paused": true,
                   "busy": false, "ready": true})
        );
        m.complete("j0").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(j.status(), Status::Standby);
        tgt.clear();
        m.resume(&j).unwrap();
        assert!(wait_for(&rx, "BLOCK_JOB_COMPLETED").get("error").is_none());
        assert!(*lock(&tgt.data) == *lock(&src.data));
    }

    /// The target is flushed before the job is called ready, as QEMU does, and a flush that
    /// fails is a failed write for `on-target-error`: with `stop` the job pauses before ready
    /// and flushes again once resumed; with `report` it fails.
    #[test]
    fn a_failed_flush_goes_to_the_target_error_policy() {
        for policy in [OnError::Stop, OnError::Report] {
            let (l, src, tgt) = faulty_layer();
            *lock(&tgt.flush_fails) = Some(Errno::EIO);
            let (m, rx) = manager(&l);
            let mut c = cfg(&l, "j0", SyncMode::Full);
            c.on_target_error = policy;
            m.start_mirror(c).unwrap();
            let action = if policy == OnError::Stop {
                "stop"
            } else {
                "report"
            };
            assert_eq!(
                wait_for(&rx, "BLOCK_JOB_ERROR"),
                json!({"device": "j0", "operation": "write", "action": action})
            );
            if policy == OnError::Report {
                assert_eq!(
                    wait_for(&rx, "BLOCK_JOB_COMPLETED")["error"],
                    "Input/output error"
                );
                continue;
            }
            assert_eq!(statuses_until(&rx, "paused"), ["paused"]);
            let j = m.find("j0").unwrap();
            assert_eq!(j.info()["io-status"], "failed");
            assert_eq!(j.info()["offset"], FAULTY_SIZE, "everything was copied");
            *lock(&tgt.flush_fails) = None;
            m.resume(&j).unwrap();
            wait_for(&rx, "BLOCK_JOB_READY");
            m.complete("j0").unwrap();
            assert!(wait_for(&rx, "BLOCK_JOB_COMPLETED").get("error").is_none());
            assert!(*lock(&tgt.data) == *lock(&src.data));
        }
    }
}
