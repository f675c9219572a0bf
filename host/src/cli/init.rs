//! `holdfast init`.

use clap::Args;

use super::Context;
use crate::id::NodeId;
use crate::state::Node;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  HOLDFAST_STATE=/var/lib/holdfast holdfast init --node-id site-a"
)]
pub struct InitCommand {
    /// This node's id (letters, digits, `_ - : . +`); generated when absent.
    #[arg(long)]
    pub node_id: Option<NodeId>,
}

impl InitCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        // Say which folders appear, rather than create a path nobody meant silently.
        let missing: Vec<&std::path::Path> = ctx
            .state
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        let node = Node::init(&ctx.state, self.node_id).await?;
        if missing.len() > 1 {
            eprintln!(
                "note: created the missing folders {}",
                missing
                    .iter()
                    .rev()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        outln!("{}", node.info.node_id);
        ctx.summary(format!(
            "initialised node {} in {} (repository format {})",
            node.info.node_id,
            ctx.state.display(),
            crate::repo::FORMAT_VERSION
        ));
        Ok(())
    }
}
