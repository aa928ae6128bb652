//! Shared helpers for end-to-end tests (each test crate uses only some of them).
#![allow(dead_code)]

pub mod proxy;
pub mod store;
