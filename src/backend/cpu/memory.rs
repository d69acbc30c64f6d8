//! The CPU backend's memory: glibc's malloc settings (freed activation buffers stay in the
//! process), and how much the host has left.
//!
//! Every op allocates its output (tens to hundreds of MB at 512²) and frees its inputs. glibc
//! serves blocks over 128 KiB with `mmap` and unmaps them on `free`, so each op paid one page
//! fault per 4 KiB of output, zero-filled by the kernel; with `mmap` off and trimming raised,
//! freed blocks are reused instead (`sd21-bench kernels` measures the difference).

/// Turns off glibc's `mmap` for large blocks and its trimming of the heap (below 2 GiB free), so
/// freed buffers are reused instead of returned to the kernel. Call once, at the start of `main`,
/// before other threads allocate. Returns whether the settings took effect (always false off glibc,
/// where the system allocator is left as it is).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets glibc malloc parameters (it takes malloc's own lock); both
        // parameters and values are documented ones, and no pointer is involved.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The kernel's estimate of memory available to new allocations without swapping
/// (`MemAvailable` in `/proc/meminfo`); `None` where there is no such file.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_on_linux() {
        let available = available_bytes();
        if cfg!(target_os = "linux") {
            assert!(
                available.is_some_and(|bytes| bytes > 1 << 20),
                "{available:?}"
            );
        }
    }

    #[test]
    fn large_blocks_still_allocate_and_are_usable_after_the_switch() {
        let applied = keep_freed_memory();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // 256 MiB, freed and allocated again: served from the heap now, and still zeroed by vec!.
        for _ in 0..2 {
            let v = vec![0.0f32; 64 << 20];
            assert!(v.iter().step_by(4096).all(|&x| x == 0.0));
            assert_eq!(v.len(), 64 << 20);
        }
    }
}
