//! A per-key rate limit as configured (`requests` every `per_seconds`, plus `burst`), validated
//! into the bucket interval that `limits` counts with. A leaf: key records and the `limits`
//! defaults both hold one.

use serde::Serialize;
use serde_json::Value;

use super::config_error::ConfigError;
use super::json_fields::Fields;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RateLimitSpec {
    pub requests: u64,
    pub per_seconds: u64,
    pub burst: u64,
}

impl RateLimitSpec {
    /// A key record's `rate_limit` and the config's `limits.rate_limit` alike.
    pub fn decode(value: &Value, path: &str) -> Result<RateLimitSpec, ConfigError> {
        let fields = Fields::of(value, path, &["requests", "per_seconds", "burst"])?;
        Ok(RateLimitSpec {
            requests: fields
                .u64("requests")?
                .ok_or_else(|| fields.missing("requests"))?,
            per_seconds: fields
                .u64("per_seconds")?
                .ok_or_else(|| fields.missing("per_seconds"))?,
            burst: fields.u64("burst")?.unwrap_or(0),
        })
    }
}

pub(super) const MICROS_PER_SECOND: i128 = 1_000_000;
/// A bucket that takes longer than this to refill is a configuration mistake (and would overflow).
const MAX_REFILL_MICROS: i128 = 100 * 366 * 86_400 * MICROS_PER_SECOND;

/// Microseconds one request occupies the bucket, rounded up (never more permissive); zero
/// requests (refused by `from_spec`) count as one.
fn interval_micros(spec: &RateLimitSpec) -> i128 {
    let window = i128::from(spec.per_seconds) * MICROS_PER_SECOND;
    let requests = i128::from(spec.requests.max(1));
    (window + requests - 1) / requests
}

/// A validated rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub requests: u64,
    pub per_seconds: u64,
    pub burst: u64,
    /// Microseconds one request occupies the bucket (rounded up, so never more permissive).
    interval_us: i64,
}

impl RateLimit {
    pub fn from_spec(spec: &RateLimitSpec, path: &str) -> Result<RateLimit, ConfigError> {
        if spec.requests == 0 {
            return Err(ConfigError::new(
                format!("{path}.requests"),
                "must be at least 1",
            ));
        }
        if spec.per_seconds == 0 {
            return Err(ConfigError::new(
                format!("{path}.per_seconds"),
                "must be at least 1",
            ));
        }
        let interval = interval_micros(spec);
        let capacity = i128::from(spec.requests) + i128::from(spec.burst);
        if interval * capacity > MAX_REFILL_MICROS {
            return Err(ConfigError::new(
                path,
                "the bucket would take more than 100 years to refill",
            ));
        }
        Ok(RateLimit::from_checked(spec))
    }

    /// A limit from a spec `from_spec` accepted: key records keep only their spec and
    /// compute this when limits apply.
    pub fn from_checked(spec: &RateLimitSpec) -> RateLimit {
        RateLimit {
            requests: spec.requests,
            per_seconds: spec.per_seconds,
            burst: spec.burst,
            interval_us: interval_micros(spec).min(i128::from(i64::MAX)) as i64,
        }
    }

    /// How many requests an idle key may send at once.
    pub fn capacity(&self) -> u64 {
        self.requests.saturating_add(self.burst)
    }

    /// Microseconds one request occupies the bucket.
    pub(super) fn interval_us(&self) -> i64 {
        self.interval_us
    }

    /// How far ahead of now the bucket's arrival time may run (validated to fit).
    pub(super) fn tolerance_us(&self) -> i64 {
        self.interval_us.saturating_mul(self.capacity() as i64)
    }
}
