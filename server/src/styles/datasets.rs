//! Uploaded training datasets (moving here from trainer.rs).
