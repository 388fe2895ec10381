//! herald's MQTT packet codec: the server side of MQTT 3.1.1 and 5.0, plus the 3.1
//! `MQIsdp` CONNECT.
//!
//! # Design: check, then parse
//!
//! The codec is *sans-IO*: it never reads from or writes to a socket, it only
//! works on byte slices. A connection task drives it in two steps:
//!
//! 1. [`check`] looks at the bytes buffered so far. It only reads the fixed
//!    header (at most 5 bytes), so calling it after every read is cheap. It
//!    answers "need more bytes" (`Ok(None)`), "the first packet is complete and
//!    is `n` bytes long" (`Ok(Some(n))`), or an error. The maximum packet size
//!    is enforced **as soon as the remaining-length field is readable** (even
//!    partially: a lower bound already over the limit is rejected), i.e.
//!    *before* the body is buffered, so a peer announcing a 200 MB packet
//!    costs us five bytes, not 200 MB.
//! 2. [`decode`] (3.1.1) or [`decode_as`] (any level) parses exactly one
//!    complete frame, as delimited by `check`, into a [`Packet`]. It
//!    re-validates the fixed header and insists that the frame length matches
//!    the announced remaining length.
//!
//! Encoding is the mirror image: [`encode`] / [`encode_as`] append any
//! [`Packet`] to a `Vec<u8>`, and [`encode_publish`] appends a PUBLISH straight
//! from borrowed parts (the delivery hot path, no intermediate
//! [`Publish`]/`Bytes`).
//!
//! # MQTT 5
//!
//! A CONNECT names its protocol level; every later packet of the connection is
//! read and written at that level ([`LEVEL_5`] or not). MQTT 5 adds property
//! blocks ([`properties`]: each identifier checked for its type, the packets
//! that may carry it, its value, and repeats) and reason codes. Reason codes
//! and properties of PUBACK/PUBREC/PUBREL/PUBCOMP are checked and dropped: an
//! acknowledgement with any reason code ends its exchange, which is all the
//! server needs of it. [`CodecError::reason_code`] gives the MQTT 5 reason code
//! a DISCONNECT should carry for each error.
//!
//! # Why herald has its own codec
//!
//! * **Small and auditable**: only what a server needs, with every rule of the
//!   spec that makes a packet malformed checked explicitly (and a malformed
//!   packet is always an `Err`, never a panic).
//! * **Sans-IO**: no tokio, no framing traits; the same functions serve the
//!   gateway, tests, tools and the fuzz target (`fuzz/`).
//! * **Max size enforced before buffering**, see above.
//! * **No allocation for idle connections**: the codec holds no per-connection
//!   state; an idle connection needs nothing but whatever (possibly empty)
//!   read buffer its owner keeps.
//! * **Property-tested**: every packet type round-trips at both levels
//!   (`decode(encode(p)) == p`), every strict prefix of a valid encoding is
//!   "need more bytes", and arbitrary or mutated bytes never panic.

use bytes::Bytes;

pub mod properties;

pub use properties::{Place, Properties, Value};

/// Largest remaining length expressible by MQTT's 4-byte variable byte integer.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Protocol level of MQTT 3.1 (protocol name `MQIsdp`).
pub const LEVEL_31: u8 = 3;
/// Protocol level of MQTT 3.1.1.
pub const LEVEL_311: u8 = 4;
/// Protocol level of MQTT 5.0.
pub const LEVEL_5: u8 = 5;

/// CONNACK return code 0x00: connection accepted.
pub const CONNACK_ACCEPTED: u8 = 0;
/// CONNACK return code 0x01: unacceptable protocol version.
pub const CONNACK_BAD_PROTOCOL: u8 = 1;
/// CONNACK return code 0x02: client identifier rejected.
pub const CONNACK_ID_REJECTED: u8 = 2;
/// CONNACK return code 0x03: server unavailable.
pub const CONNACK_UNAVAILABLE: u8 = 3;
/// CONNACK return code 0x04: bad user name or password.
pub const CONNACK_BAD_CREDENTIALS: u8 = 4;
/// CONNACK return code 0x05: not authorized.
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;

/// SUBACK return code for a refused subscription.
pub const SUBACK_FAILURE: u8 = 0x80;

/// MQTT 5 reason codes herald sends or reads.
pub mod reason {
    /// Success / normal disconnection / granted QoS 0.
    pub const SUCCESS: u8 = 0x00;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed Packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol Error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Unsupported Protocol Version.
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    /// Client Identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// Bad User Name or Password.
    pub const BAD_CREDENTIALS: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Bad authentication method.
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    /// Keep Alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Topic Filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Receive Maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// Shared Subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    /// Wildcard Subscriptions not supported.
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

// Control packet types (high nibble of the first fixed-header byte).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client to server).
    Connect(Connect),
    /// CONNACK (server to client).
    ConnAck(ConnAck),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK with its packet identifier (QoS 1 acknowledgement).
    PubAck(u16),
    /// PUBREC with its packet identifier (QoS 2, part 1).
    PubRec(u16),
    /// PUBREL with its packet identifier (QoS 2, part 2).
    PubRel(u16),
    /// PUBCOMP with its packet identifier (QoS 2, part 3).
    PubComp(u16),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ (client to server).
    PingReq,
    /// PINGRESP (server to client).
    PingResp,
    /// DISCONNECT (either direction in MQTT 5, client to server in 3.1.1).
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only).
    Auth(Auth),
}

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: [`LEVEL_311`] (name "MQTT"), [`LEVEL_31`] (name "MQIsdp") or
    /// [`LEVEL_5`]. Encoding uses "MQIsdp" for level 3 and "MQTT" otherwise.
    pub protocol_level: u8,
    /// Clean session (3.1.1) / clean start (5) flag.
    pub clean_session: bool,
    /// Keep-alive interval in seconds (0 disables it).
    pub keep_alive_s: u16,
    /// Client identifier; may be empty (whether that is acceptable is the
    /// server's decision, see MQTT-3.1.3-7/8, not the codec's).
    pub client_id: String,
    /// Last will, if the will flag is set.
    pub will: Option<Will>,
    /// User name, if the user name flag is set.
    pub username: Option<String>,
    /// Password, if the password flag is set (requires a user name before MQTT 5).
    pub password: Option<Vec<u8>>,
    /// MQTT 5 CONNECT properties (always empty below level 5).
    pub properties: Properties,
}

impl Default for Connect {
    fn default() -> Self {
        Connect {
            protocol_level: LEVEL_311,
            clean_session: true,
            keep_alive_s: 0,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
            properties: Properties::new(),
        }
    }
}

/// The last-will message of a [`Connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name the will is published to (no wildcards, non-empty).
    pub topic: String,
    /// Will payload.
    pub payload: Vec<u8>,
    /// Will QoS (0, 1 or 2).
    pub qos: u8,
    /// Will retain flag.
    pub retain: bool,
    /// MQTT 5 will properties.
    pub properties: Properties,
}

/// A CONNACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Session present flag (must be false unless `code` is [`CONNACK_ACCEPTED`]).
    pub session_present: bool,
    /// A 3.1.1 return code (one of the `CONNACK_*` constants) or an MQTT 5 reason code.
    pub code: u8,
    /// MQTT 5 CONNACK properties.
    pub properties: Properties,
}

/// A PUBLISH packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// DUP flag (always false for QoS 0).
    pub dup: bool,
    /// QoS level (0, 1 or 2).
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (no wildcards; non-empty unless an MQTT 5 Topic Alias stands in).
    pub topic: String,
    /// Packet identifier; 0 when `qos` is 0, non-zero otherwise.
    pub pkid: u16,
    /// MQTT 5 PUBLISH properties.
    pub properties: Properties,
    /// Application payload.
    pub payload: Bytes,
}

/// A SUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub pkid: u16,
    /// Topic filters with their options byte: the requested QoS (0, 1 or 2) in the low
    /// two bits, and in MQTT 5 No Local, Retain As Published and Retain Handling above
    /// it; at least one.
    pub filters: Vec<(String, u8)>,
    /// MQTT 5 SUBSCRIBE properties.
    pub properties: Properties,
}

/// A SUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE being acknowledged (non-zero).
    pub pkid: u16,
    /// One code per requested filter: granted QoS 0, 1, 2, or a failure
    /// ([`SUBACK_FAILURE`] in 3.1.1, an MQTT 5 reason code of 0x80 or more).
    pub codes: Vec<u8>,
    /// MQTT 5 SUBACK properties.
    pub properties: Properties,
}

/// An UNSUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub pkid: u16,
    /// Topic filters to remove; at least one.
    pub filters: Vec<String>,
    /// MQTT 5 UNSUBSCRIBE properties.
    pub properties: Properties,
}

/// An UNSUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE being acknowledged (non-zero).
    pub pkid: u16,
    /// MQTT 5: one reason code per filter (0x00 success, 0x11 no subscription existed,
    /// or a failure). Empty in 3.1.1.
    pub codes: Vec<u8>,
    /// MQTT 5 UNSUBACK properties.
    pub properties: Properties,
}

/// A DISCONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// MQTT 5 reason code (0 in 3.1.1).
    pub reason_code: u8,
    /// MQTT 5 DISCONNECT properties.
    pub properties: Properties,
}

/// An AUTH packet (MQTT 5 enhanced authentication, which herald does not offer).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Reason code (0x00, 0x18 continue, 0x19 re-authenticate).
    pub reason_code: u8,
    /// AUTH properties.
    pub properties: Properties,
}

