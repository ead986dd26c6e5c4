//! A style's model-registry versions on its Styles-page card: each version with when it
//! was registered, its rank, steps and similarity gain, and the aliases pointing at it
//! (`production`, `staging`, …); an alias is set or moved with the form and removed with
//! its ×. Prompts then use `<lora:NAME@ALIAS:0.8>`. Data from `GET /api/registry/{name}`;
//! changes through `PUT`/`DELETE /api/registry/{name}/aliases/{alias}`.

use leptos::prelude::*;

use crate::dto::RegisteredModel;

#[component]
pub fn RegistryVersions(name: String) -> impl IntoView {
    let model: RwSignal<Option<RegisteredModel>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let alias = RwSignal::new("production".to_string());
    let version: RwSignal<Option<i64>> = RwSignal::new(None);
    let url = format!("/api/registry/{}", crate::pages::encode_query(&name));

    // Loaded once live; a style without versions (shipped, or trained before the registry)
    // shows nothing.
    {
        let url = url.clone();
        Effect::new(move |_| {
            let url = url.clone();
            #[cfg(feature = "hydrate")]
            leptos::task::spawn_local(async move {
                if let Ok(m) = crate::browser::get_json::<RegisteredModel>(&url).await {
                    version.set(m.versions.first().map(|v| v.version));
                    model.set(Some(m));
                }
            });
            #[cfg(not(feature = "hydrate"))]
            let _ = url;
        });
    }
    let url = StoredValue::new(url);
    let change = move |alias_name: String, to: Option<i64>| {
        let target = format!("{}/aliases/{}", url.get_value(), crate::pages::encode_query(&alias_name));
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            let reply = match to {
                Some(v) => crate::browser::put_json::<_, RegisteredModel>(&target, &serde_json::json!({ "version": v })).await,
                None => crate::browser::delete_json::<RegisteredModel>(&target).await,
            };
            match reply {
                Ok(m) => {
                    error.set(None);
                    model.set(Some(m));
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = (target, to, alias_name);
    };

    move || {
        model.get().filter(|m| !m.versions.is_empty()).map(|m| {
            let rows = m
                .versions
                .iter()
                .map(|v| {
                    let gain = v.tags.get("similarity_gain").and_then(|g| g.parse::<f64>().ok()).map(|g| format!("{g:+.3}")).unwrap_or_default();
                    let badges = v
                        .aliases
                        .iter()
                        .map(|a| {
                            let a2 = a.clone();
                            view! {
                                <span class="badge alias" data-alias=a.clone()>
                                    {format!("@{a}")}
                                    <button type="button" class="remove-alias" title=format!("remove the alias {a}")
                                        on:click=move |_| change(a2.clone(), None)>"×"</button>
                                </span>
                            }
                        })
                        .collect_view();
                    view! {
                        <tr class="version-row" data-version=v.version.to_string()>
                            <td>{format!("v{}", v.version)}</td>
                            <td>{v.tags.get("rank").cloned().unwrap_or_default()}</td>
                            <td>{v.tags.get("steps").cloned().unwrap_or_default()}</td>
                            <td class="num">{gain}</td>
                            <td>{badges}</td>
                        </tr>
                    }
                })
                .collect_view();
            let options = m.versions.iter().map(|v| view! { <option value=v.version.to_string()>{format!("v{}", v.version)}</option> }).collect_view();
            let example = m.aliases.keys().next().map_or_else(|| format!("<lora:{}@1:1>", m.name), |a| format!("<lora:{}@{a}:1>", m.name));
            view! {
                <details class="registry" data-style=m.name.clone() open=true>
                    <summary>{format!("Registry: {} version{}", m.versions.len(), if m.versions.len() == 1 { "" } else { "s" })}</summary>
                    <table class="versions">
                        <thead><tr><th>"version"</th><th>"rank"</th><th>"steps"</th><th>"similarity gain"</th><th>"aliases"</th></tr></thead>
                        <tbody>{rows}</tbody>
                    </table>
                    <form class="set-alias" on:submit=move |ev| {
                        ev.prevent_default();
                        if let Some(v) = version.get_untracked() {
                            change(alias.get_untracked(), Some(v));
                        }
                    }>
                        <input type="text" class="alias-name" prop:value=move || alias.get() on:input=move |ev| alias.set(event_target_value(&ev)) />
                        <select class="alias-version" on:change=move |ev| version.set(event_target_value(&ev).parse().ok())>{options}</select>
                        <button type="submit">"Set alias"</button>
                    </form>
                    <p class="muted details">"Use a version in a prompt as " <code>{example}</code></p>
                    {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
                </details>
            }
        })
    }
}
