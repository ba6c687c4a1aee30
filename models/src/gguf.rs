//! GGUF file reading (in progress).
