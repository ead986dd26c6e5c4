//! The Deployments page (`/deployments`): every deployment with the registry version it
//! serves now (its alias followed as it moves), its default settings and where it was
//! pushed; a form to create one (a registered style or baked blend, then an alias or a
//! version of it, weight and defaults, optionally another Atelier server to push it to),
//! and Delete. Data from `GET /api/deployments` and `GET /api/registry`; changes through
//! `POST /api/deployments` and `DELETE /api/deployments/{name}`.

use leptos::prelude::*;

use crate::components::monitoring::DeploymentMonitoring;
use crate::dto::{DeploymentDefaults, DeploymentInfo, NewDeployment, RegisteredModel, SCHEDULERS};

#[component]
pub fn DeploymentsPage() -> impl IntoView {
    let list: RwSignal<Option<Vec<DeploymentInfo>>> = RwSignal::new(None);
    let models: RwSignal<Vec<RegisteredModel>> = RwSignal::new(Vec::new());
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let refresh = RwSignal::new(0u32);

    let name = RwSignal::new(String::new());
    let style = RwSignal::new(String::new());
    let selector = RwSignal::new(String::new());
    let weight = RwSignal::new("0.8".to_string());
    let steps = RwSignal::new(DeploymentDefaults::default().steps.to_string());
    let cfg = RwSignal::new(DeploymentDefaults::default().guidance.to_string());
    let scheduler = RwSignal::new(DeploymentDefaults::default().scheduler);
    let negative = RwSignal::new(String::new());
    let to = RwSignal::new(String::new());
    let token = RwSignal::new(String::new());

    // Loaded live (effects run in the browser only), again after each change.
    Effect::new(move |_| {
        refresh.track();
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::get_json::<Vec<DeploymentInfo>>("/api/deployments").await {
                Ok(l) => list.set(Some(l)),
                Err(e) => error.set(Some(e)),
            }
            if let Ok(m) = crate::browser::get_json::<Vec<RegisteredModel>>("/api/registry").await {
                if style.get_untracked().is_empty() {
                    if let Some(first) = m.first() {
                        style.set(first.name.clone());
                        selector.set(first.aliases.keys().next().cloned().or_else(|| first.versions.first().map(|v| v.version.to_string())).unwrap_or_default());
                    }
                }
                models.set(m);
            }
        });
    });

    // The aliases and versions of the chosen style, aliases first.
    let choices = move || {
        let chosen = style.get();
        models.with(|ms| {
            ms.iter()
                .find(|m| m.name == chosen)
                .map(|m| {
                    let mut out: Vec<(String, String)> = m.aliases.iter().map(|(a, v)| (a.clone(), format!("{a} (version {v})"))).collect();
                    out.extend(m.versions.iter().map(|v| (v.version.to_string(), format!("version {}", v.version))));
                    out
                })
                .unwrap_or_default()
        })
    };

    let create = move |_| {
        let parse_f = |s: String, field: &str| s.trim().parse::<f64>().map_err(|_| format!("{field}: {s:?} is not a number"));
        let request = (|| {
            Ok::<_, String>(NewDeployment {
                name: name.get_untracked().trim().to_string(),
                target: format!("{}@{}", style.get_untracked(), selector.get_untracked()),
                weight: parse_f(weight.get_untracked(), "weight")?,
                defaults: DeploymentDefaults {
                    width: None,
                    height: None,
                    steps: steps.get_untracked().trim().parse().map_err(|_| "steps: a whole number".to_string())?,
                    guidance: parse_f(cfg.get_untracked(), "CFG")?,
                    scheduler: scheduler.get_untracked(),
                    negative_prompt: negative.get_untracked(),
                },
                to: Some(to.get_untracked().trim().to_string()).filter(|t| !t.is_empty()),
                token: Some(token.get_untracked()).filter(|t| !t.is_empty()),
                monitor: true,
                monitoring: None,
            })
        })();
        match request {
            Err(e) => error.set(Some(e)),
            Ok(request) => {
                #[cfg(feature = "hydrate")]
                leptos::task::spawn_local(async move {
                    match crate::browser::post_json::<_, DeploymentInfo>("/api/deployments", &request).await {
                        Ok(_) => {
                            error.set(None);
                            name.set(String::new());
                        }
                        Err(e) => error.set(Some(e)),
                    }
                    refresh.update(|n| *n += 1);
                });
                #[cfg(not(feature = "hydrate"))]
                let _ = request;
            }
        }
    };

    let delete = move |deployment: String| {
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            let url = format!("/api/deployments/{}", super::encode_query(&deployment));
            match gloo_net::http::Request::delete(&url).send().await {
                Ok(r) if r.ok() => error.set(None),
                Ok(r) => error.set(Some(r.json::<crate::dto::ErrorBody>().await.map(|b| b.error).unwrap_or_else(|_| format!("the server answered {}", r.status())))),
                Err(_) => error.set(Some("cannot reach the server; is it running?".into())),
            }
            refresh.update(|n| *n += 1);
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = deployment;
    };

    view! {
        <section class="deployments">
            <h1>"Deployments"</h1>
            <p class="muted">
                "A deployment serves a registered style version at " <code>"POST /api/v1/deployments/NAME/generate"</code>
                " and through the AUTOMATIC1111 API (" <code>"/sdapi/v1"</code> ", option " <code>"sd_model_checkpoint"</code>
                " = NAME). Bound to an alias such as production, it follows the alias: promote or roll back on the Styles page and the next request serves the new version; requests already accepted finish on theirs."
            </p>
            {move || error.get().map(|m| view! { <p class="error">{m}</p> })}
            {move || match list.get() {
                None => view! { <p class="muted">"Loading deployments…"</p> }.into_any(),
                Some(l) if l.is_empty() => view! { <p class="muted">"No deployments yet."</p> }.into_any(),
                Some(l) => view! {
                    <table class="deployment-list">
                        <thead><tr>
                            <th>"Name"</th><th>"Target"</th><th>"Serves"</th><th>"Weight"</th><th>"Steps"</th><th>"CFG"</th><th>"Scheduler"</th><th>"Pushed to"</th><th></th>
                        </tr></thead>
                        <tbody>
                            {l.into_iter().map(|i| {
                                let d = i.deployment.clone();
                                let serving = match (i.version, i.problem.clone()) {
                                    (Some(v), _) => format!("{}@{v}", d.target.split('@').next().unwrap_or("")),
                                    (None, p) => format!("— {}", p.unwrap_or_default()),
                                };
                                let gone = d.name.clone();
                                // Quality monitoring under each deployment served here.
                                let monitored = (d.monitor && d.remote.is_none()).then(|| {
                                    let name = d.name.clone();
                                    view! { <tr class="monitoring-row" data-name=d.name.clone()><td colspan="9"><DeploymentMonitoring name=name /></td></tr> }.into_any()
                                });
                                view! {
                                    <tr data-name=d.name.clone()>
                                        <td>{d.name.clone()}</td>
                                        <td><code>{d.target.clone()}</code></td>
                                        <td class="serves">{serving}</td>
                                        <td>{d.weight}</td>
                                        <td>{d.defaults.steps}</td>
                                        <td>{d.defaults.guidance}</td>
                                        <td>{d.defaults.scheduler.clone()}</td>
                                        <td>{d.remote.clone().unwrap_or_default()}</td>
                                        <td><button type="button" class="delete secondary" on:click=move |_| delete(gone.clone())>"Delete"</button></td>
                                    </tr>
                                    {monitored}
                                }.into_any()
                            }).collect_view()}
                        </tbody>
                    </table>
                }.into_any(),
            }}
            <h2>"New deployment"</h2>
            <form class="deployment-form" on:submit=move |ev| { ev.prevent_default(); create(()); }>
                <label>"Name " <input type="text" name="name" prop:value=move || name.get() on:input=move |ev| name.set(event_target_value(&ev)) /></label>
                <label>"Style "
                    <select name="style" on:change=move |ev| {
                        let chosen = event_target_value(&ev);
                        let first = models.with_untracked(|ms| ms.iter().find(|m| m.name == chosen).and_then(|m| m.aliases.keys().next().cloned().or_else(|| m.versions.first().map(|v| v.version.to_string()))));
                        style.set(chosen);
                        selector.set(first.unwrap_or_default());
                    }>
                        {move || models.get().into_iter().map(|m| {
                            let n = m.name.clone();
                            view! { <option value=n.clone() selected=move || style.get() == n>{m.name.clone()}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Alias or version "
                    <select name="selector" on:change=move |ev| selector.set(event_target_value(&ev))>
                        {move || choices().into_iter().map(|(value, label)| {
                            let v = value.clone();
                            view! { <option value=value selected=move || selector.get() == v>{label}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Weight " <input type="number" step="0.05" name="weight" prop:value=move || weight.get() on:input=move |ev| weight.set(event_target_value(&ev)) /></label>
                <label>"Steps " <input type="number" min="1" name="steps" prop:value=move || steps.get() on:input=move |ev| steps.set(event_target_value(&ev)) /></label>
                <label>"CFG " <input type="number" step="0.5" name="cfg" prop:value=move || cfg.get() on:input=move |ev| cfg.set(event_target_value(&ev)) /></label>
                <label>"Scheduler "
                    <select name="scheduler" on:change=move |ev| scheduler.set(event_target_value(&ev))>
                        {SCHEDULERS.iter().map(|(id, label)| {
                            let id = id.to_string();
                            let current = id.clone();
                            view! { <option value=id selected=move || scheduler.get() == current>{*label}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Negative prompt " <input type="text" name="negative_prompt" prop:value=move || negative.get() on:input=move |ev| negative.set(event_target_value(&ev)) /></label>
                <label>"Push to server (optional) " <input type="url" name="to" placeholder="http://serving:3000" prop:value=move || to.get() on:input=move |ev| to.set(event_target_value(&ev)) /></label>
                <label>"Its deploy token " <input type="password" name="token" prop:value=move || token.get() on:input=move |ev| token.set(event_target_value(&ev)) /></label>
                <button type="submit">"Deploy"</button>
            </form>
        </section>
    }
}
