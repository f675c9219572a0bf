//! `holdfast completions` and `holdfast manpages`: what a package installs beside the binary,
//! made from the command line's own definitions so they never disagree with it.

use std::path::PathBuf;

use clap::{Args, CommandFactory};

use super::{Cli, Context};

#[derive(Debug, Args)]
pub struct CompletionsCommand {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

impl CompletionsCommand {
    pub async fn run(self, _ctx: &Context) -> anyhow::Result<()> {
        use std::io::Write;
        let mut buf = Vec::new();
        clap_complete::generate(self.shell, &mut Cli::command(), "holdfast", &mut buf);
        std::io::stdout()
            .lock()
            .write_all(&buf)
            .map_err(super::stdout_error)?;
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ManpagesCommand {
    /// The directory to write the pages into (created if missing): holdfast.1 and one page per
    /// subcommand (holdfast-snapshot.1, holdfast-snapshot-create.1, ...).
    #[arg(long)]
    pub out: PathBuf,
}

impl ManpagesCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        clap_mangen::generate_to(Cli::command(), &self.out)
            .with_context(|| format!("writing manual pages into {}", self.out.display()))?;
        let n = std::fs::read_dir(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".1"))
            })
            .count();
        ctx.summary(format!("{n} manual pages in {}", self.out.display()));
        Ok(())
    }
}
