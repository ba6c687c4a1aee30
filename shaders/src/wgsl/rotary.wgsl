// placeholder until the rotary kernels land.
@compute @workgroup_size(1)
fn placeholder_rotary() {}
