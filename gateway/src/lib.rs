//! herald's device gateway.

pub mod codec;
