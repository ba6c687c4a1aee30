//! The memory ledger: every byte lathe allocates on a device, by category, current and peak.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a buffer holds. The ledger keeps current and peak bytes for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemCategory {
    /// A model's frozen weights.
    Weights,
    /// LoRA adapters and other trained parameters.
    Adapters,
    /// Optimizer moments and gradients.
    Optimizer,
    /// Tensors computed by the forward and backward passes.
    Activations,
    /// Generation's keys and values.
    KvCache,
    /// Temporaries of a single op.
    Scratch,
}

impl MemCategory {
    /// Every category, in the ledger's order.
    pub const ALL: [MemCategory; 6] = [
        MemCategory::Weights,
        MemCategory::Adapters,
        MemCategory::Optimizer,
        MemCategory::Activations,
        MemCategory::KvCache,
        MemCategory::Scratch,
    ];

    /// The category's name in reports ("kv-cache").
    pub fn name(self) -> &'static str {
        match self {
            MemCategory::Weights => "weights",
            MemCategory::Adapters => "adapters",
            MemCategory::Optimizer => "optimizer",
            MemCategory::Activations => "activations",
            MemCategory::KvCache => "kv-cache",
            MemCategory::Scratch => "scratch",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Thread-safe byte counters. Peaks are updated on every charge, so they are exact.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    current: [AtomicU64; 6],
    peak: [AtomicU64; 6],
    total_current: AtomicU64,
    total_peak: AtomicU64,
}

/// One category's figures at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CategoryBytes {
    /// The category.
    pub category: MemCategory,
    /// Bytes held now.
    pub current: u64,
    /// Most bytes held at once since the start or the last reset.
    pub peak: u64,
}

/// A copy of the ledger's figures at a moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerSnapshot {
    /// Each category's figures, in [`MemCategory::ALL`]'s order.
    pub categories: Vec<CategoryBytes>,
    /// Bytes held now over all categories.
    pub total_current: u64,
    /// Peak of the sum over categories (not the sum of per-category peaks).
    pub total_peak: u64,
}

impl MemoryLedger {
    /// Counts `bytes` allocated in `category`, updating the peaks.
    pub fn charge(&self, category: MemCategory, bytes: u64) {
        let i = category.index();
        let now = self.current[i].fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
        let total = self.total_current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.total_peak.fetch_max(total, Ordering::Relaxed);
    }

    /// Counts `bytes` of `category` freed (as charged before).
    pub fn release(&self, category: MemCategory, bytes: u64) {
        self.current[category.index()].fetch_sub(bytes, Ordering::Relaxed);
        self.total_current.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes of `category` held now.
    pub fn current(&self, category: MemCategory) -> u64 {
        self.current[category.index()].load(Ordering::Relaxed)
    }

    /// Most bytes of `category` held at once since the start or the last reset.
    pub fn peak(&self, category: MemCategory) -> u64 {
        self.peak[category.index()].load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement: every peak becomes the current value.
    pub fn reset_peaks(&self) {
        for i in 0..6 {
            self.peak[i].store(self.current[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.total_peak.store(
            self.total_current.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Every figure now.
    pub fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot {
            categories: MemCategory::ALL
                .iter()
                .map(|&category| CategoryBytes {
                    category,
                    current: self.current(category),
                    peak: self.peak(category),
                })
                .collect(),
            total_current: self.total_current.load(Ordering::Relaxed),
            total_peak: self.total_peak.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Display for LedgerSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<12} {:>14} {:>14}", "category", "current", "peak")?;
        for c in &self.categories {
            writeln!(
                f,
                "{:<12} {:>14} {:>14}",
                c.category.name(),
                human_bytes(c.current),
                human_bytes(c.peak)
            )?;
        }
        write!(
            f,
            "{:<12} {:>14} {:>14}",
            "total",
            human_bytes(self.total_current),
            human_bytes(self.total_peak)
        )
    }
}

/// Bytes as a short human figure (binary units).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_follow_charges_and_survive_releases() {
        let ledger = MemoryLedger::default();
        ledger.charge(MemCategory::Weights, 100);
        ledger.charge(MemCategory::Activations, 50);
        ledger.release(MemCategory::Activations, 50);
        ledger.charge(MemCategory::Activations, 20);
        let snap = ledger.snapshot();
        assert_eq!(ledger.current(MemCategory::Weights), 100);
        assert_eq!(ledger.peak(MemCategory::Activations), 50);
        assert_eq!(ledger.current(MemCategory::Activations), 20);
        assert_eq!(snap.total_current, 120);
        assert_eq!(snap.total_peak, 150);
        ledger.reset_peaks();
        assert_eq!(ledger.peak(MemCategory::Activations), 20);
    }
}
