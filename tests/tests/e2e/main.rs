//! End-to-end tests: the real `holdfast` binary on temporary state directories.

mod bad_input;
mod corruption;
mod crash;
mod encrypted;
mod hostile;
mod live;
mod locks;
mod mirror;
mod package;
mod policies;
mod regions;
mod service;
mod simulate;
mod snapshots;
mod soak;
mod sparse;
mod target_gc;
mod targets;
mod ui;
