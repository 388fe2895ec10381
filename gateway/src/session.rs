//! One device's MQTT session as a state machine, without I/O.
//!
//! The connection task feeds it decoded packets, live deliveries, backlog pages and the
//! time (`handle_*`), and drains what it produced: bytes to write ([`Session::take_transmit`]),
//! events for the rest of herald ([`Session::poll_event`]) and the next deadline
//! ([`Session::poll_timeout`]). Everything here is testable without a runtime or a socket.
//!
//! # Delivery bookkeeping
//! The inbox in the projection store is the source of truth; live deliveries from the
//! link are a shortcut. The session keeps `covered_through`: every seq up to it is
//! pending here, in flight, acknowledged or expired. A live delivery is taken only if it
//! is exactly the next seq and the session believes the store holds nothing more
//! (`complete`); anything else (a gap, a full queue, a dropped link message) marks the
//! session incomplete, and it reads the missing entries from the store in pages. Because
//! a worker commits an entry before forwarding it, a page read after a live delivery was
//! seen always contains it.

use std::collections::VecDeque;
use std::sync::Arc;

use herald_schemas::link::{BacklogPage, Delivery};
use herald_telemetry::metrics;

use crate::codec::{
    self, CodecError, Disconnect, LEVEL_5, Packet, Properties, SubAck, UnsubAck, Value, properties,
    reason,
};

/// The topic a device subscribes to for its inbox.
pub const INBOX_TOPIC: &str = "inbox";

/// Limits of one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Most QoS 1 PUBLISHes awaiting PUBACK at once.
    pub max_inflight: usize,
    /// Most entries queued in the session beyond the in-flight window.
    pub max_pending: usize,
    /// Most QoS 1 and 2 PUBLISHes a device may have unacknowledged towards herald at
    /// once (the Receive Maximum herald tells MQTT 5 clients in CONNACK).
    pub receive_maximum: u16,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_inflight: 32,
            max_pending: 256,
            receive_maximum: 32,
        }
    }
}

/// What the device asked for at CONNECT, as the gateway settled it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The protocol level of the connection (3, 4 or 5).
    pub level: u8,
    /// The keep-alive herald enforces, in seconds (0: none); the connection is closed
    /// after 1.5 times this without a packet from the device.
    pub keep_alive_s: u16,
    /// The device's Receive Maximum: most QoS 1 and 2 PUBLISHes it takes unacknowledged.
    pub receive_maximum: u16,
    /// The device's Maximum Packet Size: a PUBLISH larger than this is not sent to it.
    pub maximum_packet_size: u32,
}

impl Peer {
    /// An MQTT 3.1.1 device with keep-alive `keep_alive_s`.
    pub fn v311(keep_alive_s: u16) -> Self {
        Peer {
            level: codec::LEVEL_311,
            keep_alive_s,
            receive_maximum: u16::MAX,
            maximum_packet_size: u32::MAX,
        }
    }

    /// The device's side of an MQTT 5 CONNECT (Receive Maximum, Maximum Packet Size),
    /// with the keep-alive herald settled on.
    pub fn v5(connect: &Properties, keep_alive_s: u16) -> Self {
        Peer {
            level: LEVEL_5,
            keep_alive_s,
            receive_maximum: connect.u16(properties::RECEIVE_MAXIMUM).unwrap_or(u16::MAX),
            maximum_packet_size: connect
                .u32(properties::MAXIMUM_PACKET_SIZE)
                .unwrap_or(u32::MAX),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The device sent DISCONNECT.
    ClientDisconnect,
    /// Nothing arrived within 1.5 times the keep-alive interval.
    KeepAliveTimeout,
    /// The device broke the protocol (a second CONNECT, a server-only packet, a
    /// repeated property).
    ProtocolViolation,
    /// The device sent a packet that does not parse.
    MalformedPacket,
    /// The device sent a packet over herald's Maximum Packet Size.
    PacketTooLarge,
    /// The device had more QoS 1/2 PUBLISHes unacknowledged than herald's Receive
    /// Maximum.
    ReceiveMaximumExceeded,
    /// The same device connected again; this connection gives way.
    TakenOver,
    /// herald is shutting down.
    ServerShutdown,
}

impl CloseReason {
    /// A short name for logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::KeepAliveTimeout => "keep_alive_timeout",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::MalformedPacket => "malformed_packet",
            CloseReason::PacketTooLarge => "packet_too_large",
            CloseReason::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            CloseReason::TakenOver => "taken_over",
            CloseReason::ServerShutdown => "server_shutdown",
        }
    }

