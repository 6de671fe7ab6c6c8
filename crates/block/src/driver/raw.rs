//! The `raw` format driver: the bytes of its `file` child, optionally a window of them
//! (`offset`, `size`), with QEMU's checks and messages for the window.
//!
//! Requests go to the child through [`BlockNode::child_read_at`] and friends, so the child's
//! own bitmaps record them too, as in QEMU where both the raw node and its file node are marked.

use super::{BlockDriver, DriverInfo, FilenameInfo};
use crate::error::BlockError;
use crate::node::{BlockNode, SECTOR_SIZE};
use crate::perm::{new_user_key, Perm, PermContext};
use nix::errno::Errno;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// A raw image over a child node.
#[derive(Debug)]
pub struct RawDriver {
    child: Arc<BlockNode>,
    offset: u64,
    size: Option<u64>,
    key: u64,
    /// Found by probing (QEMU's `bs->probed`): see [`RawDriver::set_probed`].
    probed: bool,
}

impl RawDriver {
    /// Opens a raw window `[offset, offset+size)` onto `child` (`size` defaults to the rest of
    /// the child, and then follows the child's size). Errors are QEMU's `raw_apply_options`
    /// messages.
    pub fn open(
        child: Arc<BlockNode>,
        offset: Option<u64>,
        size: Option<u64>,
    ) -> Result<Self, BlockError> {
        let offset = offset.unwrap_or(0);
        let real = child.size()?;
        if offset > real {
            return Err(BlockError::RawOffsetTooLarge {
                offset,
                file_size: real,
            });
        }
        if let Some(s) = size {
            if real - offset < s {
                return Err(BlockError::RawWindowTooLarge {
                    offset,
                    size: s,
                    file_size: real,
                });
            }
            if s % SECTOR_SIZE != 0 {
                return Err(BlockError::RawSizeUnaligned(SECTOR_SIZE));
            }
        }
        Ok(RawDriver {
            child,
            offset,
            size,
            key: new_user_key(),
            probed: false,
        })
    }

    /// Marks the image as found by probing rather than named (QEMU's `bs->probed`): a write
    /// that would make its first sector probe as another format fails with `EPERM`, so the
    /// guest cannot turn the disk into an image that opens differently next time
    /// (`raw_co_pwritev`).
    pub fn set_probed(&mut self) {
        self.probed = true;
    }

    /// QEMU's check on a write into the first sector of a probed image: the sector as the
    /// write leaves it must still probe as raw.
    fn check_first_sector(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let probe = crate::probe::PROBE_BUF_SIZE as u64;
        if !self.probed || offset >= probe || buf.is_empty() {
            return Ok(());
        }
        let mut sector = vec![0u8; crate::probe::PROBE_BUF_SIZE];
        let covered = (probe - offset).min(buf.len() as u64) as usize;
        if offset > 0 || covered < sector.len() {
            // The rest of the sector as it is (QEMU aligns such a write to 512 bytes first).
            let have = self.length()?.min(probe) as usize;
            if let Some(part) = sector.get_mut(..have) {
                self.child
                    .child_read_at(self.adjust(0, have as u64)?, part)?;
            }
        }
        let at = offset as usize;
        if let (Some(dst), Some(src)) = (sector.get_mut(at..at + covered), buf.get(..covered)) {
            dst.copy_from_slice(src);
        }
        if crate::probe::still_raw(&sector) {
            Ok(())
        } else {
            Err(BlockError::Io(Errno::EPERM))
        }
    }

    /// The child node.
    pub fn child(&self) -> &Arc<BlockNode> {
        &self.child
    }

    /// Maps a request onto the child, refusing requests outside a fixed window.
    fn adjust(&self, offset: u64, len: u64) -> Result<u64, BlockError> {
        if let Some(s) = self.size {
            if offset > s || len > s - offset {
                return Err(BlockError::Io(Errno::ENOSPC));
            }
        }
        offset
            .checked_add(self.offset)
            .ok_or(BlockError::Io(Errno::EINVAL))
    }
}

impl Drop for RawDriver {
    fn drop(&mut self) {
        let _ = self.child.set_user_perm(self.key, None);
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> Result<u64, BlockError> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(self.child.size()?.saturating_sub(self.offset)),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let off = self.adjust(offset, buf.len() as u64)?;
        self.child.child_read_at(off, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let off = self.adjust(offset, buf.len() as u64)?;
        self.check_first_sector(offset, buf)?;
        self.child.child_write_at(off, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        let off = self.adjust(offset, len)?;
        self.child.child_write_zeroes(off, len, may_unmap)
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let off = self.adjust(offset, len)?;
        self.child.child_discard(off, len)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.child.flush()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.size.is_some() {
            return Err(BlockError::RawFixedSize);
        }
        let end = size
            .checked_add(self.offset)
            .ok_or(BlockError::Io(Errno::EFBIG))?;
        self.child.truncate(end)
    }

    fn info(&self) -> Option<DriverInfo> {
        self.child.driver().info()
    }

    fn allocated_size(&self) -> u64 {
        self.child.driver().allocated_size()
    }

    /// Nothing of its own changes: the child is reopened by the layer.
    fn reopen(&self, _read_only: bool) -> Result<(), BlockError> {
        Ok(())
    }

    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        vec![("file", self.child.clone())]
    }

    fn cancel_in_flight(&self) {
        // As QEMU's raw_cancel_in_flight: the requests are the file's.
        self.child.driver().cancel_in_flight();
    }

    fn set_perm(&self, perm: Perm, _ctx: PermContext) -> Result<(), BlockError> {
        // A plain raw node is a filter; a window is a data child that must not be resized.
        let child = if self.offset != 0 || self.size.is_some() {
            Perm::for_data_window(perm)
        } else {
            perm
        };
        self.child.set_user_perm(self.key, Some(child))
    }

    fn filename(&self) -> FilenameInfo {
        let child = self.child.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), json!("raw"));
        if self.offset != 0 {
            options.insert("offset".into(), json!(self.offset));
        }
        if let Some(s) = self.size {
            options.insert("size".into(), json!(s));
        }
        options.insert("file".into(), Value::Object(child.options));
        let plain = self.offset == 0 && self.size.is_none();
        FilenameInfo {
            exact: if plain { child.exact } else { None },
            options,
        }
    }
}
