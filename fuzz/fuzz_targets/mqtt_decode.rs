//! Fuzzes herald's MQTT decoder (3.1.1 and 5) the way a connection drives it, and the
//! session behind it.
//!
//! The first byte picks the protocol level and the maximum packet size; the rest is the
//! byte stream a device sent. Every complete frame is decoded; a packet that decodes must
//! encode and decode again to itself, and is handed to a session at that level (whose
//! in-flight bound is asserted), so neither the codec nor the session may panic on
//! anything a device can send.
#![no_main]

use herald_gateway::codec::{self, LEVEL_5, LEVEL_311, Properties};
use herald_gateway::session::{Peer, Session, SessionLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let level = if first & 1 == 0 { LEVEL_311 } else { LEVEL_5 };
    let max = [64usize, 1024, 1 << 20][usize::from(first >> 1) % 3];
    let peer = if level == LEVEL_5 {
        Peer::v5(&Properties::new(), 30)
    } else {
        Peer::v311(30)
    };
    let limits = SessionLimits {
        max_inflight: 4,
        max_pending: 8,
        receive_maximum: 4,
    };
    let mut session = Session::new(peer, 0, limits);
    let _ = codec::connect_level(stream);
    let mut rest = stream;
    let mut now = 0;
    while let Ok(Some(n)) = codec::check(rest, max) {
        assert!(n <= rest.len() && n <= max);
        let (frame, tail) = rest.split_at(n);
        rest = tail;
        match codec::decode_as(frame, level) {
            Ok(packet) => {
                let mut again = Vec::new();
                codec::encode_as(&packet, level, &mut again);
                assert_eq!(codec::decode_as(&again, level).as_ref(), Ok(&packet));
                now += 100;
                session.handle_packet(packet, now);
                let mut out = Vec::new();
                session.take_transmit(&mut out);
                while session.poll_event().is_some() {}
            }
            Err(e) => {
                let _ = e.reason_code();
                session.handle_codec_error(&e);
                break;
            }
        }
    }
});
