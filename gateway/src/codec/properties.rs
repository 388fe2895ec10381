//! MQTT 5 properties: the identifiers, their value types, which packets may carry them,
//! and the checks that make a property block malformed or a protocol error.
//!
//! A block is kept as the list it arrived in ([`Properties`]), so `decode(encode(p)) == p`
//! holds for every packet and a caller reads what it needs through the typed getters.

use super::{CodecError, Reader, clamp_str, field_len, put_bin, put_u16, put_varint, varint_len};

/// Payload Format Indicator (byte, PUBLISH and will).
pub const PAYLOAD_FORMAT: u8 = 0x01;
/// Message Expiry Interval (four-byte integer, seconds; PUBLISH and will).
pub const MESSAGE_EXPIRY: u8 = 0x02;
/// Content Type (string; PUBLISH and will).
pub const CONTENT_TYPE: u8 = 0x03;
/// Response Topic (string; PUBLISH and will).
pub const RESPONSE_TOPIC: u8 = 0x08;
/// Correlation Data (binary; PUBLISH and will).
pub const CORRELATION_DATA: u8 = 0x09;
/// Subscription Identifier (variable byte integer; PUBLISH and SUBSCRIBE).
pub const SUBSCRIPTION_ID: u8 = 0x0B;
/// Session Expiry Interval (four-byte integer, seconds; CONNECT, CONNACK, DISCONNECT).
pub const SESSION_EXPIRY: u8 = 0x11;
/// Assigned Client Identifier (string; CONNACK).
pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
/// Server Keep Alive (two-byte integer, seconds; CONNACK).
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
/// Authentication Method (string; CONNECT, CONNACK, AUTH).
pub const AUTH_METHOD: u8 = 0x15;
/// Authentication Data (binary; CONNECT, CONNACK, AUTH).
pub const AUTH_DATA: u8 = 0x16;
/// Request Problem Information (byte 0/1; CONNECT).
pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
/// Will Delay Interval (four-byte integer; will).
pub const WILL_DELAY: u8 = 0x18;
/// Request Response Information (byte 0/1; CONNECT).
pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
/// Response Information (string; CONNACK).
pub const RESPONSE_INFO: u8 = 0x1A;
/// Server Reference (string; CONNACK, DISCONNECT).
pub const SERVER_REFERENCE: u8 = 0x1C;
/// Reason String (string; acknowledgements, CONNACK, DISCONNECT, AUTH).
pub const REASON_STRING: u8 = 0x1F;
/// Receive Maximum (two-byte integer, non-zero; CONNECT, CONNACK).
pub const RECEIVE_MAXIMUM: u8 = 0x21;
/// Topic Alias Maximum (two-byte integer; CONNECT, CONNACK).
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
/// Topic Alias (two-byte integer, non-zero; PUBLISH).
pub const TOPIC_ALIAS: u8 = 0x23;
/// Maximum QoS (byte 0/1; CONNACK).
pub const MAXIMUM_QOS: u8 = 0x24;
/// Retain Available (byte 0/1; CONNACK).
pub const RETAIN_AVAILABLE: u8 = 0x25;
/// User Property (string pair; every packet with properties, any number of times).
pub const USER_PROPERTY: u8 = 0x26;
/// Maximum Packet Size (four-byte integer, non-zero; CONNECT, CONNACK).
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
/// Wildcard Subscription Available (byte 0/1; CONNACK).
pub const WILDCARD_SUB_AVAILABLE: u8 = 0x28;
/// Subscription Identifiers Available (byte 0/1; CONNACK).
pub const SUB_ID_AVAILABLE: u8 = 0x29;
/// Shared Subscription Available (byte 0/1; CONNACK).
pub const SHARED_SUB_AVAILABLE: u8 = 0x2A;

/// The largest value of a variable byte integer.
const MAX_VARINT: u32 = 268_435_455;

/// The packet (or part of one) a property block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// CONNECT's own properties.
    Connect,
    /// The will properties inside CONNECT.
    Will,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// PUBACK, PUBREC, PUBREL and PUBCOMP.
    Ack,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK and UNSUBACK.
    SubAck,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

