//! The destination's side of postcopy's pause and recovery: the preempt thread (one per
//! connection), the wait for `migrate-recover`'s connections, and the answers to RECV_BITMAP.
//!
//! A paused destination keeps everything: guest RAM and the received maps (the source will
//! send exactly what is missing), the pending requests (re-sent after RESUME_ACK), the
//! incoming dirty bitmaps (QEMU drops them at the first error). Its vCPUs go on running,
//! except those on a missing page, which wait in the kernel until the page comes.

use super::fault::RpWriter;
use super::PostcopyRam;
use crate::error::MigrationError;
use crate::machine::Reader;
use crate::secure::TlsParams;
use crate::state::Shared;
use crate::transport::ShutdownHandle;
use std::sync::Arc;
use std::thread::JoinHandle;
use wire::StreamReader;

/// A running `postcopy-preempt` thread and its channel.
pub struct PreemptThread {
    handle: JoinHandle<Result<u64, MigrationError>>,
    shutdown: ShutdownHandle,
}

impl PreemptThread {
    /// Starts the thread on channel `r`: it places pages until the channel's EOS. If it
    /// fails, it shuts `main` down too, so that the listen thread (blocked on the main
    /// channel) sees the failure and pauses.
    pub fn spawn(
        pc: Arc<PostcopyRam>,
        mut r: Reader,
        shutdown: ShutdownHandle,
        main: Option<ShutdownHandle>,
    ) -> Result<Self, MigrationError> {
        let handle = std::thread::Builder::new()
            .name("postcopy-preempt".into())
            .spawn(move || {
                let res = super::preempt::load_preempt_channel(&mut r, &pc);
                if let (Err(e), Some(m)) = (&res, &main) {
                    log::warn!("postcopy preempt channel: {e}");
                    m.shutdown();
                }
                res
            })
            .map_err(|e| MigrationError::io("cannot start the postcopy preempt thread", e))?;
        Ok(PreemptThread { handle, shutdown })
    }

    /// Waits for the thread (after EOF on the main channel it ends at the channel's EOS).
    pub fn join(self) -> Result<u64, MigrationError> {
        self.handle.join().unwrap_or_else(|_| {
            Err(MigrationError::Other(
                "the postcopy preempt thread panicked".into(),
            ))
        })
    }

    /// Shuts the channel down and waits for the thread.
    pub fn stop(self) {
        self.shutdown.shutdown();
        let _ = self.join();
    }
}

/// The connections of a recovery, accepted on `migrate-recover`'s listener.
pub struct Recovered {
    /// The main channel, carrying the rest of the stream (no file header).
    pub reader: Reader,
    /// Its return path.
    pub rp: RpWriter,
    /// Shuts the main channel down.
    pub shutdown: ShutdownHandle,
    /// The preempt channel, with `postcopy-preempt`.
    pub preempt: Option<(Reader, ShutdownHandle)>,
}

/// Waits in `postcopy-paused` for `migrate-recover`, then for the source's connections on
/// its listener (main first, then preempt, as at setup). Returns `None` when the VM shuts
/// down. A connection that fails (TLS refused, say) is logged and waited for again.
pub fn wait_for_recovery(
    shared: &Arc<Shared>,
    objects: &Arc<tls::Objects>,
    preempt: bool,
) -> Option<Recovered> {
    loop {
        let listener = shared.wait_recover()?;
        let (tls, stall): (TlsParams, _) = {
            let inner = shared.lock();
            (inner.params.tls(), inner.params.stall_timeout())
        };
        // Each connection gets the stall bound at once, as at setup: a source (or anyone)
        // that connects and then says nothing — no TLS handshake, no RECV_BITMAP — fails
        // the recovery after the bound and the destination pauses again, ready for the next
        // `migrate-recover`, instead of waiting on it for good.
        let accept = || {
            listener
                .accept()
                .inspect(|c| {
                    c.shutdown.set_stall_timeout(true, true, stall);
                })
                .and_then(|c| crate::secure::secure_incoming(c, &tls, objects))
        };
        let result = (|| {
            let mut conn = accept()?;
            let (Some(reader), Some(writer)) = (conn.reader.take(), conn.writer.take()) else {
                return Err(MigrationError::Other(
                    "the recovery channel has no return path".into(),
                ));
            };
            let pre = if preempt {
                // Watched while waiting, as at setup (`channel_wait`).
                crate::channel_wait::wait_for_preempt(
                    &listener,
                    &conn.shutdown,
                    stall,
                    !tls.enabled(),
                )?;
                let mut p = accept()?;
                // The preempt channel may then stay quiet for as long as no page is asked
                // for: its bound ends with the handshake, as at setup.
                p.shutdown.set_stall_timeout(true, true, None);
                let r = p.reader.take().ok_or_else(|| {
                    MigrationError::Other("the preempt channel has no incoming direction".into())
                })?;
                Some((
                    StreamReader::with_capacity(r, 64 * 1024),
                    p.shutdown.clone(),
                ))
            } else {
                None
            };
            Ok(Recovered {
                reader: StreamReader::with_capacity(reader, 256 * 1024),
                rp: RpWriter::new(writer),
                shutdown: conn.shutdown.clone(),
                preempt: pre,
            })
        })();
        match result {
            Ok(r) => return Some(r),
            Err(e) => {
                log::error!("postcopy recovery: {e}");
                if shared
                    .pause_incoming(format!(
                        "postcopy paused: the recovery connection failed ({e}); run migrate-recover again"
                    ))
                    .is_err()
                {
                    return None;
                }
            }
        }
    }
}
