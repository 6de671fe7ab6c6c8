//! System bindings to `userfaultfd` (userfaultfd-sys 0.6.0 with pregenerated bindings; see
//! Cargo.toml for why).

#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("the checked-in userfaultfd bindings were generated for x86_64 Linux");

use cfg_if::cfg_if;

mod linux4_11;
#[cfg(feature = "linux4_14")]
mod linux4_14;
#[cfg(feature = "linux5_7")]
mod linux5_7;

#[cfg(feature = "linux5_13")]
mod linux5_13;

cfg_if! {
    if #[cfg(feature = "linux5_13")] {
        pub use crate::linux5_13::*;
    } else if #[cfg(feature = "linux5_7")] {
        pub use crate::linux5_7::*;
    } else if #[cfg(feature = "linux4_14")] {
        pub use crate::linux4_14::*;
    } else {
        pub use crate::linux4_11::*;
    }
}

include!("bindings.rs");
