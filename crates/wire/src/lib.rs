//! QEMU migration stream format: framing, sections, vmstate encodings.
#![forbid(unsafe_code)]
