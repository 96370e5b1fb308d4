//! Black-box tests: the real binaries, real directories, real sockets on
//! 127.0.0.1. Run as root (chown, ACLs, trusted.* xattrs, tmpfs mounts).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod atomicity;
mod bad_input;
mod bulk_lane;
mod confinement;
mod continuous;
mod crash_points;
mod delta;
mod deploy;
mod do_no_harm;
mod doctor;
mod failover;
mod fidelity;
mod handover;
mod hostile;
mod hostile_batch;
mod hostile_conns;
mod hostile_counts;
mod hostile_flood;
mod hostile_peer;
mod hostile_replica;
mod hostile_source;
mod hostile_stage;
mod hostile_stall;
mod hostile_tls;
mod idmap;
mod invariant12;
mod lag;
mod netns;
mod profiles;
mod promote;
mod push;
mod races;
mod scan_ahead;
mod sqlite;
mod sqlite_cuts;
mod surface;
mod trust;
mod util;
