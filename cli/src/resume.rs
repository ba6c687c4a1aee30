//! What a checkpoint must match to be resumed: `lathe_train::resume` (fingerprints of a
//! run's inputs stored in the trainer state, compared with the settings on resume).

pub use lathe_train::resume::*;
