//! Which partition of the event topic a record key lives in: the Java Kafka client's
//! default partitioner (murmur2 of the key, sign bit cleared, modulo the partition
//! count), so that herald, Kafka's own tools and any other producer agree where a
//! device's events are. Every role computes it: ingest to key records, workers to fold
//! only their partitions' devices, gateways to ask the worker that owns a device.

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition `key` lives in among `partitions` (0 when there is one, or none).
pub fn for_key(key: &[u8], partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions
}

/// Where a fold runs: one partition of a topic of `count`. Everything is local to the
/// one partition of a one-partition log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The partition being folded.
    pub partition: u32,
    /// How many partitions the topic has.
    pub count: u32,
}

impl Scope {
    /// The whole of a one-partition log.
    pub const SINGLE: Scope = Scope {
        partition: 0,
        count: 1,
    };

    /// Whether records keyed `key` are in this partition.
    pub fn holds(&self, key: &str) -> bool {
        for_key(key.as_bytes(), self.count) == self.partition
    }

    /// Whether the topic has more than one partition.
    pub fn is_partitioned(&self) -> bool {
        self.count > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values printed by org.apache.kafka.common.utils.Utils.murmur2 (kafka-clients 4.1.1).
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"abc"), 479_470_107);
        assert_eq!(murmur2(b""), 275_646_681);
        assert_eq!(
            murmur2(b"0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b"),
            -566_429_333
        );
        assert_eq!(for_key(b"21", 12), 0);
        assert_eq!(for_key(b"foobar", 12), 6);
        assert_eq!(for_key(b"0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b", 12), 3);
        assert_eq!(for_key(b"", 12), 9);
        assert_eq!(for_key(b"foobar", 1), 0);
        assert!(Scope::SINGLE.holds("anything"));
    }
}
