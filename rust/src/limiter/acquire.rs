//! `acquire` and `acquire_batch`: arguments checked, the calendar advanced, then each
//! request decided and charged.

use super::{check_n, check_now, KeyCheck, Limiter};
use crate::decision::{Decision, Reason, Tier};
use crate::error::{CoreError, CoreResult};

impl Limiter {
    /// May `key` send `n` more now? All or nothing; charged when granted.
    #[inline(always)]
    pub fn acquire(&mut self, key: u32, n: u32, now_ms: u64) -> CoreResult<Decision> {
        if key as usize >= self.keys.len() {
            return Err(CoreError::UnknownHandle {
                kind: "key",
                handle: u64::from(key),
            });
        }
        check_n(n)?;
        check_now(now_ms)?;
        self.advance(now_ms);
        Ok(self.decide(key, n, now_ms, Tier::Direct))
    }

    #[inline(always)]
    pub(crate) fn decide(&mut self, key: u32, n: u32, now_ms: u64, tier: Tier) -> Decision {
        match self.evaluate(key, n, now_ms) {
            KeyCheck::Fit(tat) => {
                self.commit(key, n, tat);
                Decision {
                    granted: n,
                    reason: Reason::Granted,
                    retry_after_ms: Some(0),
                    key,
                    tier,
                }
            }
            KeyCheck::Held(reason, retry_after_ms) => Decision {
                granted: 0,
                reason,
                retry_after_ms,
                key,
                tier,
            },
        }
    }

    /// Decide many (key, n) requests at one `now_ms`, in order, appending to `out`.
    /// Every request is checked before any is decided, so bad input changes nothing.
    pub fn acquire_batch<I>(
        &mut self,
        requests: I,
        now_ms: u64,
        out: &mut Vec<Decision>,
    ) -> CoreResult<()>
    where
        I: ExactSizeIterator<Item = (u32, u32)> + Clone,
    {
        check_now(now_ms)?;
        let nkeys = self.keys.len();
        // The checking pass also reads each request's key and IP, so the cache misses of a
        // large batch overlap here instead of stalling the deciding pass one by one.
        let mut touched = 0u32;
        for (i, (key, n)) in requests.clone().enumerate() {
            if key as usize >= nkeys {
                return Err(CoreError::UnknownHandle {
                    kind: "key",
                    handle: u64::from(key),
                });
            }
            if n == 0 {
                return Err(CoreError::bad("counts", format!("request {i} asks for 0")));
            }
            let slot = &self.keys[key as usize];
            touched ^= slot.hour_used ^ self.ips[slot.ip as usize].hour_used;
        }
        std::hint::black_box(touched);
        self.advance(now_ms);
        out.reserve(requests.len());
        for (key, n) in requests {
            out.push(self.decide(key, n, now_ms, Tier::Direct));
        }
        Ok(())
    }
}
