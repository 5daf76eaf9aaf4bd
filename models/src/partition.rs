//! The partition function: which lane and which aggregator a device belongs to.
//!
//! Partition = XXH3-64 (seed 0) of the device id's UTF-8 bytes, mod P. This is a wire-level contract:
//! it must never change between versions, or devices would silently move between owners.

use xxhash_rust::xxh3::xxh3_64;

/// Default number of partitions per deployment.
pub const DEFAULT_PARTITIONS: u32 = 64;

/// The partition of `device` among `partitions` (which must be > 0; 0 is treated as 1).
#[inline]
pub fn partition_of(device: &str, partitions: u32) -> u32 {
    (xxh3_64(device.as_bytes()) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_across_versions() {
        // Golden values: if these change, every deployment reshuffles its devices.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(partition_of("pump-7", 64), (xxh3_64(b"pump-7") % 64) as u32);
        let p = partition_of("pump-7", 64);
        assert_eq!(p, partition_of("pump-7", 64));
        assert!(p < 64);
    }

    #[test]
    fn partitions_spread_devices() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(&format!("dev-{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn zero_partitions_does_not_divide_by_zero() {
        assert_eq!(partition_of("x", 0), 0);
    }
}
