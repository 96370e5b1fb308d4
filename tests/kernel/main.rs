//! The kernel-knob tier: tests that change kernel-wide limits, apart from the
//! integration tests that run in parallel (see `knobs.rs`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod knobs;
#[allow(dead_code)]
#[path = "../integration/util.rs"]
mod util;
