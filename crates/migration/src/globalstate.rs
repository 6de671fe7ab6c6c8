//! QEMU's `globalstate` section: the source's run state at switchover, so the destination
//! resumes the guest only if it was running (a paused guest stays paused).
//!
//! Body (104 bytes): be32 `strlen(runstate) + 1`, then a 100-byte NUL-padded buffer. QEMU 7.2
//! writes the run state name in the first 32 bytes and zeros after; master adds two flag bytes
//! at offsets 32/33 that 7.2 ignores. livemig writes the 7.2 layout and reads both.

use crate::error::MigrationError;
use crate::machine::{DeviceState, Reader, Writer};
use crate::runstate::RunState;
use std::sync::Mutex;
use wire::vmstate::{FieldKind, VmsdDesc};

/// Section idstr.
pub const GLOBALSTATE_IDSTR: &str = "globalstate";
const RUNSTATE_BUF: usize = 100;

/// The `globalstate` section of one migration: on the source it holds the run state stored
/// at switchover; on the destination, the one received.
#[derive(Default)]
pub struct GlobalState {
    state: Mutex<Option<RunState>>,
}

impl GlobalState {
    /// Records the run state to send (QEMU's `global_state_store`).
    pub fn store(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// The run state received, if the section arrived.
    pub fn received(&self) -> Option<RunState> {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DeviceState for GlobalState {
    fn idstr(&self) -> String {
        GLOBALSTATE_IDSTR.into()
    }

    /// A source with `store-global-state=off` does not send it; the destination then runs
    /// the guest as `autostart` says, as QEMU's does.
    fn required_on_load(&self) -> bool {
        false
    }

    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new(GLOBALSTATE_IDSTR, 1)
            .field("size", FieldKind::U32)
            .field("runstate", FieldKind::Buffer(RUNSTATE_BUF))
    }

    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let name = self.received().unwrap_or(RunState::Running).as_str();
        let mut buf = [0u8; RUNSTATE_BUF];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        w.put_be32(name.len() as u32 + 1)?;
        w.put_bytes(&buf)?;
        Ok(())
    }

    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let _size = r.be32()?;
        let buf: [u8; RUNSTATE_BUF] = r.array()?;
        // The name ends at the first NUL within the first 32 bytes (master's layout puts flags
        // after it); QEMU ignores `size` too.
        let head = &buf[..32];
        let end = head.iter().position(|b| *b == 0).unwrap_or(head.len());
        let name = String::from_utf8_lossy(&head[..end]).into_owned();
        let state = RunState::parse(&name).ok_or_else(|| {
            MigrationError::Load(format!("globalstate: unknown run state '{name}'"))
        })?;
        self.store(state);
        Ok(())
    }
}
