//! The runtime on a real adapter (lavapipe in CI): adapter choice, ledger, pool reuse,
//! pipeline cache, dispatch and readback.

use lathe_shaders::{grid_1d, AdapterChoice, GpuContext, Launch, MemCategory, Shader, View};

fn context() -> std::sync::Arc<GpuContext> {
    GpuContext::new(AdapterChoice::any())
        .expect("GPU tests need a Vulkan adapter: apt-get install mesa-vulkan-drivers")
}

#[test]
fn software_adapters_need_an_explicit_opt_in() {
    let ctx = context();
    if ctx.report().is_software {
        let err = GpuContext::new(AdapterChoice {
            allow_software: false,
            max_binding: None,
            index: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no hardware GPU adapter"), "{err}");
    } else {
        // A machine with a real GPU picks it whatever the choice says.
        assert!(
            !GpuContext::new(AdapterChoice {
                allow_software: false,
                max_binding: None,
                index: None,
            })
            .unwrap()
            .report()
            .is_software
        );
    }
}

#[test]
fn ledger_counts_live_buffers_and_the_pool_reuses_them() {
    let ctx = context();
    // Weights get their exact size; other categories a recyclable size class.
    let w = ctx.alloc(1001, MemCategory::Weights).unwrap();
    assert_eq!(
        (w.capacity(), ctx.ledger().current(MemCategory::Weights)),
        (1004, 1004)
    );
    drop(w);
    ctx.trim_pool();
    let a = ctx.alloc(1000, MemCategory::Optimizer).unwrap();
    let b = ctx.alloc(5000, MemCategory::KvCache).unwrap();
    assert!(a.capacity() > 1000);
    assert_eq!(ctx.ledger().current(MemCategory::Optimizer), a.capacity());
    assert_eq!(ctx.ledger().current(MemCategory::KvCache), b.capacity());
    let (a_capacity, b_capacity) = (a.capacity(), b.capacity());
    drop(a);
    assert_eq!(ctx.ledger().current(MemCategory::Optimizer), 0);
    assert_eq!(ctx.ledger().peak(MemCategory::Optimizer), a_capacity);
    assert_eq!(ctx.pool_idle_bytes(), a_capacity);
    // Same size class, other category: the idle buffer is reused and charged anew.
    let c = ctx.alloc(990, MemCategory::Activations).unwrap();
    assert_eq!(c.capacity(), a_capacity);
    assert_eq!(ctx.pool_idle_bytes(), 0);
    assert_eq!(ctx.ledger().current(MemCategory::Activations), a_capacity);
    let snapshot = ctx.ledger_snapshot();
    assert_eq!(snapshot.total_current, a_capacity + b_capacity);
    assert!(snapshot.to_string().contains("kv-cache"));
    drop((b, c));
    ctx.trim_pool();
    assert_eq!(ctx.pool_idle_bytes(), 0);
}

#[test]
fn dispatch_and_readback_round_trip_and_pipelines_are_cached() {
    let ctx = context();
    let n = 70_001u32; // not a multiple of the workgroup size
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let x = ctx
        .upload(bytemuck::cast_slice(&data), MemCategory::Activations)
        .unwrap();
    let out = ctx.alloc(n as u64 * 4, MemCategory::Activations).unwrap();
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Affine {
        n: u32,
        _pad: u32,
        mul: f32,
        add: f32,
    }
    let params = Affine {
        n,
        _pad: 0,
        mul: 2.0,
        add: 1.0,
    };
    for _ in 0..2 {
        ctx.launch(&Launch {
            shader: Shader::Elementwise,
            entry: "affine",
            inputs: &[View::whole(&x)],
            outputs: &[View::whole(&out)],
            params: bytemuck::bytes_of(&params),
            workgroups: grid_1d(n as u64, 256),
        })
        .unwrap();
    }
    let pipelines = ctx.pipeline_count();
    let back: Vec<f32> = bytemuck::pod_collect_to_vec(&ctx.read(&out).unwrap());
    assert_eq!(back.len(), n as usize);
    assert!(back
        .iter()
        .enumerate()
        .all(|(i, v)| *v == 2.0 * i as f32 + 1.0));
    ctx.launch(&Launch {
        shader: Shader::Elementwise,
        entry: "affine",
        inputs: &[View::whole(&x)],
        outputs: &[View::whole(&out)],
        params: bytemuck::bytes_of(&params),
        workgroups: [1, 1, 1],
    })
    .unwrap();
    assert_eq!(
        ctx.pipeline_count(),
        pipelines,
        "a second launch compiled the pipeline again"
    );
    ctx.sync().unwrap();
}

#[test]
fn oversized_buffers_are_errors_not_panics() {
    let ctx = context();
    let too_big = ctx.report().max_buffer_size + 1;
    let err = ctx.alloc(too_big, MemCategory::Scratch).unwrap_err();
    assert!(
        err.to_string()
            .contains("exceeds the device's max buffer size"),
        "{err}"
    );
}

/// A rank's adapter index counts among the adapters as good as the best, modulo their
/// number: any index opens an adapter (4 ranks on a machine of fewer GPUs share them), and
/// index 0 is the default choice.
#[test]
fn an_adapter_index_wraps_over_the_equally_good_adapters() {
    let first = GpuContext::new(AdapterChoice::any()).unwrap();
    for i in 0..4 {
        let ctx = GpuContext::new(AdapterChoice {
            index: Some(i),
            ..AdapterChoice::any()
        })
        .unwrap();
        if i == 0 {
            assert_eq!(ctx.report().name, first.report().name);
        }
    }
}
