//! The `null-co` protocol driver: a device of a given size with no storage.
//!
//! Writes succeed and are dropped. Reads succeed and, with `read-zeroes=on`, return zeroes;
//! without it (QEMU's default) they leave the caller's buffer as it was, exactly like QEMU —
//! which is why `qemu-io read -P 0xab` succeeds on such a node (qemu-io fills read buffers with
//! 0xab). The driver has no discard callback, so discards are skipped and mark no bitmap.
//! `latency-ns` delays every request.

use super::{BlockDriver, FilenameInfo};
use crate::error::BlockError;
use crate::node::BlockNode;
use serde_json::{json, Map};
use std::sync::Arc;
use std::time::Duration;

/// QEMU's default `size` for null-co: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// A `null-co` device.
#[derive(Debug, Clone)]
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    latency: Duration,
    /// The options given explicitly, for the `json:` filename.
    given: Map<String, serde_json::Value>,
}

impl NullDriver {
    /// A device of `size` bytes (default 1 GiB), with QEMU's `read-zeroes` and `latency-ns`.
    pub fn new(size: Option<u64>, read_zeroes: Option<bool>, latency_ns: Option<u64>) -> Self {
        let mut given = Map::new();
        if let Some(l) = latency_ns {
            given.insert("latency-ns".into(), json!(l));
        }
        if let Some(r) = read_zeroes {
            given.insert("read-zeroes".into(), json!(r));
        }
        if let Some(s) = size {
            given.insert("size".into(), json!(s));
        }
        NullDriver {
            size: size.unwrap_or(DEFAULT_SIZE),
            read_zeroes: read_zeroes.unwrap_or(false),
            latency: Duration::from_nanos(latency_ns.unwrap_or(0)),
            given,
        }
    }

    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size)
    }

    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.delay();
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }

    fn write_at(&self, _offset: u64, _buf: &[u8]) -> Result<(), BlockError> {
        self.delay();
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        self.delay();
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        false
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn truncate(&self, _size: u64) -> Result<(), BlockError> {
        Err(BlockError::ResizeUnsupported)
    }

    fn info(&self) -> Option<super::DriverInfo> {
        None
    }

    fn allocated_size(&self) -> u64 {
        0
    }

    /// No storage: nothing changes.
    fn reopen(&self, _read_only: bool) -> Result<(), BlockError> {
        Ok(())
    }

    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        Vec::new()
    }

    fn filename(&self) -> FilenameInfo {
        let mut options = Map::new();
        options.insert("driver".into(), json!("null-co"));
        options.extend(self.given.clone());
        FilenameInfo {
            exact: if self.given.is_empty() {
                Some("null-co://".into())
            } else {
                None
            },
            options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_leave_buffer_unless_read_zeroes() {
        let d = NullDriver::new(Some(4096), None, None);
        let mut buf = [0xabu8; 8];
        d.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 8]);
        let z = NullDriver::new(Some(4096), Some(true), None);
        z.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 8]);
    }

    #[test]
    fn filename_follows_qemu() {
        assert_eq!(
            super::super::display_filename(&NullDriver::new(None, None, None).filename()),
            "null-co://"
        );
        assert_eq!(
            super::super::display_filename(&NullDriver::new(Some(1000000), None, None).filename()),
            r#"json:{"driver": "null-co", "size": 1000000}"#
        );
        assert_eq!(NullDriver::new(None, None, None).length().unwrap(), 1 << 30);
    }
}
