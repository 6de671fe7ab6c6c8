//! The `file` protocol driver: a host file, read and written with `pread`/`pwrite`.
//!
//! * Reads past the end of the file return zeroes (the node may be a little longer than the
//!   file, because node sizes are whole 512-byte sectors, and a format driver may read past its
//!   child's end).
//! * `discard` punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); a file system
//!   without hole punching makes it a successful no-op, as in QEMU.
//! * `write_zeroes` uses `FALLOC_FL_ZERO_RANGE`, or a hole when unmapping is allowed and the
//!   range lies inside the file, and falls back to writing zeroes.
//! * `flush` is `fdatasync`.
//!
//! # Image locking
//!
//! The permissions the node's users hold (see [`crate::perm`]) become the byte-range locks QEMU
//! 7.2's `file-posix` takes, so that QEMU and livemig refuse to write one image at the same
//! time: a shared (read) open-file-description lock on byte `100 + i` for each permission bit
//! `i` taken, and on byte `200 + i` for each permission bit *not* shared. Before a new request
//! is committed it is tested against the other processes' locks: a permission taken conflicts
//! with a lock on its `200 + i` byte ("Failed to get "write" lock"), a permission not shared
//! with a lock on its `100 + i` byte ("Failed to get shared "write" lock"). `locking=off`
//! takes and tests nothing; `auto` and `on` use OFD locks (always available on Linux).
//!
//! While the node is inactive its locks stay as they are (QEMU skips lock changes for inactive
//! nodes); the parents, inactivated first, have already loosened them to byte 100. A node opened
//! inactive (an incoming migration) locks nothing until it is activated.

use super::{BlockDriver, DriverInfo, FilenameInfo};
use crate::error::BlockError;
use crate::node::BlockNode;
use crate::perm::{perm_name, Perm, PermContext, ALL, PERM_BITS, RESIZE, WRITE, WRITE_UNCHANGED};
use nix::errno::Errno;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg};
use serde_json::{json, Map, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

/// `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked while permission bit `i` is held.
pub const LOCK_PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked while permission bit `i` is not shared.
pub const LOCK_SHARED_BASE: i64 = 200;

/// The `locking` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock if OFD locks are available (always on Linux).
    #[default]
    Auto,
    /// Always lock.
    On,
    /// Never lock.
    Off,
}

