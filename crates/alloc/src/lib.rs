//! The allocator every Meridian binary uses, and its one tuning.
//!
//! mimalloc returns freed memory to the OS far better than glibc malloc under many
//! threads and many small, short-lived allocations (streams, JSON), which is what a
//! region holding 100k agent streams does all day. By default (v3) it gives memory
//! back 1 s after it falls free; a server writing a few thousand objects a second
//! frees and reuses memory on a scale of seconds, so pages went back to the kernel
//! and faulted in, zeroed, again: at 300k pods a tenth of all CPU was the kernel
//! clearing pages (400k page faults in one run). [`tune`] waits 10 s instead
//! (33k faults, the same peak memory): memory still goes back when a burst is over.

use std::ffi::c_int;

/// The global allocator of a binary: `#[global_allocator] static A: Allocator = Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's `mi_option_purge_delay` (v3's `mi_option_e`; the `-sys` crate has no name for it).
const PURGE_DELAY: c_int = 15;
/// How long freed memory stays mapped before it goes back to the OS.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// Sets the allocator's options; call first thing in `main`.
pub fn tune() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table; the
    // option exists in the mimalloc version libmimalloc-sys builds (checked by the
    // test below), and the purge code reads it each time it runs.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS as _);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tune_sets_the_purge_delay_option() {
        #[allow(unsafe_code)]
        // SAFETY: reads an integer from mimalloc's option table.
        let before = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(
            before, 1000,
            "option {PURGE_DELAY} is not the purge delay (default 1 s)"
        );
        tune();
        #[allow(unsafe_code)]
        // SAFETY: reads an integer from mimalloc's option table.
        let v = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(v as i64, PURGE_DELAY_MS);
    }
}
