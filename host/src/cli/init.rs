//! `holdfast init`.

use clap::Args;

use super::Context;
use holdfast::id::NodeId;
use holdfast::state::Node;

#[derive(Debug, Args)]
pub struct InitCommand {
    /// This node's id (letters, digits, `_ - : . +`); generated when absent.
    #[arg(long)]
    pub node_id: Option<NodeId>,
}

impl InitCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = Node::init(&ctx.state, self.node_id).await?;
        outln!("{}", node.info.node_id);
        ctx.summary(format!(
            "initialised node {} in {} (repository format {})",
            node.info.node_id,
            ctx.state.display(),
            holdfast::repo::FORMAT_VERSION
        ));
        Ok(())
    }
}
