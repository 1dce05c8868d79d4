//! What the hot calls return. Being throttled is a value, never an error.

/// Why a request was denied. Codes are stable: they cross the wire and land in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Reason {
    /// Granted: nothing held it back.
    Granted = 0,
    /// The key is paused by policy (or its multiplier is 0); no time is known for a retry.
    Paused = 1,
    /// The key is suspended until a deadline (e.g. after provider push-back).
    Suspended = 2,
    /// The key's daily cap is spent for this calendar day.
    DailyCap = 3,
    /// The key's hourly cap is spent for this calendar hour.
    HourlyCap = 4,
    /// The IP's daily cap across all providers is spent.
    IpDailyCap = 5,
    /// The IP's hourly cap across all providers is spent.
    IpHourlyCap = 6,
    /// The GCRA rate: too soon after the previous sends.
    Rate = 7,
    /// The key used up what the last durable snapshot reserved for it (see
    /// `Engine::reservation_snapshot`); the next commit gives it more.
    Reservation = 8,
    /// The key's IP is no longer a sending IP of the plan (`Limiter::retain_ips`).
    Retired = 9,
    /// The current local hour is not one of the key's active hours (a warming IP rests at
    /// night); the wait runs to the start of the next active hour.
    OutsideActiveHours = 10,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Granted,
        Reason::Paused,
        Reason::Suspended,
        Reason::DailyCap,
        Reason::HourlyCap,
        Reason::IpDailyCap,
        Reason::IpHourlyCap,
        Reason::Rate,
        Reason::Reservation,
        Reason::Retired,
        Reason::OutsideActiveHours,
    ];

    /// The snake_case name used on the wire, in logs and in Python.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::Paused => "paused",
            Reason::Suspended => "suspended",
            Reason::DailyCap => "daily_cap",
            Reason::HourlyCap => "hourly_cap",
            Reason::IpDailyCap => "ip_daily_cap",
            Reason::IpHourlyCap => "ip_hourly_cap",
            Reason::Rate => "rate",
            Reason::Reservation => "reservation",
            Reason::Retired => "retired",
            Reason::OutsideActiveHours => "outside_active_hours",
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

/// Which tier of a pool carried a `pick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tier {
    /// Not a pick (a plain `acquire`).
    Direct = 0,
    /// A warming IP of the asked pool had room.
    Warming = 1,
    /// A warm IP of the asked pool, chosen by weight.
    Warm = 2,
    /// An IP of an overflow pool (the asked pool had no room).
    Overflow = 3,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Direct, Tier::Warming, Tier::Warm, Tier::Overflow];

    /// The name used on the wire and in Python.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Direct => "direct",
            Tier::Warming => "warming",
            Tier::Warm => "warm",
            Tier::Overflow => "overflow",
        }
    }
}

/// The answer to "may this key send `n` now?" (all or nothing).
///
/// `retry_after_ms` is honest: it is the earliest time at which the same request is granted
/// if nothing else is granted meanwhile and no limit changes (asking again earlier is
/// denied; only a reservation's wait is an estimate). `None` on a denial means no scheduled
/// event frees the key: paused or retired, `n` above a cap or the burst, or no calendar
/// boundary (or active hour) supplied that far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// How many were granted: the full `n`, or 0 when denied.
    pub granted: u32,
    pub reason: Reason,
    /// 0 when granted.
    pub retry_after_ms: Option<u64>,
    /// The key (IP, provider) that was charged, or that blocked a denial.
    pub key: u32,
    pub tier: Tier,
}

impl Decision {
    pub const fn is_granted(&self) -> bool {
        self.granted > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r as u8), Some(r));
        }
        assert_eq!(Reason::from_code(11), None);
        assert_eq!(Reason::OutsideActiveHours.as_str(), "outside_active_hours");
        assert_eq!(Reason::Reservation.as_str(), "reservation");
        assert_eq!(Reason::DailyCap.as_str(), "daily_cap");
    }
}
