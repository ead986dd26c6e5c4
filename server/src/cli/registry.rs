//! `atelier registry`: the model registry from the command line: `list` (every registered
//! style with its latest version and aliases), `show NAME` (its versions with their
//! metadata), `alias NAME ALIAS VERSION` (set or move an alias; `--delete` removes it).
//! With `--tracking-uri` the change is mirrored to the MLflow server's registry at once.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use atelier_server::tracking::Tracker;

/// Arguments of `atelier registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    command: RegistryCommand,
    /// The experiment store holding the registry (the studio keeps it in DATA/tracking).
    #[arg(long, global = true, env = "ATELIER_TRACKING", default_value = "data/tracking")]
    tracking: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum RegistryCommand {
    /// Registered styles: latest version, aliases, when updated.
    List,
    /// One registered style: every version with its run, aliases and metadata.
    Show { name: String },
    /// Points ALIAS (e.g. production, staging) of NAME at VERSION; prompts can then say
    /// <lora:NAME@ALIAS:0.8>.
    Alias {
        name: String,
        alias: String,
        /// The version number (required unless --delete).
        version: Option<i64>,
        /// Remove the alias instead.
        #[arg(long)]
        delete: bool,
        #[command(flatten)]
        uri: super::TrackingUri,
    },
}

pub fn run(args: RegistryArgs) -> Result<()> {
    if !args.tracking.join("tracking.sqlite").is_file() {
        bail!("no experiment store at {}: train a style first, or pass --tracking DIR", args.tracking.display());
    }
    let tracker = Tracker::open(&args.tracking).with_context(|| format!("opening {}", args.tracking.display()))?;
    match args.command {
        RegistryCommand::List => {
            let models = tracker.registered_models()?;
            if models.is_empty() {
                println!("no registered styles yet: every finished style training registers a version");
                return Ok(());
            }
            let mut rows = vec![["name", "versions", "latest", "aliases", "updated"].map(String::from).to_vec()];
            for m in models {
                let aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}→{v}")).collect();
                rows.push(vec![
                    m.name.clone(),
                    m.versions.len().to_string(),
                    m.versions.first().map_or("-".into(), |v| v.version.to_string()),
                    if aliases.is_empty() { "-".into() } else { aliases.join(" ") },
                    time(m.last_updated_time),
                ]);
            }
            print!("{}", super::runs::columns(rows));
        }
        RegistryCommand::Show { name } => {
            let m = tracker.registered_model(&name)?.with_context(|| format!("no registered style {name:?}; `atelier registry list` shows them"))?;
            println!("{}: {} version(s)", m.name, m.versions.len());
            for v in &m.versions {
                let aliases = if v.aliases.is_empty() { String::new() } else { format!("  [{}]", v.aliases.join(", ")) };
                println!("\nversion {}{aliases}  registered {}  run {}", v.version, time(v.creation_time), v.run_id.as_deref().unwrap_or("-"));
                println!("  files: {}", v.source);
                let w = v.tags.keys().map(|k| k.len()).max().unwrap_or(0);
                for (k, val) in &v.tags {
                    println!("  {k:<w$}  {val}");
                }
            }
        }
        RegistryCommand::Alias { name, alias, version, delete, uri } => {
            if delete {
                if !tracker.delete_alias(&name, &alias)? {
                    bail!("{name} has no alias {alias}");
                }
                println!("removed alias {alias} of {name}");
            } else {
                let version = version.context("give the version the alias points at, e.g. `atelier registry alias ink production 3`")?;
                tracker.set_alias(&name, &alias, version)?;
                println!("{name}@{alias} → version {version}; use it as <lora:{name}@{alias}:1>");
            }
            uri.mirror(&args.tracking);
        }
    }
    Ok(())
}

fn time(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}
