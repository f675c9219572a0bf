#![no_main]
// See holdfast::fuzz::sealed for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::capped();
    holdfast::fuzz::sealed(data)
});
