//! The block layer's one error type.
//!
//! Every variant's `Display` is the exact `desc` text QEMU 7.2 puts in its QMP error reply for
//! the same condition (observed against QEMU 7.2 or taken from its source), so a client written
//! against QEMU sees the same words. The few conditions QEMU has no message for — because it
//! asserts, or because it lacks the feature — carry a message of our own, marked as such below.

use hbitmap::HBitmapError;
use nix::errno::Errno;
use thiserror::Error;

/// Hint QEMU appends (for human monitors only) to [`BlockError::BitmapInconsistent`].
pub const INCONSISTENT_HINT: &str = "Try block-dirty-bitmap-remove to delete this bitmap from disk";

/// Anything the block layer refuses or fails at.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockError {
    // ---- lookups -----------------------------------------------------------------------------
    /// `bdrv_lookup_bs` found neither a device nor a node of that name.
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    CannotFind {
        /// Device (BlockBackend) name searched for; empty when only node names were searched.
        device: String,
        /// Node name searched for.
        node: String,
    },
    /// `block_dirty_bitmap_lookup`: the node does not exist.
    #[error("Node '{0}' not found")]
    NodeNotFound(String),
    /// `block_dirty_bitmap_lookup`: the node has no bitmap of that name.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),

    // ---- the node graph ----------------------------------------------------------------------
    /// `blockdev-add` with a node name already in use.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    /// A node name that is not a well-formed id (letter first, then letters, digits, `-._`).
    #[error("Invalid node-name: '{0}'")]
    InvalidNodeName(String),
    /// A node name of 32 bytes or more.
    #[error("Node name too long")]
    NodeNameTooLong,
    /// A node name equal to a device (BlockBackend) name.
    #[error("node-name={0} is conflicting with a device id")]
    NodeNameConflictsWithDevice(String),
    /// `blockdev-add` without `node-name`.
    #[error("'node-name' must be specified for the root node")]
    RootNodeNameRequired,
    /// `blockdev-del` or `blockdev-reopen` of a node that does not exist.
    #[error("Failed to find node with node-name='{0}'")]
    DelNodeNotFound(String),
    /// `blockdev-reopen` of an options set without `node-name`.
    #[error("node-name not specified")]
    NodeNameNotSpecified,
    /// `blockdev-reopen` changing an option that cannot change.
    #[error("Cannot change the option '{0}'")]
    CannotChangeOption(String),
    /// `blockdev-reopen` of a node with a backing file, without `backing`.
    #[error("backing is missing for '{0}'")]
    BackingMissing(String),
    /// `blockdev-del` of a node a guest device is attached to.
    #[error("Node {0} is in use")]
    NodeInUse(String),
    /// `blockdev-del` of a node that is the child of another node.
    #[error("Block device {0} is in use")]
    BlockDeviceInUse(String),
    /// `blockdev-del` of a node created implicitly as another node's child.
    #[error("Node {0} is not owned by the monitor")]
    NotMonitorOwned(String),
    /// A device id used twice (QEMU's qdev message).
    #[error("Duplicate ID '{0}' for device")]
    DuplicateDevice(String),
    /// A device id equal to a node name.
    #[error("Device name '{0}' conflicts with an existing node name")]
    DeviceNameConflictsWithNode(String),
    /// Attaching a second device to a node (our message: QEMU reports this through the device
    /// property, which this crate does not know).
    #[error("Node '{node}' is already attached to device '{device}'")]
    AlreadyAttached {
        /// The node.
        node: String,
        /// The device (qdev path) it is attached to.
        device: String,
    },

    // ---- arguments (QAPI visitor and keyval messages) ----------------------------------------
    /// A required member is absent.
    #[error("Parameter '{0}' is missing")]
    MissingParameter(String),
    /// A member the schema does not have.
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedParameter(String),
    /// A member of the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidParameterType {
        /// Full member path, e.g. `file.size`.
        name: String,
        /// QAPI type name: `integer`, `boolean`, `string`, `object`, ...
        expected: String,
    },
    /// A value outside its type (`Parameter 'granularity' expects uint32_t`).
    #[error("Parameter '{name}' expects {expected}")]
    InvalidParameterValue {
        /// Full member path.
        name: String,
        /// What was expected, in QEMU's words.
        expected: String,
    },
    /// An enum member with a value the enum does not have.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    ParameterValueRejected {
        /// Full member path.
        name: String,
        /// The rejected value.
        value: String,
    },
    /// keyval: a malformed key.
    #[error("Invalid parameter '{0}'")]
    InvalidKey(String),
    /// keyval: a key without `=value`.
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// keyval: a key used both as a value and as a prefix of dotted keys.
    #[error("Parameters '{0}.*' used inconsistently")]
    InconsistentParameters(String),
    /// A `-blockdev '{...}'` argument that is not valid JSON.
    #[error("JSON parse error, {0}")]
    JsonParse(String),

    // ---- opening and resizing ----------------------------------------------------------------
    /// The host file could not be opened.
    #[error("Could not open '{filename}': {}", strerror(*.errno))]
    OpenFailed {
        /// The path.
        filename: String,
        /// Why.
        errno: Errno,
    },
    /// raw: `offset` past the end of the file.
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({file_size})")]
    RawOffsetTooLarge {
        /// Requested offset.
        offset: u64,
        /// Size of the child.
        file_size: u64,
    },
    /// raw: `offset + size` past the end of the file (QEMU's double space kept).
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  \
         actual size of the containing file ({file_size})"
    )]
    RawWindowTooLarge {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
        /// Size of the child.
        file_size: u64,
    },
    /// raw: `size` not a multiple of 512.
    #[error("Specified size is not multiple of {0}")]
    RawSizeUnaligned(u64),
    /// raw: resizing a node opened with an explicit `size`.
    #[error("Cannot resize fixed-size raw disks")]
    RawFixedSize,
    /// The driver cannot change its size.
    #[error("Image format driver does not support resize")]
    ResizeUnsupported,
    /// A write-type operation on a read-only node (QEMU's qemu-io and permission message).
    #[error("Block node is read-only")]
    ReadOnlyNode,
    /// A valid QEMU option this implementation does not support (our message).
    #[error("{0}")]
    Unsupported(String),
    /// `blockdev-reopen` of a node whose driver cannot reopen (the layer names the node:
    /// [`BlockError::ReopenNotSupported`]).
    #[error("the driver does not support reopening files")]
    ReopenUnsupported,
    /// `blockdev-reopen` of a node whose driver cannot reopen.
    #[error("Block format '{format}' used by node '{node}' does not support reopening files")]
    ReopenNotSupported {
        /// The driver.
        format: String,
        /// The node.
        node: String,
    },

    // ---- dirty bitmaps -----------------------------------------------------------------------
    /// `block-dirty-bitmap-add` with an empty name.
    #[error("Bitmap name cannot be empty")]
    BitmapNameEmpty,
    /// A bitmap of that name already exists on the node.
    #[error("Bitmap already exists: {0}")]
    BitmapExists(String),
    /// A bitmap name longer than 1023 bytes.
    #[error("Bitmap name too long: {0}")]
    BitmapNameTooLong(String),
    /// A granularity that is not a power of two in 512..=2^31.
    #[error("Granularity must be power of 2 and at least 512")]
    BadGranularity,
    /// `persistent: true` on a node whose driver cannot store bitmaps.
    #[error("Can't store persistent bitmaps to {0}: Operation not supported")]
    CannotStorePersistent(String),
    /// Check flag `BUSY`.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// Check flag `RO`.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    BitmapReadOnly(String),
    /// Check flag `INCONSISTENT` (QEMU adds [`INCONSISTENT_HINT`] for humans).
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// `create_successor` on a bitmap that has one.
    #[error("Cannot create a successor for a bitmap that already has one")]
    SuccessorExists,
    /// `abdicate` without a successor.
    #[error("Cannot relinquish control if there's no successor present")]
    NoSuccessorToAbdicate,
    /// `reclaim` without a successor.
    #[error("Cannot reclaim a successor when none is present")]
    NoSuccessorToReclaim,
    /// `enable_successor` without a successor (our message: QEMU dereferences NULL).
    #[error("The bitmap has no successor to enable")]
    NoSuccessorToEnable,
    /// Merge of bitmaps over nodes of different sizes.
    #[error(
        "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) and \
         can't be merged"
    )]
    SizeMismatch {
        /// Destination size in bytes.
        dest: u64,
        /// Source size in bytes.
        src: u64,
    },
    /// `set_inconsistent` on a transient bitmap (our message: QEMU asserts).
    #[error("Bitmap '{0}' is not persistent")]
    NotPersistent(String),
    /// The node's length could not be read while creating a bitmap.
    #[error("could not get length of device: {}", strerror(*.0))]
    Length(Errno),
    /// A bitmap operation violated an HBitmap precondition (QEMU asserts these).
    #[error(transparent)]
    HBitmap(#[from] HBitmapError),
    /// A driver's own refusal, e.g. qcow2's "Can't make bitmap 'x' persistent in 'd0': ...".
    #[error("{0}")]
    Driver(String),

    // ---- image locking -----------------------------------------------------------------------
    /// Another process holds a conflicting lock on the image: `Failed to get "write" lock` or
    /// `Failed to get shared "write" lock` (QEMU's `raw_check_lock_bytes`); the hint names the
    /// file.
    #[error("{message}")]
    ImageLocked {
        /// QEMU's text.
        message: String,
        /// The file, for the hint `Is another process using the image [<file>]?`.
        filename: String,
    },
    /// `force-share=on` on a node that is not read-only.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareNeedsReadOnly,

    // ---- I/O ---------------------------------------------------------------------------------
    /// A request failed with this errno; the text is `strerror`, as qemu-io prints it after
    /// `write failed: `.
    #[error("{}", strerror(*.0))]
    Io(Errno),
}

/// The C library's `strerror` text for `e` ("Input/output error"), as QEMU prints it.
pub fn strerror(e: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(e as i32).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text.get(..i).unwrap_or(&text).to_string(),
        None => text,
    }
}

impl BlockError {
    /// The QMP error class. QEMU reports every error of this layer as `GenericError`.
    pub fn class(&self) -> &'static str {
        "GenericError"
    }

    /// The extra line QEMU shows human monitor and command-line users, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            BlockError::BitmapInconsistent(_) => Some(INCONSISTENT_HINT.to_string()),
            BlockError::ImageLocked { filename, .. } => {
                Some(format!("Is another process using the image [{filename}]?"))
            }
            _ => None,
        }
    }

    /// Wraps an `std::io::Error` from a host call as an errno error.
    pub fn from_io(e: &std::io::Error) -> Self {
        BlockError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

impl From<Errno> for BlockError {
    fn from(e: Errno) -> Self {
        BlockError::Io(e)
    }
}
