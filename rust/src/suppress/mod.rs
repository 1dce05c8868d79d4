//! The suppression list's live set: the addresses that must not be mailed, checked at send
//! time (docs/suppression.md).
//!
//! Each entry is one `u64`: a 61-bit keyed hash (SipHash-1-3) of `scope \0 address` and
//! 3 bits of event type, in an open-addressing table with linear probing (load at most 7/8,
//! backward-shift deletion, no tombstones). So the set holds no address at all: at 10M
//! addresses the table is 2^24 slots, 128 MiB, 13.4 bytes an address (at most 18.3 right
//! after it doubles). The hash key is the operator's: without it a stored hash says nothing
//! about who is on the list. Soft bounces carry an expiry, kept beside the table for them
//! only. Two addresses whose hashes agree in 61 bits collide: with 10M addresses the chance
//! that any given unlisted address is taken for a listed one is about 10M / 2^61 (4e-12).

use hashbrown::HashMap;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;
use std::ops::Range;

pub mod csvread;
pub mod dedupe;
mod table;
#[cfg(test)]
mod tests;

use table::Slots;

/// Why an address is on the list (3 bits; 0 marks an empty slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Event {
    HardBounce = 1,
    Complaint = 2,
    Unsubscribe = 3,
    Manual = 4,
    SoftBounce = 5,
}

impl Event {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HardBounce => "hard_bounce",
            Self::Complaint => "complaint",
            Self::Unsubscribe => "unsubscribe",
            Self::Manual => "manual",
            Self::SoftBounce => "soft_bounce",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "hard_bounce" => Self::HardBounce,
            "complaint" => Self::Complaint,
            "unsubscribe" => Self::Unsubscribe,
            "manual" => Self::Manual,
            "soft_bounce" => Self::SoftBounce,
            _ => return None,
        })
    }

    const fn from_bits(bits: u64) -> Option<Self> {
        Some(match bits {
            1 => Self::HardBounce,
            2 => Self::Complaint,
            3 => Self::Unsubscribe,
            4 => Self::Manual,
            5 => Self::SoftBounce,
            _ => return None,
        })
    }
}

const EVENT_BITS: u32 = 3;
const EVENT_MASK: u64 = (1 << EVENT_BITS) - 1;
const MIN_SLOTS: usize = 1 << 10;
/// Most addresses the set holds (the table then has 2^28 slots, 2 GiB).
pub const MAX_ADDRESSES: usize = 200_000_000;

/// The live set; see the module docstring.
#[derive(Debug, Clone)]
pub struct SuppressionSet {
    key: (u64, u64),
    slots: Slots,
    len: usize,
    /// Fingerprint -> expiry (Unix ms) of the soft bounces.
    expiries: HashMap<u64, u64>,
}

impl Default for SuppressionSet {
    fn default() -> Self {
        Self::new((0, 0))
    }
}

impl SuppressionSet {
    /// An empty set whose hashes are keyed with `key`.
    pub fn new(key: (u64, u64)) -> Self {
        Self {
            key,
            slots: Slots::zeroed(MIN_SLOTS),
            len: 0,
            expiries: HashMap::new(),
        }
    }

