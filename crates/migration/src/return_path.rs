//! The source's return path: the thread that reads what the destination sends back
//! (`wire::return_path` is the syntax) and what it means to the source — SHUT's verdict, the
//! PONGs that measure the destination's backlog, postcopy's page requests (checked by
//! [`SourceRam::resolve_request`], answered on the preempt channel or handed to
//! `migration-out`), and a postcopy recovery's received maps and RESUME_ACK.
//!
//! Everything here reads bytes a peer controls: a message that cannot be acted on ends the
//! thread with an [`RpEvent::Closed`] or [`RpEvent::Failed`] naming it, never a panic.

use crate::error::MigrationError;
use crate::policy::{Backlog, BACKLOG_PING};
use crate::postcopy::source::{PreemptSender, SourceRam};
use crate::transport::BoxRead;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use wire::return_path::{read_rp_message, RpMessage};
use wire::StreamReader;

/// Messages from the return-path thread, in the order it read them; the thread's last one
/// is `Shut`, `Closed` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpEvent {
    /// SHUT with its status (0 = the destination loaded everything).
    Shut(u32),
    /// The return path ended or carried something that is not a message (the reader's
    /// error, worded for the operator).
    Closed(String),
    /// A postcopy page request (checked): pages `first..end` of block number `block`, for
    /// `migration-out` to send (without preempt).
    Request {
        /// Block number, in [`SourceRam::blocks`] order.
        block: usize,
        /// First page.
        first: u64,
        /// One past the last page.
        end: u64,
    },
    /// The return-path thread could not do its part (a bad request, a broken preempt
    /// channel).
    Failed(String),
    /// Recovery: the destination's received map of block number `block`, turned into the
    /// pages still to send.
    RecvBitmap {
        /// Block number, in [`SourceRam::blocks`] order.
        block: usize,
        /// One bit per page still to send, bit `n` of word `n / 64`.
        dirty: Vec<u64>,
    },
    /// Recovery: RESUME_ACK with its value.
    ResumeAck(u32),
}

/// What the return-path thread shares with `migration-out`: the answers to the backlog
/// PINGs (`policy::Backlog`), and from the postcopy switch on what serving page requests
/// needs.
#[derive(Default)]
pub struct RpCtx {
    /// The pages still to send (requests are checked against it).
    pub(crate) src: OnceLock<Arc<SourceRam>>,
    /// With `postcopy-preempt`: where requested pages go, written by the return-path thread.
    pub(crate) preempt: OnceLock<Arc<PreemptSender>>,
    /// The last answer to a backlog PING, and when it arrived.
    answered: Mutex<Option<(u32, Instant)>>,
}

impl RpCtx {
    /// The postcopy switch: from now on page requests are checked against `src` and, without
    /// a preempt sender, handed to `migration-out`. False if it was set already.
    pub fn set_source(&self, src: Arc<SourceRam>) -> bool {
        self.src.set(src).is_ok()
    }

    /// With `postcopy-preempt`: requested pages are answered by the return-path thread on
    /// `p`'s channel. False if it was set already.
    pub fn set_preempt(&self, p: Arc<PreemptSender>) -> bool {
        self.preempt.set(p).is_ok()
    }

