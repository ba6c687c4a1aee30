//! The KV cache's own contract: appends read back as one concatenation, GPU storage is
//! charged to the ledger as KV cache and freed on clear, and bad steps are errors. (Its own
//! test binary: the ledger is process-wide, and other tests allocate concurrently.)

use lathe_core::testing::test_gpu;
use lathe_core::{Device, MemCategory, Tensor};
use lathe_models::kv_cache::KvCache;

fn appends_read_back_as_concatenation(device: &Device) {
    let mut cache = KvCache::with_capacity(2, 2);
    let step = |seed, t| Tensor::rand_uniform(-1.0, 1.0, &[2, 3, t, 4], seed, device).unwrap();
    let steps: Vec<Tensor> = vec![step(0, 3), step(1, 1), step(2, 1), step(3, 2), step(4, 1)];
    let mut last = None;
    for s in &steps {
        let values = s.scale(2.0).unwrap();
        last = Some(cache.append(1, s, &values).unwrap());
    }
    let (keys, values) = last.unwrap();
    let refs: Vec<&Tensor> = steps.iter().collect();
    let want = Tensor::cat(&refs, 2).unwrap();
    assert_eq!(keys.shape(), [2, 3, 8, 4]);
    assert_eq!(keys.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    assert_eq!(
        values.to_vec_f32().unwrap(),
        want.scale(2.0).unwrap().to_vec_f32().unwrap()
    );
}

#[test]
fn kv_cache_appends_read_back_as_concatenation_cpu() {
    appends_read_back_as_concatenation(&Device::Cpu);
}

#[test]
fn kv_cache_appends_read_back_as_concatenation_gpu() {
    appends_read_back_as_concatenation(&test_gpu());
}

#[test]
fn gpu_kv_cache_is_charged_as_kv_cache_and_freed_on_clear() {
    // A context of its own: other tests of this binary allocate caches on the shared one.
    let device = Device::gpu(lathe_shaders::AdapterChoice::any()).unwrap();
    let ctx = device.gpu_context().unwrap();
    let before = ctx.ledger().current(MemCategory::KvCache);
    let mut cache = KvCache::with_capacity(1, 16);
    let step = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 1, 4], 9, &device).unwrap();
    cache.append(0, &step, &step).unwrap();
    assert!(cache.bytes() >= 2 * 16 * 2 * 3 * 4 * 4);
    assert!(ctx.ledger().current(MemCategory::KvCache) >= before + cache.bytes() as u64);
    cache.clear();
    assert_eq!(cache.seq_len(), 0);
    assert_eq!(ctx.ledger().current(MemCategory::KvCache), before);
}

#[test]
fn kv_cache_rejects_bad_steps() {
    let mut cache = KvCache::new(1);
    let k = Tensor::zeros(&[1, 2, 3, 4], &Device::Cpu).unwrap();
    let err = cache.append(1, &k, &k).unwrap_err().to_string();
    assert!(err.contains("no layer 1"), "{err}");
    let v = Tensor::zeros(&[1, 2, 3, 5], &Device::Cpu).unwrap();
    let err = cache.append(0, &k, &v).unwrap_err().to_string();
    assert!(err.contains("(B, kv_heads, t, d)"), "{err}");
    cache.append(0, &k, &k).unwrap();
    let other = Tensor::zeros(&[1, 3, 1, 4], &Device::Cpu).unwrap();
    let err = cache.append(0, &other, &other).unwrap_err().to_string();
    assert!(err.contains("kv cache holds"), "{err}");
}
