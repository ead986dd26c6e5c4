//! One line on the Experiments page saying where the mirror to MLflow stands: the server
//! and "all runs synced", or "N runs waiting to sync" with the reason while the server
//! cannot be reached, and any run it refused. Nothing when no server is configured.
//! Polls `GET /api/tracking/sync` every 5 s while the page is open.

use leptos::prelude::*;

use crate::dto::MirrorStatus;

#[component]
pub fn SyncStatus() -> impl IntoView {
    let status: RwSignal<Option<MirrorStatus>> = RwSignal::new(None);
    let fetch = move || {
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            if let Ok(s) = crate::browser::get_json::<MirrorStatus>("/api/tracking/sync").await {
                status.set(Some(s));
            }
        });
    };
    // Effects run in the browser only: a first look, then every 5 s while mounted.
    Effect::new(move |_| {
        fetch();
        if let Ok(handle) = set_interval_with_handle(fetch, std::time::Duration::from_secs(5)) {
            on_cleanup(move || handle.clear());
        }
    });
    move || {
        status.get().and_then(|s| {
            let uri = s.uri.clone()?;
            let (class, text) = if s.pending == 0 {
                ("sync-status ok", format!("Runs mirrored to MLflow at {uri}: all synced."))
            } else {
                let why = s.last_error.clone().map(|e| format!(" ({e})")).unwrap_or_default();
                (
                    "sync-status waiting",
                    format!("Runs mirrored to MLflow at {uri}: {} run{} waiting to sync{why}.", s.pending, if s.pending == 1 { "" } else { "s" }),
                )
            };
            let refused = s.refused.iter().map(|(run, m)| view! { <li>{format!("{}: {m}", &run[..run.len().min(8)])}</li> }).collect_view();
            Some(view! {
                <div class=class data-pending=s.pending.to_string()>
                    <p>{text}</p>
                    {(!s.refused.is_empty()).then(|| view! { <p>"Refused by the server (not retried until the run changes):"</p><ul>{refused}</ul> })}
                </div>
            })
        })
    }
}
