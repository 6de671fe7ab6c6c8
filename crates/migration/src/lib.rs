//! Live migration engine: state machine, handlers, RAM and dirty-bitmap sections, transports.
#![forbid(unsafe_code)]
