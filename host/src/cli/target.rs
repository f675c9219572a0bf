//! `holdfast target add|list|remove|check|clear-pending`.

use clap::Subcommand;

use super::{Context, print_json};
use crate::repo::sealed::Cipher;
use crate::target::{TargetRecord, Targets};

#[derive(Debug, Subcommand)]
pub enum TargetCommand {
    /// Register a mirror target: checks it (reachable, writable, empty or a holdfast
    /// repository of this format) and initialises an empty one. Credentials come from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never stored, never printed).
    #[command(
        after_help = "Examples:\n  holdfast target add bucket --url s3://backups/site-a --region eu-central-1\n  holdfast target add usb --url file:///mnt/usb/holdfast"
    )]
    Add {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        /// `s3://BUCKET/PREFIX` or `file:///PATH`.
        #[arg(long)]
        url: String,
        /// An S3-compatible endpoint (MinIO, Ceph RGW, Garage...); AWS when absent.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        /// The bucket's region (default: AWS_REGION, else us-east-1)
        region: Option<String>,
        /// Allow a plain-HTTP endpoint (a local test server); never implied.
        #[arg(long)]
        allow_http: bool,
        /// Take the keys from this profile of an AWS shared credentials file (read each time
        /// the target is used; the keys are never stored or printed).
        #[arg(long)]
        profile: Option<String>,
        /// That file (default: AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials).
        #[arg(long)]
        credentials_file: Option<std::path::PathBuf>,
        /// Create the target encrypted: every object sealed with a random master key, which is
        /// stored only wrapped by the passphrase or key file (`host/TARGETS.md`). An existing
        /// encrypted target is found encrypted without it.
        #[arg(long)]
        encrypt: bool,
        /// What a new encrypted target's objects are sealed with: aes-256-gcm or
        /// chacha20-poly1305 (default: AES-256-GCM where this CPU has AES instructions, else
        /// ChaCha20-Poly1305). Choose chacha20-poly1305 for a target that machines without
        /// them (a Raspberry Pi 4, say) will restore from: AES is several times slower there.
        #[arg(long, requires = "encrypt", value_parser = parse_cipher)]
        cipher: Option<Cipher>,
        /// The key file that opens it (`holdfast key new FILE`); its path is recorded, read
        /// each time the target is used.
        #[arg(long, conflicts_with = "passphrase_file")]
        key_file: Option<std::path::PathBuf>,
        /// A file holding the passphrase (its first line); its path is recorded. Without this
        /// or --key-file: HOLDFAST_PASSPHRASE, else a prompt on a terminal.
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// The key slots of an encrypted target: each one a passphrase or key file that opens it.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The registered targets.
    List {
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Forget a target (its contents are not touched).
    Remove { name: String },
    /// Reachable, writable, format version, what it holds, and any unfinished pushes.
    #[command(after_help = "Examples:\n  holdfast target check bucket")]
    Check {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Finish the unfinished pushes of another node that has stopped for good: each of its
    /// hidden snapshots becomes visible if every chunk is safely stored, else it is removed.
    /// Only for a node that is not running (its own next push finishes them otherwise).
    #[command(
        after_help = "Examples:\n  holdfast target clear-pending bucket --node old-node --yes"
    )]
    ClearPending {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        /// The node whose pushes to finish (as `target check` names it); repeatable: nodes
        /// that pushed the same snapshot are cleared together.
        #[arg(long, required = true)]
        node: Vec<String>,
        /// Also remove the snapshots that cannot be made whole (a chunk is gone and no node
        /// stored it again); without it they stay hidden. Never one a lock record names.
        #[arg(long)]
        drop_incomplete: bool,
        /// Do it without asking (required when not run on a terminal).
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a key slot: another passphrase or key file that opens the target. This node's own
    /// secret opens it first.
    #[command(
        after_help = "Examples:\n  holdfast key new /root/bucket.key && holdfast target key add bucket --new-key-file /root/bucket.key\n  HOLDFAST_NEW_PASSPHRASE=... holdfast target key add bucket --use"
    )]
    Add {
        /// The target's name
        name: String,
        /// The new slot opens with this key file (`holdfast key new FILE`).
        #[arg(long, conflicts_with = "new_passphrase_file")]
        new_key_file: Option<std::path::PathBuf>,
        /// The new slot opens with the passphrase in this file. Without this or
        /// --new-key-file: HOLDFAST_NEW_PASSPHRASE, else a prompt on a terminal.
        #[arg(long)]
        new_passphrase_file: Option<std::path::PathBuf>,
        /// This node opens the target with the new secret from now on (recorded: the file's
        /// path, or HOLDFAST_PASSPHRASE / a prompt for a passphrase given otherwise).
        #[arg(long = "use")]
        use_it: bool,
        /// Print the new slot as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// The key slots (no secret needed).
    List {
        /// The target's name
        name: String,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Remove a key slot: its secret no longer opens the target. Never the last one, nor the
    /// one this node uses. (The master key stays the same: whoever copied it while they held
    /// that secret still has it.)
    Remove {
        /// The target's name
        name: String,
        /// The slot's id (`holdfast target key list NAME`)
        slot: String,
    },
}

impl KeyCommand {
    async fn run(self, targets: &Targets<'_>, ctx: &Context) -> anyhow::Result<()> {
        use crate::target::keys::KeySource;
        match self {
            KeyCommand::Add {
                name,
                new_key_file,
                new_passphrase_file,
                use_it,
                json,
            } => {
                let source = KeySource::new(new_key_file, new_passphrase_file)?;
                let slot = targets.add_key(&name, source, use_it).await?;
                if json {
                    return print_json(&slot);
                }
                ctx.summary(format!(
                    "added key slot {} ({}) to target {name}{}",
                    slot.id,
                    slot.kind,
                    if use_it {
                        "; this node opens the target with it from now on"
                    } else {
                        ""
                    }
                ));
            }
            KeyCommand::List { name, json } => {
                let slots = targets.key_slots(&name).await?;
                if json {
                    return print_json(&slots);
                }
                outln!("{:<10} {:<12} {:<26} KDF", "SLOT", "KIND", "CREATED");
                for s in slots {
                    outln!(
                        "{:<10} {:<12} {:<26} {}",
                        s.id,
                        s.kind.to_string(),
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_millis(s.created_unix_ms)
                        )
                        .to_string(),
                        match &s.argon2id {
                            Some(a) =>
                                format!("argon2id {} MiB, {} passes", a.memory_kib / 1024, a.passes),
                            None => "blake3 (a random key)".into(),
                        }
                    );
                }
            }
            KeyCommand::Remove { name, slot } => {
                let s = targets.remove_key(&name, &slot).await?;
                ctx.summary(format!(
                    "removed key slot {} ({}) of target {name}: its secret no longer opens it",
                    s.id, s.kind
                ));
            }
        }
        Ok(())
    }
}

