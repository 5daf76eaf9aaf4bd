//! Capped exponential backoff with full jitter, as a pure state machine (the caller sleeps).
//!
//! Used by every reconnecting link: MQTT clients reconnect at once on their own (rumqttc has no delay),
//! which floods logs and CPU while a broker is down.

/// Delay generator: `base × 2^attempt`, capped, with a seeded jitter in [50 %, 100 %] of that.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `base_ms` (≥ 1) and never exceeds `cap_ms`; `seed` makes the jitter reproducible.
    pub fn new(base_ms: u64, cap_ms: u64, seed: u64) -> Self {
        Self {
            base_ms: base_ms.max(1),
            cap_ms: cap_ms.max(base_ms.max(1)),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The next delay in ms; each call doubles the ceiling until the cap.
    pub fn next_delay_ms(&mut self) -> u64 {
        let ceiling = self
            .base_ms
            .saturating_mul(1u64 << self.attempt.min(32))
            .min(self.cap_ms);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*: jitter only, no cryptographic need.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let half = ceiling / 2;
        half + r % (ceiling - half + 1)
    }

    /// Back to the base delay after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stay_under_the_cap() {
        let mut b = Backoff::new(100, 5_000, 7);
        let delays: Vec<u64> = (0..12).map(|_| b.next_delay_ms()).collect();
        assert!((50..=100).contains(&delays[0]), "{delays:?}");
        assert!((100..=200).contains(&delays[1]), "{delays:?}");
        assert!(delays.iter().all(|&d| d <= 5_000));
        assert!(delays[11] >= 2_500, "{delays:?}");
        b.reset();
        assert!(b.next_delay_ms() <= 100);
    }
}
