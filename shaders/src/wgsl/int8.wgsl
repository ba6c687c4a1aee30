// placeholder until the int8 kernels land.
@compute @workgroup_size(1)
fn placeholder_int8() {}
