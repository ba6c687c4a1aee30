//! A process-wide count of the multiply-adds of the matrix products (two FLOPs each), for
//! the benchmarks' achieved GFLOP/s: every [`crate::Tensor::matmul_t`], the fused LM-head
//! products and lathe-quant's int8 products add theirs, forward and backward, on either
//! device. Elementwise ops, norms and softmax are not counted: a section's figure is the
//! work a GEMM peak bounds.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNTED: AtomicU64 = AtomicU64::new(0);

/// Adds the 2 m n k FLOPs of an (m, k) @ (k, n) product.
pub fn add_product(m: usize, n: usize, k: usize) {
    let flops = 2u64
        .saturating_mul(m as u64)
        .saturating_mul(n as u64)
        .saturating_mul(k as u64);
    COUNTED.fetch_add(flops, Ordering::Relaxed);
}

/// FLOPs counted since the process started (read before and after a timed region).
pub fn counted() -> u64 {
    COUNTED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, Tensor};

    #[test]
    fn a_matmul_counts_its_multiply_adds() {
        let a = Tensor::from_vec(vec![1f32; 6 * 5], &[2, 3, 5], &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![1f32; 5 * 4], &[5, 4], &Device::Cpu).unwrap();
        let before = counted();
        a.matmul(&b).unwrap();
        // Other tests run products meanwhile: at least this one's 2 x 6 x 4 x 5.
        assert!(counted() - before >= 2 * 6 * 4 * 5);
    }
}
