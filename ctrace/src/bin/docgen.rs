//! Writes ctrace's man page (`ctrace.8`) and its bash, zsh and fish
//! completions into the directory given, from the CLI's own definition,
//! for the packages (`cargo xtask package`).
use std::{fs, path::PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("usage: ctrace-docgen DIR"))?,
    );
    fs::create_dir_all(&dir)?;
    let cmd = ctrace::cli::Cli::command()
        .name("ctrace")
        .bin_name("ctrace");
    let mut page = Vec::new();
    // Section 8: a system administration command (it needs root).
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    fs::write(dir.join("ctrace.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "ctrace", &dir)?;
    }
    Ok(())
}
