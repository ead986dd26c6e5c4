//! `atelier datasets`: style datasets versioned in DVC 3's layout (see
//! `atelier_server::datasets`), in the studio data folder (`--project`, default the
//! `ATELIER_DATA` folder `serve` uses) or any DVC project.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_server::datasets::remote::{self, RemoteStore};
use atelier_server::datasets::{Dataset, Project, Remote};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct DatasetsArgs {
    /// The DVC project: the studio's data folder by default.
    #[arg(long, global = true, env = "ATELIER_DATA", default_value = "data")]
    pub project: PathBuf,
    #[command(subcommand)]
    pub command: DatasetsCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetsCommand {
    /// Make the folder a DVC project (what `dvc init --no-scm` makes); nothing changes if it is one.
    Init,
    /// Every dataset (each `.dvc` file): current version, hash, files, size, damage.
    List,
    /// One dataset's versions, each with what changed.
    Show { dataset: String },
    /// What changed between two versions (default: the current one against the one before).
    Diff {
        dataset: String,
        /// The older version (default: the one before --to).
        #[arg(long)]
        from: Option<u32>,
        /// The newer version (default: the current one).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Commit a folder inside the project as a new version (makes FOLDER.dvc the first time),
    /// or a dataset by id.
    Add { folder_or_dataset: String },
    /// Remove files from a dataset and commit the result.
    Remove {
        dataset: String,
        /// Paths inside the dataset's folder.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Restore a dataset's folder from the cache (default: the version its .dvc file
    /// names); unsaved workspace files are committed as a version first.
    Checkout {
        dataset: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Upload every version's files and manifests the remote lacks.
    Push {
        /// Only these datasets (default: all).
        datasets: Vec<String>,
        #[arg(long)]
        remote: Option<String>,
    },
    /// Fetch what the .dvc files need from the remote and check them out.
    Pull {
        datasets: Vec<String>,
        #[arg(long)]
        remote: Option<String>,
    },
    /// Remotes in .dvc/config.
    Remote {
        #[command(subcommand)]
        command: RemoteCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Add or replace a remote: a folder, or s3://BUCKET/PREFIX.
    Add {
        name: String,
        url: String,
        /// Make it the default remote (core.remote).
        #[arg(long)]
        default: bool,
        /// S3 endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000.
        #[arg(long)]
        endpoint_url: Option<String>,
        #[arg(long)]
        access_key_id: Option<String>,
        #[arg(long)]
        secret_access_key: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// List the remotes.
    List,
    /// Make a remote the default.
    Default { name: String },
}

fn bar(len: u64, what: &str, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template = if bytes { "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {elapsed} eta {eta}" } else { "{prefix:>8} [{bar:30}] {pos}/{len} objects {elapsed} eta {eta}" };
    pb.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    pb.set_prefix(what.to_string());
    pb
}

fn human(bytes: u64) -> String {
    atelier_engine::memory::format_bytes(bytes)
}

fn selected(project: &Project, ids: &[String]) -> Result<Vec<Dataset>> {
    if ids.is_empty() {
        return Ok(project.all());
    }
    ids.iter().map(|id| Ok(project.dataset(id)?)).collect()
}

pub fn run(args: DatasetsArgs) -> Result<()> {
    let root = &args.project;
    if let DatasetsCommand::Init = args.command {
        Project::init(root)?;
        println!("{} is a DVC project (dvc status, dvc push and dvc pull work there)", root.display());
        return Ok(());
    }
    let project = Project::open(root)?;
    match args.command {
        DatasetsCommand::Init => unreachable!(),
        DatasetsCommand::List => {
            let list = project.list();
            if list.is_empty() {
                println!("no datasets in {}", root.display());
            }
            for d in list {
                let version = d.version.map_or("-".into(), |v| format!("v{v}"));
                let state = d.damaged.map_or("ok".to_string(), |r| format!("DAMAGED: {r}"));
                println!(
                    "{:<40} {:>5} of {:<3} {} {:>6} files {:>10}  {state}",
                    d.id,
                    version,
                    d.versions,
                    d.md5.as_deref().unwrap_or("-"),
                    d.nfiles.unwrap_or(0),
                    human(d.size.unwrap_or(0))
                );
            }
        }
        DatasetsCommand::Show { dataset } => {
            let ds = project.dataset(&dataset)?;
            let info = project.info(&ds);
            println!("dataset {} ({}): {}", info.id, info.dvc_file, info.damaged.as_deref().map_or("ok".into(), |r| format!("DAMAGED: {r}")));
            for v in project.versions(&ds)? {
                let current = if Some(v.number) == info.version { "*" } else { " " };
                println!("{current} v{:<4} {} {:>6} files {:>10}  {}  {}", v.number, v.md5, v.nfiles, human(v.size), v.time, v.summary);
            }
        }
        DatasetsCommand::Diff { dataset, from, to } => {
            let d = project.diff(&project.dataset(&dataset)?, from, to)?;
            println!("{} → v{}: {}", d.from.map_or("nothing".into(), |f| format!("v{f}")), d.to.unwrap_or(0), d.summary());
            for (sign, list) in [("+", &d.images_added), ("-", &d.images_removed), ("~", &d.images_changed)] {
                for f in list {
                    println!("  {sign} {f}");
                }
            }
            for c in &d.captions_changed {
                println!("  caption {}: {:?} → {:?}", c.caption, c.before.as_deref().unwrap_or("(none)"), c.after.as_deref().unwrap_or("(none)"));
            }
        }
        DatasetsCommand::Add { folder_or_dataset } => {
            let path = PathBuf::from(&folder_or_dataset);
            let ds = if path.is_dir() { project.folder_dataset(&path)? } else { project.dataset(&folder_or_dataset)? };
            let pb = bar(atelier_server::datasets::folder_bytes(&ds.folder), "hashing", true);
            let c = project.commit(&ds, None, &mut |n| pb.inc(n))?;
            pb.finish_and_clear();
            if c.new {
                println!("{}: version {} ({}): {}", ds.id, c.version.number, c.version.md5, c.version.summary);
            } else {
                println!("{}: unchanged, still version {} ({})", ds.id, c.version.number, c.version.md5);
            }
        }
        DatasetsCommand::Remove { dataset, files } => {
            let ds = project.dataset(&dataset)?;
            let c = project.remove_files(&ds, &files)?;
            println!("{}: version {} ({}): {}", ds.id, c.version.number, c.version.md5, c.version.summary);
        }
        DatasetsCommand::Checkout { dataset, version } => {
            let ds = project.dataset(&dataset)?;
            let v = project.version(&ds, version)?;
            let pb = bar(v.size, "checkout", true);
            let v = project.checkout(&ds, version, &mut |n| pb.inc(n))?;
            pb.finish_and_clear();
            println!("{}: checked out version {} ({}, {} files)", ds.id, v.number, v.md5, v.nfiles);
        }
        DatasetsCommand::Push { datasets, remote: name } => {
            let r = project.remote(name.as_deref())?;
            let store = RemoteStore::open(&project, &r)?;
            let list = selected(&project, &datasets)?;
            let pb = bar(0, "push", false);
            let report = runtime()?.block_on(remote::push(&project, &list, &store, &|done, total| {
                pb.set_length(total);
                pb.set_position(done);
            }))?;
            pb.finish_and_clear();
            println!("pushed {} object(s) to {} ({}), {} already there", report.moved, r.name, r.url, report.present);
            warn_missing(&report.missing, "not in the local cache");
        }
        DatasetsCommand::Pull { datasets, remote: name } => {
            let r = project.remote(name.as_deref())?;
            let store = RemoteStore::open(&project, &r)?;
            let list = selected(&project, &datasets)?;
            let pb = bar(0, "pull", false);
            let report = runtime()?.block_on(remote::pull(&project, &list, &store, &|done, total| {
                pb.set_length(total);
                pb.set_position(done);
            }))?;
            pb.finish_and_clear();
            println!("pulled {} object(s) from {} ({}), {} already here; {} dataset(s) checked out", report.moved, r.name, r.url, report.present, list.len());
            warn_missing(&report.missing, "not on the remote (older versions)");
        }
        DatasetsCommand::Remote { command } => match command {
            RemoteCommand::Add { name, url, default, endpoint_url, access_key_id, secret_access_key, region } => {
                let r = Remote { name: name.clone(), url, endpointurl: endpoint_url, access_key_id, secret_access_key, region, default };
                project.set_remote(&r, default)?;
                println!("remote {name} → {}{}", r.url, if default { " (default)" } else { "" });
            }
            RemoteCommand::List => {
                for r in project.remotes()? {
                    println!("{}{}\t{}{}", r.name, if r.default { " (default)" } else { "" }, r.url, r.endpointurl.map(|e| format!("  endpoint {e}")).unwrap_or_default());
                }
            }
            RemoteCommand::Default { name } => {
                project.set_default_remote(&name)?;
                println!("default remote: {name}");
            }
        },
    }
    Ok(())
}

fn warn_missing(missing: &[String], why: &str) {
    if !missing.is_empty() {
        eprintln!("warning: {} object(s) {why}:", missing.len());
        for m in missing.iter().take(20) {
            eprintln!("  {m}");
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().context("starting the async runtime")
}
