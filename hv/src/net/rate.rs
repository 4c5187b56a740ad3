use std::time::{Duration, Instant};

/// A rate limit as Firecracker's: `rate` units (bytes or packets) per second, with a bucket
/// that holds `burst` units, full at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: u64,
    pub burst: u64,
}

impl RateLimit {
    /// A limit whose bucket holds a tenth of a second of traffic, so the long-run rate is
    /// `rate` and a short burst is not penalised.
    pub fn per_second(rate: u64) -> RateLimit {
        RateLimit {
            rate,
            burst: (rate / 10).max(1),
        }
    }
}

/// A token bucket; a consumer of more than the bucket holds still gets through once the
/// bucket is full, so a frame larger than the burst is delayed, not stuck.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> TokenBucket {
        TokenBucket {
            limit,
            tokens: limit.burst as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.limit.rate as f64).min(self.limit.burst as f64);
    }

    /// Whether `n` tokens may be taken now, or how long until they may.
    pub fn check(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let need = (n as f64).min(self.limit.burst as f64);
        if self.tokens >= need {
            return Ok(());
        }
        let missing = need - self.tokens;
        Err(Duration::from_secs_f64(
            missing / self.limit.rate.max(1) as f64,
        ))
    }

    /// Takes `n` tokens after a successful [`TokenBucket::check`]; the bucket may go into
    /// debt, which later traffic pays back.
    pub fn consume(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    /// Takes `n` tokens, or says how long until they are there.
    pub fn take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.check(n, now)?;
        self.consume(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_burst_through_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RateLimit {
            rate: 1000,
            burst: 100,
        });
        bucket.last = start;
        assert!(bucket.take(100, start).is_ok());
        let wait = bucket.take(50, start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.05).abs() < 1e-6, "{wait:?}");
        assert!(bucket.take(50, start + Duration::from_millis(50)).is_ok());
        // One more than the bucket holds goes through once the bucket is full.
        let later = start + Duration::from_secs(1);
        assert!(bucket.take(500, later).is_ok());
        assert!(bucket.take(1, later).is_err());
        assert_eq!(RateLimit::per_second(10_000).burst, 1000);
    }
}