    pub fn key(&self) -> (u64, u64) {
        self.key
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the set takes: the table and the soft bounces' expiries.
    pub fn bytes(&self) -> usize {
        self.slots.len() * 8 + self.expiries.capacity() * 17
    }

    /// The 61-bit fingerprint of `address` in `scope` ("" for the global list): what the
    /// set holds, and what a hashed store keeps instead of the address. Never 0.
    pub fn fingerprint(&self, scope: &[u8], address: &[u8]) -> u64 {
        Self::fingerprint_keyed(self.key, scope, &[address])
    }

    /// `fingerprint(scope, local@domain)` from the parts, without joining them.
    pub fn fingerprint_parts(&self, scope: &[u8], local: &[u8], domain: &[u8]) -> u64 {
        Self::fingerprint_keyed(self.key, scope, &[local, b"@", domain])
    }

    /// The fingerprint with `key` of the address that `pieces` make joined (SipHash reads
    /// a stream: the same bytes in pieces give the same hash), without a set at hand.
    #[inline]
    pub fn fingerprint_keyed(key: (u64, u64), scope: &[u8], pieces: &[&[u8]]) -> u64 {
        let mut h = SipHasher13::new_with_keys(key.0, key.1);
        h.write(scope);
        h.write_u8(0);
        for piece in pieces {
            h.write(piece);
        }
        (h.finish() >> EVENT_BITS).max(1)
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Where `fp` is, or the empty slot where it would go.
    #[inline]
    fn find(&self, fp: u64) -> (usize, bool) {
        let mask = self.mask();
        let mut i = fp as usize & mask;
        loop {
            let s = self.slots[i];
            if s == 0 {
                return (i, false);
            }
            if s >> EVENT_BITS == fp {
                return (i, true);
            }
            i = (i + 1) & mask;
        }
    }

    /// Put `fp` on the list for `event` (a later event replaces an earlier one; a soft
    /// bounce expires at `expires_ms`). Returns whether it was not there before. Err: the set
    /// is full.
    pub fn insert(
        &mut self,
        fp: u64,
        event: Event,
        expires_ms: Option<u64>,
    ) -> Result<bool, String> {
        let (i, found) = self.find(fp);
        let slot = (fp << EVENT_BITS) | event as u64;
        if found {
            self.slots[i] = slot;
        } else {
            if self.len >= MAX_ADDRESSES {
                return Err(format!(
                    "the suppression list holds {MAX_ADDRESSES} addresses"
                ));
            }
            if (self.len + 1) * 8 > self.slots.len() * 7 {
                self.grow();
                return self.insert(fp, event, expires_ms);
            }
            self.slots[i] = slot;
            self.len += 1;
        }
        match (event, expires_ms) {
            (Event::SoftBounce, Some(t)) => {
                self.expiries.insert(fp, t);
            }
            _ => {
                self.expiries.remove(&fp);
            }
        }
        Ok(!found)
    }

    fn grow(&mut self) {
        let doubled = Slots::zeroed(self.slots.len() * 2);
        let old = std::mem::replace(&mut self.slots, doubled);
        let mask = self.mask();
        for &s in old.iter().filter(|&&s| s != 0) {
            let mut i = (s >> EVENT_BITS) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Take `fp` off the list. Returns whether it was there.
    pub fn remove(&mut self, fp: u64) -> bool {
        let (mut hole, found) = self.find(fp);
        if !found {
            return false;
        }
        self.expiries.remove(&fp);
        self.slots[hole] = 0;
        self.len -= 1;
        // Backward shift: move later entries of the run into the hole when their home is at
        // or before it, so every entry stays reachable from its home without tombstones.
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s == 0 {
                return true;
            }
            let home = (s >> EVENT_BITS) as usize & mask;
            let between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !between {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
        }
    }

    /// Why `fp` is on the list at `now_ms` (an expired soft bounce is not), or None.
    #[inline]
    pub fn lookup(&self, fp: u64, now_ms: u64) -> Option<Event> {
        let (i, found) = self.find(fp);
        if !found {
            return None;
        }
        let event = Event::from_bits(self.slots[i] & EVENT_MASK)?;
        if event == Event::SoftBounce && self.expiries.get(&fp).is_some_and(|&t| t <= now_ms) {
            return None;
        }
        Some(event)
    }

    /// `lookup` of each of `fps` onto `out`, a block at a time: first every block's home slot
    /// is read in a loop without branches, so the CPU has many of those reads (each a cache
    /// miss in a big table) in flight at once; the probes that follow find them in cache.
    pub fn lookup_many(&self, fps: &[u64], now_ms: u64, out: &mut Vec<Option<Event>>) {
        const BLOCK: usize = 32;
        let mask = self.mask();
        for block in fps.chunks(BLOCK) {
            let touched = block
                .iter()
                .fold(0u64, |acc, &fp| acc ^ self.slots[fp as usize & mask]);
            std::hint::black_box(touched);
            out.extend(block.iter().map(|&fp| self.lookup(fp, now_ms)));
        }
    }

    /// Why `address` may not be mailed at `now_ms`: on the global list, or on `scope`'s.
    pub fn check(&self, scope: &[u8], address: &[u8], now_ms: u64) -> Option<Event> {
        self.lookup(self.fingerprint(b"", address), now_ms)
            .or_else(|| {
                (!scope.is_empty())
                    .then(|| self.lookup(self.fingerprint(scope, address), now_ms))
                    .flatten()
            })
    }

    /// `check` for many addresses: all are hashed first, then the table is probed for all
    /// of them, so the CPU waits for several memory reads at once instead of one by one.
    pub fn check_batch(
        &self,
        scope: &[u8],
        addresses: &[&[u8]],
        now_ms: u64,
        out: &mut Vec<Option<Event>>,
    ) {
        let start = out.len();
        let global: Vec<u64> = addresses.iter().map(|a| self.fingerprint(b"", a)).collect();
        self.lookup_many(&global, now_ms, out);
        if scope.is_empty() {
            return;
        }
        for (k, a) in addresses.iter().enumerate() {
            if out[start + k].is_none() {
                out[start + k] = self.lookup(self.fingerprint(scope, a), now_ms);
            }
        }
    }

    /// Drop the soft bounces that expired by `now_ms`; how many.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let gone: Vec<u64> = self
            .expiries
            .iter()
            .filter(|&(_, &t)| t <= now_ms)
            .map(|(&fp, _)| fp)
            .collect();
        for &fp in &gone {
            self.remove(fp);
        }
        gone.len()
    }

    /// Every entry: (fingerprint, event, expiry), in table order (a snapshot's content).
    pub fn entries(&self) -> impl Iterator<Item = (u64, Event, Option<u64>)> + '_ {
        self.slots.iter().filter(|&&s| s != 0).filter_map(|&s| {
            let fp = s >> EVENT_BITS;
            Event::from_bits(s & EVENT_MASK).map(|e| (fp, e, self.expiries.get(&fp).copied()))
        })
    }

    /// The set as bytes (key check, then slots and expiries, little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.bytes_head();
        self.bytes_slots(0..self.slots.len(), &mut out);
        self.bytes_expiries(&mut out);
        out
    }

    /// `to_bytes` in three parts, so a caller can copy the table a range of slots at a
    /// time (`slot_count`) while the set does not change: the header (room reserved for
    /// the rest), then the entries of each range, then the expiries.
    pub fn bytes_head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.len * 8 + self.expiries.len() * 16);
        out.extend_from_slice(b"KSUP1\0\0\0");
        out.extend_from_slice(&self.key_check().to_le_bytes());
        out.extend_from_slice(&(self.len as u64).to_le_bytes());
        out.extend_from_slice(&(self.expiries.len() as u64).to_le_bytes());
        out
    }

    /// The entries of `slots` (a range of `0..slot_count()`), for `to_bytes`.
    pub fn bytes_slots(&self, slots: Range<usize>, out: &mut Vec<u8>) {
        for s in self.slots[slots].iter().filter(|&&s| s != 0) {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }

    /// The soft bounces' expiries, the last part of `to_bytes`.
    pub fn bytes_expiries(&self, out: &mut Vec<u8>) {
        for (fp, t) in &self.expiries {
            out.extend_from_slice(&fp.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
        }
    }

    /// Slots of the table (a power of two).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Whether `more` new addresses fit without the table growing.
    pub fn has_room(&self, more: usize) -> bool {
        (self.len + more) * 8 <= self.slots.len() * 7
    }

    /// An empty set keyed as this one, with room for `n` addresses without growing.
    #[must_use]
    pub fn with_room_for(&self, n: usize) -> Self {
        let mut set = Self::new(self.key);
        let mut slots = MIN_SLOTS;
        while n.min(MAX_ADDRESSES) * 8 > slots * 7 {
            slots *= 2;
        }
        set.slots = Slots::zeroed(slots);
        set
    }

    /// Put the entries of `slots` (a range of `0..slot_count()`) into `into`, with their
    /// expiries: growing a big set a range at a time, so no one holds it for the whole copy.
    pub fn copy_slots(&self, slots: Range<usize>, into: &mut Self) -> Result<(), String> {
        for &s in self.slots[slots].iter().filter(|&&s| s != 0) {
            let fp = s >> EVENT_BITS;
            if let Some(event) = Event::from_bits(s & EVENT_MASK) {
                into.insert(fp, event, self.expiries.get(&fp).copied())?;
            }
        }
        Ok(())
    }

    /// A set from `to_bytes`, hashed with `key` (Err if it was made with another key or the
    /// bytes are not a set).
    pub fn from_bytes(key: (u64, u64), data: &[u8]) -> Result<Self, String> {
        let word = |i: usize| -> Result<u64, String> {
            data.get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .ok_or_else(|| "suppression snapshot: cut short".to_owned())
        };
        if data.get(..8) != Some(b"KSUP1\0\0\0") {
            return Err("suppression snapshot: not one (bad header)".into());
        }
        let mut set = Self::new(key);
        if word(8)? != set.key_check() {
            return Err("suppression snapshot: made with another hash key".into());
        }
        let (n, soft) = (word(16)? as usize, word(24)? as usize);
        if n > MAX_ADDRESSES || data.len() != 32 + n * 8 + soft * 16 {
            return Err("suppression snapshot: wrong length".into());
        }
        while n * 8 > set.slots.len() * 7 {
            set.slots = Slots::zeroed(set.slots.len() * 2);
        }
        for k in 0..n {
            let s = word(32 + k * 8)?;
            let fp = s >> EVENT_BITS;
            let event = Event::from_bits(s & EVENT_MASK)
                .ok_or_else(|| "suppression snapshot: bad event".to_owned())?;
            set.insert(fp, event, None)?;
        }
        for k in 0..soft {
            let at = 32 + n * 8 + k * 16;
            set.expiries.insert(word(at)?, word(at + 8)?);
        }
        Ok(set)
    }

    /// A fingerprint of the key itself, so a snapshot is never read with another key.
    fn key_check(&self) -> u64 {
        self.fingerprint(b"kiln-key-check", b"")
    }
}
