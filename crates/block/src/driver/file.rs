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
//! Image locking (QEMU's `locking=auto` byte-range locks) belongs here too; it is not part of
//! this crate yet.

use super::{BlockDriver, DriverInfo, FilenameInfo};
use crate::error::BlockError;
use crate::node::BlockNode;
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use serde_json::{json, Map, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

/// Largest piece written at once when zeroes have to be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open host file.
#[derive(Debug)]
pub struct FileDriver {
    file: File,
    filename: String,
}

impl FileDriver {
    /// Opens `filename`, read-only or read-write. Fails with QEMU's
    /// `Could not open '<filename>': <strerror>`.
    pub fn open(filename: &str, read_only: bool) -> Result<Self, BlockError> {
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
            file,
            filename: filename.to_string(),
        })
    }

    /// The path this driver was opened with.
    pub fn path(&self) -> &str {
        &self.filename
    }

    fn file_len(&self) -> Result<u64, BlockError> {
        self.file
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
            self.file
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
            match self.file.read_at(rest, offset + done as u64) {
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
        self.file
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
                &self.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off_t(offset)?,
                off_t(len)?,
            );
            if punched.is_ok() {
                return Ok(());
            }
        }
        match fallocate(
            &self.file,
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
            &self.file,
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
        nix::unistd::fdatasync(&self.file).map_err(BlockError::Io)
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.file.set_len(size).map_err(|e| BlockError::from_io(&e))
    }

    fn info(&self) -> Option<DriverInfo> {
        Some(DriverInfo::default())
    }

    fn allocated_size(&self) -> u64 {
        self.file
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    }

    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        Vec::new()
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
