//! Which partition queue a user's batches go to.
//!
//! **Partition hash v1**: take the first 8 bytes of SHA-256 over the user id's UTF-8 bytes,
//! read them as a big-endian unsigned 64-bit integer, and reduce it modulo the partition
//! count. Every api replica and every release must agree on this, since per-user order relies
//! on all of a user's batches going through one queue; hence a fixed, documented function
//! rather than Rust's `DefaultHasher`, whose output may change between releases.

use sha2::{Digest, Sha256};

/// The version of the scheme below; bump it only together with a migration plan.
pub const PARTITION_HASH_VERSION: u32 = 1;

/// The 64-bit stable hash of a user id (scheme v1).
pub fn stable_hash(user_id: &str) -> u64 {
    let digest = Sha256::digest(user_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The partition a user's batches are routed to.
pub fn partition_for(user_id: &str, partitions: u16) -> u16 {
    assert!(partitions > 0, "partition count must be positive");
    (stable_hash(user_id) % u64::from(partitions)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned_to_known_values() {
        // Pinned so an accidental change of the function fails loudly: these values are
        // the first 8 bytes of SHA-256 of each string.
        assert_eq!(stable_hash(""), 0xe3b0_c442_98fc_1c14);
        assert_eq!(stable_hash("abc"), 0xba78_16bf_8f01_cfea);
        assert_eq!(partition_for("abc", 8), (0xba78_16bf_8f01_cfeau64 % 8) as u16);
    }

    #[test]
    fn users_spread_over_all_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for(&format!("user-{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }
}
