//! `cargo xtask image`: the DaemonSet's image as an OCI archive for
//! linux/amd64 and linux/arm64, made without a container daemon. FROM
//! scratch: one layer holding the static binary at /ctrace, which is the
//! entrypoint. The archive's single reference is `ctrace:<version>`, an
//! image index with one manifest per platform, which `skopeo copy
//! oci-archive:FILE:ctrace:<version> docker://REGISTRY/ctrace:<version>`
//! pushes as a multi-arch image.
//!
//! Layers and the archive are made reproducible (sorted, mtime 0, owner 0)
//! with tar and gzip; digests with sha256sum. Then skopeo reads it back:
//! both platforms, the entrypoint and the labels.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{build, output, run, step, workspace_root};

/// (Rust target, OCI architecture).
const PLATFORMS: [(&str, &str); 2] = [
    ("x86_64-unknown-linux-musl", "amd64"),
    ("aarch64-unknown-linux-musl", "arm64"),
];

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// ctrace's version ([workspace.package] in Cargo.toml): the image's tag,
/// which the DaemonSet names.
pub fn version() -> anyhow::Result<String> {
    let manifest = fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .map(str::to_string)
        .context("no [workspace.package] version in Cargo.toml")
}

/// Builds both binaries, assembles the archive and checks it. Returns its
/// path.
pub fn image() -> anyhow::Result<PathBuf> {
    let bins: Vec<(PathBuf, &str)> = PLATFORMS
        .iter()
        .map(|(target, arch)| Ok((build(Some(target))?, *arch)))
        .collect::<anyhow::Result<_>>()?;
    let version = version()?;
    let out = workspace_root().join("target/image");
    let archive = assemble(&bins, &version, &out)?;
    check(&archive, &version)?;
    Ok(archive)
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    let hex = out.split_whitespace().next().unwrap_or_default();
    ensure!(hex.len() == 64, "sha256sum said {out:?}");
    Ok(hex.to_string())
}

/// Moves `file` into the layout's blobs under its digest; returns the
/// descriptor's digest and size.
fn blob(layout: &Path, file: &Path) -> anyhow::Result<(String, u64)> {
    let hex = sha256(file)?;
    let size = fs::metadata(file)?.len();
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    fs::rename(file, dir.join(&hex))?;
    Ok((format!("sha256:{hex}"), size))
}

fn json_blob(layout: &Path, scratch: &Path, v: &Value) -> anyhow::Result<(String, u64)> {
    let f = scratch.join("blob.json");
    fs::write(&f, serde_json::to_vec(v)?)?;
    blob(layout, &f)
}

/// A reproducible tar of `names` under `dir`.
pub fn tar(dir: &Path, names: &[&str], to: &Path) -> anyhow::Result<()> {
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "-cf",
        ])
        .arg(to)
        .arg("-C")
        .arg(dir)
        .args(names))
}

fn assemble(bins: &[(PathBuf, &str)], version: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let _ = fs::remove_dir_all(out);
    let layout = out.join("layout");
    let scratch = out.join("scratch");
    fs::create_dir_all(&layout)?;
    fs::create_dir_all(&scratch)?;
    let labels = json!({
        "org.opencontainers.image.title": "ctrace",
        "org.opencontainers.image.description": "Catch conntrack table-full drops live and say whose connections they were.",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
    });
    let mut manifests = Vec::new();
    for (bin, arch) in bins {
        step(&format!("image: linux/{arch} from {}", bin.display()));
        let stage = scratch.join(format!("rootfs-{arch}"));
        fs::create_dir_all(&stage)?;
        fs::copy(bin, stage.join("ctrace"))?;
        fs::set_permissions(
            stage.join("ctrace"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let layer_tar = scratch.join(format!("layer-{arch}.tar"));
        tar(&stage, &["ctrace"], &layer_tar)?;
        let diff_id = format!("sha256:{}", sha256(&layer_tar)?);
        run(Command::new("gzip")
            .args(["-n", "-9", "-f"])
            .arg(&layer_tar))?;
        let (layer, layer_size) = blob(&layout, &layer_tar.with_extension("tar.gz"))?;
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/ctrace"],
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "cargo xtask image", "comment": "the static ctrace binary"}],
        });
        let (config, config_size) = json_blob(&layout, &scratch, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config, "size": config_size},
            "layers": [{"mediaType": LAYER, "digest": layer, "size": layer_size}],
            "annotations": labels,
        });
        let (digest, size) = json_blob(&layout, &scratch, &manifest)?;
        manifests.push(json!({
            "mediaType": MANIFEST,
            "digest": digest,
            "size": size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
    let (digest, size) = json_blob(&layout, &scratch, &index)?;
    let top = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": INDEX,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": format!("ctrace:{version}")},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = out.join(format!("ctrace-{version}.oci.tar"));
    tar(&layout, &["blobs", "index.json", "oci-layout"], &archive)?;
    fs::remove_dir_all(&scratch)?;
    fs::remove_dir_all(&layout)?;
    step(&format!(
        "image: {} ({:.1} MiB)",
        archive.display(),
        fs::metadata(&archive)?.len() as f64 / 1048576.0
    ));
    Ok(archive)
}

/// skopeo reads the archive back as a registry would serve it.
pub fn check(archive: &Path, version: &str) -> anyhow::Result<()> {
    crate::vm::apt::Host::new().ensure_installed("skopeo")?;
    let reference = format!("oci-archive:{}:ctrace:{version}", archive.display());
    let raw: Value = serde_json::from_str(&output(
        Command::new("skopeo").args(["inspect", "--raw", &reference]),
    )?)?;
    let mut platforms: Vec<String> = raw["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    platforms.sort();
    ensure!(
        platforms == ["linux/amd64", "linux/arm64"],
        "image platforms {platforms:?}, not linux/amd64 and linux/arm64"
    );
    for (_, arch) in PLATFORMS {
        let config: Value = serde_json::from_str(&output(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--override-os",
            "linux",
            "--override-arch",
            arch,
            &reference,
        ]))?)?;
        if config["architecture"] != arch || config["config"]["Entrypoint"] != json!(["/ctrace"]) {
            bail!("linux/{arch}: unexpected config {config}");
        }
        let labels = &config["config"]["Labels"];
        ensure!(
            labels["org.opencontainers.image.version"] == version
                && labels["org.opencontainers.image.title"] == "ctrace",
            "linux/{arch}: labels {labels}"
        );
    }
    step(&format!(
        "image checked by skopeo: {}, entrypoint /ctrace, version label {version}",
        platforms.join(" and ")
    ));
    Ok(())
}
