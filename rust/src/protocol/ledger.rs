//! What Python drains about once a second: per-key tallies and the push-back reports that
//! policy reads, each held within a bound between two drains.

use hashbrown::HashMap;

/// Most push-back reports held between two drains; later ones are counted as dropped.
pub const MAX_REPORTS: usize = 100_000;
/// Longest SMTP reply text kept with a report (bytes, cut at a character boundary).
pub const MAX_REPORT_TEXT: usize = 1_000;

/// What one key saw since the last drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub granted: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub complaints: u64,
}

/// A delivery result that was not a plain delivery: the evidence policy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub at_ms: u64,
    pub key: u32,
    pub result: Outcome,
    pub n: u32,
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    pub text: Option<String>,
}

/// The result a `report` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
    Complaint,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Delivered,
        Outcome::Deferred,
        Outcome::Bounced,
        Outcome::Complaint,
    ];

    /// The name on the wire and in Python.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
            Outcome::Complaint => "complaint",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// Tallies by key and reports in arrival order, since the last drain.
#[derive(Debug, Clone, Default)]
pub(super) struct Ledger {
    tallies: HashMap<u32, Tally>,
    reports: Vec<Report>,
}

impl Ledger {
    /// `n` messages granted to `key`.
    pub(super) fn grant(&mut self, key: u32, n: u32) {
        self.tallies.entry(key).or_default().granted += u64::from(n);
    }

    /// Count a report in its key's tally and keep it unless it was a plain delivery; false
    /// when it had to be dropped (`MAX_REPORTS` held).
    pub(super) fn record(&mut self, report: Report) -> bool {
        let tally = self.tallies.entry(report.key).or_default();
        let count = u64::from(report.n);
        match report.result {
            Outcome::Delivered => tally.delivered += count,
            Outcome::Deferred => tally.deferred += count,
            Outcome::Bounced => tally.bounced += count,
            Outcome::Complaint => tally.complaints += count,
        }
        if report.result == Outcome::Delivered {
            return true;
        }
        if self.reports.len() >= MAX_REPORTS {
            return false;
        }
        self.reports.push(report);
        true
    }

    /// Per-key tallies since the last call, by key.
    pub(super) fn take_tallies(&mut self) -> Vec<(u32, Tally)> {
        let mut v: Vec<(u32, Tally)> = self.tallies.drain().collect();
        v.sort_unstable_by_key(|&(k, _)| k);
        v
    }

    /// Reports since the last call, in arrival order.
    pub(super) fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    /// Forget everything (the keys it names are gone).
    pub(super) fn clear(&mut self) {
        self.tallies.clear();
        self.reports.clear();
    }
}