/// A property's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A byte.
    Byte(u8),
    /// A two-byte integer.
    U16(u16),
    /// A four-byte integer.
    U32(u32),
    /// A variable byte integer.
    VarInt(u32),
    /// A UTF-8 string.
    Str(String),
    /// Binary data.
    Bin(Vec<u8>),
    /// A UTF-8 string pair (user properties).
    Pair(String, String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

/// The value type of a property identifier, `None` if MQTT 5 defines no such property.
fn kind(id: u8) -> Option<Kind> {
    Some(match id {
        PAYLOAD_FORMAT
        | REQUEST_PROBLEM_INFO
        | REQUEST_RESPONSE_INFO
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUB_AVAILABLE
        | SUB_ID_AVAILABLE
        | SHARED_SUB_AVAILABLE => Kind::Byte,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => Kind::U16,
        MESSAGE_EXPIRY | SESSION_EXPIRY | WILL_DELAY | MAXIMUM_PACKET_SIZE => Kind::U32,
        SUBSCRIPTION_ID => Kind::VarInt,
        CONTENT_TYPE | RESPONSE_TOPIC | ASSIGNED_CLIENT_ID | AUTH_METHOD | RESPONSE_INFO
        | SERVER_REFERENCE | REASON_STRING => Kind::Str,
        CORRELATION_DATA | AUTH_DATA => Kind::Bin,
        USER_PROPERTY => Kind::Pair,
        _ => return None,
    })
}

/// Whether `id` may appear in a block of `place` (MQTT 5, table 2-4).
fn allowed(id: u8, place: Place) -> bool {
    use Place::*;
    match id {
        PAYLOAD_FORMAT | MESSAGE_EXPIRY | CONTENT_TYPE | RESPONSE_TOPIC | CORRELATION_DATA => {
            matches!(place, Publish | Will)
        }
        SUBSCRIPTION_ID => matches!(place, Publish | Subscribe),
        SESSION_EXPIRY => matches!(place, Connect | ConnAck | Disconnect),
        ASSIGNED_CLIENT_ID
        | SERVER_KEEP_ALIVE
        | RESPONSE_INFO
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUB_AVAILABLE
        | SUB_ID_AVAILABLE
        | SHARED_SUB_AVAILABLE => place == ConnAck,
        AUTH_METHOD | AUTH_DATA => matches!(place, Connect | ConnAck | Auth),
        REQUEST_PROBLEM_INFO | REQUEST_RESPONSE_INFO => place == Connect,
        WILL_DELAY => place == Will,
        SERVER_REFERENCE => matches!(place, ConnAck | Disconnect),
        REASON_STRING => matches!(place, ConnAck | Ack | SubAck | Disconnect | Auth),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => {
            matches!(place, Connect | ConnAck)
        }
        TOPIC_ALIAS => place == Publish,
        USER_PROPERTY => true,
        _ => false,
    }
}

/// Whether a value is one the spec allows (a zero Receive Maximum, Maximum Packet Size,
/// Topic Alias or Subscription Identifier, or a flag byte other than 0/1, is a protocol
/// error).
fn valid_value(id: u8, value: &Value) -> bool {
    match (id, value) {
        (RECEIVE_MAXIMUM | TOPIC_ALIAS, Value::U16(0)) => false,
        (MAXIMUM_PACKET_SIZE, Value::U32(0)) => false,
        (SUBSCRIPTION_ID, Value::VarInt(v)) => *v != 0,
        (_, Value::Byte(b)) => *b <= 1,
        _ => true,
    }
}

/// A property block, in the order it arrived or will be written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties(pub Vec<(u8, Value)>);

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Properties(Vec::new())
    }

    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds a property (the caller keeps to the one-of-each rule).
    pub fn push(&mut self, id: u8, value: Value) -> &mut Self {
        self.0.push((id, value));
        self
    }

    /// Adds a user property.
    pub fn user(&mut self, key: &str, value: &str) -> &mut Self {
        self.push(USER_PROPERTY, Value::Pair(key.to_owned(), value.to_owned()))
    }

    fn get(&self, id: u8) -> Option<&Value> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// A byte property.
    pub fn byte(&self, id: u8) -> Option<u8> {
        match self.get(id) {
            Some(Value::Byte(b)) => Some(*b),
            _ => None,
        }
    }

    /// A two-byte integer property.
    pub fn u16(&self, id: u8) -> Option<u16> {
        match self.get(id) {
            Some(Value::U16(v)) => Some(*v),
            _ => None,
        }
    }

    /// A four-byte integer property.
    pub fn u32(&self, id: u8) -> Option<u32> {
        match self.get(id) {
            Some(Value::U32(v)) => Some(*v),
            _ => None,
        }
    }

    /// A string property.
    pub fn str(&self, id: u8) -> Option<&str> {
        match self.get(id) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether the block holds `id` at all.
    pub fn has(&self, id: u8) -> bool {
        self.get(id).is_some()
    }

    /// The value of the first user property named `key`.
    pub fn user_value(&self, key: &str) -> Option<&str> {
        self.0.iter().find_map(|(id, v)| match v {
            Value::Pair(k, v) if *id == USER_PROPERTY && k == key => Some(v.as_str()),
            _ => None,
        })
    }

    /// Encoded size of the properties, without the length in front.
    pub(super) fn body_len(&self) -> usize {
        self.0
            .iter()
            .map(|(_, v)| {
                1 + match v {
                    Value::Byte(_) => 1,
                    Value::U16(_) => 2,
                    Value::U32(_) => 4,
                    Value::VarInt(x) => varint_len(*x as usize),
                    Value::Str(s) => field_len(clamp_str(s).as_bytes()),
                    Value::Bin(b) => field_len(b),
                    Value::Pair(k, v) => {
                        field_len(clamp_str(k).as_bytes()) + field_len(clamp_str(v).as_bytes())
                    }
                }
            })
            .sum()
    }

    /// Encoded size with the length in front.
    pub(super) fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body) + body
    }

    /// Writes the block with its length in front. Strings and binaries longer than a
    /// two-byte length can say are clamped, like everywhere in the codec.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.body_len());
        for (id, v) in &self.0 {
            out.push(*id);
            match v {
                Value::Byte(b) => out.push(*b),
                Value::U16(x) => put_u16(out, *x),
                Value::U32(x) => out.extend_from_slice(&x.to_be_bytes()),
                Value::VarInt(x) => put_varint(out, (*x).min(MAX_VARINT) as usize),
                Value::Str(s) => put_bin(out, clamp_str(s).as_bytes()),
                Value::Bin(b) => put_bin(out, b),
                Value::Pair(k, v) => {
                    put_bin(out, clamp_str(k).as_bytes());
                    put_bin(out, clamp_str(v).as_bytes());
                }
            }
        }
    }

    /// Reads a block (its length, then the properties) for `place`.
    pub(super) fn decode(r: &mut Reader<'_>, place: Place) -> Result<Properties, CodecError> {
        let len = r.varint()?;
        let mut block = Reader { buf: r.take(len)? };
        let mut props = Vec::new();
        while !block.is_empty() {
            let id = block.u8()?;
            let kind = kind(id).ok_or(CodecError::UnknownProperty(id))?;
            if !allowed(id, place) {
                return Err(CodecError::PropertyNotAllowed(id));
            }
            let value = match kind {
                Kind::Byte => Value::Byte(block.u8()?),
                Kind::U16 => Value::U16(block.u16()?),
                Kind::U32 => Value::U32(block.u32()?),
                Kind::VarInt => Value::VarInt(block.varint()? as u32),
                Kind::Str => Value::Str(block.string()?.to_owned()),
                Kind::Bin => Value::Bin(block.binary()?.to_vec()),
                Kind::Pair => Value::Pair(block.string()?.to_owned(), block.string()?.to_owned()),
            };
            if !valid_value(id, &value) {
                return Err(CodecError::BadPropertyValue(id));
            }
            // Only user properties (and, server to client, subscription ids) repeat.
            let repeats = id == USER_PROPERTY || (id == SUBSCRIPTION_ID && place == Place::Publish);
            if !repeats && props.iter().any(|(i, _)| *i == id) {
                return Err(CodecError::DuplicateProperty(id));
            }
            props.push((id, value));
        }
        Ok(Properties(props))
    }
}