/// Why a byte sequence is not a valid MQTT packet.
///
/// Except for [`CodecError::UnsupportedProtocol`] (answer CONNACK
/// [`CONNACK_BAD_PROTOCOL`], then close), the spec's answer to all of these is
/// to close the network connection, in MQTT 5 after a DISCONNECT carrying
/// [`CodecError::reason_code`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The announced packet size (fixed header + remaining length) exceeds the
    /// configured maximum. Detected from the fixed header alone; if the
    /// remaining length was not fully readable yet, `size` is a lower bound.
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Announced frame size in bytes (or a lower bound of it).
        size: usize,
        /// Configured maximum frame size in bytes.
        max: usize,
    },
    /// The remaining-length field (or another variable byte integer) does not end
    /// within 4 bytes.
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// Packet type 0, or 15 (AUTH) below MQTT 5. Holds the packet type (high nibble).
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    /// Fixed-header flags are invalid for the packet type (PUBREL, SUBSCRIBE
    /// and UNSUBSCRIBE need 0b0010, others except PUBLISH need 0, a QoS 0
    /// PUBLISH must not have DUP set). Holds the whole first header byte.
    #[error("invalid fixed header flags in byte {0:#04x}")]
    BadFlags(u8),
    /// CONNECT with a known protocol name but an unsupported protocol level
    /// (e.g. 6). The server should answer CONNACK [`CONNACK_BAD_PROTOCOL`] and close.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    /// CONNECT protocol name is neither "MQTT" nor "MQIsdp".
    #[error("bad protocol name")]
    BadProtocolName,
    /// CONNECT flags are invalid: reserved bit 0 set, will QoS/retain set
    /// without the will flag, or (before MQTT 5) password flag set without the
    /// user name flag. Holds the connect flags byte.
    #[error("invalid connect flags {0:#04x}")]
    BadConnectFlags(u8),
    /// A string is not well-formed UTF-8 or contains U+0000.
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// The packet body is shorter than its fields (or than its announced
    /// remaining length).
    #[error("truncated packet")]
    Truncated,
    /// Bytes remain after the last field of the packet (or the frame is longer
    /// than its announced remaining length).
    #[error("trailing bytes after packet")]
    TrailingBytes,
    /// QoS 3 in a PUBLISH header or a will, or a SUBSCRIBE requested-QoS byte
    /// greater than 2 (reserved bits set). Holds the offending value.
    #[error("invalid QoS {0}")]
    InvalidQos(u8),
    /// A packet identifier that must be non-zero is zero.
    #[error("packet identifier is zero")]
    ZeroPacketId,
    /// SUBSCRIBE, UNSUBSCRIBE or SUBACK without any filter / return code.
    #[error("empty subscription list")]
    EmptySubscription,
    /// A topic name (PUBLISH or will) is empty or contains `+` or `#`.
    #[error("invalid topic name")]
    InvalidTopic,
    /// A topic filter is empty or misuses the `+`/`#` wildcards.
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// A return or reason code the packet cannot carry. Holds the code.
    #[error("invalid return code {0:#04x}")]
    InvalidReturnCode(u8),
    /// CONNACK acknowledge flags have reserved bits set, or session present is
    /// set with a non-zero return code. Holds the flags byte.
    #[error("invalid CONNACK flags {0:#04x}")]
    BadConnAckFlags(u8),
    /// MQTT 5 subscription options with reserved bits set or Retain Handling 3.
    #[error("invalid subscription options {0:#04x}")]
    BadSubscriptionOptions(u8),
    /// An MQTT 5 property identifier the spec does not define.
    #[error("unknown property {0:#04x}")]
    UnknownProperty(u8),
    /// An MQTT 5 property in a packet that may not carry it.
    #[error("property {0:#04x} is not allowed in this packet")]
    PropertyNotAllowed(u8),
    /// An MQTT 5 property that may appear once appears twice.
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    /// An MQTT 5 property with a value the spec forbids (zero Receive Maximum, a flag
    /// other than 0 or 1, ...).
    #[error("invalid value of property {0:#04x}")]
    BadPropertyValue(u8),
}

impl CodecError {
    /// The MQTT 5 reason code of a DISCONNECT (or CONNACK) answering this error:
    /// Packet too large, Protocol Error for a repeated property or a forbidden value,
    /// Unsupported Protocol Version, and Malformed Packet for the rest.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            CodecError::DuplicateProperty(_) | CodecError::BadPropertyValue(_) => {
                reason::PROTOCOL_ERROR
            }
            CodecError::UnsupportedProtocol(_) | CodecError::BadProtocolName => {
                reason::UNSUPPORTED_PROTOCOL
            }
            _ => reason::MALFORMED,
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed header
// ---------------------------------------------------------------------------

/// Validates the first fixed-header byte (packet type and flags).
fn validate_first_byte(first: u8) -> Result<(), CodecError> {
    let ty = first >> 4;
    let flags = first & 0x0F;
    match ty {
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(CodecError::InvalidQos(qos));
            }
            if qos == 0 && flags & 0x08 != 0 {
                // MQTT-3.3.1-2: DUP must be 0 for QoS 0.
                return Err(CodecError::BadFlags(first));
            }
            Ok(())
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags == 0b0010 => Ok(()),
        CONNECT | CONNACK | PUBACK | PUBREC | PUBCOMP | SUBACK | UNSUBACK | PINGREQ | PINGRESP
        | DISCONNECT | AUTH
            if flags == 0 =>
        {
            Ok(())
        }
        CONNECT..=AUTH => Err(CodecError::BadFlags(first)),
        _ => Err(CodecError::UnknownPacketType(ty)),
    }
}

/// Reads the fixed header. `Ok(None)`: more bytes needed. `Ok(Some((header_len,
/// remaining_len)))` otherwise. Enforces `max` on the frame size as early as a
/// lower bound of it is known.
fn read_fixed_header(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    validate_first_byte(first)?;
    let mut value: usize = 0;
    for i in 0..4usize {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7F) << (7 * i);
        let more = byte & 0x80 != 0;
        if more && i == 3 {
            return Err(CodecError::MalformedRemainingLength);
        }
        let header_len = 2 + i;
        // value <= MAX_REMAINING_LENGTH, so this cannot overflow.
        let size = header_len + value;
        if size > max {
            return Err(CodecError::PacketTooLarge { size, max });
        }
        if !more {
            return Ok(Some((header_len, value)));
        }
    }
    Err(CodecError::MalformedRemainingLength)
}

/// Step 1, check: given the bytes buffered so far, returns `Ok(None)` if more
/// bytes are needed (this is **not** an error), `Ok(Some(frame_len))` with the
/// total length (fixed header + remaining length) of the first complete
/// packet, or `Err` if the fixed header is invalid or the announced size
/// exceeds `max_packet_bytes`.
///
/// `max_packet_bytes` is enforced as soon as the remaining-length field is
/// readable, before the body is buffered, so a caller never needs to buffer a
/// huge packet. Only the first (at most 5) bytes are inspected, so calling this
/// after every read is O(1).
pub fn check(buf: &[u8], max_packet_bytes: usize) -> Result<Option<usize>, CodecError> {
    match read_fixed_header(buf, max_packet_bytes)? {
        None => Ok(None),
        Some((header_len, remaining)) => {
            let total = header_len + remaining;
            Ok((buf.len() >= total).then_some(total))
        }
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Cursor over a packet body; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.buf.split_first().ok_or(CodecError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let hi = self.u8()?;
        let lo = self.u8()?;
        Ok(u16::from_be_bytes([hi, lo]))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = <[u8; 4]>::try_from(self.take(4)?).map_err(|_| CodecError::Truncated)?;
        Ok(u32::from_be_bytes(b))
    }

    /// A variable byte integer (at most 4 bytes).
    fn varint(&mut self) -> Result<usize, CodecError> {
        let mut value = 0usize;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::MalformedRemainingLength)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or(CodecError::Truncated)?;
        self.buf = rest;
        Ok(head)
    }

    /// Two-byte length prefixed binary data.
    fn binary(&mut self) -> Result<&'a [u8], CodecError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Two-byte length prefixed UTF-8 string without U+0000.
    fn string(&mut self) -> Result<&'a str, CodecError> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| CodecError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(CodecError::InvalidUtf8);
        }
        Ok(s)
    }

    fn packet_id(&mut self) -> Result<u16, CodecError> {
        match self.u16()? {
            0 => Err(CodecError::ZeroPacketId),
            id => Ok(id),
        }
    }

    fn rest(self) -> &'a [u8] {
        self.buf
    }

    fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes)
        }
    }
}

/// A topic name must be non-empty and free of wildcards (MQTT-3.3.2-2, 4.7.3-1).
fn validate_topic_name(topic: &str) -> Result<(), CodecError> {
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(CodecError::InvalidTopic);
    }
    Ok(())
}

/// A topic filter must be non-empty; `#` only as the whole last level, `+`
/// only as a whole level (MQTT-4.7.1-2/3, 4.7.3-1).
fn validate_topic_filter(filter: &str) -> Result<(), CodecError> {
    if filter.is_empty() {
        return Err(CodecError::InvalidTopicFilter);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            other => !other.contains(['+', '#']),
        };
        if !ok {
            return Err(CodecError::InvalidTopicFilter);
        }
    }
    Ok(())
}

/// Step 2, parse exactly one complete MQTT 3.1.1 frame (as delimited by [`check`]); a
/// CONNECT is read at whatever level it names. Same as [`decode_as`] at [`LEVEL_311`].
pub fn decode(frame: &[u8]) -> Result<Packet, CodecError> {
    decode_as(frame, LEVEL_311)
}

