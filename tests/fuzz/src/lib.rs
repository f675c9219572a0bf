//! What every fuzz target shares: an allocator that aborts on any single allocation larger
//! than [`LIMIT`]. The inputs are at most a few hundred KiB, so a bigger request means a
//! length field from outside was trusted (libFuzzer's own -malloc_limit_mb needs a
//! sanitizer's allocator; this works in the plain builds `run.sh` makes).

use std::alloc::{GlobalAlloc, Layout, System};

/// Far above what any parser needs for inputs of `-max_len` bytes.
pub const LIMIT: usize = 256 << 20;

struct Capped;

// SAFETY: forwards to the system allocator unchanged; only refuses (aborts) first.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > LIMIT {
        // No allocation from here on: write the message by hand and abort (libFuzzer then
        // saves the input as a crash).
        let msg = b"holdfast-fuzz: an allocation of more than 256 MiB (a length from the input \
                    was trusted)\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg);
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Links this crate (and its allocator) into a target.
pub fn capped() {}