    /// The last answer to a backlog PING (a PONG with [`BACKLOG_PING`] set), and when it came.
    pub fn last_answer(&self) -> Option<(u32, Instant)> {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `backlog` the last answer to its PINGs, if one came.
    pub(crate) fn take_answer(&self, backlog: &mut Backlog) {
        if let Some((v, at)) = self.last_answer() {
            backlog.answered(v, at);
        }
    }

    /// RECV_BITMAP's dump for `ramblock` (`ram_dirty_bitmap_reload`): read whole, checked
    /// against the block, and turned into the pages the destination lacks.
    fn recv_bitmap(
        &self,
        r: &mut StreamReader<BoxRead>,
        ramblock: &str,
    ) -> Result<(usize, Vec<u64>), String> {
        let src = self
            .src
            .get()
            .ok_or_else(|| "RP: RECV_BITMAP before postcopy".to_string())?;
        let (bi, pages) = src
            .blocks()
            .enumerate()
            .find(|(_, (n, _))| *n == ramblock)
            .map(|(i, (_, p))| (i, p))
            .ok_or_else(|| format!("RP: RECV_BITMAP for unknown block '{ramblock}'"))?;
        let limit = crate::postcopy::received::dump_len(pages);
        let dump = wire::return_path::read_recv_bitmap_dump(r, ramblock, limit)
            .map_err(|e| format!("RP: {e}"))?;
        let dirty = crate::postcopy::received::dirty_from_dump(ramblock, pages, &dump)
            .map_err(|e| e.to_string())?;
        Ok((bi, dirty))
    }

    /// A request for `len` bytes at `offset` of `block`: checked, then answered on the
    /// preempt channel or handed to `migration-out`. Err ends the thread.
    fn request(
        &self,
        tx: &mpsc::Sender<RpEvent>,
        block: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), String> {
        let src = self
            .src
            .get()
            .ok_or_else(|| "RP: page request before postcopy".to_string())?;
        let (bi, first, end) = src.resolve_request(block, offset, len)?;
        src.counters()
            .postcopy_requests
            .fetch_add(1, Ordering::Relaxed);
        match self.preempt.get() {
            Some(p) => p
                .answer(bi, first, end)
                .map(|_| ())
                .map_err(|e| format!("postcopy preempt channel: {e}")),
            None => {
                let _ = tx.send(RpEvent::Request {
                    block: bi,
                    first,
                    end,
                });
                Ok(())
            }
        }
    }
}

/// What the source adds to a return-path error that is a TLS record: a destination that
/// asks for TLS (its `tls-creds`) answers a source without it with a TLS alert.
const TLS_PEER_HINT: &str = ": that is a TLS record: the destination speaks TLS, and this side \
                             has no tls-creds (both ends need them)";

/// Whether the return path's first bytes were a TLS record header (content type 21 or 22,
/// version 3.x) rather than a message: the destination runs TLS on a channel this side
/// opened in the clear.
fn speaks_tls(e: &wire::WireError) -> bool {
    match e.kind {
        wire::WireErrorKind::RpUnknownMessage { ty, .. } => {
            e.offset == 0 && matches!(ty.to_be_bytes(), [0x15 | 0x16, 3])
        }
        _ => false,
    }
}

/// Starts the return-path thread (`migration-rp`) on `reader`: it reads the destination's
/// messages, checks them against `ctx` (page requests, received maps) and reports each as an
/// [`RpEvent`]; it ends after SHUT, at the end of the reader, or at the first message it
/// cannot act on.
pub fn spawn(reader: BoxRead, ctx: Arc<RpCtx>) -> Result<mpsc::Receiver<RpEvent>, MigrationError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("migration-rp".into())
        .spawn(move || {
            let mut r = StreamReader::new(reader);
            // The block of the last REQ_PAGES_ID: REQ_PAGES names none.
            let mut block: Option<String> = None;
            loop {
                let result = match read_rp_message(&mut r) {
                    Ok(RpMessage::Shut(st)) => {
                        let _ = tx.send(RpEvent::Shut(st));
                        return;
                    }
                    Ok(RpMessage::Pong(v)) if v & BACKLOG_PING != 0 => {
                        *ctx.answered.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((v, Instant::now()));
                        Ok(())
                    }
                    Ok(RpMessage::Pong(_)) | Ok(RpMessage::SwitchoverAck) => Ok(()),
                    Ok(RpMessage::ReqPagesId {
                        start,
                        len,
                        ramblock,
                    }) => {
                        let r = ctx.request(&tx, &ramblock, start, u64::from(len));
                        block = Some(ramblock);
                        r
                    }
                    Ok(RpMessage::ReqPages { start, len }) => match &block {
                        Some(b) => ctx.request(&tx, b, start, u64::from(len)),
                        None => Err("RP: REQ_PAGES before any REQ_PAGES_ID".into()),
                    },
                    Ok(RpMessage::RecvBitmap { ramblock }) => {
                        match ctx.recv_bitmap(&mut r, &ramblock) {
                            Ok((block, dirty)) => {
                                let _ = tx.send(RpEvent::RecvBitmap { block, dirty });
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Ok(RpMessage::ResumeAck(v)) => {
                        let _ = tx.send(RpEvent::ResumeAck(v));
                        Ok(())
                    }
                    Err(e) => {
                        let mut why = format!("RP: {e}");
                        if speaks_tls(&e) {
                            why.push_str(TLS_PEER_HINT);
                        }
                        let _ = tx.send(RpEvent::Closed(why));
                        return;
                    }
                };
                if let Err(why) = result {
                    let _ = tx.send(RpEvent::Failed(why));
                    return;
                }
            }
        })
        .map_err(|e| MigrationError::io("cannot start the return-path thread", e))?;
    Ok(rx)
}

/// Collects the page requests the return path has delivered, waiting up to `wait` for the
/// first one (as `migration-out` does between postcopy batches). Anything else ends postcopy's
/// push with an error: the destination going away (a recovery follows), SHUT, a message of a
/// recovery.
pub fn drain_requests(
    rp: &mpsc::Receiver<RpEvent>,
    pending: &mut Vec<(usize, u64, u64)>,
    wait: Duration,
) -> Result<(), MigrationError> {
    let mut first = true;
    loop {
        let ev = if first && !wait.is_zero() {
            match rp.recv_timeout(wait) {
                Ok(ev) => Ok(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            }
        } else {
            match rp.try_recv() {
                Ok(ev) => Ok(ev),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            }
        };
        first = false;
        match ev {
            Ok(RpEvent::Request { block, first, end }) => pending.push((block, first, end)),
            Ok(RpEvent::Failed(why)) => return Err(MigrationError::Other(why)),
            Ok(RpEvent::RecvBitmap { .. } | RpEvent::ResumeAck(_)) => {
                return Err(MigrationError::Other(
                    "RP: recovery message outside a recovery".into(),
                ))
            }
            Ok(RpEvent::Shut(n)) => {
                return Err(MigrationError::Other(format!(
                    "the destination ended the migration (SHUT {n}) during postcopy"
                )))
            }
            Ok(RpEvent::Closed(why)) => {
                return Err(MigrationError::Other(format!(
                    "the destination went away during postcopy ({why})"
                )))
            }
            Err(()) => {
                return Err(MigrationError::Other(
                    "the return path ended during postcopy".into(),
                ))
            }
        }
    }
}
