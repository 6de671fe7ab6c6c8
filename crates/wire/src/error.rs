//! The crate's one error type.
//!
//! Every decoder and encoder in this crate returns [`WireError`]: *what* went wrong
//! ([`WireErrorKind`]), *where* (the absolute byte offset in the stream) and *in which section*
//! (idstr and section id, when the caller told the reader which section it is in). Messages use
//! QEMU's wording wherever QEMU reports the same condition, so an operator who knows QEMU's logs
//! recognises them.

use std::fmt;

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, WireError>;

/// The section a decoder was in when it failed: used only to make error messages precise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionContext {
    /// The section's idstr, e.g. `ram`, `dirty-bitmap`, `timer`.
    pub idstr: String,
    /// The section id carried by the section header.
    pub section_id: u32,
}

impl SectionContext {
    /// Builds a context from an idstr and a section id.
    pub fn new(idstr: impl Into<String>, section_id: u32) -> Self {
        SectionContext {
            idstr: idstr.into(),
            section_id,
        }
    }
}

/// An error while reading or writing a migration stream: what, where, and in which section.
#[derive(Debug)]
pub struct WireError {
    /// Absolute byte offset in the stream where the offending item starts (for writers: the
    /// number of bytes written before it).
    pub offset: u64,
    /// The section being read or written, if the caller declared one.
    pub section: Option<SectionContext>,
    /// What was wrong.
    pub kind: WireErrorKind,
}

impl WireError {
    /// Builds an error at `offset` with no section context.
    pub fn new(offset: u64, kind: WireErrorKind) -> Self {
        WireError {
            offset,
            section: None,
            kind,
        }
    }

