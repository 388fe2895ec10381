//! AES-256-GCM sealing of push payloads at rest.
//!
//! Each payload is sealed with a fresh 96-bit nonce (the caller draws it from the OS RNG:
//! this crate has no randomness) and the message id as associated data, so a ciphertext
//! moved to another message fails to open. The key id travels with the ciphertext so
//! keys can be rotated: old events stay readable while the keyring holds their key.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::events::SealedPayload;

/// Length of a key in bytes.
pub const KEY_BYTES: usize = 32;
/// Length of a nonce in bytes.
pub const NONCE_BYTES: usize = 12;

/// Why a payload could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The payload names a key this keyring does not hold.
    #[error("unknown payload key id {0}")]
    UnknownKey(u32),
    /// The nonce has the wrong length.
    #[error("nonce must be {NONCE_BYTES} bytes")]
    BadNonce,
    /// The ciphertext was altered, or belongs to another message.
    #[error("payload failed authentication")]
    Unauthentic,
}

/// The payload keys by id, and which one seals new payloads.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, Aes256Gcm>,
    current: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

impl Keyring {
    /// A keyring with one key, which seals new payloads.
    pub fn new(key_id: u32, key: &[u8; KEY_BYTES]) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(key_id, Aes256Gcm::new(key.into()));
        Keyring {
            keys,
            current: key_id,
        }
    }

    /// The id of the key that seals new payloads.
    pub fn current_key_id(&self) -> u32 {
        self.current
    }

    /// Seals `plaintext` for `message_id` with the current key and the given nonce.
    pub fn seal(
        &self,
        nonce: [u8; NONCE_BYTES],
        message_id: &str,
        plaintext: &[u8],
    ) -> Result<SealedPayload, SealError> {
        let cipher = self
            .keys
            .get(&self.current)
            .ok_or(SealError::UnknownKey(self.current))?;
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: message_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Unauthentic)?;
        Ok(SealedPayload {
            key_id: self.current,
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a payload sealed for `message_id`.
    pub fn open(&self, sealed: &SealedPayload, message_id: &str) -> Result<Vec<u8>, SealError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or(SealError::UnknownKey(sealed.key_id))?;
        if sealed.nonce.len() != NONCE_BYTES {
            return Err(SealError::BadNonce);
        }
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: message_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Unauthentic)
    }
}

/// Compares two byte strings (secrets, their hashes) in time that does not depend on
/// where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_refusals() {
        let ring = Keyring::new(1, &[7u8; KEY_BYTES]);
        let sealed = ring
            .seal([1u8; NONCE_BYTES], "m1", b"{\"a\":1}")
            .expect("seals");
        assert_ne!(sealed.ciphertext, b"{\"a\":1}".to_vec());
        assert_eq!(
            ring.open(&sealed, "m1").expect("opens"),
            b"{\"a\":1}".to_vec()
        );
        // Moved to another message: refused.
        assert_eq!(ring.open(&sealed, "m2"), Err(SealError::Unauthentic));
        // Tampered: refused.
        let mut bad = sealed.clone();
        bad.ciphertext[0] ^= 1;
        assert_eq!(ring.open(&bad, "m1"), Err(SealError::Unauthentic));
        // Another keyring with the same id but another key: refused.
        let other = Keyring::new(1, &[8u8; KEY_BYTES]);
        assert_eq!(other.open(&sealed, "m1"), Err(SealError::Unauthentic));
        let mut unknown = sealed;
        unknown.key_id = 9;
        assert_eq!(ring.open(&unknown, "m1"), Err(SealError::UnknownKey(9)));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
