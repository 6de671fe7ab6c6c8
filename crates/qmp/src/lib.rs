//! QEMU Machine Protocol server: framing, negotiation, dispatch, errors, events.
#![forbid(unsafe_code)]
