//! A counting global allocator: exact live heap bytes, per thread (so other threads' allocations
//! do not blur a single-threaded measurement). The counter is a const-initialised thread-local
//! `Cell` (no lazy init, no destructor), so it never allocates itself and costs ~1 ns per call.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

pub struct Counting;

thread_local! {
    /// Requested bytes live.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The same in glibc malloc chunks: size + 8-byte header, 16-byte aligned, 32 at least.
    static CHUNKS: Cell<isize> = const { Cell::new(0) };
}

pub fn chunk(size: usize) -> isize {
    (size.saturating_add(8 + 15) & !15).max(32) as isize
}

fn add(size: usize, sign: isize) {
    // try_with: during thread teardown the slot may be gone; the count then no longer matters.
    let _ = LIVE.try_with(|c| c.set(c.get() + sign * size as isize));
    let _ = CHUNKS.try_with(|c| c.set(c.get() + sign * chunk(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        add(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(layout.size(), -1);
            add(new_size, 1);
        }
        p
    }
}

/// Heap bytes allocated and not yet freed by this thread: (requested, in malloc chunks).
pub fn live() -> (isize, isize) {
    (
        LIVE.try_with(Cell::get).unwrap_or(0),
        CHUNKS.try_with(Cell::get).unwrap_or(0),
    )
}
