//! Builds the eBPF object for the architecture user space is built for, so
//! the binary embeds the programs it loads: one file to copy to a router.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Lets `cargo check`/clippy run without bpf-linker. The binary then
        // refuses to trace and says how to build it properly.
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        fs::write(out.join("ctrace-ebpf"), [])?;
        return Ok(());
    }
    // The object is built by the toolchain building user space unless told
    // otherwise: bpf-linker has to match that toolchain's LLVM either way.
    println!("cargo::rerun-if-env-changed=CTRACE_EBPF_TOOLCHAIN");
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = env::var("CTRACE_EBPF_TOOLCHAIN")
        .or_else(|_| env::var("RUSTUP_TOOLCHAIN"))
        .map_err(|_| {
            anyhow::anyhow!(
                "no toolchain for the eBPF object: build with `cargo xtask build`, \
                 or set CTRACE_EBPF_TOOLCHAIN (or use rustup's `cargo +TOOLCHAIN`)"
            )
        })?;
    // aya-build watches the eBPF crate; the types it shares with user space
    // live in ctrace-common, and a stale object would disagree with them.
    println!("cargo::rerun-if-changed=../ctrace-common/src");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../ctrace-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ctrace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