/// Step 2, parse exactly one complete frame (as delimited by [`check`]) of a connection
/// at protocol `level` (the level its CONNECT named; a CONNECT itself is read at the
/// level it names).
///
/// The frame must be exactly as long as its fixed header announces: shorter
/// is [`CodecError::Truncated`], longer is [`CodecError::TrailingBytes`]. No
/// size limit is applied here; that is [`check`]'s job. A PUBLISH payload is
/// copied into a fresh [`Bytes`].
pub fn decode_as(frame: &[u8], level: u8) -> Result<Packet, CodecError> {
    let (header_len, remaining) =
        read_fixed_header(frame, usize::MAX)?.ok_or(CodecError::Truncated)?;
    let total = header_len + remaining;
    if frame.len() > total {
        return Err(CodecError::TrailingBytes);
    }
    let body = frame.get(header_len..total).ok_or(CodecError::Truncated)?;
    let first = frame.first().copied().ok_or(CodecError::Truncated)?;
    let v5 = level == LEVEL_5;
    let mut r = Reader { buf: body };
    let packet = match first >> 4 {
        CONNECT => Packet::Connect(decode_connect(&mut r)?),
        CONNACK => {
            let flags = r.u8()?;
            let code = r.u8()?;
            if flags & 0xFE != 0 {
                return Err(CodecError::BadConnAckFlags(flags));
            }
            let known = if v5 {
                code == 0 || code >= 0x80
            } else {
                code <= CONNACK_NOT_AUTHORIZED
            };
            if !known {
                return Err(CodecError::InvalidReturnCode(code));
            }
            let session_present = flags & 0x01 != 0;
            if session_present && code != CONNACK_ACCEPTED {
                return Err(CodecError::BadConnAckFlags(flags));
            }
            let properties = props_at(&mut r, v5, Place::ConnAck)?;
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties,
            })
        }
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            let topic = r.string()?;
            let pkid = if qos > 0 { r.packet_id()? } else { 0 };
            let properties = props_at(&mut r, v5, Place::Publish)?;
            // MQTT 5: an empty topic name stands for the one a Topic Alias names.
            if !(v5 && topic.is_empty() && properties.has(properties::TOPIC_ALIAS)) {
                validate_topic_name(topic)?;
            }
            return Ok(Packet::Publish(Publish {
                dup: first & 0x08 != 0,
                qos,
                retain: first & 0x01 != 0,
                topic: topic.to_owned(),
                pkid,
                properties,
                payload: Bytes::copy_from_slice(r.rest()),
            }));
        }
        PUBACK => Packet::PubAck(decode_ack(&mut r, v5)?),
        PUBREC => Packet::PubRec(decode_ack(&mut r, v5)?),
        PUBREL => Packet::PubRel(decode_ack(&mut r, v5)?),
        PUBCOMP => Packet::PubComp(decode_ack(&mut r, v5)?),
        SUBSCRIBE => {
            let pkid = r.packet_id()?;
            let properties = props_at(&mut r, v5, Place::Subscribe)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                validate_topic_filter(filter)?;
                let options = r.u8()?;
                if options & 0x03 == 3 || (!v5 && options > 2) {
                    return Err(CodecError::InvalidQos(options));
                }
                // Reserved bits 6-7, and Retain Handling 3.
                if options & 0xC0 != 0 || options & 0x30 == 0x30 {
                    return Err(CodecError::BadSubscriptionOptions(options));
                }
                filters.push((filter.to_owned(), options));
            }
            if filters.is_empty() {
                return Err(CodecError::EmptySubscription);
            }
            Packet::Subscribe(Subscribe {
                pkid,
                filters,
                properties,
            })
        }
        SUBACK => {
            let pkid = r.packet_id()?;
            let properties = props_at(&mut r, v5, Place::SubAck)?;
            let codes = r.rest().to_vec();
            if codes.is_empty() {
                return Err(CodecError::EmptySubscription);
            }
            let valid = |c: u8| {
                if v5 {
                    c <= 2 || c >= 0x80
                } else {
                    matches!(c, 0..=2 | SUBACK_FAILURE)
                }
            };
            if let Some(&bad) = codes.iter().find(|&&c| !valid(c)) {
                return Err(CodecError::InvalidReturnCode(bad));
            }
            return Ok(Packet::SubAck(SubAck {
                pkid,
                codes,
                properties,
            }));
        }
        UNSUBSCRIBE => {
            let pkid = r.packet_id()?;
            let properties = props_at(&mut r, v5, Place::Unsubscribe)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                validate_topic_filter(filter)?;
                filters.push(filter.to_owned());
            }
            if filters.is_empty() {
                return Err(CodecError::EmptySubscription);
            }
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                filters,
                properties,
            })
        }
        UNSUBACK => {
            let pkid = r.packet_id()?;
            if v5 {
                let properties = Properties::decode(&mut r, Place::SubAck)?;
                let codes = r.rest().to_vec();
                if codes.is_empty() {
                    return Err(CodecError::EmptySubscription);
                }
                if let Some(&bad) = codes.iter().find(|&&c| !matches!(c, 0x00 | 0x11 | 0x80..)) {
                    return Err(CodecError::InvalidReturnCode(bad));
                }
                return Ok(Packet::UnsubAck(UnsubAck {
                    pkid,
                    codes,
                    properties,
                }));
            }
            Packet::UnsubAck(UnsubAck {
                pkid,
                ..UnsubAck::default()
            })
        }
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => {
            let (reason_code, properties) = if v5 {
                decode_reason(&mut r, Place::Disconnect)?
            } else {
                (0, Properties::new())
            };
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        }
        AUTH if v5 => {
            let (reason_code, properties) = decode_reason(&mut r, Place::Auth)?;
            if !matches!(reason_code, 0x00 | 0x18 | 0x19) {
                return Err(CodecError::InvalidReturnCode(reason_code));
            }
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        }
        ty => return Err(CodecError::UnknownPacketType(ty)),
    };
    r.finish()?;
    Ok(packet)
}

/// The protocol level a CONNECT names, if `bytes` begin with one and it is readable
/// (for answering a CONNECT that fails to parse at the right level).
pub fn connect_level(bytes: &[u8]) -> Option<u8> {
    if bytes.first()? >> 4 != CONNECT {
        return None;
    }
    let mut header_len = 2;
    while bytes.get(header_len - 1)? & 0x80 != 0 && header_len < 5 {
        header_len += 1;
    }
    let mut r = Reader {
        buf: bytes.get(header_len..)?,
    };
    r.binary().ok()?;
    r.u8().ok()
}

/// A property block at `place` in MQTT 5; none below it.
fn props_at(r: &mut Reader<'_>, v5: bool, place: Place) -> Result<Properties, CodecError> {
    if v5 {
        Properties::decode(r, place)
    } else {
        Ok(Properties::new())
    }
}

/// The packet identifier of a PUBACK/PUBREC/PUBREL/PUBCOMP; in MQTT 5 the optional
/// reason code and properties after it are checked and dropped.
fn decode_ack(r: &mut Reader<'_>, v5: bool) -> Result<u16, CodecError> {
    let pkid = r.packet_id()?;
    if v5 && !r.is_empty() {
        let code = r.u8()?;
        if !matches!(code, 0x00 | 0x10 | 0x80..) {
            return Err(CodecError::InvalidReturnCode(code));
        }
        if !r.is_empty() {
            Properties::decode(r, Place::Ack)?;
        }
    }
    Ok(pkid)
}

/// An MQTT 5 DISCONNECT/AUTH body: a reason code (0 when the body is empty) and
/// properties (none when only the code is there).
fn decode_reason(r: &mut Reader<'_>, place: Place) -> Result<(u8, Properties), CodecError> {
    if r.is_empty() {
        return Ok((0, Properties::new()));
    }
    let code = r.u8()?;
    if place == Place::Disconnect && !matches!(code, 0x00 | 0x04 | 0x80..) {
        return Err(CodecError::InvalidReturnCode(code));
    }
    let properties = if r.is_empty() {
        Properties::new()
    } else {
        Properties::decode(r, place)?
    };
    Ok((code, properties))
}

fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, CodecError> {
    let name = r.binary()?;
    let protocol_level = r.u8()?;
    match (name, protocol_level) {
        (b"MQTT", LEVEL_311 | LEVEL_5) | (b"MQIsdp", LEVEL_31) => {}
        (b"MQTT" | b"MQIsdp", level) => return Err(CodecError::UnsupportedProtocol(level)),
        _ => return Err(CodecError::BadProtocolName),
    }
    let v5 = protocol_level == LEVEL_5;
    let flags = r.u8()?;
    let username_flag = flags & 0x80 != 0;
    let password_flag = flags & 0x40 != 0;
    let will_retain = flags & 0x20 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_flag = flags & 0x04 != 0;
    let clean_session = flags & 0x02 != 0;
    if flags & 0x01 != 0 {
        // MQTT-3.1.2-3: reserved flag must be 0.
        return Err(CodecError::BadConnectFlags(flags));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        // MQTT-3.1.2-11/13/15.
        return Err(CodecError::BadConnectFlags(flags));
    }
    if will_qos == 3 {
        // MQTT-3.1.2-14.
        return Err(CodecError::InvalidQos(will_qos));
    }
    if password_flag && !username_flag && !v5 {
        // MQTT-3.1.2-22 (MQTT 5 allows a password without a user name).
        return Err(CodecError::BadConnectFlags(flags));
    }
    let keep_alive_s = r.u16()?;
    let properties = props_at(r, v5, Place::Connect)?;
    let client_id = r.string()?.to_owned();
    let will = if will_flag {
        let properties = props_at(r, v5, Place::Will)?;
        let topic = r.string()?;
        validate_topic_name(topic)?;
        let payload = r.binary()?;
        Some(Will {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?.to_owned())
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    Ok(Connect {
        protocol_level,
        clean_session,
        keep_alive_s,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

const MAX_FIELD: usize = u16::MAX as usize;

/// Binary data clamped to what a two-byte length prefix can express.
fn clamp_bin(b: &[u8]) -> &[u8] {
    b.get(..MAX_FIELD).unwrap_or(b)
}

/// String clamped (at a char boundary) to what a two-byte length can express.
fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Two-byte length prefixed field (clamped to 65535 bytes).
fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    let b = clamp_bin(b);
    put_u16(out, u16::try_from(b.len()).unwrap_or(u16::MAX));
    out.extend_from_slice(b);
}

/// Encoded size of a two-byte length prefixed field.
fn field_len(b: &[u8]) -> usize {
    2 + clamp_bin(b).len()
}

/// Writes a variable byte integer (values above [`MAX_REMAINING_LENGTH`] are clamped).
fn put_varint(out: &mut Vec<u8>, value: usize) {
    let mut len = value.min(MAX_REMAINING_LENGTH);
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Encoded size of a variable byte integer.
fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes the first header byte and the remaining length (which the callers
/// keep at most [`MAX_REMAINING_LENGTH`], so at most 4 bytes).
fn put_header(out: &mut Vec<u8>, first: u8, remaining: usize) {
    out.reserve(5 + remaining);
    out.push(first);
    put_varint(out, remaining);
}

fn put_pkid_only(out: &mut Vec<u8>, first: u8, pkid: u16) {
    put_header(out, first, 2);
    put_u16(out, pkid);
}

/// Encoded size of a property block at `level` (nothing below MQTT 5).
fn props_len(props: &Properties, level: u8) -> usize {
    if level == LEVEL_5 {
        props.encoded_len()
    } else {
        0
    }
}

/// Writes a property block at `level` (nothing below MQTT 5).
fn put_props(out: &mut Vec<u8>, props: &Properties, level: u8) {
    if level == LEVEL_5 {
        props.encode(out);
    }
}

/// Appends the MQTT 3.1.1 encoding of `packet` to `out` (a CONNECT at the level it
/// names). Same as [`encode_as`] at [`LEVEL_311`].
pub fn encode(packet: &Packet, out: &mut Vec<u8>) {
    encode_as(packet, LEVEL_311, out);
}

/// Appends the encoding of `packet` at protocol `level` to `out` (a CONNECT is written
/// at the level it names). Below MQTT 5 properties and reason codes are left out.
///
/// `encode_as` does not validate: for every packet [`decode_as`] accepts at the same
/// level, `decode_as(encode_as(p)) == p`, while a packet `decode_as` would reject (zero
/// packet id, wildcard topic, password without user name, ...) is encoded as its
/// fields say and the peer will reject it. It never panics: fields beyond
/// MQTT's limits are clamped so the output is a correctly framed packet
/// (strings/binaries to 65535 bytes, PUBLISH payloads and
/// SUBSCRIBE/UNSUBSCRIBE/SUBACK lists so the remaining length stays within
/// [`MAX_REMAINING_LENGTH`]; property blocks are not clamped as a whole);
/// PUBLISH QoS above 2 is sent as 2, and DUP is never set on QoS 0 (MQTT-3.3.1-2).
pub fn encode_as(packet: &Packet, level: u8, out: &mut Vec<u8>) {
    let v5 = level == LEVEL_5;
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(c) => {
            put_header(out, CONNACK << 4, 2 + props_len(&c.properties, level));
            out.push(u8::from(c.session_present));
            out.push(c.code);
            put_props(out, &c.properties, level);
        }
        Packet::Publish(p) => {
            let mut props = Vec::new();
            if v5 {
                p.properties.encode(&mut props);
            }
            write_publish(
                out,
                &p.topic,
                p.qos,
                p.pkid,
                p.dup,
                p.retain,
                v5.then_some(&props[..]),
                p.payload.as_ref(),
            )
        }
        Packet::PubAck(id) => put_pkid_only(out, PUBACK << 4, *id),
        Packet::PubRec(id) => put_pkid_only(out, PUBREC << 4, *id),
        Packet::PubRel(id) => put_pkid_only(out, (PUBREL << 4) | 0b0010, *id),
        Packet::PubComp(id) => put_pkid_only(out, PUBCOMP << 4, *id),
        Packet::Subscribe(s) => {
            let mut remaining = 2 + props_len(&s.properties, level);
            let mut count = 0;
            for (filter, _) in &s.filters {
                let add = field_len(filter.as_bytes()) + 1;
                if remaining + add > MAX_REMAINING_LENGTH {
                    break;
                }
                remaining += add;
                count += 1;
            }
            put_header(out, (SUBSCRIBE << 4) | 0b0010, remaining);
            put_u16(out, s.pkid);
            put_props(out, &s.properties, level);
            for (filter, qos) in s.filters.iter().take(count) {
                put_bin(out, clamp_str(filter).as_bytes());
                out.push(*qos);
            }
        }
        Packet::SubAck(s) => encode_codes(out, SUBACK, s.pkid, &s.properties, &s.codes, level),
        Packet::Unsubscribe(u) => {
            let mut remaining = 2 + props_len(&u.properties, level);
            let mut count = 0;
            for filter in &u.filters {
                let add = field_len(filter.as_bytes());
                if remaining + add > MAX_REMAINING_LENGTH {
                    break;
                }
                remaining += add;
                count += 1;
            }
            put_header(out, (UNSUBSCRIBE << 4) | 0b0010, remaining);
            put_u16(out, u.pkid);
            put_props(out, &u.properties, level);
            for filter in u.filters.iter().take(count) {
                put_bin(out, clamp_str(filter).as_bytes());
            }
        }
        Packet::UnsubAck(u) if v5 => {
            encode_codes(out, UNSUBACK, u.pkid, &u.properties, &u.codes, level)
        }
        Packet::UnsubAck(u) => put_pkid_only(out, UNSUBACK << 4, u.pkid),
        Packet::PingReq => put_header(out, PINGREQ << 4, 0),
        Packet::PingResp => put_header(out, PINGRESP << 4, 0),
        Packet::Disconnect(d) if v5 => encode_reason(out, DISCONNECT, d.reason_code, &d.properties),
        Packet::Disconnect(_) => put_header(out, DISCONNECT << 4, 0),
        Packet::Auth(a) => encode_reason(out, AUTH, a.reason_code, &a.properties),
    }
}

/// SUBACK / UNSUBACK: packet id, properties, one code per filter.
fn encode_codes(out: &mut Vec<u8>, ty: u8, pkid: u16, props: &Properties, codes: &[u8], level: u8) {
    let head = 2 + props_len(props, level);
    let codes = codes.get(..MAX_REMAINING_LENGTH - head).unwrap_or(codes);
    put_header(out, ty << 4, head + codes.len());
    put_u16(out, pkid);
    put_props(out, props, level);
    out.extend_from_slice(codes);
}

/// An MQTT 5 DISCONNECT / AUTH: nothing for a plain success, else the reason code and,
/// if there are any, the properties.
fn encode_reason(out: &mut Vec<u8>, ty: u8, code: u8, props: &Properties) {
    if code == 0 && props.is_empty() {
        put_header(out, ty << 4, 0);
    } else if props.is_empty() {
        put_header(out, ty << 4, 1);
        out.push(code);
    } else {
        put_header(out, ty << 4, 1 + props.encoded_len());
        out.push(code);
        props.encode(out);
    }
}

fn encode_connect(c: &Connect, out: &mut Vec<u8>) {
    let name: &[u8] = if c.protocol_level == LEVEL_31 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    let level = c.protocol_level;
    let client_id = clamp_str(&c.client_id);
    let will_topic = c.will.as_ref().map(|w| clamp_str(&w.topic));
    let username = c.username.as_deref().map(clamp_str);

    let mut remaining = field_len(name)
        + 1
        + 1
        + 2
        + props_len(&c.properties, level)
        + field_len(client_id.as_bytes());
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let (Some(w), Some(topic)) = (&c.will, will_topic) {
        flags |= 0x04 | ((w.qos & 0x03) << 3);
        if w.retain {
            flags |= 0x20;
        }
        remaining +=
            props_len(&w.properties, level) + field_len(topic.as_bytes()) + field_len(&w.payload);
    }
    if let Some(u) = username {
        flags |= 0x80;
        remaining += field_len(u.as_bytes());
    }
    if let Some(p) = &c.password {
        flags |= 0x40;
        remaining += field_len(p);
    }

    put_header(out, CONNECT << 4, remaining);
    put_bin(out, name);
    out.push(c.protocol_level);
    out.push(flags);
    put_u16(out, c.keep_alive_s);
    put_props(out, &c.properties, level);
    put_bin(out, client_id.as_bytes());
    if let (Some(w), Some(topic)) = (&c.will, will_topic) {
        put_props(out, &w.properties, level);
        put_bin(out, topic.as_bytes());
        put_bin(out, &w.payload);
    }
    if let Some(u) = username {
        put_bin(out, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_bin(out, p);
    }
}

/// A PUBLISH; `props` is an encoded MQTT 5 property block (with its length), `None`
/// below MQTT 5.
#[allow(clippy::too_many_arguments)]
fn write_publish(
    out: &mut Vec<u8>,
    topic: &str,
    qos: u8,
    pkid: u16,
    dup: bool,
    retain: bool,
    props: Option<&[u8]>,
    payload: &[u8],
) {
    let qos = qos.min(2);
    let topic = clamp_str(topic);
    let props = props.unwrap_or_default();
    let header = field_len(topic.as_bytes()) + if qos > 0 { 2 } else { 0 } + props.len();
    let payload = payload
        .get(..MAX_REMAINING_LENGTH.saturating_sub(header))
        .unwrap_or(payload);
    let mut first = (PUBLISH << 4) | (qos << 1);
    if dup && qos > 0 {
        first |= 0x08;
    }
    if retain {
        first |= 0x01;
    }
    put_header(out, first, header + payload.len());
    put_bin(out, topic.as_bytes());
    if qos > 0 {
        put_u16(out, pkid);
    }
    out.extend_from_slice(props);
    out.extend_from_slice(payload);
}

/// Convenience for the hot path: appends a non-retained MQTT 3.1.1 PUBLISH built from
/// borrowed parts, without building a [`Publish`] (no payload copy into [`Bytes`]).
///
/// Meant for QoS 0/1 (QoS 2 works too; above 2 is sent as 2). For QoS 0,
/// `pkid` is not written and `dup` is ignored. Same clamping rules as
/// [`encode`].
pub fn encode_publish(
    out: &mut Vec<u8>,
    topic: &str,
    qos: u8,
    pkid: u16,
    dup: bool,
    payload: &[u8],
) {
    write_publish(out, topic, qos, pkid, dup, false, None, payload);
}

/// [`encode_publish`] for an MQTT 5 connection, with the PUBLISH properties `props`.
pub fn encode_publish_v5(
    out: &mut Vec<u8>,
    topic: &str,
    qos: u8,
    pkid: u16,
    dup: bool,
    props: &Properties,
    payload: &[u8],
) {
    let mut block = Vec::with_capacity(props.encoded_len());
    props.encode(&mut block);
    write_publish(out, topic, qos, pkid, dup, false, Some(&block), payload);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(p: &Packet) -> Vec<u8> {
        let mut out = Vec::new();
        encode(p, &mut out);
        out
    }

    // ---- strategies -------------------------------------------------------

    fn mqtt_char() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => proptest::char::range('a', 'z'),
            1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        ]
    }

    fn mqtt_string() -> impl Strategy<Value = String> {
        proptest::collection::vec(mqtt_char(), 0..12).prop_map(|v| v.into_iter().collect())
    }

    /// A non-wildcard, non-separator char.
    fn level_char() -> impl Strategy<Value = char> {
        mqtt_char().prop_filter("plain level char", |c| !matches!(c, '+' | '#' | '/'))
    }

    fn topic_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![4 => level_char(), 1 => Just('/')], 1..16)
            .prop_map(|v| v.into_iter().collect())
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            1 => Just("+".to_owned()),
            4 => proptest::collection::vec(level_char(), 0..6)
                .prop_map(|v| v.into_iter().collect::<String>()),
        ];
        (proptest::collection::vec(level, 0..5), any::<bool>()).prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                if levels.is_empty() {
                    f.push('#');
                } else {
                    f.push_str("/#");
                }
            }
            if f.is_empty() { "#".to_owned() } else { f }
        })
    }

    fn pkid() -> impl Strategy<Value = u16> {
        1..=u16::MAX
    }

    fn bytes_vec(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn user_props() -> impl Strategy<Value = Vec<(u8, Value)>> {
        proptest::collection::vec(
            (mqtt_string(), mqtt_string())
                .prop_map(|(k, v)| (properties::USER_PROPERTY, Value::Pair(k, v))),
            0..3,
        )
    }

    /// A valid property block for `place` at `level` (always empty below MQTT 5): a few
    /// of the properties the place allows, and user properties.
    fn props(place: Place, level: u8) -> BoxedStrategy<Properties> {
        use properties::*;
        if level != LEVEL_5 {
            return Just(Properties::new()).boxed();
        }
        let reason = || mqtt_string().prop_map(Value::Str);
        let some: BoxedStrategy<Vec<(u8, Value)>> = match place {
            Place::Connect => (
                proptest::option::of(any::<u32>()),
                proptest::option::of(1u16..),
                proptest::option::of(1u32..),
            )
                .prop_map(|(e, r, m)| {
                    let mut v = Vec::new();
                    v.extend(e.map(|e| (SESSION_EXPIRY, Value::U32(e))));
                    v.extend(r.map(|r| (RECEIVE_MAXIMUM, Value::U16(r))));
                    v.extend(m.map(|m| (MAXIMUM_PACKET_SIZE, Value::U32(m))));
                    v
                })
                .boxed(),
            Place::Will => (
                proptest::option::of(any::<u32>()),
                proptest::option::of(mqtt_string()),
            )
                .prop_map(|(e, c)| {
                    let mut v = Vec::new();
                    v.extend(e.map(|e| (MESSAGE_EXPIRY, Value::U32(e))));
                    v.extend(c.map(|c| (CONTENT_TYPE, Value::Str(c))));
                    v
                })
                .boxed(),
            Place::ConnAck => (
                proptest::option::of(any::<u16>()),
                proptest::option::of(0u8..=1),
                proptest::option::of(reason()),
            )
                .prop_map(|(k, r, s)| {
                    let mut v = Vec::new();
                    v.extend(k.map(|k| (SERVER_KEEP_ALIVE, Value::U16(k))));
                    v.extend(r.map(|r| (RETAIN_AVAILABLE, Value::Byte(r))));
                    v.extend(s.map(|s| (REASON_STRING, s)));
                    v
                })
                .boxed(),
            Place::Publish => (
                proptest::option::of(any::<u32>()),
                proptest::collection::vec(1u32..=268_435_455, 0..3),
                proptest::option::of(bytes_vec(8)),
            )
                .prop_map(|(e, ids, c)| {
                    let mut v = Vec::new();
                    v.extend(e.map(|e| (MESSAGE_EXPIRY, Value::U32(e))));
                    v.extend(ids.into_iter().map(|i| (SUBSCRIPTION_ID, Value::VarInt(i))));
                    v.extend(c.map(|c| (CORRELATION_DATA, Value::Bin(c))));
                    v
                })
                .boxed(),
            Place::Subscribe => proptest::option::of(1u32..=268_435_455)
                .prop_map(|i| {
                    i.map(|i| (SUBSCRIPTION_ID, Value::VarInt(i)))
                        .into_iter()
                        .collect()
                })
                .boxed(),
            Place::SubAck | Place::Ack => proptest::option::of(reason())
                .prop_map(|s| s.map(|s| (REASON_STRING, s)).into_iter().collect())
                .boxed(),
            Place::Disconnect => (
                proptest::option::of(any::<u32>()),
                proptest::option::of(reason()),
            )
                .prop_map(|(e, s)| {
                    let mut v = Vec::new();
                    v.extend(e.map(|e| (SESSION_EXPIRY, Value::U32(e))));
                    v.extend(s.map(|s| (REASON_STRING, s)));
                    v
                })
                .boxed(),
            Place::Auth => proptest::option::of(mqtt_string())
                .prop_map(|m| {
                    m.map(|m| (AUTH_METHOD, Value::Str(m)))
                        .into_iter()
                        .collect()
                })
                .boxed(),
            Place::Unsubscribe => Just(Vec::new()).boxed(),
        };
        (some, user_props())
            .prop_map(|(mut v, users)| {
                v.extend(users);
                Properties(v)
            })
            .boxed()
    }

    fn will(level: u8) -> impl Strategy<Value = Will> {
        (
            topic_name(),
            bytes_vec(32),
            0u8..=2,
            any::<bool>(),
            props(Place::Will, level),
        )
            .prop_map(|(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            })
    }

    fn connect() -> impl Strategy<Value = Connect> {
        prop_oneof![Just(LEVEL_31), Just(LEVEL_311), Just(LEVEL_5)].prop_flat_map(|level| {
            (
                any::<bool>(),
                any::<u16>(),
                mqtt_string(),
                proptest::option::of(will(level)),
                proptest::option::of(mqtt_string()),
                proptest::option::of(bytes_vec(16)),
                props(Place::Connect, level),
            )
                .prop_map(
                    move |(
                        clean_session,
                        keep_alive_s,
                        client_id,
                        will,
                        username,
                        pw,
                        properties,
                    )| {
                        // Below MQTT 5 a password needs a user name.
                        let password = if username.is_some() || level == LEVEL_5 {
                            pw
                        } else {
                            None
                        };
                        Connect {
                            protocol_level: level,
                            clean_session,
                            keep_alive_s,
                            client_id,
                            will,
                            username,
                            password,
                            properties,
                        }
                    },
                )
        })
    }

    fn publish(level: u8) -> impl Strategy<Value = Publish> {
        (
            0u8..=2,
            any::<bool>(),
            any::<bool>(),
            topic_name(),
            pkid(),
            props(Place::Publish, level),
            prop_oneof![3 => bytes_vec(64), 1 => bytes_vec(400)],
        )
            .prop_map(
                |(qos, dup, retain, topic, pkid, properties, payload)| Publish {
                    dup: dup && qos > 0,
                    qos,
                    retain,
                    topic,
                    pkid: if qos == 0 { 0 } else { pkid },
                    properties,
                    payload: Bytes::from(payload),
                },
            )
    }

    /// Any packet valid at `level` (MQTT 3.1.1 or 5; a CONNECT of any level).
    fn packet(level: u8) -> impl Strategy<Value = Packet> {
        let v5 = level == LEVEL_5;
        let connack_code = if v5 {
            prop_oneof![Just(0u8), Just(0x80), Just(0x87), Just(0x95)].boxed()
        } else {
            (0u8..=5).boxed()
        };
        let suback_code = if v5 {
            prop_oneof![
                Just(0u8),
                Just(1),
                Just(2),
                Just(0x80),
                Just(0x87),
                Just(0xA2)
            ]
            .boxed()
        } else {
            prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)].boxed()
        };
        let unsuback_codes = if v5 {
            proptest::collection::vec(prop_oneof![Just(0u8), Just(0x11), Just(0x87)], 1..4).boxed()
        } else {
            Just(Vec::new()).boxed()
        };
        let options = if v5 {
            (0u8..=2, 0u8..=1, 0u8..=1, 0u8..=2)
                .prop_map(|(q, nl, rap, rh)| q | (nl << 2) | (rap << 3) | (rh << 4))
                .boxed()
        } else {
            (0u8..=2).boxed()
        };
        let disconnect_code = if v5 {
            prop_oneof![Just(0u8), Just(0x04), Just(0x8D), Just(0x8E), Just(0x95)].boxed()
        } else {
            Just(0u8).boxed()
        };
        let mut all = vec![
            connect().prop_map(Packet::Connect).boxed(),
            (any::<bool>(), connack_code, props(Place::ConnAck, level))
                .prop_map(|(sp, code, properties)| {
                    Packet::ConnAck(ConnAck {
                        session_present: sp && code == 0,
                        code,
                        properties,
                    })
                })
                .boxed(),
            publish(level).prop_map(Packet::Publish).boxed(),
            pkid().prop_map(Packet::PubAck).boxed(),
            pkid().prop_map(Packet::PubRec).boxed(),
            pkid().prop_map(Packet::PubRel).boxed(),
            pkid().prop_map(Packet::PubComp).boxed(),
            (
                pkid(),
                proptest::collection::vec((topic_filter(), options), 1..5),
                props(Place::Subscribe, level),
            )
                .prop_map(|(pkid, filters, properties)| {
                    Packet::Subscribe(Subscribe {
                        pkid,
                        filters,
                        properties,
                    })
                })
                .boxed(),
            (
                pkid(),
                proptest::collection::vec(suback_code, 1..8),
                props(Place::SubAck, level),
            )
                .prop_map(|(pkid, codes, properties)| {
                    Packet::SubAck(SubAck {
                        pkid,
                        codes,
                        properties,
                    })
                })
                .boxed(),
            (
                pkid(),
                proptest::collection::vec(topic_filter(), 1..5),
                props(Place::Unsubscribe, level),
            )
                .prop_map(|(pkid, filters, properties)| {
                    Packet::Unsubscribe(Unsubscribe {
                        pkid,
                        filters,
                        properties,
                    })
                })
                .boxed(),
            (pkid(), unsuback_codes, props(Place::SubAck, level))
                .prop_map(|(pkid, codes, properties)| {
                    Packet::UnsubAck(UnsubAck {
                        pkid,
                        codes,
                        properties,
                    })
                })
                .boxed(),
            Just(Packet::PingReq).boxed(),
            Just(Packet::PingResp).boxed(),
            (disconnect_code, props(Place::Disconnect, level))
                .prop_map(|(reason_code, properties)| {
                    Packet::Disconnect(Disconnect {
                        reason_code,
                        properties,
                    })
                })
                .boxed(),
        ];
        if v5 {
            all.push(
                (
                    prop_oneof![Just(0u8), Just(0x18), Just(0x19)],
                    props(Place::Auth, level),
                )
                    .prop_map(|(reason_code, properties)| {
                        Packet::Auth(Auth {
                            reason_code,
                            properties,
                        })
                    })
                    .boxed(),
            );
        }
        proptest::strategy::Union::new(all)
    }

    /// Drives check()+decode() over a buffer like a connection task would.
    fn drive(buf: &[u8], max: usize) {
        for level in [LEVEL_311, LEVEL_5] {
            let mut rest = buf;
            while let Ok(Some(n)) = check(rest, max) {
                assert!(n <= rest.len() && n <= max);
                let (frame, tail) = rest.split_at(n);
                let _ = decode_as(frame, level);
                let _ = connect_level(frame);
                rest = tail;
            }
            let _ = decode_as(buf, level);
        }
    }

    /// What every valid encoding must satisfy at `level`.
    fn check_round_trip(p: &Packet, level: u8) -> Result<(), TestCaseError> {
        let mut bytes = Vec::new();
        encode_as(p, level, &mut bytes);
        prop_assert_eq!(check(&bytes, bytes.len()), Ok(Some(bytes.len())));
        prop_assert_eq!(check(&bytes, usize::MAX), Ok(Some(bytes.len())));
        prop_assert_eq!(decode_as(&bytes, level), Ok(p.clone()));
        for i in 0..bytes.len() {
            prop_assert_eq!(check(&bytes[..i], bytes.len()), Ok(None), "prefix {}", i);
        }
        // A second packet behind the first does not change the answer.
        let mut two = bytes.clone();
        encode(&Packet::PingReq, &mut two);
        prop_assert_eq!(check(&two, usize::MAX), Ok(Some(bytes.len())));
        // One byte over the limit is rejected.
        let too_small = bytes.len() - 1;
        let rejected = matches!(
            check(&bytes, too_small),
            Err(CodecError::PacketTooLarge { .. })
        );
        prop_assert!(rejected);
        if let Packet::Connect(c) = p {
            prop_assert_eq!(connect_level(&bytes), Some(c.protocol_level));
        }
        Ok(())
    }

    // ---- property tests ---------------------------------------------------

    proptest! {
        #[test]
        fn round_trip(p in packet(LEVEL_311)) {
            check_round_trip(&p, LEVEL_311)?;
        }

        #[test]
        fn round_trip_v5(p in packet(LEVEL_5)) {
            check_round_trip(&p, LEVEL_5)?;
        }

        #[test]
        fn encode_publish_matches_encode(p in publish(LEVEL_311)) {
            let p = Publish { retain: false, ..p };
            let mut a = Vec::new();
            encode_publish(&mut a, &p.topic, p.qos, p.pkid, p.dup, &p.payload);
            prop_assert_eq!(&a, &enc(&Packet::Publish(p.clone())));
            prop_assert_eq!(decode(&a), Ok(Packet::Publish(p)));
        }

        #[test]
        fn encode_publish_v5_matches_encode(p in publish(LEVEL_5)) {
            let p = Publish { retain: false, ..p };
            let mut a = Vec::new();
            encode_publish_v5(&mut a, &p.topic, p.qos, p.pkid, p.dup, &p.properties, &p.payload);
            let mut b = Vec::new();
            encode_as(&Packet::Publish(p.clone()), LEVEL_5, &mut b);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(decode_as(&a, LEVEL_5), Ok(Packet::Publish(p)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            max in prop_oneof![Just(usize::MAX), 0usize..400],
        ) {
            drive(&bytes, max);
        }

        #[test]
        fn mutated_packets_never_panic(
            p in prop_oneof![packet(LEVEL_311), packet(LEVEL_5)],
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = Vec::new();
            encode_as(&p, LEVEL_5, &mut bytes);
            for (idx, val) in edits {
                let i = idx.index(bytes.len());
                bytes[i] = val;
            }
            drive(&bytes, usize::MAX);
            let cut = cut.index(bytes.len() + 1);
            drive(&bytes[..cut], usize::MAX);
        }

        #[test]
        fn header_with_any_body_never_panics(
            first in 0u8..=255,
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = Vec::new();
            put_header(&mut bytes, first, body.len());
            bytes.extend_from_slice(&body);
            drive(&bytes, usize::MAX);
        }
    }

    // ---- unit tests: real traffic & encodings ------------------------------

    /// What `mosquitto_sub -i mosq-sub-1 -u alice -P s3cret -k 60 -t t` sends
    /// (MQTT 3.1.1, clean session, user name + password).
    fn mosquitto_connect() -> Vec<u8> {
        let mut b = vec![0x10, 37];
        b.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x3C]);
        b.extend_from_slice(&[0x00, 10]);
        b.extend_from_slice(b"mosq-sub-1");
        b.extend_from_slice(&[0x00, 5]);
        b.extend_from_slice(b"alice");
        b.extend_from_slice(&[0x00, 6]);
        b.extend_from_slice(b"s3cret");
        b
    }

    #[test]
    fn mosquitto_sub_connect() {
        let bytes = mosquitto_connect();
        assert_eq!(bytes.len(), 39);
        assert_eq!(check(&bytes, 64 * 1024), Ok(Some(39)));
        let expected = Connect {
            protocol_level: 4,
            clean_session: true,
            keep_alive_s: 60,
            client_id: "mosq-sub-1".to_owned(),
            will: None,
            username: Some("alice".to_owned()),
            password: Some(b"s3cret".to_vec()),
            properties: Properties::new(),
        };
        assert_eq!(decode(&bytes), Ok(Packet::Connect(expected.clone())));
        assert_eq!(enc(&Packet::Connect(expected)), bytes);
    }

    #[test]
    fn connect_with_will_and_mqtt31() {
        // MQTT 3.1 ("MQIsdp", level 3), will qos 1 retained, no credentials.
        let mut b = vec![0x10, 0];
        b.extend_from_slice(&[0x00, 0x06]);
        b.extend_from_slice(b"MQIsdp");
        b.extend_from_slice(&[0x03, 0x2C, 0x00, 0x0A]); // will(0x04)|qos1(0x08)|retain(0x20)
        b.extend_from_slice(&[0x00, 0x01, b'c']);
        b.extend_from_slice(&[0x00, 0x03]);
        b.extend_from_slice(b"w/t");
        b.extend_from_slice(&[0x00, 0x02, 0xDE, 0xAD]);
        b[1] = u8::try_from(b.len() - 2).unwrap();
        let p = decode(&b).unwrap();
        assert_eq!(
            p,
            Packet::Connect(Connect {
                protocol_level: 3,
                clean_session: false,
                keep_alive_s: 10,
                client_id: "c".to_owned(),
                will: Some(Will {
                    topic: "w/t".to_owned(),
                    payload: vec![0xDE, 0xAD],
                    qos: 1,
                    retain: true,
                    properties: Properties::new(),
                }),
                username: None,
                password: None,
                properties: Properties::new(),
            })
        );
        assert_eq!(enc(&p), b);
    }

    #[test]
    fn known_encodings() {
        let ack = |session_present, code| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties: Properties::new(),
            })
        };
        assert_eq!(enc(&ack(false, CONNACK_ACCEPTED)), [0x20, 0x02, 0x00, 0x00]);
        assert_eq!(enc(&ack(true, CONNACK_ACCEPTED)), [0x20, 0x02, 0x01, 0x00]);
        assert_eq!(
            enc(&ack(false, CONNACK_BAD_PROTOCOL)),
            [0x20, 0x02, 0x00, 0x01]
        );
        assert_eq!(enc(&ack(false, CONNACK_ID_REJECTED))[3], 2);
        assert_eq!(enc(&ack(false, CONNACK_UNAVAILABLE))[3], 3);
        assert_eq!(enc(&ack(false, CONNACK_BAD_CREDENTIALS))[3], 4);
        assert_eq!(enc(&ack(false, CONNACK_NOT_AUTHORIZED))[3], 5);
        assert_eq!(enc(&Packet::PingResp), [0xD0, 0x00]);
        assert_eq!(enc(&Packet::PingReq), [0xC0, 0x00]);
        assert_eq!(
            enc(&Packet::Disconnect(Disconnect::default())),
            [0xE0, 0x00]
        );
        assert_eq!(enc(&Packet::PubAck(0x1234)), [0x40, 0x02, 0x12, 0x34]);
        assert_eq!(enc(&Packet::PubRec(1)), [0x50, 0x02, 0x00, 0x01]);
        assert_eq!(enc(&Packet::PubRel(1)), [0x62, 0x02, 0x00, 0x01]);
        assert_eq!(enc(&Packet::PubComp(1)), [0x70, 0x02, 0x00, 0x01]);
        assert_eq!(
            enc(&Packet::UnsubAck(UnsubAck {
                pkid: 7,
                ..UnsubAck::default()
            })),
            [0xB0, 0x02, 0x00, 0x07]
        );
        assert_eq!(
            enc(&Packet::SubAck(SubAck {
                pkid: 10,
                codes: vec![0, 1, 2, SUBACK_FAILURE],
                properties: Properties::new(),
            })),
            [0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x02, 0x80]
        );
        // QoS 1 publish, dup, to "a/b" with payload "hi".
        let mut out = Vec::new();
        encode_publish(&mut out, "a/b", 1, 5, true, b"hi");
        assert_eq!(
            out,
            [
                0x3A, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x05, b'h', b'i'
            ]
        );
        // QoS 0: no packet id, dup ignored.
        out.clear();
        encode_publish(&mut out, "a", 0, 5, true, b"");
        assert_eq!(out, [0x30, 0x03, 0x00, 0x01, b'a']);
        // Appends rather than overwrites.
        encode(&Packet::PingResp, &mut out);
        assert_eq!(out, [0x30, 0x03, 0x00, 0x01, b'a', 0xD0, 0x00]);
    }

    #[test]
    fn remaining_length_boundaries() {
        for (remaining, header_len) in [
            (3usize, 2usize),
            (127, 2),
            (128, 3),
            (16_383, 3),
            (16_384, 4),
            (2_097_151, 4),
            (2_097_152, 5),
        ] {
            // Topic "t" => 3 bytes of variable header before the payload.
            let payload = vec![0xA5u8; remaining - 3];
            let p = Packet::Publish(Publish {
                dup: false,
                qos: 0,
                retain: true,
                topic: "t".to_owned(),
                pkid: 0,
                properties: Properties::new(),
                payload: Bytes::from(payload),
            });
            let bytes = enc(&p);
            assert_eq!(bytes.len(), header_len + remaining);
            assert_eq!(check(&bytes, usize::MAX), Ok(Some(bytes.len())));
            assert_eq!(check(&bytes[..bytes.len() - 1], usize::MAX), Ok(None));
            assert_eq!(decode(&bytes), Ok(p));
        }
        // Exact encodings of the boundaries.
        for (len, expect) in [
            (0usize, &[0x00u8][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_REMAINING_LENGTH, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = Vec::new();
            put_header(&mut out, 0x30, len);
            assert_eq!(&out[1..], expect, "remaining length {len}");
        }
        // A non-minimal encoding (0x80 0x00 == 0) is accepted, as in 3.1.1.
        assert_eq!(decode(&[0xC0, 0x80, 0x00]), Ok(Packet::PingReq));
    }

    #[test]
    fn check_needs_more_bytes() {
        assert_eq!(check(&[], 1024), Ok(None));
        assert_eq!(check(&[0x30], 1024), Ok(None));
        assert_eq!(check(&[0x30, 0x80], 1024), Ok(None));
        assert_eq!(check(&[0x30, 0x05, 0x00, 0x01], 1024), Ok(None));
        assert_eq!(check(&[0x30, 0x03, 0x00, 0x01, b'a'], 1024), Ok(Some(5)));
        // Exactly at the limit is fine.
        assert_eq!(check(&[0x30, 0x03, 0x00, 0x01, b'a'], 5), Ok(Some(5)));
    }

    // ---- unit tests: one per error variant ---------------------------------

    #[test]
    fn packet_too_large_before_body() {
        // PUBLISH announcing 10 MiB (0x80 0x80 0x80 0x05 = 5 * 128^3); only the
        // 5 header bytes have arrived.
        let buf = [0x30, 0x80, 0x80, 0x80, 0x05];
        assert_eq!(
            check(&buf, 64 * 1024),
            Err(CodecError::PacketTooLarge {
                size: 5 + 10_485_760,
                max: 64 * 1024
            })
        );
        // Rejected even before the remaining length is complete: after
        // 0xFF 0xFF the length is already >= 16383.
        assert!(matches!(
            check(&[0x30, 0xFF, 0xFF], 1024),
            Err(CodecError::PacketTooLarge { max: 1024, .. })
        ));
        // One byte over.
        assert_eq!(
            check(&[0x30, 0x03, 0x00, 0x01, b'a'], 4),
            Err(CodecError::PacketTooLarge { size: 5, max: 4 })
        );
    }

    #[test]
    fn malformed_remaining_length() {
        let five = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(
            check(&five, usize::MAX),
            Err(CodecError::MalformedRemainingLength)
        );
        assert_eq!(decode(&five), Err(CodecError::MalformedRemainingLength));
        // Detected as soon as the 4th byte shows a continuation bit.
        assert_eq!(
            check(&[0xC0, 0x80, 0x80, 0x80, 0x80], usize::MAX),
            Err(CodecError::MalformedRemainingLength)
        );
    }

    #[test]
    fn unknown_packet_type() {
        assert_eq!(check(&[0x00], 1024), Err(CodecError::UnknownPacketType(0)));
        assert_eq!(decode(&[0x00, 0x00]), Err(CodecError::UnknownPacketType(0)));
        assert_eq!(
            decode(&[0xF0, 0x00]),
            Err(CodecError::UnknownPacketType(15))
        );
    }

    #[test]
    fn bad_flags() {
        // PUBREL needs 0b0010.
        assert_eq!(
            decode(&[0x60, 0x02, 0x00, 0x01]),
            Err(CodecError::BadFlags(0x60))
        );
        assert_eq!(decode(&[0x62, 0x02, 0x00, 0x01]), Ok(Packet::PubRel(1)));
        // SUBSCRIBE / UNSUBSCRIBE need 0b0010.
        assert_eq!(check(&[0x80], 1024), Err(CodecError::BadFlags(0x80)));
        assert_eq!(check(&[0xA0], 1024), Err(CodecError::BadFlags(0xA0)));
        // Others need 0.
        assert_eq!(decode(&[0xC1, 0x00]), Err(CodecError::BadFlags(0xC1)));
        assert_eq!(
            decode(&[0x42, 0x02, 0x00, 0x01]),
            Err(CodecError::BadFlags(0x42))
        );
        assert_eq!(check(&[0x18], 1024), Err(CodecError::BadFlags(0x18)));
        // QoS 0 PUBLISH with DUP.
        assert_eq!(
            decode(&[0x38, 0x03, 0x00, 0x01, b'a']),
            Err(CodecError::BadFlags(0x38))
        );
    }

    #[test]
    fn invalid_qos() {
        // PUBLISH with QoS 3.
        assert_eq!(check(&[0x36], 1024), Err(CodecError::InvalidQos(3)));
        // SUBSCRIBE requesting QoS 3, and reserved bits set.
        assert_eq!(
            decode(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03]),
            Err(CodecError::InvalidQos(3))
        );
        assert_eq!(
            decode(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04]),
            Err(CodecError::InvalidQos(4))
        );
        // Will QoS 3.
        let mut c = mosquitto_connect();
        c[9] = 0x1C; // will | qos 3
        assert_eq!(decode(&c), Err(CodecError::InvalidQos(3)));
    }

    /// A real MQTT 5 CONNECT (mosquitto_sub -V mqttv5 -i c): level 5 and an empty
    /// property block after the keep-alive.
    const MOSQUITTO_V5_CONNECT: [u8; 16] = [
        0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01,
        b'c',
    ];

    #[test]
    fn mosquitto_sub_v5_connect() {
        let v5 = MOSQUITTO_V5_CONNECT;
        assert_eq!(check(&v5, 1024), Ok(Some(16)));
        assert_eq!(connect_level(&v5), Some(LEVEL_5));
        let expected = Connect {
            protocol_level: LEVEL_5,
            keep_alive_s: 60,
            client_id: "c".into(),
            ..Connect::default()
        };
        assert_eq!(decode(&v5), Ok(Packet::Connect(expected.clone())));
        assert_eq!(enc(&Packet::Connect(expected)), v5);
    }

    /// `MOSQUITTO_V5_CONNECT` with `props` (id, then value bytes) as its property block.
    fn v5_connect_with(props: &[u8]) -> Vec<u8> {
        let mut b = MOSQUITTO_V5_CONNECT[..12].to_vec();
        b.push(u8::try_from(props.len()).unwrap());
        b.extend_from_slice(props);
        b.extend_from_slice(&[0x00, 0x01, b'c']);
        b[1] = u8::try_from(b.len() - 2).unwrap();
        b
    }

    #[test]
    fn v5_property_errors() {
        use properties::*;
        // Receive Maximum 10 and a user property: fine.
        let ok = v5_connect_with(&[
            RECEIVE_MAXIMUM,
            0,
            10,
            USER_PROPERTY,
            0,
            1,
            b'k',
            0,
            1,
            b'v',
        ]);
        let Ok(Packet::Connect(c)) = decode(&ok) else {
            panic!("{:?}", decode(&ok))
        };
        assert_eq!(c.properties.u16(RECEIVE_MAXIMUM), Some(10));
        assert_eq!(c.properties.user_value("k"), Some("v"));
        // The same property twice: a protocol error (0x82).
        let dup = v5_connect_with(&[RECEIVE_MAXIMUM, 0, 10, RECEIVE_MAXIMUM, 0, 11]);
        assert_eq!(
            decode(&dup),
            Err(CodecError::DuplicateProperty(RECEIVE_MAXIMUM))
        );
        assert_eq!(
            decode(&dup).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
        // User properties repeat freely.
        let users = v5_connect_with(&[
            USER_PROPERTY,
            0,
            1,
            b'a',
            0,
            0,
            USER_PROPERTY,
            0,
            1,
            b'a',
            0,
            0,
        ]);
        assert!(decode(&users).is_ok());
        // Receive Maximum 0: a protocol error.
        let zero = v5_connect_with(&[RECEIVE_MAXIMUM, 0, 0]);
        assert_eq!(
            decode(&zero),
            Err(CodecError::BadPropertyValue(RECEIVE_MAXIMUM))
        );
        // An identifier MQTT 5 does not define, a property CONNECT may not carry, and a
        // block longer than the packet: malformed (0x81).
        let unknown = v5_connect_with(&[0x7F, 0]);
        assert_eq!(decode(&unknown), Err(CodecError::UnknownProperty(0x7F)));
        assert_eq!(
            decode(&unknown).unwrap_err().reason_code(),
            reason::MALFORMED
        );
        let wrong = v5_connect_with(&[SERVER_KEEP_ALIVE, 0, 5]);
        assert_eq!(
            decode(&wrong),
            Err(CodecError::PropertyNotAllowed(SERVER_KEEP_ALIVE))
        );
        let mut long = v5_connect_with(&[RECEIVE_MAXIMUM, 0, 10]);
        long[12] = 40;
        assert_eq!(decode(&long), Err(CodecError::Truncated));
        // A truncated value inside the block.
        let short = v5_connect_with(&[RECEIVE_MAXIMUM, 0]);
        assert_eq!(decode(&short), Err(CodecError::Truncated));
    }

    #[test]
    fn v5_acks_disconnect_and_auth() {
        // PUBACK with a reason code and a reason string: the id is what counts.
        let ack = [0x40, 0x07, 0x00, 0x05, 0x10, 0x03, 0x1F, 0x00, 0x00];
        assert_eq!(decode_as(&ack, LEVEL_5), Ok(Packet::PubAck(5)));
        assert_eq!(decode(&ack), Err(CodecError::TrailingBytes));
        // A reason code PUBACK cannot carry.
        let bad = [0x40, 0x03, 0x00, 0x05, 0x05];
        assert_eq!(
            decode_as(&bad, LEVEL_5),
            Err(CodecError::InvalidReturnCode(5))
        );
        // DISCONNECT 0x8E (session taken over).
        let mut out = Vec::new();
        encode_as(
            &Packet::Disconnect(Disconnect {
                reason_code: reason::SESSION_TAKEN_OVER,
                properties: Properties::new(),
            }),
            LEVEL_5,
            &mut out,
        );
        assert_eq!(out, [0xE0, 0x01, 0x8E]);
        // AUTH is a packet of MQTT 5 only.
        assert_eq!(
            decode(&[0xF0, 0x00]),
            Err(CodecError::UnknownPacketType(15))
        );
        assert_eq!(
            decode_as(&[0xF0, 0x00], LEVEL_5),
            Ok(Packet::Auth(Auth::default()))
        );
    }

    #[test]
    fn unsupported_protocol() {
        let mut v6 = MOSQUITTO_V5_CONNECT;
        v6[8] = 6;
        assert_eq!(decode(&v6), Err(CodecError::UnsupportedProtocol(6)));
        // "MQTT" with level 3, "MQIsdp" with level 4.
        let mut c = mosquitto_connect();
        c[8] = 3;
        assert_eq!(decode(&c), Err(CodecError::UnsupportedProtocol(3)));
        let mut b = vec![0x10, 0x0F, 0x00, 0x06];
        b.extend_from_slice(b"MQIsdp");
        b.extend_from_slice(&[0x04, 0x02, 0x00, 0x00, 0x00, 0x01, b'c']);
        assert_eq!(decode(&b), Err(CodecError::UnsupportedProtocol(4)));
    }

    #[test]
    fn bad_protocol_name() {
        let mut c = mosquitto_connect();
        c[7] = b'X'; // "MQTX"
        assert_eq!(decode(&c), Err(CodecError::BadProtocolName));
    }

    #[test]
    fn bad_connect_flags() {
        let with_flags = |flags: u8| {
            let mut c = mosquitto_connect();
            c[9] = flags;
            decode(&c)
        };
        // Reserved bit.
        assert_eq!(with_flags(0xC3), Err(CodecError::BadConnectFlags(0xC3)));
        // Will retain / will QoS without will flag.
        assert_eq!(with_flags(0xE2), Err(CodecError::BadConnectFlags(0xE2)));
        assert_eq!(with_flags(0xCA), Err(CodecError::BadConnectFlags(0xCA)));
        // Password without user name.
        let mut b = vec![0x10, 0x0F];
        b.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x42, 0x00, 0x00]);
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, b'p']);
        assert_eq!(decode(&b), Err(CodecError::BadConnectFlags(0x42)));
    }

    #[test]
    fn invalid_utf8() {
        let mut c = mosquitto_connect();
        c[14] = 0xFF; // inside the client id
        assert_eq!(decode(&c), Err(CodecError::InvalidUtf8));
        let mut c = mosquitto_connect();
        c[14] = 0x00; // U+0000 is not allowed
        assert_eq!(decode(&c), Err(CodecError::InvalidUtf8));
        // Surrogate (CESU-style) in a topic.
        assert_eq!(
            decode(&[0x30, 0x05, 0x00, 0x03, 0xED, 0xA0, 0x80]),
            Err(CodecError::InvalidUtf8)
        );
    }

    #[test]
    fn truncated() {
        // PUBACK with a 1-byte body.
        assert_eq!(decode(&[0x40, 0x01, 0x00]), Err(CodecError::Truncated));
        // Frame shorter than its announced remaining length.
        assert_eq!(decode(&[0x40, 0x02, 0x00]), Err(CodecError::Truncated));
        assert_eq!(decode(&[0x40]), Err(CodecError::Truncated));
        assert_eq!(decode(&[]), Err(CodecError::Truncated));
        // CONNECT whose password is missing although the flag is set.
        let mut c = mosquitto_connect();
        c.truncate(c.len() - 8);
        c[1] -= 8;
        assert_eq!(decode(&c), Err(CodecError::Truncated));
        // PUBLISH whose topic length exceeds the body.
        assert_eq!(
            decode(&[0x30, 0x03, 0x00, 0x05, b'a']),
            Err(CodecError::Truncated)
        );
        // QoS 1 PUBLISH without packet id.
        assert_eq!(
            decode(&[0x32, 0x03, 0x00, 0x01, b'a']),
            Err(CodecError::Truncated)
        );
        // CONNACK with one byte.
        assert_eq!(decode(&[0x20, 0x01, 0x00]), Err(CodecError::Truncated));
        // SUBSCRIBE filter without its QoS byte.
        assert_eq!(
            decode(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']),
            Err(CodecError::Truncated)
        );
    }

    #[test]
    fn trailing_bytes() {
        assert_eq!(
            decode(&[0x40, 0x03, 0x00, 0x01, 0x00]),
            Err(CodecError::TrailingBytes)
        );
        assert_eq!(decode(&[0xC0, 0x01, 0x00]), Err(CodecError::TrailingBytes));
        assert_eq!(decode(&[0xE0, 0x01, 0x00]), Err(CodecError::TrailingBytes));
        assert_eq!(
            decode(&[0x20, 0x03, 0x00, 0x00, 0x00]),
            Err(CodecError::TrailingBytes)
        );
        // CONNECT with a byte after the password.
        let mut c = mosquitto_connect();
        c.push(0x00);
        c[1] += 1;
        assert_eq!(decode(&c), Err(CodecError::TrailingBytes));
        // Frame longer than announced.
        assert_eq!(
            decode(&[0xC0, 0x00, 0xC0, 0x00]),
            Err(CodecError::TrailingBytes)
        );
        // ...but a PUBLISH payload is simply the rest of the body.
        assert!(matches!(
            decode(&[0x30, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]),
            Ok(Packet::Publish(Publish { ref payload, .. })) if payload.as_ref() == [0, 0]
        ));
    }

    #[test]
    fn zero_packet_id() {
        for first in [0x40u8, 0x50, 0x62, 0x70, 0xB0] {
            assert_eq!(
                decode(&[first, 0x02, 0x00, 0x00]),
                Err(CodecError::ZeroPacketId),
                "type byte {first:#04x}"
            );
        }
        assert_eq!(
            decode(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]),
            Err(CodecError::ZeroPacketId)
        );
        assert_eq!(
            decode(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00]),
            Err(CodecError::ZeroPacketId)
        );
        assert_eq!(
            decode(&[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a']),
            Err(CodecError::ZeroPacketId)
        );
        assert_eq!(
            decode(&[0x90, 0x03, 0x00, 0x00, 0x00]),
            Err(CodecError::ZeroPacketId)
        );
    }

    #[test]
    fn empty_subscription() {
        assert_eq!(
            decode(&[0x82, 0x02, 0x00, 0x01]),
            Err(CodecError::EmptySubscription)
        );
        assert_eq!(
            decode(&[0xA2, 0x02, 0x00, 0x01]),
            Err(CodecError::EmptySubscription)
        );
        assert_eq!(
            decode(&[0x90, 0x02, 0x00, 0x01]),
            Err(CodecError::EmptySubscription)
        );
    }

    #[test]
    fn invalid_topic() {
        let publish = |topic: &[u8]| {
            let mut b = vec![0x30, u8::try_from(2 + topic.len()).unwrap(), 0x00];
            b.push(u8::try_from(topic.len()).unwrap());
            b.extend_from_slice(topic);
            decode(&b)
        };
        assert_eq!(publish(b""), Err(CodecError::InvalidTopic));
        assert_eq!(publish(b"a/+"), Err(CodecError::InvalidTopic));
        assert_eq!(publish(b"a/#"), Err(CodecError::InvalidTopic));
        assert!(publish(b"/a//b/").is_ok());
        // Will topic with a wildcard.
        let mut b = vec![0x10, 0x12];
        b.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x06, 0x00, 0x00]);
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x02, b'a', b'#', 0x00, 0x00]);
        assert_eq!(decode(&b), Err(CodecError::InvalidTopic));
    }

    #[test]
    fn invalid_topic_filter() {
        let subscribe = |filter: &[u8]| {
            let mut b = vec![
                0x82,
                u8::try_from(5 + filter.len()).unwrap(),
                0x00,
                0x01,
                0x00,
            ];
            b.push(u8::try_from(filter.len()).unwrap());
            b.extend_from_slice(filter);
            b.push(0x01);
            decode(&b)
        };
        for bad in [&b""[..], b"a/#/b", b"a#", b"a/b+", b"+a", b"##"] {
            assert_eq!(
                subscribe(bad),
                Err(CodecError::InvalidTopicFilter),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [
            &b"#"[..],
            b"+",
            b"a/+/b",
            b"a/#",
            b"/",
            b"+/+",
            b"$SYS/#",
            b"a//#",
        ] {
            assert!(subscribe(good).is_ok(), "{}", String::from_utf8_lossy(good));
        }
        // UNSUBSCRIBE validates too.
        assert_eq!(
            decode(&[0xA2, 0x06, 0x00, 0x01, 0x00, 0x02, b'#', b'a']),
            Err(CodecError::InvalidTopicFilter)
        );
    }

    #[test]
    fn invalid_return_code() {
        assert_eq!(
            decode(&[0x20, 0x02, 0x00, 0x06]),
            Err(CodecError::InvalidReturnCode(6))
        );
        assert_eq!(
            decode(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x03]),
            Err(CodecError::InvalidReturnCode(3))
        );
    }

    #[test]
    fn bad_connack_flags() {
        assert_eq!(
            decode(&[0x20, 0x02, 0x02, 0x00]),
            Err(CodecError::BadConnAckFlags(0x02))
        );
        assert_eq!(
            decode(&[0x20, 0x02, 0x01, 0x05]),
            Err(CodecError::BadConnAckFlags(0x01))
        );
    }

    #[test]
    fn oversized_fields_are_clamped_not_panicking() {
        let long = "é".repeat(40_000); // 80 000 bytes, 2-byte chars
        let mut out = Vec::new();
        encode_publish(&mut out, &long, 1, 1, false, b"x");
        assert_eq!(check(&out, usize::MAX), Ok(Some(out.len())));
        match decode(&out) {
            Ok(Packet::Publish(p)) => {
                assert!(p.topic.len() <= 65_535);
                assert!(long.starts_with(&p.topic));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_display() {
        let e = CodecError::PacketTooLarge { size: 10, max: 5 };
        assert_eq!(
            e.to_string(),
            "packet of 10 bytes exceeds the maximum of 5 bytes"
        );
        assert_eq!(
            CodecError::BadFlags(0x60).to_string(),
            "invalid fixed header flags in byte 0x60"
        );
    }
}
