//! The SDK's errors: each variant is one thing a caller can act on.
//!
//! `Display` and `Error` are written out by hand so the crate needs no further
//! dependency; the messages name the file or option concerned.

use std::fmt;
use std::path::PathBuf;

/// Why a [`Device`](crate::Device) could not start or stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The gateway refused the CONNECT (CONNACK not authorized, bad user name or
    /// password, bad client id or protocol): the credentials are wrong or the device was
    /// removed. The device does not retry.
    Refused {
        /// The CONNACK return code, as rumqttc names it (for example `NotAuthorized`).
        code: String,
    },
    /// The state file exists but could not be read.
    StateRead {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not a state file this SDK can read. Delete it to start over;
    /// the app may then see messages again that it was shown before.
    StateCorrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The state file belongs to another device.
    StateWrongDevice {
        /// The state file.
        path: PathBuf,
        /// The device being started.
        expected: String,
        /// The device the file belongs to.
        found: String,
    },
    /// Saving the state file failed. The device stops without showing the message it was
    /// about to show (the gateway keeps it), since it could no longer promise not to show
    /// a message twice after a restart.
    StateWrite {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An option or credential is out of range.
    InvalidOption {
        /// The option's name.
        name: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused { code } => write!(f, "the gateway refused the connection: {code}"),
            Error::StateRead { path, source } => {
                write!(f, "cannot read state file {}: {source}", path.display())
            }
            Error::StateCorrupt { path, reason } => write!(
                f,
                "state file {} is corrupt: {reason} (delete it to start over; the app may \
                 then see messages it has already seen)",
                path.display()
            ),
            Error::StateWrongDevice {
                path,
                expected,
                found,
            } => write!(
                f,
                "state file {} belongs to device {found:?}, not {expected:?}",
                path.display()
            ),
            Error::StateWrite { path, source } => {
                write!(f, "cannot write state file {}: {source}", path.display())
            }
            Error::InvalidOption { name, reason } => write!(f, "invalid option {name}: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::StateRead { source, .. } | Error::StateWrite { source, .. } => Some(source),
            _ => None,
        }
    }
}
