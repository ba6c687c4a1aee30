//! Model configurations (in progress).
