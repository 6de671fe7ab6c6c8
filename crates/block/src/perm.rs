//! Permissions between nodes (QEMU's `BLK_PERM_*`), which decide the byte-range locks the
//! `file` driver takes on an image.
//!
//! Every user of a node — a parent node or a guest device — asks for a [`Perm`]: what it does
//! itself (`perm`) and what it lets others do at the same time (`shared`). A node combines its
//! parents' requests (the union of `perm`, the intersection of `shared`), and its driver turns the
//! result into requests on its own children (a format driver adds what it needs for its
//! metadata) or, in the `file` driver, into locks that other processes see.
//!
//! The rules are QEMU 7.2's `bdrv_default_perms` for the roles this crate has:
//!
//! * a format's **file** child (metadata and data): `consistent read` always, `write` and
//!   `resize` while the format node is writable and active; `write` and `resize` are never
//!   shared;
//! * a format's **backing** child (copy-on-write source): `consistent read` if the parents need
//!   it, and `write`/`resize` shared only if the parents share `write`;
//! * a filter (`raw` without a window): the parents' request as it is.
//!
//! An inactive format node (handed over to a migration destination) asks its file for
//! `consistent read` only and shares everything: QEMU 7.2 keeps exactly lock byte 100 on an image
//! it has inactivated (observed).

use std::sync::atomic::{AtomicU64, Ordering};

/// `BLK_PERM_CONSISTENT_READ`.
pub const CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`.
pub const WRITE: u8 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const WRITE_UNCHANGED: u8 = 0x04;
/// `BLK_PERM_RESIZE`.
pub const RESIZE: u8 = 0x08;
/// `BLK_PERM_ALL`.
pub const ALL: u8 = 0x0f;

/// Number of permission bits (QEMU's `PERM_FOREACH` runs over these).
pub const PERM_BITS: u32 = 4;

/// The name QEMU's `bdrv_perm_names` gives one permission bit.
pub fn perm_name(bit: u8) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        RESIZE => "resize",
        _ => "unknown",
    }
}

/// What a user of a node does (`perm`) and allows others to do (`shared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// Permissions taken.
    pub perm: u8,
    /// Permissions others may hold at the same time.
    pub shared: u8,
}

impl Perm {
    /// Nothing taken, everything shared: a node nobody uses.
    pub const NONE: Perm = Perm {
        perm: 0,
        shared: ALL,
    };

    /// Combines two users' requests.
    pub fn combine(self, other: Perm) -> Perm {
        Perm {
            perm: self.perm | other.perm,
            shared: self.shared & other.shared,
        }
    }

    /// What a guest device asks of the node it is attached to (virtio-blk with
    /// `share-rw=off`): read, write when the node is writable; shares only reads.
    pub fn device(writable: bool) -> Perm {
        Perm {
            perm: CONSISTENT_READ | if writable { WRITE } else { 0 },
            shared: CONSISTENT_READ | WRITE_UNCHANGED,
        }
    }

    /// What a format node asks of its `file` child (`bdrv_default_perms_for_storage` with
    /// the metadata and data roles), given what its own parents ask of it.
    pub fn for_storage(parents: Perm, writable: bool, active: bool) -> Perm {
        if !active {
            return Perm {
                perm: CONSISTENT_READ,
                shared: ALL,
            };
        }
        let mut perm = parents.perm | CONSISTENT_READ;
        if writable {
            perm |= WRITE | RESIZE;
        }
        if perm & WRITE_UNCHANGED != 0 {
            perm |= WRITE;
        }
        if perm & WRITE != 0 {
            perm |= RESIZE;
        }
        Perm {
            perm,
            shared: parents.shared & !(WRITE | RESIZE),
        }
    }

    /// What a format node asks of its `backing` child (`bdrv_default_perms_for_cow`).
    pub fn for_cow(parents: Perm) -> Perm {
        let shared = if parents.shared & WRITE != 0 {
            WRITE | RESIZE
        } else {
            0
        };
        Perm {
            perm: parents.perm & CONSISTENT_READ,
            shared: shared | CONSISTENT_READ | WRITE_UNCHANGED,
        }
    }

    /// What a `raw` node with an `offset` or `size` window asks of its file (data role without
    /// metadata; `raw_child_perm` keeps only the write and resize its parents asked for).
    pub fn for_data_window(parents: Perm) -> Perm {
        Perm {
            perm: parents.perm,
            shared: parents.shared & !RESIZE,
        }
    }
}

/// The state a node's permissions are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermContext {
    /// The node is active (not handed over).
    pub active: bool,
    /// The node may be written (not read-only, and neither is its file).
    pub writable: bool,
}

static NEXT_USER_KEY: AtomicU64 = AtomicU64::new(1);

/// A fresh key identifying one user (a parent driver or a device) in a node's list of users.
pub fn new_user_key() -> u64 {
    NEXT_USER_KEY.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_over_file_locks_what_qemu_locks() {
        // QEMU 7.2 with `-blockdev driver=qcow2,...` and no device: bytes 100, 101, 103 (perm)
        // and 201, 203 (not shared) are locked.
        let p = Perm::for_storage(Perm::NONE, true, true);
        assert_eq!(p.perm, CONSISTENT_READ | WRITE | RESIZE);
        assert_eq!(p.shared, CONSISTENT_READ | WRITE_UNCHANGED);
        let ro = Perm::for_storage(Perm::NONE, false, true);
        assert_eq!(ro.perm, CONSISTENT_READ);
        assert_eq!(ro.shared, CONSISTENT_READ | WRITE_UNCHANGED);
        let inactive = Perm::for_storage(Perm::device(true), true, false);
        assert_eq!(
            inactive,
            Perm {
                perm: CONSISTENT_READ,
                shared: ALL
            }
        );
        assert_eq!(
            Perm::for_cow(Perm::NONE),
            Perm {
                perm: 0,
                shared: ALL
            }
        );
        assert_eq!(
            Perm::for_cow(Perm::device(true)),
            Perm {
                perm: CONSISTENT_READ,
                shared: CONSISTENT_READ | WRITE_UNCHANGED
            }
        );
        assert_eq!(perm_name(WRITE), "write");
    }
}
