//! The reference VM's guest code and the memory layout it shares with the VMM.
//!
//! [`IMAGE`] is the workload of `vm::workload` written as x86-64 code (`src/guest.S`),
//! assembled from source by the build script with binutils — no prebuilt blob. The VMM loads
//! it at [`layout::SYS_BASE`] + [`layout::CODE_OFF`], builds the page tables and control
//! blocks described in [`layout`], and enters it in 64-bit mode at its first byte.
#![forbid(unsafe_code)]

/// Guest physical layout, control-block fields and I/O ports.
pub mod layout {
    include!("layout.rs");
}

/// The guest's code, linked to run at `SYS_BASE + CODE_OFF`; its entry point is its first byte.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_fits_its_room() {
        assert!(!IMAGE.is_empty());
        assert!(
            IMAGE.len() as u64 <= layout::CODE_MAX,
            "{} bytes",
            IMAGE.len()
        );
    }
}