    /// The MQTT 5 reason code of the DISCONNECT herald sends for it (`None` when the
    /// device ended the session).
    pub fn reason_code(self) -> Option<u8> {
        Some(match self {
            CloseReason::ClientDisconnect => return None,
            CloseReason::KeepAliveTimeout => reason::KEEP_ALIVE_TIMEOUT,
            CloseReason::ProtocolViolation => reason::PROTOCOL_ERROR,
            CloseReason::MalformedPacket => reason::MALFORMED,
            CloseReason::PacketTooLarge => reason::PACKET_TOO_LARGE,
            CloseReason::ReceiveMaximumExceeded => reason::RECEIVE_MAXIMUM_EXCEEDED,
            CloseReason::TakenOver => reason::SESSION_TAKEN_OVER,
            CloseReason::ServerShutdown => reason::SERVER_SHUTTING_DOWN,
        })
    }

    /// Why a connection sending a packet the codec refused is closed.
    pub fn of_codec_error(e: &CodecError) -> Self {
        match e.reason_code() {
            reason::PACKET_TOO_LARGE => CloseReason::PacketTooLarge,
            reason::MALFORMED => CloseReason::MalformedPacket,
            _ => CloseReason::ProtocolViolation,
        }
    }
}

/// What a session asks of the rest of herald.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The device received a QoS 2 entry (PUBREC). Make this durable (a
    /// `DeviceReceived` event), then call [`Session::handle_received_durable`]: only then
    /// is the PUBREL sent, so that after a crash the entry is never published again.
    Received {
        /// The entry's seq.
        seq: u64,
        /// Its message.
        message_id: Arc<str>,
    },
    /// The device confirmed an entry (PUBACK, PUBCOMP, or sent at QoS 0).
    Acked {
        /// The entry's seq.
        seq: u64,
        /// Its message.
        message_id: Arc<str>,
    },
    /// Read the next page of the inbox after `after_seq` and hand it to
    /// [`Session::handle_backlog`].
    FetchBacklog {
        /// Entries after this seq.
        after_seq: u64,
        /// At most this many.
        limit: usize,
    },
    /// The session is over; close the connection.
    Close(CloseReason),
}

/// Where an entry in flight is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// QoS 1 PUBLISH sent.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent.
    AwaitPubRec,
    /// PUBREC arrived; waiting for the receipt to be durable before PUBREL.
    AwaitDurable,
    /// The receipt is durable; the PUBREL waits for those of earlier entries, so that
    /// a receiver that hands messages to its app on PUBREL does so in seq order.
    Durable,
    /// PUBREL sent.
    AwaitPubComp,
}

#[derive(Debug)]
struct Inflight {
    pkid: u16,
    seq: u64,
    message_id: Arc<str>,
    stage: Stage,
}

/// The packet id of an entry: derived from its seq, so a PUBLISH sent again after a crash
/// or a reconnect carries the same id and a QoS 2 receiver recognises it as a duplicate.
pub fn pkid_for(seq: u64) -> u16 {
    ((seq.saturating_sub(1) % 65_535) + 1) as u16
}

/// One device's session.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    peer: Peer,
    /// MQTT 5: QoS 1 PUBLISHes from the device whose PUBACK is not written yet, and
    /// QoS 2 ones awaiting their PUBREL (by packet id), against herald's Receive Maximum.
    inbound_acks: usize,
    inbound_qos2: Vec<u16>,
    /// The QoS granted on `inbox`, once subscribed.
    granted_qos: Option<u8>,
    inflight: VecDeque<Inflight>,
    pending: VecDeque<Delivery>,
    covered_through: u64,
    complete: bool,
    fetching: bool,
    /// The seq the outstanding backlog read starts after; a page is used only if the
    /// session's position has not moved since it was asked for.
    fetch_after: u64,
    /// Messages withdrawn while a backlog read was outstanding: its page may still hold
    /// them.
    withdrawn_during_fetch: Vec<Arc<str>>,
    live_hint: u64,
    keep_alive_ms: u64,
    last_rx_ms: u64,
    closed: bool,
    transmit: Vec<u8>,
    events: VecDeque<SessionEvent>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // What was in flight is no longer anyone's (it stays in the inbox).
        metrics::inflight(-(self.inflight.len() as i64));
    }
}

impl Session {
    /// A session that was just accepted from `peer`.
    pub fn new(peer: Peer, now_ms: u64, limits: SessionLimits) -> Self {
        Session {
            limits,
            peer,
            inbound_acks: 0,
            inbound_qos2: Vec::new(),
            granted_qos: None,
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            covered_through: 0,
            complete: false,
            fetching: false,
            fetch_after: 0,
            withdrawn_during_fetch: Vec::new(),
            live_hint: 0,
            keep_alive_ms: u64::from(peer.keep_alive_s) * 1000,
            last_rx_ms: now_ms,
            closed: false,
            transmit: Vec::new(),
            events: VecDeque::new(),
        }
    }

