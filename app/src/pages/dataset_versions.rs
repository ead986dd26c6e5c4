//! The versions of an uploaded dataset on the Train page: every DVC version Atelier
//! committed (number, time, file count, what changed), and for the chosen one the diff to
//! the version before it with thumbnails of the images added, removed and changed and the
//! captions edited. Reads `GET /api/datasets/{id}` and `GET /api/datasets/{id}/diff`.

use leptos::prelude::*;
use serde::Deserialize;

/// One version (as `/api/datasets/{id}` lists it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DatasetVersion {
    pub number: u32,
    pub md5: String,
    pub size: u64,
    pub nfiles: u64,
    pub time: String,
    pub summary: String,
}

/// The dataset part of `/api/datasets/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DatasetVersionInfo {
    pub version: Option<u32>,
    pub damaged: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DatasetVersionList {
    pub dataset: DatasetVersionInfo,
    pub versions: Vec<DatasetVersion>,
}

/// A caption added, removed or edited.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CaptionEdit {
    pub caption: String,
    pub image: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// `/api/datasets/{id}/diff`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DatasetDiff {
    pub from: Option<u32>,
    pub to: Option<u32>,
    pub images_added: Vec<String>,
    pub images_removed: Vec<String>,
    pub images_changed: Vec<String>,
    pub captions_changed: Vec<CaptionEdit>,
}

fn encode_path(relpath: &str) -> String {
    relpath.split('/').map(super::encode_query).collect::<Vec<_>>().join("/")
}

#[component]
pub fn DatasetVersions(id: String) -> impl IntoView {
    let list = RwSignal::new(None::<Result<DatasetVersionList, String>>);
    let chosen = RwSignal::new(None::<u32>);
    let diff = RwSignal::new(None::<Result<DatasetDiff, String>>);
    #[cfg(feature = "hydrate")]
    {
        let url = format!("/api/datasets/{id}");
        leptos::task::spawn_local(async move {
            let got: Result<DatasetVersionList, String> = crate::browser::get_json(&url).await;
            if let Ok(l) = &got {
                chosen.set(l.versions.last().map(|v| v.number));
            }
            list.set(Some(got));
        });
        let diff_id = id.clone();
        Effect::new(move |_| {
            let Some(n) = chosen.get() else { return };
            let url = format!("/api/datasets/{diff_id}/diff?to={n}");
            leptos::task::spawn_local(async move { diff.set(Some(crate::browser::get_json(&url).await)) });
        });
    }
    let file_url = {
        let id = id.clone();
        move |version: u32, relpath: &str| format!("/api/datasets/{id}/versions/{version}/files/{}?thumb=96", encode_path(relpath))
    };
    view! {
        <div class="dataset-versions">
            <h3>"Versions (DVC)"</h3>
            {move || match list.get() {
                None => view! { <p class="muted">"Loading versions…"</p> }.into_any(),
                Some(Err(e)) => view! { <p class="error">{e}</p> }.into_any(),
                Some(Ok(l)) => {
                    let current = l.dataset.version;
                    view! {
                        {l.dataset.damaged.map(|d| view! { <p class="error damaged">"Damaged: " {d}</p> })}
                        <ol class="versions">
                            {l.versions.into_iter().rev().map(|v| {
                                let n = v.number;
                                let title = v.md5.clone();
                                view! {
                                    <li class:current=move || current == Some(n) class:chosen=move || chosen.get() == Some(n) data-version=n.to_string()>
                                        <button type="button" class="link" title=title on:click=move |_| chosen.set(Some(n))>{format!("v{n}")}</button>
                                        " " <span class="muted">{v.time.clone()}</span>
                                        " · " {format!("{} files", v.nfiles)} " · " <span class="summary">{v.summary.clone()}</span>
                                    </li>
                                }
                            }).collect_view()}
                        </ol>
                    }.into_any()
                }
            }}
            {move || diff.get().map(|d| match d {
                Err(e) => view! { <p class="error">{e}</p> }.into_any(),
                Ok(d) => {
                    let to = d.to.unwrap_or(0);
                    let from = d.from;
                    let group = |label: &'static str, class: &'static str, version: Option<u32>, files: Vec<String>| {
                        let file_url = file_url.clone();
                        (!files.is_empty()).then(|| view! {
                            <div class=format!("diff-group {class}")>
                                <h4>{format!("{label} ({})", files.len())}</h4>
                                <ul class="version-thumbs">
                                    {files.into_iter().map(|f| view! {
                                        <li><img src=file_url(version.unwrap_or(to), &f) alt=f.clone() title=f.clone() /></li>
                                    }).collect_view()}
                                </ul>
                            </div>
                        })
                    };
                    view! {
                        <div class="version-diff" data-to=to.to_string()>
                            <p>{match from { Some(f) => format!("v{f} → v{to}"), None => format!("v{to}: the first version") }}</p>
                            {group("Added", "added", Some(to), d.images_added)}
                            {group("Removed", "removed", from, d.images_removed)}
                            {group("Changed", "changed", Some(to), d.images_changed)}
                            {(!d.captions_changed.is_empty()).then(|| view! {
                                <table class="captions-changed">
                                    <caption>"Captions changed"</caption>
                                    <tbody>
                                        {d.captions_changed.into_iter().map(|c| view! {
                                            <tr>
                                                <td>{c.image.unwrap_or(c.caption)}</td>
                                                <td class="before">{c.before.unwrap_or_else(|| "(none)".into())}</td>
                                                <td class="after">{c.after.unwrap_or_else(|| "(none)".into())}</td>
                                            </tr>
                                        }).collect_view()}
                                    </tbody>
                                </table>
                            })}
                        </div>
                    }.into_any()
                }
            })}
        </div>
    }
}
