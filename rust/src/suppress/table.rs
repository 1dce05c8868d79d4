//! The memory of the set's table. A lookup in a big list lands on a random slot, so it
//! misses the CPU's caches; with 4 KiB pages it also misses the TLB, and the page-table walk
//! costs more misses. So from `HUGE_FROM_BYTES` the table is an anonymous mapping the
//! kernel is asked to back with transparent huge pages (`madvise(MADV_HUGEPAGE)`: honoured
//! when /sys/kernel/mm/transparent_hugepage/enabled says `always` or `madvise`, the
//! default of most distributions; elsewhere a plain mapping). Smaller tables are vectors.

use std::fmt;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut};

/// Tables at least this big are mapped and advised (one huge page: 2 MiB).
pub const HUGE_FROM_BYTES: usize = 2 << 20;

/// `len` zeroed slots.
pub struct Slots(Memory);

enum Memory {
    Vector(Vec<u64>),
    Mapped(MmapMut),
}

impl Slots {
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * 8;
        if bytes >= HUGE_FROM_BYTES {
            // Anonymous mappings come zeroed and page-aligned, so they view as u64s.
            if let Ok(map) = MmapMut::map_anon(bytes) {
                let _ = map.advise(Advice::HugePage); // a hint; refused: 4 KiB pages
                return Self(Memory::Mapped(map));
            }
        }
        Self(Memory::Vector(vec![0; len]))
    }
}

impl Deref for Slots {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        match &self.0 {
            Memory::Vector(v) => v,
            Memory::Mapped(m) => bytemuck::cast_slice(m),
        }
    }
}

impl DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [u64] {
        match &mut self.0 {
            Memory::Vector(v) => v,
            Memory::Mapped(m) => bytemuck::cast_slice_mut(m),
        }
    }
}

impl Clone for Slots {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len());
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Memory::Vector(_) => "vector",
            Memory::Mapped(_) => "mapped",
        };
        write!(f, "Slots({} {kind})", self.len())
    }
}
