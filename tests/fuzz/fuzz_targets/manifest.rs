#![no_main]
// See holdfast::fuzz::manifest for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::capped();
    holdfast::fuzz::manifest(data)
});