impl TargetCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let targets = Targets::new(&node);
        match self {
            TargetCommand::Add {
                name,
                url,
                endpoint,
                region,
                allow_http,
                profile,
                credentials_file,
                encrypt,
                cipher,
                key_file,
                passphrase_file,
                json,
            } => {
                let encryption = if key_file.is_some() || passphrase_file.is_some() {
                    Some(crate::target::keys::KeySource::new(
                        key_file,
                        passphrase_file,
                    )?)
                } else {
                    None
                };
                let credentials_file = credentials_file
                    .map(|f| std::path::absolute(&f))
                    .transpose()
                    .map_err(|e| crate::Error::io("resolving --credentials-file", e))?;
                let r = targets
                    .add(
                        TargetRecord {
                            name,
                            url,
                            endpoint,
                            region,
                            allow_http,
                            profile,
                            credentials_file,
                            added_unix_ms: crate::now_unix_ms(),
                            encryption,
                            repository_id: None,
                        },
                        encrypt,
                        cipher,
                    )
                    .await?;
                if json {
                    return print_json(&r);
                }
                ctx.summary(format!(
                    "added target {} ({}): format version {}{}{}, {} snapshot(s), {} pack(s)",
                    r.target,
                    r.url,
                    r.format_version,
                    match &r.cipher {
                        Some(c) => format!(", encrypted ({c})"),
                        None => String::new(),
                    },
                    if r.initialised_now {
                        ", initialised now"
                    } else {
                        ""
                    },
                    r.snapshots,
                    r.packs
                ));
            }
            TargetCommand::List { json } => {
                let list = targets.list()?;
                if json {
                    return print_json(&list);
                }
                outln!("{:<20} {:<40} ENDPOINT", "NAME", "URL");
                for t in list {
                    outln!(
                        "{:<20} {:<40} {}{}{}",
                        t.name,
                        t.url,
                        t.endpoint.as_deref().unwrap_or("-"),
                        if t.allow_http {
                            " (plain http allowed)"
                        } else {
                            ""
                        },
                        if t.encryption.is_some() {
                            " (encrypted)"
                        } else {
                            ""
                        }
                    );
                }
            }
            TargetCommand::Key(k) => k.run(&targets, ctx).await?,
            TargetCommand::Remove { name } => {
                let r = targets.remove(&name)?;
                ctx.summary(format!(
                    "removed target {} ({}); its contents were not touched",
                    r.name, r.url
                ));
            }
            TargetCommand::Check { name, json } => {
                let rec = targets.get(&name)?;
                let r = crate::target::check_or_init(
                    &rec,
                    &node.info.node_id,
                    crate::target::Checking::Registered,
                )
                .await?;
                if json {
                    return print_json(&r);
                }
                outln!(
                    "target {} ({}): reachable, writable, format version {}{}, {} snapshot(s), {} pack(s), {} gc record(s), checked in {:.2}s",
                    r.target,
                    r.url,
                    r.format_version,
                    match &r.cipher {
                        Some(c) => format!(", encrypted ({c})"),
                        None => String::new(),
                    },
                    r.snapshots,
                    r.packs,
                    r.gc_records,
                    r.seconds
                );
                for p in &r.pending_pushes {
                    outln!(
                        "unfinished push: {}@{} by node {}, {} ago (hidden until that node's next \
                         push finishes it; if the node is gone for good: holdfast target \
                         clear-pending {} --node {})",
                        p.volume,
                        p.snapshot,
                        p.node,
                        humantime::format_duration(std::time::Duration::from_secs(p.age_seconds)),
                        r.target,
                        p.node
                    );
                }
            }
            TargetCommand::ClearPending {
                name,
                node: of,
                drop_incomplete,
                yes,
                json,
            } => {
                let of = of
                    .iter()
                    .map(|n| n.parse::<crate::id::NodeId>())
                    .collect::<Result<Vec<_>, _>>()?;
                let rec = targets.get(&name)?;
                if !yes {
                    let names: Vec<String> = of.iter().map(|n| n.to_string()).collect();
                    confirm_clear(&name, &names.join(", "))?;
                }
                let pb = ctx.count_bar("checking chunks");
                let r = crate::target::clear_pending(&node, &rec, &of, drop_incomplete, &pb).await;
                pb.finish_and_clear();
                let r = r?;
                if json {
                    return print_json(&r);
                }
                use crate::target::Finished;
                for c in &r {
                    let said = match c.outcome {
                        Finished::Committed => "committed (every chunk is stored)".to_string(),
                        Finished::NoManifest => {
                            "nothing to finish (no manifest was written; its key is fenced)"
                                .to_string()
                        }
                        Finished::Dropped => "removed (it could not be made whole)".to_string(),
                        Finished::Damaged => "left hidden: the object at its manifest's key is \
                                              not its manifest (see the warning above)"
                            .to_string(),
                        Finished::Incomplete { missing } => format!(
                            "left hidden: {missing} chunks are gone; rerun with \
                             --drop-incomplete (with a --node for every node that pushed this \
                             snapshot and is gone: `target check` lists them)"
                        ),
                    };
                    outln!("{}@{} (node {}) {said}", c.volume, c.snapshot, c.node);
                }
                let names: Vec<String> = of.iter().map(|n| n.to_string()).collect();
                ctx.summary(format!(
                    "finished {} unfinished push(es) of node {} in target {name}",
                    r.len(),
                    names.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Asks on the terminal before finishing another node's pushes; refuses without a terminal.
fn confirm_clear(target: &str, of: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(crate::Error::invalid(format!(
            "clear-pending needs --yes when not run on a terminal (node {of}, target {target})"
        )));
    }
    eprint!(
        "node {of} must not be running a push to {target}: its unfinished snapshots are \
         committed if whole, else removed. Type yes: "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        anyhow::bail!(crate::Error::conflict("not confirmed; nothing was changed"));
    }
    Ok(())
}

fn parse_cipher(s: &str) -> std::result::Result<Cipher, String> {
    Cipher::ALL
        .into_iter()
        .find(|c| c.short_name() == s)
        .ok_or_else(|| {
            format!(
                "no cipher {s:?}; give one of {}",
                Cipher::ALL.map(Cipher::short_name).join(", ")
            )
        })
}