    /// True when the stream simply ended (truncated stream), as opposed to carrying bad bytes.
    pub fn is_truncated(&self) -> bool {
        matches!(self.kind, WireErrorKind::Truncated { .. })
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {:#x}", self.offset)?;
        if let Some(s) = &self.section {
            write!(f, " in section '{}' (id {})", s.idstr, s.section_id)?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            WireErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything that can be wrong with a migration stream, or with a value given to an encoder.
#[derive(Debug, thiserror::Error)]
pub enum WireErrorKind {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// The stream ended in the middle of an item.
    #[error("unexpected end of stream: {needed} more byte(s) needed for {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes were still missing.
        needed: u64,
    },

    // --- file header and configuration (§1.1, §1.2) ---
    /// The first four bytes are not "QEVM".
    #[error("Not a migration stream, magic: {magic:x} != 5145564d")]
    NotAMigrationStream {
        /// The four bytes read, big-endian.
        magic: u32,
    },
    /// File version 2.
    #[error("SaveVM v2 format is obsolete and don't work anymore")]
    ObsoleteVersion,
    /// Any file version other than 2 and 3.
    #[error("Unsupported migration stream version, file version {version:x} != 3")]
    UnsupportedVersion {
        /// The version read.
        version: u32,
    },
    /// The byte after the header is not 0x07 while a configuration section is required.
    #[error("Configuration section missing, {got:x} != 7")]
    ConfigurationMissing {
        /// The byte read instead.
        got: u8,
    },
    /// The received machine name is not a prefix of the local machine's class name.
    #[error("Machine type received is '{received}' and local is '{local}'")]
    MachineMismatch {
        /// Machine name from the stream.
        received: String,
        /// Local machine class name.
        local: String,
    },
    /// The configuration's target page bits differ from the local ones.
    #[error("Received TARGET_PAGE_BITS is {received} but local is {local}")]
    TargetPageBitsMismatch {
        /// Bits from the stream.
        received: u32,
        /// Local bits.
        local: u32,
    },

    // --- top-level framing (§1.3, §1.4) ---
    /// A type byte the top-level loop does not accept.
    #[error("Unknown savevm section type {ty}")]
    UnknownSectionType {
        /// The byte read.
        ty: u8,
    },
    /// A configuration section (0x07) anywhere but right after the file header.
    #[error(
        "Unknown savevm section type 7: a configuration section may only follow the file header"
    )]
    ConfigurationMidStream,
    /// The byte after a section body is not 0x7E.
    #[error("Missing section footer for {idstr} (got byte {got:#04x})")]
    MissingFooter {
        /// The section's idstr.
        idstr: String,
        /// The byte read instead of 0x7E.
        got: u8,
    },
    /// The footer carries another section id.
    #[error("Mismatched section id in footer for {idstr} - read {read:#x} expected {expected:#x}")]
    FooterMismatch {
        /// The section's idstr.
        idstr: String,
        /// Id in the footer.
        read: u32,
        /// Id in the header.
        expected: u32,
    },

    // --- primitives ---
    /// A counted string of length 0 (QEMU's `qemu_get_counted_string` rejects those).
    #[error("Unable to read {what}")]
    EmptyString {
        /// What the string was, in QEMU's words (e.g. "ID string", "node alias string").
        what: &'static str,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// A length read from the stream (or given to an encoder) is above the limit.
    #[error("{what} length {len} exceeds limit {limit}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// The length read.
        len: u64,
        /// The limit in force.
        limit: u64,
    },
    /// A list has more entries than the limit allows.
    #[error("too many {what}: more than {limit}")]
    TooMany {
        /// What is being counted.
        what: &'static str,
        /// The limit in force.
        limit: u64,
    },
    /// An encoder was given a string it cannot represent as a counted string.
    #[error("cannot encode {what} of length {len} as a counted string (1..=255 bytes)")]
    BadStringLength {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
    },

    // --- commands (§2.1, §2.2) ---
    /// Command number 0 or beyond the table.
    #[error("MIG_CMD {cmd:#x} unknown (len {len:#x})")]
    UnknownCommand {
        /// Command number.
        cmd: u16,
        /// Its length field.
        len: u16,
    },
    /// A command whose length differs from the table.
    #[error("{name} received with bad length - expecting {expected}, got {got}")]
    CommandBadLength {
        /// QEMU's name for the command.
        name: &'static str,
        /// Length from the table.
        expected: u16,
        /// Length read.
        got: u16,
    },
    /// POSTCOPY_ADVISE with a length other than 0 and 16.
    #[error("CMD_POSTCOPY_ADVISE invalid length ({len})")]
    AdviseBadLength {
        /// Length read.
        len: u16,
    },
    /// A POSTCOPY_RAM_DISCARD length that cannot hold the header and whole ranges.
    #[error("CMD_POSTCOPY_RAM_DISCARD invalid length ({len})")]
    DiscardBadLength {
        /// The length (or remaining length) that is wrong.
        len: u16,
    },
    /// POSTCOPY_RAM_DISCARD version byte other than 0.
    #[error("CMD_POSTCOPY_RAM_DISCARD invalid version ({version})")]
    DiscardBadVersion {
        /// Version read.
        version: u8,
    },
    /// POSTCOPY_RAM_DISCARD without the NUL after the block name.
    #[error("CMD_POSTCOPY_RAM_DISCARD missing nil ({got})")]
    DiscardMissingNil {
        /// Byte read instead of 0.
        got: u8,
    },
    /// RECV_BITMAP whose length does not match its block name.
    #[error("loadvm_handle_recv_bitmap: invalid payload length ({len})")]
    RecvBitmapBadLength {
        /// Length field of the command.
        len: u16,
    },
    /// A PACKAGED command announcing more bytes than the limit.
    #[error("Unreasonably large packaged state: {len} (limit {limit})")]
    PackagedTooLarge {
        /// Announced length.
        len: u32,
        /// Limit in force.
        limit: u32,
    },

    // --- return path (§2.3, §5.5) ---
    /// Return-path message type 0 or beyond the table.
    #[error("RP: Received invalid message {ty:#06x} length {len:#06x}")]
    RpUnknownMessage {
        /// Message type.
        ty: u16,
        /// Its length field.
        len: u16,
    },
    /// Return-path message whose length differs from the table, or is above 512.
    #[error("RP: Received '{name}' message ({ty:#06x}) with incorrect length {len} expecting {expected}")]
    RpBadLength {
        /// QEMU's name for the message.
        name: &'static str,
        /// Message type.
        ty: u16,
        /// Length read.
        len: u16,
        /// Expected length (for variable messages: the maximum, 512).
        expected: u16,
    },
    /// REQ_PAGES_ID whose length does not match its block name.
    #[error("RP: Req_Page_id with length {len} expecting {expected}")]
    RpReqPagesIdBadLength {
        /// Length read.
        len: u16,
        /// Length implied by the block name.
        expected: u16,
    },
    /// RECV_BITMAP return-path message whose length does not match its block name.
    #[error("RP: RECV_BITMAP with length {len} expecting {expected}")]
    RpRecvBitmapBadLength {
        /// Length read.
        len: u16,
        /// Length implied by the block name.
        expected: u16,
    },
    /// The received-bitmap dump does not end with the magic ending.
    #[error("ramblock '{block}' end mark incorrect: {got:#x}")]
    RecvBitmapBadEnding {
        /// Block the dump is for.
        block: String,
        /// What was read instead of 0x0123456789ABCDEF.
        got: u64,
    },

    /// A section whose layout this crate does not know, in a stream without section footers:
    /// its end cannot be found.
    #[error("cannot find the end of section '{idstr}': its layout is unknown and section footers are off")]
    UndecodableSection {
        /// The section's idstr.
        idstr: String,
    },

    // --- RAM (§3) ---
    /// A RAM record whose flags are not one of the known combinations.
    #[error("Unknown combination of migration flags: {flags:#x}")]
    RamUnknownFlags {
        /// The flags (low bits of the record header).
        flags: u64,
    },
    /// A CONTINUE record before any block was named.
    #[error("Ack, bad migration stream! (CONTINUE record before any RAM block was named)")]
    RamContinueWithoutBlock,
    /// The MEM_SIZE block list adds up to more than its total.
    #[error("RAM block '{block}' of length {len:#x} overruns the MEM_SIZE total ({left:#x} left)")]
    RamBlockListOverrun {
        /// Block name.
        block: String,
        /// Its used_length.
        len: u64,
        /// What was left of the total.
        left: u64,
    },
    /// An encoder was given a RAM offset with bits inside the target page.
    #[error("RAM offset {offset:#x} is not aligned to the 4096-byte target page")]
    RamMisalignedOffset {
        /// The offset given.
        offset: u64,
    },
    /// An encoder was given a page payload of the wrong size.
    #[error("page payload is {len} bytes, expected 4096")]
    RamBadPageLength {
        /// Length given.
        len: usize,
    },
    /// An XBZRLE record with another encoding byte.
    #[error("Failed to load XBZRLE page - wrong compression! (encoding {encoding:#x})")]
    XbzrleBadEncoding {
        /// Encoding byte read.
        encoding: u8,
    },
    /// An XBZRLE record longer than a page.
    #[error("Failed to load XBZRLE page - len overflow! ({len} > 4096)")]
    XbzrleTooLong {
        /// Length read.
        len: u16,
    },
    /// A COMPRESS_PAGE record with an impossible length.
    #[error("Invalid compressed data length: {len}")]
    CompressBadLength {
        /// Length read.
        len: u32,
    },

    // --- multifd channels (§4) ---
    /// A channel handshake that does not start with `MULTIFD_MAGIC`.
    #[error("multifd: received packet magic {magic:x} expected 11223344")]
    MultifdInitMagic {
        /// The four bytes read, big-endian.
        magic: u32,
    },
    /// A channel handshake of another version.
    #[error("multifd: received packet version {version} expected 1")]
    MultifdInitVersion {
        /// Version read.
        version: u32,
    },
    /// A channel handshake from a VM with another UUID.
    #[error("multifd: received uuid '{received}' and expected uuid '{expected}' for channel {id}")]
    MultifdUuid {
        /// UUID received.
        received: String,
        /// This VM's UUID.
        expected: String,
        /// The channel's id.
        id: u8,
    },
    /// A channel id outside 0..channels (QEMU 7.2's message for this is about the version).
    #[error("multifd: received channel id {id}, but only {channels} channels are expected")]
    MultifdChannelId {
        /// Id read.
        id: u8,
        /// `multifd-channels` here.
        channels: u32,
    },
    /// A packet that does not start with `MULTIFD_MAGIC`.
    #[error("multifd: received packet magic {magic:x} and expected magic 11223344")]
    MultifdPacketMagic {
        /// The four bytes read, big-endian.
        magic: u32,
    },
    /// A packet of another version.
    #[error("multifd: received packet version {version} and expected version 1")]
    MultifdPacketVersion {
        /// Version read.
        version: u32,
    },
    /// `pages_alloc` above the 128 offsets a header holds.
    #[error("multifd: received packet with size {size} and expected a size of {expected}")]
    MultifdPacketSize {
        /// `pages_alloc` read.
        size: u32,
        /// 128.
        expected: u32,
    },
    /// `normal_pages` above `pages_alloc`.
    #[error("multifd: received packet with {pages} pages and expected maximum pages are {max}")]
    MultifdPacketPages {
        /// `normal_pages` read.
        pages: u32,
        /// `pages_alloc` read.
        max: u32,
    },

    // --- dirty bitmaps (dirty-bitmaps.md §4, §5.2) ---
    /// Chunk flags with bits that no version of the format defines.
    #[error("Unknown dirty bitmap migration flags: {flags:#x}")]
    BitmapUnknownFlags {
        /// The flags as read (all bytes of the multi-byte form).
        flags: u32,
    },
    /// A BITS chunk whose buffer is larger than the limit.
    #[error("Bitmap migration stream buffer allocation request is too large ({size} > {limit})")]
    BitmapBufferTooLarge {
        /// buf_size read.
        size: u64,
        /// Limit in force.
        limit: u64,
    },

    // --- vmstate (§6) ---
    /// A subsection whose name starts with the parent's name but is not known.
    #[error("VM subsection '{name}' in '{parent}' does not exist")]
    UnknownSubsection {
        /// Subsection name read.
        name: String,
        /// Parent vmsd name.
        parent: String,
    },
    /// A vmsd version above the local one.
    #[error("{name}: incoming version_id {version} is too new for local version_id {local}")]
    VersionTooNew {
        /// vmsd name.
        name: String,
        /// Version read.
        version: u32,
        /// Local version.
        local: u32,
    },
    /// A vmsd version below the minimum.
    #[error(
        "{name}: incoming version_id {version} is too old for local minimum version_id {minimum}"
    )]
    VersionTooOld {
        /// vmsd name.
        name: String,
        /// Version read.
        version: u32,
        /// Minimum accepted.
        minimum: u32,
    },
    /// An integrity digest (`x-livemig-integrity`) does not match the bytes it covers: they
    /// changed between the two peers.
    #[error("integrity check failed: the {what} arrived with digest {computed:#018x}, the source sent {sent:#018x} (bytes changed in transit)")]
    IntegrityMismatch {
        /// What the digest covers, e.g. "batch of RAM records".
        what: &'static str,
        /// The digest the source sent.
        sent: u64,
        /// The digest of what arrived.
        computed: u64,
    },
    /// Records that `x-livemig-integrity` covers came without the digest that should close
    /// them.
    #[error("integrity check failed: the {what} came without its digest")]
    IntegrityMissing {
        /// What should have been covered.
        what: &'static str,
    },
    /// A subsection header was expected but another byte was found.
    #[error("expected a subsection (0x05), got {got:#04x}")]
    NotASubsection {
        /// The byte read.
        got: u8,
    },
}

impl From<std::io::Error> for WireErrorKind {
    fn from(e: std::io::Error) -> Self {
        WireErrorKind::Io(e)
    }
}
