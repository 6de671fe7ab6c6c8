//! Block nodes, image drivers and named dirty bitmaps.
#![forbid(unsafe_code)]