    /// A packet arrived from the device.
    pub fn handle_packet(&mut self, packet: Packet, now_ms: u64) {
        if self.closed {
            return;
        }
        self.last_rx_ms = now_ms;
        let v5 = self.peer.level == LEVEL_5;
        match packet {
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                for (filter, options) in &sub.filters {
                    codes.push(if filter == INBOX_TOPIC {
                        let granted = (options & 0x03).min(2);
                        self.granted_qos = Some(granted);
                        granted
                    } else if !v5 {
                        codec::SUBACK_FAILURE
                    } else if filter.starts_with("$share/") {
                        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                    } else if filter.contains(['+', '#']) {
                        reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
                    } else {
                        reason::NOT_AUTHORIZED
                    });
                }
                self.send(Packet::SubAck(SubAck {
                    pkid: sub.pkid,
                    codes,
                    properties: Properties::new(),
                }));
            }
            Packet::Unsubscribe(unsub) => {
                let codes = unsub
                    .filters
                    .iter()
                    .map(|f| {
                        if f == INBOX_TOPIC && self.granted_qos.take().is_some() {
                            reason::SUCCESS
                        } else {
                            // No subscription existed.
                            0x11
                        }
                    })
                    .collect();
                self.send(Packet::UnsubAck(UnsubAck {
                    pkid: unsub.pkid,
                    codes,
                    properties: Properties::new(),
                }));
            }
            Packet::PubAck(pkid) => self.complete_inflight(pkid, Stage::AwaitPubAck),
            Packet::PubComp(pkid) => self.complete_inflight(pkid, Stage::AwaitPubComp),
            Packet::PubRec(pkid) => {
                if let Some(f) = self.inflight.iter_mut().find(|f| f.pkid == pkid) {
                    match f.stage {
                        Stage::AwaitPubRec => {
                            f.stage = Stage::AwaitDurable;
                            self.events.push_back(SessionEvent::Received {
                                seq: f.seq,
                                message_id: f.message_id.clone(),
                            });
                        }
                        // A repeated PUBREC: repeat the PUBREL.
                        Stage::AwaitPubComp => self.send(Packet::PubRel(pkid)),
                        Stage::AwaitDurable | Stage::Durable | Stage::AwaitPubAck => {}
                    }
                }
            }
            Packet::PingReq => self.send(Packet::PingResp),
            // Devices do not publish to herald; acknowledge and drop, as the protocol
            // allows, so a client that tries is not stuck. herald offers no topic
            // aliases (Topic Alias Maximum 0), so using one is a protocol error.
            Packet::Publish(p) if p.properties.has(properties::TOPIC_ALIAS) => {
                self.close(CloseReason::ProtocolViolation)
            }
            Packet::Publish(p) => {
                match p.qos {
                    1 => {
                        self.inbound_acks += 1;
                        self.send(Packet::PubAck(p.pkid));
                    }
                    2 => {
                        if v5 && !self.inbound_qos2.contains(&p.pkid) {
                            self.inbound_qos2.push(p.pkid);
                        }
                        self.send(Packet::PubRec(p.pkid));
                    }
                    _ => {}
                }
                if v5
                    && self.inbound_acks + self.inbound_qos2.len()
                        > usize::from(self.limits.receive_maximum)
                {
                    self.close(CloseReason::ReceiveMaximumExceeded);
                }
            }
            Packet::PubRel(pkid) => {
                self.inbound_qos2.retain(|&id| id != pkid);
                if self.inbound_qos2.is_empty() {
                    self.inbound_qos2 = Vec::new();
                }
                self.send(Packet::PubComp(pkid));
            }
            Packet::Disconnect(_) => self.close(CloseReason::ClientDisconnect),
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp
            | Packet::Auth(_) => self.close(CloseReason::ProtocolViolation),
        }
        self.pump(now_ms);
    }

    /// The device sent bytes the codec refused: the session ends (in MQTT 5 with a
    /// DISCONNECT naming why).
    pub fn handle_codec_error(&mut self, error: &CodecError) {
        self.close(CloseReason::of_codec_error(error));
    }

    /// The session ends for a reason outside it (a takeover, a shutdown).
    pub fn handle_close(&mut self, reason: CloseReason) {
        self.close(reason);
    }

    fn send(&mut self, packet: Packet) {
        codec::encode_as(&packet, self.peer.level, &mut self.transmit);
    }

    /// Entries arrived live from a delivery worker.
    pub fn handle_deliveries(&mut self, deliveries: Vec<Delivery>, now_ms: u64) {
        for d in deliveries {
            self.live_hint = self.live_hint.max(d.seq);
            if d.seq <= self.covered_through {
                continue;
            }
            if self.complete
                && d.seq == self.covered_through + 1
                && self.pending.len() < self.limits.max_pending
            {
                self.covered_through = d.seq;
                self.pending.push_back(d);
            } else {
                self.complete = false;
            }
        }
        self.pump(now_ms);
    }

    /// The receipt of a QoS 2 entry (see [`SessionEvent::Received`]) is durable: send
    /// its PUBREL.
    pub fn handle_received_durable(&mut self, seq: u64, now_ms: u64) {
        if let Some(f) = self
            .inflight
            .iter_mut()
            .find(|f| f.seq == seq && f.stage == Stage::AwaitDurable)
        {
            f.stage = Stage::Durable;
        }
        self.release_in_order();
        self.pump(now_ms);
    }

    /// Sends the PUBRELs of durable receipts in seq order: up to the first entry whose
    /// receipt is not durable yet.
    fn release_in_order(&mut self) {
        for f in self.inflight.iter_mut() {
            match f.stage {
                Stage::Durable => {
                    f.stage = Stage::AwaitPubComp;
                    codec::encode_as(&Packet::PubRel(f.pkid), self.peer.level, &mut self.transmit);
                }
                Stage::AwaitPubComp | Stage::AwaitPubAck => {}
                Stage::AwaitPubRec | Stage::AwaitDurable => break,
            }
        }
    }

    /// Messages were recalled or replaced: drop their entries not yet sent. Entries
    /// already on the wire cannot be taken back.
    pub fn handle_withdraw(&mut self, message_ids: &[Arc<str>], now_ms: u64) {
        // An entry the device already received at QoS 2 is finished (PUBREL), not dropped.
        self.pending
            .retain(|d| d.released || !message_ids.contains(&d.message_id));
        if self.fetching {
            self.withdrawn_during_fetch
                .extend(message_ids.iter().cloned());
        }
        self.pump(now_ms);
    }

    /// Commands for this session were dropped (its mailbox was full): a delivery or a
    /// withdrawal may be missing. Forget what is queued unsent and read it again from the
    /// store, which has every entry and skips withdrawn ones.
    pub fn handle_overflow(&mut self, now_ms: u64) {
        if let Some(first) = self.pending.front() {
            self.covered_through = first.seq - 1;
        }
        self.pending = VecDeque::new();
        self.complete = false;
        if self.fetching {
            // A dropped withdrawal may concern the page being read: do not use it.
            self.fetch_after = u64::MAX;
        }
        self.pump(now_ms);
    }

    /// Takes the bytes to write to the device, leaving no buffer behind.
    pub fn take_transmit_buf(&mut self) -> Vec<u8> {
        // The PUBACKs in it are on their way: those PUBLISHes are no longer in flight.
        self.inbound_acks = 0;
        std::mem::take(&mut self.transmit)
    }

    /// A page asked for by [`SessionEvent::FetchBacklog`] arrived.
    pub fn handle_backlog(&mut self, page: BacklogPage, now_ms: u64) {
        self.fetching = false;
        let withdrawn = std::mem::take(&mut self.withdrawn_during_fetch);
        if self.fetch_after != self.covered_through {
            // The session's position moved while the page was read (an overflow reset
            // it): the page may skip entries. Read again from where the session is.
            self.complete = false;
            self.pump(now_ms);
            return;
        }
        metrics::backlog_read(page.entries.len());
        for e in page.entries {
            if !e.released && withdrawn.contains(&e.message_id) {
                // Withdrawn while the page was read: skip it, but it is covered.
                self.covered_through = self.covered_through.max(e.seq);
                continue;
            }
            if e.seq > self.covered_through {
                debug_assert!(self.pending.back().is_none_or(|b| b.seq < e.seq));
                self.covered_through = e.seq;
                self.pending.push_back(e);
            }
        }
        self.covered_through = self.covered_through.max(page.covered_through);
        self.complete = page.complete && self.live_hint <= self.covered_through;
        self.pump(now_ms);
    }

    /// A backlog read failed; try again on the next pump.
    pub fn handle_backlog_failed(&mut self, now_ms: u64) {
        self.fetching = false;
        self.withdrawn_during_fetch.clear();
        self.pump(now_ms);
    }

    /// Time passed; checks the keep-alive.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(deadline) = self.poll_timeout()
            && now_ms >= deadline
        {
            self.close(CloseReason::KeepAliveTimeout);
        }
    }

    /// When [`Session::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.keep_alive_ms == 0 || self.closed {
            return None;
        }
        Some(self.last_rx_ms + self.keep_alive_ms + self.keep_alive_ms / 2)
    }

    /// The next event for the rest of herald.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let e = self.events.pop_front();
        if e.is_none() && self.events.capacity() > 0 {
            // An idle session keeps no buffers.
            self.events = VecDeque::new();
        }
        e
    }

    /// Takes the bytes to write to the device.
    pub fn take_transmit(&mut self, out: &mut Vec<u8>) {
        self.inbound_acks = 0;
        out.append(&mut self.transmit);
    }

    /// Whether there are bytes to write.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// The protocol level of the connection.
    pub fn level(&self) -> u8 {
        self.peer.level
    }

    /// Entries sent and not yet acknowledged.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    fn complete_inflight(&mut self, pkid: u16, stage: Stage) {
        if let Some(i) = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.stage == stage)
            && let Some(done) = self.inflight.remove(i)
        {
            metrics::acked();
            metrics::inflight(-1);
            self.events.push_back(SessionEvent::Acked {
                seq: done.seq,
                message_id: done.message_id,
            });
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            if self.peer.level == LEVEL_5
                && let Some(reason_code) = reason.reason_code()
            {
                self.send(Packet::Disconnect(Disconnect {
                    reason_code,
                    properties: Properties::new(),
                }));
            }
            self.events.push_back(SessionEvent::Close(reason));
        }
    }

    /// Writes the PUBLISH of `d`; false (and nothing written) if it is larger than the
    /// device's Maximum Packet Size. In MQTT 5 it carries the entry's remaining life as
    /// Message Expiry Interval and its `id` and `seq` as user properties.
    fn write_publish(&mut self, d: &Delivery, qos: u8, pkid: u16, now_ms: u64) -> bool {
        let start = self.transmit.len();
        if self.peer.level == LEVEL_5 {
            let expiry_s = d.expires_at_ms.saturating_sub(now_ms).div_ceil(1000);
            let mut props = Properties::new();
            props
                .push(
                    properties::MESSAGE_EXPIRY,
                    Value::U32(u32::try_from(expiry_s).unwrap_or(u32::MAX)),
                )
                .user("id", &d.message_id)
                .user("seq", &d.seq.to_string());
            codec::encode_publish_v5(
                &mut self.transmit,
                INBOX_TOPIC,
                qos,
                pkid,
                false,
                &props,
                &d.envelope,
            );
        } else {
            codec::encode_publish(
                &mut self.transmit,
                INBOX_TOPIC,
                qos,
                pkid,
                false,
                &d.envelope,
            );
        }
        if self.transmit.len() - start > self.peer.maximum_packet_size as usize {
            self.transmit.truncate(start);
            return false;
        }
        metrics::published();
        tracing::debug!(message_id = %d.message_id, seq = d.seq, qos, "sent");
        true
    }

    /// The in-flight window: herald's own, or the device's Receive Maximum if smaller.
    fn window(&self) -> usize {
        self.limits
            .max_inflight
            .min(usize::from(self.peer.receive_maximum))
    }

    fn pump(&mut self, now_ms: u64) {
        if self.closed {
            return;
        }
        let Some(qos) = self.granted_qos else {
            return;
        };
        let window = self.window();
        while self.inflight.len() < window {
            let Some(front) = self.pending.front() else {
                break;
            };
            let pkid = pkid_for(front.seq);
            // Ids repeat every 65,535 seqs; wait for an old holder of this id to finish.
            if self.inflight.iter().any(|f| f.pkid == pkid) {
                break;
            }
            let Some(d) = self.pending.pop_front() else {
                break;
            };
            if d.released {
                // Received at QoS 2 on an earlier connection: finish with PUBREL only,
                // in seq order with the rest.
                metrics::inflight(1);
                self.inflight.push_back(Inflight {
                    pkid,
                    seq: d.seq,
                    message_id: d.message_id,
                    stage: Stage::Durable,
                });
                continue;
            }
            if d.expires_at_ms <= now_ms {
                continue;
            }
            if !self.write_publish(&d, qos, pkid, now_ms) {
                // Larger than the device takes (its Maximum Packet Size): not sent, and
                // not acknowledged either; it stays in the inbox until it expires.
                tracing::debug!(
                    seq = d.seq,
                    "entry over the device's Maximum Packet Size; not sent"
                );
                continue;
            }
            if qos == 0 {
                self.events.push_back(SessionEvent::Acked {
                    seq: d.seq,
                    message_id: d.message_id,
                });
                continue;
            }
            metrics::inflight(1);
            self.inflight.push_back(Inflight {
                pkid,
                seq: d.seq,
                message_id: d.message_id,
                stage: if qos == 2 {
                    Stage::AwaitPubRec
                } else {
                    Stage::AwaitPubAck
                },
            });
        }
        self.release_in_order();
        assert!(self.inflight.len() <= window);
        // An idle session keeps no buffers.
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        if self.inflight.is_empty() && self.inflight.capacity() > 0 {
            self.inflight = VecDeque::new();
        }
        if !self.complete && !self.fetching && self.pending.len() < self.limits.max_pending / 2 {
            self.fetching = true;
            self.fetch_after = self.covered_through;
            self.events.push_back(SessionEvent::FetchBacklog {
                after_seq: self.covered_through,
                limit: self.limits.max_pending - self.pending.len(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec::Subscribe;

    fn d(seq: u64) -> Delivery {
        Delivery {
            device_id: "dev".into(),
            seq,
            message_id: format!("m{seq}").into(),
            expires_at_ms: 10_000,
            envelope: format!("{{\"seq\":{seq}}}").into_bytes().into(),
            released: false,
        }
    }

    fn subscribe(s: &mut Session) {
        s.handle_packet(
            Packet::Subscribe(Subscribe {
                pkid: 1,
                filters: vec![("inbox".into(), 1)],
                ..Subscribe::default()
            }),
            0,
        );
    }

    fn sent_seqs(s: &mut Session) -> Vec<u64> {
        let mut out = Vec::new();
        s.take_transmit(&mut out);
        let mut seqs = Vec::new();
        let mut rest = &out[..];
        while let Some(n) = codec::check(rest, 1 << 20).unwrap() {
            if let Packet::Publish(p) = codec::decode(&rest[..n]).unwrap() {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
            rest = &rest[n..];
        }
        seqs
    }

    fn fetches(s: &mut Session) -> Vec<(u64, usize)> {
        let mut v = Vec::new();
        while let Some(e) = s.poll_event() {
            if let SessionEvent::FetchBacklog { after_seq, limit } = e {
                v.push((after_seq, limit));
            }
        }
        v
    }

    #[test]
    fn backlog_then_live_in_order_with_window() {
        let limits = SessionLimits {
            max_inflight: 2,
            max_pending: 8,
            ..SessionLimits::default()
        };
        let mut s = Session::new(Peer::v311(60), 0, limits);
        subscribe(&mut s);
        assert_eq!(fetches(&mut s), vec![(0, 8)]);
        // A live entry arriving while the backlog is read is not taken directly...
        s.handle_deliveries(vec![d(4)], 1);
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(1), d(2), d(3)],
                covered_through: 3,
                complete: true,
            },
            1,
        );
        // ...and, seen beyond the page, it makes the session read again.
        assert_eq!(sent_seqs(&mut s), vec![1, 2]);
        assert_eq!(fetches(&mut s), vec![(3, 7)]);
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(4)],
                covered_through: 4,
                complete: true,
            },
            1,
        );
        s.handle_packet(Packet::PubAck(1), 2);
        assert_eq!(sent_seqs(&mut s), vec![3]);
        s.handle_packet(Packet::PubAck(2), 2);
        s.handle_packet(Packet::PubAck(3), 2);
        assert_eq!(sent_seqs(&mut s), vec![4]);
        // Now complete: the next live entry goes straight out; a duplicate is dropped.
        s.handle_deliveries(vec![d(5), d(5), d(3)], 3);
        assert_eq!(sent_seqs(&mut s), vec![5]);
        let acked: Vec<u64> = std::iter::from_fn(|| s.poll_event())
            .filter_map(|e| match e {
                SessionEvent::Acked { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(acked, vec![1, 2, 3]);
    }

    #[test]
    fn gap_in_live_deliveries_reads_the_store() {
        let mut s = Session::new(Peer::v311(0), 0, SessionLimits::default());
        subscribe(&mut s);
        let _ = fetches(&mut s);
        s.handle_backlog(
            BacklogPage {
                complete: true,
                ..BacklogPage::default()
            },
            0,
        );
        assert!(fetches(&mut s).is_empty());
        s.handle_deliveries(vec![d(2)], 0);
        assert!(sent_seqs(&mut s).is_empty());
        assert_eq!(fetches(&mut s), vec![(0, 256)]);
    }

    #[test]
    fn expired_entries_are_not_sent_and_keepalive_closes() {
        let mut s = Session::new(Peer::v311(10), 0, SessionLimits::default());
        subscribe(&mut s);
        let _ = fetches(&mut s);
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(1), d(2)],
                covered_through: 2,
                complete: true,
            },
            10_000,
        );
        assert!(sent_seqs(&mut s).is_empty());
        // The last packet arrived at 0: the deadline is 1.5 x 10 s after it.
        assert_eq!(s.poll_timeout(), Some(15_000));
        s.handle_timeout(14_999);
        assert!(s.poll_event().is_none());
        s.handle_timeout(15_000);
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::Close(CloseReason::KeepAliveTimeout))
        );
    }

    #[test]
    fn nothing_is_sent_before_subscribe_and_other_topics_are_refused() {
        let mut s = Session::new(Peer::v311(0), 0, SessionLimits::default());
        s.handle_deliveries(vec![d(1)], 0);
        assert!(sent_seqs(&mut s).is_empty());
        s.handle_packet(
            Packet::Subscribe(Subscribe {
                pkid: 9,
                filters: vec![("other/#".into(), 1)],
                ..Subscribe::default()
            }),
            0,
        );
        let mut out = Vec::new();
        s.take_transmit(&mut out);
        assert_eq!(
            codec::decode(&out).unwrap(),
            Packet::SubAck(SubAck {
                pkid: 9,
                codes: vec![0x80],
                ..SubAck::default()
            })
        );
    }

    #[test]
    fn a_page_read_across_an_overflow_is_not_used() {
        let limits = SessionLimits {
            max_inflight: 1,
            max_pending: 8,
            ..SessionLimits::default()
        };
        let mut s = Session::new(Peer::v311(0), 0, limits);
        subscribe(&mut s);
        assert_eq!(fetches(&mut s), vec![(0, 8)]);
        s.handle_backlog(
            BacklogPage {
                entries: (1..=4).map(d).collect(),
                covered_through: 4,
                complete: false,
            },
            0,
        );
        // 1 in flight, 2..4 pending, and the next page asked for after 4.
        assert_eq!(sent_seqs(&mut s), vec![1]);
        assert_eq!(fetches(&mut s), vec![(4, 5)]);
        // The mailbox overflowed meanwhile: 2..4 are forgotten, to be read again.
        s.handle_overflow(0);
        // The page asked for before the overflow would skip 2..4: it is not used...
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(5)],
                covered_through: 5,
                complete: true,
            },
            0,
        );
        // ...and the session reads again from after 1.
        assert_eq!(fetches(&mut s), vec![(1, 8)]);
    }

    #[test]
    fn a_withdrawal_during_a_read_filters_its_page() {
        let mut s = Session::new(Peer::v311(0), 0, SessionLimits::default());
        subscribe(&mut s);
        let _ = fetches(&mut s);
        s.handle_withdraw(&["m2".into()], 0);
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(1), d(2), d(3)],
                covered_through: 3,
                complete: true,
            },
            0,
        );
        assert_eq!(sent_seqs(&mut s), vec![1, 3]);
    }

    #[test]
    fn released_entries_are_finished_in_seq_order() {
        let mut s = Session::new(Peer::v311(0), 0, SessionLimits::default());
        s.handle_packet(
            Packet::Subscribe(Subscribe {
                pkid: 1,
                filters: vec![("inbox".into(), 2)],
                ..Subscribe::default()
            }),
            0,
        );
        let _ = fetches(&mut s);
        let mut two = d(2);
        two.released = true;
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(1), two],
                covered_through: 2,
                complete: true,
            },
            0,
        );
        let mut out = Vec::new();
        s.take_transmit(&mut out);
        let mut packets = Vec::new();
        let mut rest = &out[..];
        while let Some(n) = codec::check(rest, 1 << 20).unwrap() {
            packets.push(codec::decode(&rest[..n]).unwrap());
            rest = &rest[n..];
        }
        // Seq 1 is published; seq 2's PUBREL waits until 1's receipt is durable.
        assert_eq!(packets.len(), 2, "{packets:?}");
        assert!(matches!(packets[1], Packet::Publish(ref p) if p.pkid == 1));
        s.handle_packet(Packet::PubRec(1), 0);
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Received { seq: 1, .. })
        ));
        s.handle_received_durable(1, 0);
        let mut out = Vec::new();
        s.take_transmit(&mut out);
        let mut rels = Vec::new();
        let mut rest = &out[..];
        while let Some(n) = codec::check(rest, 1 << 20).unwrap() {
            rels.push(codec::decode(&rest[..n]).unwrap());
            rest = &rest[n..];
        }
        assert_eq!(rels, vec![Packet::PubRel(1), Packet::PubRel(2)]);
    }

    fn v5_peer(receive_maximum: u16, maximum_packet_size: u32) -> Peer {
        let mut props = Properties::new();
        props
            .push(properties::RECEIVE_MAXIMUM, Value::U16(receive_maximum))
            .push(
                properties::MAXIMUM_PACKET_SIZE,
                Value::U32(maximum_packet_size),
            );
        Peer::v5(&props, 30)
    }

    fn packets(s: &mut Session) -> Vec<Packet> {
        let mut out = Vec::new();
        s.take_transmit(&mut out);
        let mut packets = Vec::new();
        let mut rest = &out[..];
        while let Some(n) = codec::check(rest, 1 << 20).unwrap() {
            packets.push(codec::decode_as(&rest[..n], LEVEL_5).unwrap());
            rest = &rest[n..];
        }
        packets
    }

    #[test]
    fn v5_publishes_carry_expiry_and_ids_within_the_devices_limits() {
        // The device takes 2 unacknowledged PUBLISHes of at most 120 bytes.
        let mut s = Session::new(v5_peer(2, 120), 0, SessionLimits::default());
        subscribe(&mut s);
        let _ = fetches(&mut s);
        let mut big = d(3);
        big.envelope = vec![b'x'; 200].into();
        s.handle_backlog(
            BacklogPage {
                entries: vec![d(1), d(2), big, d(4)],
                covered_through: 4,
                complete: true,
            },
            2_500,
        );
        let sent = packets(&mut s);
        assert_eq!(sent.len(), 3, "{sent:?}"); // SUBACK + two PUBLISHes
        let Packet::Publish(p) = &sent[1] else {
            panic!("{sent:?}")
        };
        // 10 s of life at 0 ms, 2.5 s gone: 7.5 s left, rounded up.
        assert_eq!(p.properties.u32(properties::MESSAGE_EXPIRY), Some(8));
        assert_eq!(p.properties.user_value("id"), Some("m1"));
        assert_eq!(p.properties.user_value("seq"), Some("1"));
        // Acks open the window; the entry over 120 bytes is skipped, not sent.
        s.handle_packet(Packet::PubAck(1), 3_000);
        s.handle_packet(Packet::PubAck(2), 3_000);
        let sent = packets(&mut s);
        let seqs: Vec<&str> = sent
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => p.properties.user_value("seq"),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec!["4"]);
    }

    #[test]
    fn v5_receive_maximum_exceeded_closes_with_0x93() {
        let limits = SessionLimits {
            receive_maximum: 2,
            ..SessionLimits::default()
        };
        let mut s = Session::new(v5_peer(10, 1 << 20), 0, limits);
        let publish = |pkid, qos| {
            Packet::Publish(codec::Publish {
                qos,
                topic: "up".into(),
                pkid,
                ..codec::Publish::default()
            })
        };
        // Two QoS 2 PUBLISHes await their PUBREL; a released one frees its place.
        s.handle_packet(publish(1, 2), 0);
        s.handle_packet(publish(2, 2), 0);
        s.handle_packet(Packet::PubRel(1), 0);
        // QoS 1 PUBLISHes whose PUBACKs were written are no longer in flight.
        s.handle_packet(publish(3, 1), 0);
        let _ = packets(&mut s);
        s.handle_packet(publish(4, 1), 0);
        assert!(s.poll_event().is_none());
        // A third in flight (2's PUBREL and 4's PUBACK outstanding) is one too many.
        s.handle_packet(publish(5, 1), 0);
        assert_eq!(
            s.poll_event(),
            Some(SessionEvent::Close(CloseReason::ReceiveMaximumExceeded))
        );
        let sent = packets(&mut s);
        assert_eq!(
            sent.last(),
            Some(&Packet::Disconnect(Disconnect {
                reason_code: reason::RECEIVE_MAXIMUM_EXCEEDED,
                properties: Properties::new(),
            }))
        );
    }

    #[test]
    fn v5_close_reasons_are_sent_as_disconnects() {
        for (close, code) in [
            (None, reason::KEEP_ALIVE_TIMEOUT),
            (Some(CloseReason::TakenOver), reason::SESSION_TAKEN_OVER),
            (
                Some(CloseReason::ServerShutdown),
                reason::SERVER_SHUTTING_DOWN,
            ),
        ] {
            let mut s = Session::new(v5_peer(10, 1 << 20), 0, SessionLimits::default());
            match close {
                Some(r) => s.handle_close(r),
                None => s.handle_timeout(45_000),
            }
            assert_eq!(
                packets(&mut s),
                vec![Packet::Disconnect(Disconnect {
                    reason_code: code,
                    properties: Properties::new(),
                })]
            );
        }
        // A device's own DISCONNECT is not answered; 3.1.1 devices get no DISCONNECT.
        let mut s = Session::new(v5_peer(10, 1 << 20), 0, SessionLimits::default());
        s.handle_packet(Packet::Disconnect(Disconnect::default()), 0);
        assert!(packets(&mut s).is_empty());
        let mut s = Session::new(Peer::v311(30), 0, SessionLimits::default());
        s.handle_timeout(45_000);
        assert!(packets(&mut s).is_empty());
    }
}
