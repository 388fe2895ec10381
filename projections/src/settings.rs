//! Settings of the CQL store that a herald without the `cql` feature checks too (its
//! configuration names them whatever the build).

use std::str::FromStr;

/// How many replicas must answer a read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CqlConsistency {
    /// One replica.
    One,
    /// One replica in the local datacenter.
    LocalOne,
    /// A majority of all replicas.
    Quorum,
    /// A majority of the local datacenter's replicas (the default).
    LocalQuorum,
    /// Every replica.
    All,
}

impl FromStr for CqlConsistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "one" => CqlConsistency::One,
            "local_one" => CqlConsistency::LocalOne,
            "quorum" => CqlConsistency::Quorum,
            "local_quorum" => CqlConsistency::LocalQuorum,
            "all" => CqlConsistency::All,
            other => {
                return Err(format!(
                    "{other:?} is not a consistency level (one, local_one, quorum, local_quorum, all)"
                ));
            }
        })
    }
}

/// Whether `name` can be a keyspace (CQL unquoted identifiers, at most 48 characters).
pub fn valid_keyspace(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 48
}
