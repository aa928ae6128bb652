//! tern-scheduler: pure, deterministic DRS (load model, imbalance, balancing plans, placement,
//! evacuation, destination ranking, migration queue). No I/O, no clock, no hidden randomness.
#![forbid(unsafe_code)]