impl Locking {
    /// Parses the option's value (`on`, `off`, `auto`).
    pub fn parse(s: &str) -> Option<Locking> {
        match s {
            "auto" => Some(Locking::Auto),
            "on" => Some(Locking::On),
            "off" => Some(Locking::Off),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct LockState {
    use_lock: bool,
    /// Permission bits whose `100 + i` byte this file description has locked.
    held_perm: u8,
    /// Permission bits whose `200 + i` byte this file description has locked.
    held_unshared: u8,
}

/// Largest piece written at once when zeroes have to be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open host file.
#[derive(Debug)]
pub struct FileDriver {
    /// The open file; `blockdev-reopen` replaces it with one opened for the new mode.
    file: RwLock<File>,
    filename: String,
    locks: Mutex<LockState>,
}

impl FileDriver {
    /// Opens `filename`, read-only or read-write, with `locking=auto`. Fails with QEMU's
    /// `Could not open '<filename>': <strerror>`.
    pub fn open(filename: &str, read_only: bool) -> Result<Self, BlockError> {
        Self::open_with(filename, read_only, Locking::Auto)
    }

    /// Opens `filename` with a `locking` mode. No lock is taken until a user of the node asks
    /// for permissions.
    pub fn open_with(
        filename: &str,
        read_only: bool,
        locking: Locking,
    ) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(filename)
            .map_err(|e| BlockError::OpenFailed {
                filename: filename.to_string(),
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        let meta = file.metadata().map_err(|e| BlockError::from_io(&e))?;
        if meta.is_dir() {
            return Err(BlockError::OpenFailed {
                filename: filename.to_string(),
                errno: Errno::EISDIR,
            });
        }
        Ok(FileDriver {
            file: RwLock::new(file),
            filename: filename.to_string(),
            locks: Mutex::new(LockState {
                use_lock: locking != Locking::Off,
                held_perm: 0,
                held_unshared: 0,
            }),
        })
    }

    /// The lock bytes this file description holds now, for tests and diagnostics: `100 + i`
    /// and `200 + i` offsets in ascending order.
    pub fn held_lock_bytes(&self) -> Vec<i64> {
        let st = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v = Vec::new();
        for i in 0..PERM_BITS {
            if st.held_perm & (1 << i) != 0 {
                v.push(LOCK_PERM_BASE + i64::from(i));
            }
        }
        for i in 0..PERM_BITS {
            if st.held_unshared & (1 << i) != 0 {
                v.push(LOCK_SHARED_BASE + i64::from(i));
            }
        }
        v
    }

    fn flock(&self, ty: libc::c_short, byte: i64) -> libc::flock {
        libc::flock {
            l_type: ty,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        }
    }

    fn lock_byte(&self, byte: i64, lock: bool) -> Result<(), BlockError> {
        let ty = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
        let fl = self.flock(ty as libc::c_short, byte);
        fcntl(&*self.f(), FcntlArg::F_OFD_SETLK(&fl))
            .map(drop)
            .map_err(|e| {
                let what = if lock { "lock" } else { "unlock" };
                BlockError::Driver(format!(
                    "Failed to {what} byte {byte}: {}",
                    crate::error::strerror(e)
                ))
            })
    }

    /// `qemu_lock_fd_test(fd, byte, 1, true)`: whether another file description holds a lock
    /// on `byte`.
    fn byte_taken(&self, byte: i64) -> Result<bool, BlockError> {
        let mut fl = self.flock(libc::F_WRLCK as libc::c_short, byte);
        fcntl(&*self.f(), FcntlArg::F_OFD_GETLK(&mut fl)).map_err(BlockError::Io)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Makes the held bytes exactly `perm` / `unshared` (locks missing ones, unlocks extra
    /// ones when `unlock`).
    fn apply_lock_bytes(
        &self,
        st: &mut LockState,
        perm: u8,
        unshared: u8,
        unlock: bool,
    ) -> Result<(), BlockError> {
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            let byte = LOCK_PERM_BASE + i64::from(i);
            if perm & bit != 0 && st.held_perm & bit == 0 {
                self.lock_byte(byte, true)?;
                st.held_perm |= bit;
            } else if unlock && st.held_perm & bit != 0 && perm & bit == 0 {
                self.lock_byte(byte, false)?;
                st.held_perm &= !bit;
            }
        }
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            let byte = LOCK_SHARED_BASE + i64::from(i);
            if unshared & bit != 0 && st.held_unshared & bit == 0 {
                self.lock_byte(byte, true)?;
                st.held_unshared |= bit;
            } else if unlock && st.held_unshared & bit != 0 && unshared & bit == 0 {
                self.lock_byte(byte, false)?;
                st.held_unshared &= !bit;
            }
        }
        Ok(())
    }

    /// `raw_check_lock_bytes`: QEMU's message for the first conflict.
    fn check_lock_bytes(&self, p: Perm) -> Result<(), BlockError> {
        let locked = |message: String| BlockError::ImageLocked {
            message,
            filename: self.filename.clone(),
        };
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            if p.perm & bit != 0 && self.byte_taken(LOCK_SHARED_BASE + i64::from(i))? {
                return Err(locked(format!("Failed to get \"{}\" lock", perm_name(bit))));
            }
        }
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            if p.shared & bit == 0 && self.byte_taken(LOCK_PERM_BASE + i64::from(i))? {
                return Err(locked(format!(
                    "Failed to get shared \"{}\" lock",
                    perm_name(bit)
                )));
            }
        }
        Ok(())
    }

    fn f(&self) -> RwLockReadGuard<'_, File> {
        self.file.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The path this driver was opened with.
    pub fn path(&self) -> &str {
        &self.filename
    }

    fn file_len(&self) -> Result<u64, BlockError> {
        self.f()
            .metadata()
            .map(|m| m.len())
            .map_err(|e| BlockError::from_io(&e))
    }

    fn write_zero_data(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let chunk = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            let piece = chunk.get(..n).ok_or(BlockError::Io(Errno::EINVAL))?;
            self.f()
                .write_all_at(piece, offset + done)
                .map_err(|e| BlockError::from_io(&e))?;
            done += n as u64;
        }
        Ok(())
    }
}

fn off_t(v: u64) -> Result<libc::off_t, BlockError> {
    libc::off_t::try_from(v).map_err(|_| BlockError::Io(Errno::EINVAL))
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    fn length(&self) -> Result<u64, BlockError> {
        self.file_len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).ok_or(BlockError::Io(Errno::EINVAL))?;
            match self.f().read_at(rest, offset + done as u64) {
                Ok(0) => {
                    // End of file: the rest reads as zeroes.
                    rest.fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlockError::from_io(&e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.f()
            .write_all_at(buf, offset)
            .map_err(|e| BlockError::from_io(&e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .ok_or(BlockError::Io(Errno::EINVAL))?;
        if may_unmap && end <= self.file_len()? {
            let punched = fallocate(
                &*self.f(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off_t(offset)?,
                off_t(len)?,
            );
            if punched.is_ok() {
                return Ok(());
            }
        }
        match fallocate(
            &*self.f(),
            FallocateFlags::FALLOC_FL_ZERO_RANGE,
            off_t(offset)?,
            off_t(len)?,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
                self.write_zero_data(offset, len)
            }
            Err(e) => Err(BlockError::Io(e)),
        }
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            &*self.f(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off_t(offset)?,
            off_t(len)?,
        ) {
            Ok(()) => Ok(()),
            // Discard is advisory: QEMU reports success where the host cannot punch holes.
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => Ok(()),
            Err(e) => Err(BlockError::Io(e)),
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        nix::unistd::fdatasync(&*self.f()).map_err(BlockError::Io)
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.f().set_len(size).map_err(|e| BlockError::from_io(&e))
    }

    fn info(&self) -> Option<DriverInfo> {
        Some(DriverInfo::default())
    }

    fn allocated_size(&self) -> u64 {
        self.f()
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    }

    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        Vec::new()
    }

    fn set_perm(&self, p: Perm, ctx: PermContext) -> Result<(), BlockError> {
        let mut st = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if !st.use_lock {
            return Ok(());
        }
        if !ctx.active {
            // An inactive image has been handed to another process: like QEMU, whose devices
            // drop their permissions before their nodes are inactivated, it keeps no write
            // permission and shares everything. Letting go never conflicts; an image opened
            // inactive (incoming) holds nothing to begin with.
            let keep = st.held_perm & !(WRITE | WRITE_UNCHANGED | RESIZE);
            let _ = self.apply_lock_bytes(&mut st, keep, 0, true);
            return Ok(());
        }
        let unshared = !p.shared & ALL;
        let (old_perm, old_unshared) = (st.held_perm, st.held_unshared);
        let loosening = p.perm & !old_perm == 0 && unshared & !old_unshared == 0;
        if !loosening {
            // QEMU's prepare step: hold the union, then test the new request against others.
            let prepared = self
                .apply_lock_bytes(&mut st, old_perm | p.perm, old_unshared | unshared, false)
                .and_then(|()| self.check_lock_bytes(p));
            if let Err(e) = prepared {
                let _ = self.apply_lock_bytes(&mut st, old_perm, old_unshared, true);
                return Err(e);
            }
        }
        // Commit: exactly the new bytes. Unlocking cannot conflict; a failure leaves a byte
        // locked, which QEMU only warns about.
        let _ = self.apply_lock_bytes(&mut st, p.perm, unshared, true);
        Ok(())
    }

    /// Opens the file again for the new mode and moves the image locks over to the new file
    /// description before the old one is closed (QEMU's `raw_reopen_prepare`), so other
    /// processes never see them lapse.
    fn reopen(&self, read_only: bool) -> Result<(), BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&self.filename)
            .map_err(|e| BlockError::OpenFailed {
                filename: self.filename.clone(),
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        let st = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        for i in 0..PERM_BITS {
            for (held, base) in [
                (st.held_perm, LOCK_PERM_BASE),
                (st.held_unshared, LOCK_SHARED_BASE),
            ] {
                if held & (1 << i) != 0 {
                    let fl = self.flock(libc::F_RDLCK as libc::c_short, base + i64::from(i));
                    fcntl(&file, FcntlArg::F_OFD_SETLK(&fl)).map_err(|e| {
                        BlockError::Driver(format!(
                            "Failed to lock byte {}: {}",
                            base + i64::from(i),
                            crate::error::strerror(e)
                        ))
                    })?;
                }
            }
        }
        let old = std::mem::replace(
            &mut *self.file.write().unwrap_or_else(PoisonError::into_inner),
            file,
        );
        drop(st);
        if read_only {
            // What was written reaches the disk before the file is read-only.
            let _ = nix::unistd::fdatasync(&old);
        }
        drop(old);
        Ok(())
    }

    fn filename(&self) -> FilenameInfo {
        let mut options = Map::new();
        options.insert("driver".into(), json!("file"));
        options.insert("filename".into(), Value::String(self.filename.clone()));
        FilenameInfo {
            exact: Some(self.filename.clone()),
            options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_are_zero_and_writes_grow() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        std::fs::write(&p, [7u8; 1000]).unwrap();
        let d = FileDriver::open(p.to_str().unwrap(), false).unwrap();
        assert_eq!(d.length().unwrap(), 1000);
        let mut buf = [0xabu8; 48];
        d.read_at(990, &mut buf).unwrap();
        assert_eq!(&buf[..10], &[7u8; 10]);
        assert!(buf[10..].iter().all(|&b| b == 0));
        d.write_at(1020, &[1, 2, 3, 4]).unwrap();
        assert_eq!(d.length().unwrap(), 1024);
        d.write_zeroes(0, 16, false).unwrap();
        d.discard(16, 16).unwrap();
        let mut head = [9u8; 16];
        d.read_at(0, &mut head).unwrap();
        assert_eq!(head, [0u8; 16]);
        d.flush().unwrap();
        d.truncate(4096).unwrap();
        assert_eq!(d.length().unwrap(), 4096);
    }

    #[test]
    fn open_errors_carry_qemu_text() {
        let e = FileDriver::open("/nonexistent/x.img", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open '/nonexistent/x.img': No such file or directory"
        );
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro.img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let d = FileDriver::open(p.to_str().unwrap(), true).unwrap();
        assert!(d.write_at(0, &[1]).is_err());
    }
}
