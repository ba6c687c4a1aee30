//! GGUF block dequantization (in progress).
