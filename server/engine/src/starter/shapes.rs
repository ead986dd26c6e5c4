//! The procedural shapes world (to be written).
