//! Reading a whole per-CPU hash map with `BPF_MAP_LOOKUP_BATCH`: a few
//! syscalls for the map instead of two per key. The flow map is read every
//! tick and, in a storm, holds thousands of flows: key-by-key iteration
//! made that read most of what ctrace cost once a storm was over.
//!
//! Kernels before 5.6 have no batch commands (EINVAL); callers then fall
//! back to aya's key-by-key iteration.
use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{IterableMap, PerCpuHashMap},
};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Keys asked for per call: large enough that a 16,384-entry map takes a
/// handful of calls, small enough that the buffers stay well under a MiB
/// on a 2-CPU router.
const CHUNK: u32 = 2048;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, per-CPU values) of `map`, or the error of the first call
/// that failed (EINVAL where the kernel has no batch lookup). Entries that
/// come or go during the read may or may not be listed, as with
/// iteration.
pub fn per_cpu_entries<K: Pod, V: Pod>(
    map: &PerCpuHashMap<aya::maps::MapData, K, V>,
) -> io::Result<Vec<(K, Vec<V>)>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
    // The kernel lays per-CPU values out 8-byte aligned, one per possible
    // CPU.
    let stride = size_of::<V>().div_ceil(8) * 8;
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut chunk = CHUNK as usize;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    // The hash map's batch token is a bucket index (u32).
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize(chunk * cpus * stride, 0);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at buffers sized for `count` keys and
        // values, which outlive the call; the kernel writes at most that.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket holds more keys than asked for: ask for more.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        for (i, key) in keys.iter().take(attr.count as usize).enumerate() {
            // SAFETY: the kernel filled the first `count` keys.
            let key = unsafe { key.assume_init() };
            let per_cpu = (0..cpus)
                .map(|c| {
                    let at = (i * cpus + c) * stride;
                    // SAFETY: V is Pod and `at + size_of::<V>()` lies in
                    // the buffer; read_unaligned takes any alignment.
                    unsafe { std::ptr::read_unaligned(values[at..].as_ptr().cast::<V>()) }
                })
                .collect();
            out.push((key, per_cpu));
        }
        if err.is_some() {
            // ENOENT: the walk reached the end.
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}
