//! `atelier deploy`: deployments from the command line: `create NAME TARGET` (`TARGET` is
//! `STYLE@ALIAS`, `STYLE@NUMBER` or a registered baked blend; `--to URL --token T` pushes
//! it to another Atelier server), `list`, `show NAME`, `delete NAME`.
//!
//! Works on the data folder directly (`--data-dir`, as `atelier registry` does; `create`
//! then checks the target against `--model`'s hash), or on a running studio with
//! `--server URL` (its `/api/deployments`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use app::dto::{DeploymentDefaults, DeploymentInfo, NewDeployment};
use atelier_server::deployments::{self, DeploymentStore};

/// Arguments of `atelier deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
    /// The studio's data folder (deployments in DATA/deployments, the registry in
    /// DATA/tracking).
    #[arg(long, global = true, env = "ATELIER_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Talk to this running studio (e.g. http://127.0.0.1:3000) instead of the data folder.
    #[arg(long, global = true)]
    server: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum DeployCommand {
    /// Every deployment with the version its target resolves to now.
    List,
    /// One deployment.
    Show { name: String },
    /// Creates a deployment serving TARGET (STYLE@ALIAS follows the alias as it moves;
    /// STYLE@NUMBER stays on one version).
    Create {
        name: String,
        target: String,
        /// The adapter's weight in every prompt.
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        /// Default denoising steps.
        #[arg(long, default_value_t = DeploymentDefaults::default().steps)]
        steps: usize,
        /// Default guidance (CFG) scale.
        #[arg(long, default_value_t = DeploymentDefaults::default().guidance)]
        cfg: f64,
        /// Default scheduler id (ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras).
        #[arg(long, default_value_t = DeploymentDefaults::default().scheduler)]
        sampler: String,
        /// Default size in pixels (default: the model's native size).
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// Default negative prompt.
        #[arg(long, default_value = "")]
        negative_prompt: String,
        /// Push the version to this other Atelier server and create the deployment there.
        #[arg(long)]
        to: Option<String>,
        /// The token the server given by --to was started with (--deploy-token).
        #[arg(long, env = "ATELIER_DEPLOY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Do not score what it serves for quality drift (monitoring is on by default: a
        /// reference is measured when the studio first serves it).
        #[arg(long)]
        no_monitor: bool,
        /// The model the studio serves (local mode: targets trained for another base model
        /// are refused).
        #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
        model: PathBuf,
    },
    /// Removes a deployment.
    Delete { name: String },
}

pub fn run(args: DeployArgs) -> Result<()> {
    match &args.server {
        Some(url) => remote(url.trim_end_matches('/'), args.command),
        None => local(&args.data_dir, args.command),
    }
}

fn print(list: &[DeploymentInfo]) {
    if list.is_empty() {
        println!("no deployments yet: atelier deploy create NAME STYLE@production");
        return;
    }
    let mut rows = vec![["name", "target", "serves", "weight", "steps", "cfg", "sampler", "remote"].map(String::from).to_vec()];
    for i in list {
        let d = &i.deployment;
        let name = d.target.split('@').next().unwrap_or("");
        rows.push(vec![
            d.name.clone(),
            d.target.clone(),
            i.version.map_or_else(|| format!("- ({})", i.problem.clone().unwrap_or_default()), |v| format!("{name}@{v}")),
            d.weight.to_string(),
            d.defaults.steps.to_string(),
            d.defaults.guidance.to_string(),
            d.defaults.scheduler.clone(),
            d.remote.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

#[allow(clippy::too_many_arguments)]
fn new_deployment(command: &DeployCommand) -> Option<NewDeployment> {
    let DeployCommand::Create { name, target, weight, steps, cfg, sampler, width, height, negative_prompt, to, token, no_monitor, .. } = command else { return None };
    Some(NewDeployment {
        name: name.clone(),
        target: target.clone(),
        weight: *weight,
        defaults: DeploymentDefaults { width: *width, height: *height, steps: *steps, guidance: *cfg, scheduler: sampler.clone(), negative_prompt: negative_prompt.clone() },
        to: to.clone(),
        token: token.clone(),
        monitor: !*no_monitor,
        monitoring: None,
    })
}

fn local(data: &std::path::Path, command: DeployCommand) -> Result<()> {
    let store = DeploymentStore::in_data_dir(data);
    let tracking = data.join("tracking");
    let api = |e: atelier_server::ApiError| anyhow::anyhow!("{e}");
    match &command {
        DeployCommand::List => print(&store.list().into_iter().map(|d| deployments::info(&tracking, d)).collect::<Vec<_>>()),
        DeployCommand::Show { name } => print(&[deployments::info(&tracking, store.get(name).map_err(api)?)]),
        DeployCommand::Delete { name } => {
            store.delete(name).map_err(api)?;
            println!("deleted deployment {name}");
        }
        DeployCommand::Create { model, .. } => {
            let new = new_deployment(&command).expect("create");
            if store.list().iter().any(|d| d.name == new.name) {
                bail!("a deployment called {} exists; delete it first or choose another name", new.name);
            }
            let dir = atelier_engine::model::resolve(&model.to_string_lossy()).with_context(|| format!("finding the model {}", model.display()))?;
            let hash = atelier_server::blends::model_hash(&dir).with_context(|| format!("hashing the model in {}", dir.display()))?;
            let (mut deployment, version) = deployments::prepare(&tracking, &hash, &new).map_err(api)?;
            if let Some(url) = new.to.as_deref() {
                deployments::remote::push(url, new.token.as_deref().unwrap_or(""), &deployment, &version).map_err(api)?;
                deployment.remote = Some(url.trim_end_matches('/').to_string());
                println!("pushed {}@{} to {url}; deployment {} created there", version.name, version.version, deployment.name);
            }
            store.save(&deployment).map_err(api)?;
            print(&[deployments::info(&tracking, deployment)]);
        }
    }
    Ok(())
}

fn remote(url: &str, command: DeployCommand) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let answer = |result: Result<ureq::http::Response<ureq::Body>, ureq::Error>| -> Result<String> {
        let mut resp = result.with_context(|| format!("cannot reach the studio at {url}"))?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<app::dto::ErrorBody>(&text).map(|b| b.error).unwrap_or(text);
            bail!("{url} answered {status}: {message}");
        }
        Ok(text)
    };
    match &command {
        DeployCommand::List => print(&serde_json::from_str::<Vec<DeploymentInfo>>(&answer(agent.get(format!("{url}/api/deployments")).call())?)?),
        DeployCommand::Show { name } => print(&[serde_json::from_str::<DeploymentInfo>(&answer(agent.get(format!("{url}/api/deployments/{name}")).call())?)?]),
        DeployCommand::Delete { name } => {
            answer(agent.delete(format!("{url}/api/deployments/{name}")).call())?;
            println!("deleted deployment {name}");
        }
        DeployCommand::Create { .. } => {
            let new = new_deployment(&command).expect("create");
            let text = answer(agent.post(format!("{url}/api/deployments")).send_json(&new))?;
            print(&[serde_json::from_str::<DeploymentInfo>(&text)?]);
        }
    }
    Ok(())
}
