//! safetensors IO.
