#![no_main]
// See holdfast::fuzz::node_toml for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::capped();
    holdfast::fuzz::node_toml(data)
});
