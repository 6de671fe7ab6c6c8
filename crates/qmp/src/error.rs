//! QMP errors: QEMU's error classes and the error a command handler returns.
//!
//! On the wire an error is `{"error": {"class": <class>, "desc": <text>}}`. Clients branch on
//! the class (rarely anything but `GenericError`) and show the text to people, so handlers should
//! use QEMU's wording wherever QEMU has a message for the same condition; the constructors below
//! carry QEMU's texts for argument validation.

use crate::json::JsonError;
use serde_json::{json, Value};

/// QEMU's `QapiErrorClass` (`qapi/error.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Almost every error.
    GenericError,
    /// The requested command does not exist (or is not available in this mode).
    CommandNotFound,
    /// A device exists but has no driver attached.
    DeviceNotActive,
    /// The requested device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the request needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: a class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description (`desc`).
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of almost every error.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error with the given text.
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::DeviceNotActive, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `KVMMissingCap` error.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::KVMMissingCap, desc)
    }

    /// QEMU's `The command %s has not been found` (`CommandNotFound`).
    pub fn unknown_command(name: &str) -> QmpError {
        QmpError::command_not_found(format!("The command {name} has not been found"))
    }

    /// QEMU's `QERR_MISSING_PARAMETER`: `Parameter 'x' is missing`.
    pub fn missing_parameter(name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' is missing"))
    }

    /// QEMU's `QERR_INVALID_PARAMETER_TYPE`: `Invalid parameter type for 'x', expected: string`.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// QEMU's `QERR_INVALID_PARAMETER_VALUE`: `Parameter 'x' expects uint32_t` (or any other
    /// description of what was expected).
    pub fn invalid_parameter_value(name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// QEMU's `Parameter 'x' is unexpected`, for a member the command does not take.
    pub fn unexpected_parameter(name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// QEMU's `Parameter 'x' does not accept value 'y'`, for an unknown enum value.
    pub fn invalid_enum_value(name: &str, value: &str) -> QmpError {
        QmpError::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }

    /// The `{"class": .., "desc": ..}` object that goes under `"error"`.
    pub fn to_value(&self) -> Value {
        json!({ "class": self.class.as_str(), "desc": self.desc })
    }
}

impl From<JsonError> for QmpError {
    /// Parse errors are `GenericError`s with QEMU's text.
    fn from(e: JsonError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}
