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
    let toolchain = env::var("CTRACE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "1.99.1".into());
    println!("cargo::rerun-if-env-changed=CTRACE_EBPF_TOOLCHAIN");
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
