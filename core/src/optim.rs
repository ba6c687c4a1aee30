//! Adam and AdamW.
