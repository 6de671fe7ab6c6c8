//! What the engine needs from the VMM that embeds it.
//!
//! A VMM implements [`Machine`] once: its RAM blocks, its devices, its block layer and its run
//! state. Each device implements [`DeviceState`]: its section name, its layout (for the vmdesc
//! trailer and for `livemig analyze`), and how to save and load its body.
//!
//! Locking contract (seed 004): the engine calls these methods from the migration thread
//! without holding any lock of its own, and the VMM must not make them wait for the QMP thread
//! or for the migration thread. [`Machine::stop`] may wait for vCPU threads to park, because
//! vCPUs never wait for the engine.

use crate::error::MigrationError;
use crate::guest::RamBlock;
use crate::runstate::RunState;
use crate::transport::{BoxRead, BoxWrite};
use std::sync::Arc;
use wire::vmstate::VmsdDesc;
use wire::{StreamReader, StreamWriter};

/// The reader every section loader gets.
pub type Reader = StreamReader<BoxRead>;
/// The writer every section saver gets.
pub type Writer = StreamWriter<BoxWrite>;

/// A piece of non-iterable VM state, saved once at switchover as a FULL section.
pub trait DeviceState: Send + Sync {
    /// The section's idstr (e.g. `timer`).
    fn idstr(&self) -> String;
    /// Distinguishes identically named instances.
    fn instance_id(&self) -> u32 {
        0
    }
    /// The layout: name, version (the section's `version_id`), minimum version accepted on
    /// load, fields and subsections.
    fn vmsd(&self) -> VmsdDesc;
    /// Whether a destination must receive this section before it may run the guest: a stream
    /// that ends without it fails (its state would be whatever the destination started with —
    /// vCPUs at step 0, say). True unless the device is one a source may leave out (QEMU's
    /// `globalstate` with `store-global-state=off`).
    fn required_on_load(&self) -> bool {
        true
    }
    /// Whether the section is sent at all (QEMU's vmsd `needed`).
    fn needed(&self) -> bool {
        true
    }
    /// Writes the body (fields, then subsections). Called with the guest stopped.
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError>;
    /// Reads the body written by a peer at `version_id` (already checked against the vmsd's
    /// range). Called with the guest stopped, inside one memory-map batch for all devices.
    fn load(&self, r: &mut Reader, version_id: u32) -> Result<(), MigrationError>;
}

/// A VMM, as the engine sees it.
pub trait Machine: Send + Sync {
    /// The machine type sent in the configuration section (`none` for QEMU's `-M none`).
    /// A destination accepts a stream whose name is a prefix of its own, as QEMU does.
    fn machine_type(&self) -> String;
    /// RAM blocks, in the order they are listed on the wire.
    fn ram_blocks(&self) -> Vec<Arc<dyn RamBlock>>;
    /// The kernel thread id of each vCPU, by vCPU index: postcopy blocktime tells vCPUs from
    /// other threads that fault on guest RAM. Empty (the default) leaves blocktime empty.
    fn vcpu_thread_ids(&self) -> Vec<i32> {
        Vec::new()
    }
    /// Device state, in the order it is saved.
    fn devices(&self) -> Vec<Arc<dyn DeviceState>>;
    /// The block layer whose named bitmaps migrate with capability `dirty-bitmaps`.
    fn block_layer(&self) -> Option<Arc<block::BlockLayer>>;
    /// The current run state.
    fn runstate(&self) -> RunState;
    /// Stops the guest and enters `state`; returns once no vCPU runs, so guest memory is
    /// stable. Emits `STOP` if the guest was running.
    fn stop(&self, state: RunState);
    /// Starts the guest (run state `running`); emits `RESUME`.
    fn start(&self);
    /// Sets the run state of a stopped guest without starting it (e.g. `postmigrate`).
    fn set_runstate(&self, state: RunState);
    /// Before the end of the stream at switchover: flush the disks and give up the images
    /// (store persistent bitmaps, release write locks).
    fn inactivate_disks(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    /// Takes the images back (destination when it starts; source after a failed or cancelled
    /// switchover, or on `cont` after a completed one).
    fn activate_disks(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    /// Called before the destination loads device state, and [`Machine::end_device_load`]
    /// after: a VMM batches memory-map changes in between (seed 003).
    fn begin_device_load(&self) {}
    /// See [`Machine::begin_device_load`]. An error (the batch's changes could not be made
    /// real, e.g. a KVM memslot refused) fails the load.
    fn end_device_load(&self) -> Result<(), MigrationError> {
        Ok(())
    }
    /// Whether the VMM can throttle its vCPUs ([`Machine::throttle_vcpus`]). Capability
    /// `auto-converge` is refused when it cannot (the default).
    fn can_throttle_vcpus(&self) -> bool {
        false
    }
    /// `auto-converge`: from now on keep every vCPU off the CPU `percent` % of the time
    /// (1–99), as QEMU's cpu-throttle does — each time a vCPU has run 10 ms, it sleeps
    /// `10 ms × percent / (100 − percent)`; 0 lifts the throttle. A throttled vCPU still
    /// parks at once when the machine stops. Called by the migration thread; it only records
    /// the figure and must not wait for the vCPUs.
    fn throttle_vcpus(&self, percent: u8) {
        let _ = percent;
    }
}
